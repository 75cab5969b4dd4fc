//! Long work over the whole keyspace — `KAMSYNC.RESYNC` and `KAMSYNC.CHECK [REPAIR]` — done in
//! small batches from a timer, so that Redis keeps answering meanwhile.
//!
//! Each batch scans with `SCAN ... MATCH <prefix>* COUNT n` and handles what it gets until
//! [`BATCH_BUDGET`] is spent, then yields: the next batch is a zero-delay timer, which Redis runs
//! only after serving the clients that are ready. SCAN returns every key that exists for the
//! whole run at least once, perhaps more than once; every step is idempotent, and writes made
//! by clients meanwhile are synced by the normal write path. One task runs at a time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis_module::{BlockedClient, Context, RedisValue, ThreadSafeContext};

use crate::calls::{Calls, Reply};
use crate::config::{self, Config};
use crate::error::SyncError;
use crate::events::OwnWrites;
use crate::mapping::Kind;
use crate::stats;
use crate::sync::{Action, Adoption, Finding, Syncer};

/// Work per batch before yielding to clients.
pub const BATCH_BUDGET: Duration = Duration::from_micros(1000);
/// Keys asked of one SCAN call: small enough that handling them stays within the budget.
const SCAN_COUNT: &str = "16";
/// Most entities RESYNC puts off for its second pass. Beyond this (a large dataset where few
/// documents carry ids) the rest get new ids at once: memory stays bounded, and ids issued
/// early are still never adopted twice (see `Adoption`).
const MAX_DEFERRED: usize = 100_000;
/// Examples of each problem kept for the CHECK report.
const EXAMPLES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Resync,
    Check { repair: bool },
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Resync => "resync",
            TaskKind::Check { repair: false } => "check",
            TaskKind::Check { repair: true } => "check repair",
        }
    }
}

/// One pass of a task: the entities of a kind, or the rows of a kind's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Entities(Kind),
    /// RESYNC's second pass: the new entities the first pass put off until every id carried
    /// by a document was adopted.
    Deferred,
    Rows(Kind),
}

/// Counts of a task, shown by STATUS and INFO while it runs and after it ended.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub scanned: u64,
    pub synced: u64,
    pub rejected: u64,
    pub in_step: u64,
    pub missing: u64,
    pub differs: u64,
    pub conflicts: u64,
    pub orphans: u64,
    pub invalid: u64,
    pub repaired: u64,
    pub batches: u64,
    /// Longest batch, in microseconds.
    pub longest_batch_us: u64,
}

/// A problem CHECK found, for its report.
#[derive(Debug, Clone)]
pub struct Example {
    pub problem: &'static str,
    pub key: String,
    pub detail: String,
}

pub struct Task {
    pub kind: TaskKind,
    pub db: i32,
    phases: Vec<Phase>,
    phase: usize,
    cursor: String,
    pub started: Instant,
    pub started_ms: i64,
    /// DBSIZE when the task started, for the "remaining" estimate.
    pub keys_at_start: u64,
    pub progress: Progress,
    pub examples: Vec<Example>,
    adoption: Adoption,
    /// Entity keys RESYNC put off (see [`Phase::Deferred`]).
    deferred: Vec<Vec<u8>>,
    /// The client waiting for CHECK's report.
    waiting: Option<BlockedClient>,
    aborted: bool,
}

/// A finished task, as STATUS shows it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub kind: TaskKind,
    pub db: i32,
    pub outcome: &'static str,
    pub duration_ms: u64,
    pub progress: Progress,
}

static RUNNING: Mutex<Option<Task>> = Mutex::new(None);
static LAST: Mutex<Option<Finished>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running task as STATUS and INFO show it.
#[derive(Debug, Clone)]
pub struct Running {
    pub kind: TaskKind,
    pub db: i32,
    pub progress: Progress,
    /// Keys not scanned yet, estimated from DBSIZE at the start.
    pub remaining: u64,
    pub elapsed_ms: u64,
}

/// What STATUS and INFO show: the running task or the last one.
pub fn snapshot() -> (Option<Running>, Option<Finished>) {
    let running = lock(&RUNNING).as_ref().map(|t| Running {
        kind: t.kind,
        db: t.db,
        progress: t.progress.clone(),
        remaining: t.keys_at_start.saturating_sub(t.progress.scanned),
        elapsed_ms: t.started.elapsed().as_millis() as u64,
    });
    (running, lock(&LAST).clone())
}

/// Refuses when a task runs already (checked before a client is blocked for CHECK).
pub fn ensure_idle() -> Result<(), SyncError> {
    match lock(&RUNNING).as_ref() {
        Some(task) => Err(busy(task)),
        None => Ok(()),
    }
}

fn busy(task: &Task) -> SyncError {
    SyncError::Busy(format!(
        "a {} is already running ({} keys scanned); KAMSYNC.STATUS shows its progress, \
         KAMSYNC.RESYNC ABORT stops it",
        task.kind.name(),
        task.progress.scanned
    ))
}

/// Starts a task in the client's database. `waiting` gets the report when it ends (CHECK).
pub fn start(
    ctx: &Context,
    kind: TaskKind,
    waiting: Option<BlockedClient>,
) -> Result<(), SyncError> {
    let mut running = lock(&RUNNING);
    if let Some(task) = running.as_ref() {
        return Err(busy(task));
    }
    let db = Calls::selected_db(ctx);
    let keys_at_start = match Calls::new(ctx).read("DBSIZE", &[])? {
        Reply::Int(n) => n.max(0) as u64,
        _ => 0,
    };
    let mut phases = vec![Phase::Entities(Kind::Domain), Phase::Entities(Kind::Credential)];
    match kind {
        TaskKind::Resync => phases.push(Phase::Deferred),
        TaskKind::Check { .. } => {
            phases.extend([Phase::Rows(Kind::Domain), Phase::Rows(Kind::Credential)])
        }
    }
    *running = Some(Task {
        kind,
        db,
        phases,
        phase: 0,
        cursor: "0".into(),
        started: Instant::now(),
        started_ms: chrono::Utc::now().timestamp_millis(),
        keys_at_start,
        progress: Progress::default(),
        examples: Vec::new(),
        adoption: Adoption::default(),
        deferred: Vec::new(),
        waiting,
        aborted: false,
    });
    drop(running);
    crate::log::notice(ctx, &format!("{} started in db {db} ({keys_at_start} keys)", kind.name()));
    ctx.create_timer(Duration::ZERO, tick, ());
    Ok(())
}

/// Asks the running task to stop after its current batch. False if none runs.
pub fn abort() -> bool {
    match lock(&RUNNING).as_mut() {
        Some(task) => {
            task.aborted = true;
            true
        }
        None => false,
    }
}

fn tick(ctx: &Context, (): ()) {
    let result = catch_unwind(AssertUnwindSafe(|| run_batch(ctx)));
    let again = match result {
        Ok(again) => again,
        Err(_) => {
            crate::log::warning(ctx, "internal error in a background task (a bug); task stopped");
            finish(ctx, "failed");
            false
        }
    };
    if again {
        ctx.create_timer(Duration::ZERO, tick, ());
    }
}

/// One batch. True when there is more to do.
fn run_batch(ctx: &Context) -> bool {
    let mut guard = lock(&RUNNING);
    let Some(task) = guard.as_mut() else { return false };
    let repairs = !matches!(task.kind, TaskKind::Check { repair: false });
    if task.aborted || (repairs && is_replica(ctx)) {
        drop(guard);
        finish(ctx, "aborted");
        return false;
    }
    let config = config::get().clone();
    let _own_writes = OwnWrites::hold();
    let adoption = std::mem::take(&mut task.adoption);
    let mut syncer = Syncer::new(Calls::new(ctx), config.clone()).for_command(adoption);
    let started = Instant::now();
    let mut done = false;
    while started.elapsed() < BATCH_BUDGET {
        let Some(&phase) = task.phases.get(task.phase) else {
            done = true;
            break;
        };
        if let Err(err) = scan_step(&mut syncer, &config, task, phase) {
            crate::log::warning(ctx, &format!("{} stopped: {err}", task.kind.name()));
            task.aborted = true;
            break;
        }
    }
    task.adoption = syncer.finish();
    let spent = started.elapsed().as_micros() as u64;
    task.progress.batches += 1;
    task.progress.longest_batch_us = task.progress.longest_batch_us.max(spent);
    let aborted = task.aborted;
    drop(guard);
    if done || aborted {
        finish(ctx, if done { "done" } else { "aborted" });
        return false;
    }
    true
}

fn is_replica(ctx: &Context) -> bool {
    ctx.get_flags().contains(redis_module::ContextFlags::SLAVE)
}

fn pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

/// One SCAN call of the current phase, and the handling of what it returned.
fn scan_step(
    syncer: &mut Syncer,
    config: &Config,
    task: &mut Task,
    phase: Phase,
) -> Result<(), SyncError> {
    let pattern = match phase {
        Phase::Entities(kind) => pattern(config.prefix(kind)),
        Phase::Rows(kind) => pattern(&format!("{}:entry::", config.table(kind))),
        Phase::Deferred => return deferred_step(syncer, task),
    };
    let (cursor, keys) = syncer.scan(task.db, &task.cursor, &pattern, SCAN_COUNT)?;
    syncer.defer_fresh_ids = task.kind == TaskKind::Resync && task.deferred.len() < MAX_DEFERRED;
    for key in keys {
        task.progress.scanned += 1;
        match phase {
            Phase::Rows(kind) => handle_row(syncer, task, kind, &key)?,
            _ => handle_entity(syncer, task, &key),
        }
    }
    if cursor == "0" {
        task.phase += 1;
    }
    task.cursor = cursor;
    Ok(())
}

/// A slice of the put-off entities, now issued ids from the sequence.
fn deferred_step(syncer: &mut Syncer, task: &mut Task) -> Result<(), SyncError> {
    syncer.defer_fresh_ids = false;
    let at = task.deferred.len().saturating_sub(64);
    for key in task.deferred.split_off(at) {
        handle_entity(syncer, task, &key);
    }
    if task.deferred.is_empty() {
        task.phase += 1;
    }
    Ok(())
}

fn handle_entity(syncer: &mut Syncer, task: &mut Task, key: &[u8]) {
    let db = task.db;
    let TaskKind::Check { repair } = task.kind else {
        match syncer.reconcile(db, key) {
            Ok(Action::Deferred) => task.deferred.push(key.to_vec()),
            Ok(_) => task.progress.synced += 1,
            Err(_) => task.progress.rejected += 1,
        }
        return;
    };
    let finding = match syncer.inspect(db, key) {
        Ok(finding) => finding,
        Err(err) => Finding::Invalid(err.to_string()),
    };
    let (problem, detail, fixable) = match finding {
        Finding::InStep => {
            task.progress.in_step += 1;
            return;
        }
        Finding::Invalid(why) => {
            task.progress.invalid += 1;
            ("invalid", why, false)
        }
        Finding::Missing { row } => {
            task.progress.missing += 1;
            ("missing", row, true)
        }
        Finding::Differs { row } => {
            task.progress.differs += 1;
            ("differs", row, true)
        }
        Finding::Conflict { row, owner } => {
            task.progress.conflicts += 1;
            ("conflict", format!("{row} belongs to {owner}"), false)
        }
    };
    task.example(problem, key, detail);
    if repair && fixable && syncer.reconcile(db, key).is_ok() {
        task.progress.repaired += 1;
    }
}

fn handle_row(
    syncer: &mut Syncer,
    task: &mut Task,
    kind: Kind,
    row: &[u8],
) -> Result<(), SyncError> {
    if !syncer.is_orphan_row(task.db, kind, row)? {
        return Ok(());
    }
    task.progress.orphans += 1;
    task.example("orphan", row, "no entity owns this row".into());
    if task.kind == (TaskKind::Check { repair: true }) {
        syncer.remove_orphan_row(task.db, kind, row)?;
        task.progress.repaired += 1;
    }
    Ok(())
}

impl Task {
    fn example(&mut self, problem: &'static str, key: &[u8], detail: String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(Example { problem, key: stats::printable_key(key), detail });
        }
    }
}

fn finish(ctx: &Context, outcome: &'static str) {
    let Some(mut task) = lock(&RUNNING).take() else { return };
    let duration_ms = task.started.elapsed().as_millis() as u64;
    let p = &task.progress;
    let summary = match task.kind {
        TaskKind::Resync => format!(
            "resync {outcome} in db {} after {duration_ms} ms: {} keys scanned, {} synced, {} \
             rejected (KAMSYNC.STATUS lists the last errors)",
            task.db, p.scanned, p.synced, p.rejected
        ),
        TaskKind::Check { .. } => format!(
            "{} {outcome} in db {} after {duration_ms} ms: {} scanned, {} in step, {} missing, \
             {} differ, {} conflicts, {} orphan rows, {} invalid, {} repaired",
            task.kind.name(),
            task.db,
            p.scanned,
            p.in_step,
            p.missing,
            p.differs,
            p.conflicts,
            p.orphans,
            p.invalid,
            p.repaired
        ),
    };
    crate::log::notice(ctx, &summary);
    if let Some(client) = task.waiting.take() {
        let reply = report(&task, outcome, duration_ms);
        ThreadSafeContext::with_blocked_client(client).reply(Ok(reply));
    }
    *lock(&LAST) = Some(Finished {
        kind: task.kind,
        db: task.db,
        outcome,
        duration_ms,
        progress: task.progress.clone(),
    });
}

fn text(s: impl Into<String>) -> RedisValue {
    RedisValue::BulkString(s.into())
}

fn int(n: u64) -> RedisValue {
    RedisValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Name/value pairs of a task's counts (shared by the CHECK reply and STATUS).
pub fn progress_fields(p: &Progress) -> Vec<RedisValue> {
    [
        ("scanned", p.scanned),
        ("synced", p.synced),
        ("rejected", p.rejected),
        ("in_step", p.in_step),
        ("missing", p.missing),
        ("differs", p.differs),
        ("conflicts", p.conflicts),
        ("orphans", p.orphans),
        ("invalid", p.invalid),
        ("repaired", p.repaired),
        ("batches", p.batches),
        ("longest_batch_us", p.longest_batch_us),
    ]
    .into_iter()
    .flat_map(|(name, value)| [text(name), int(value)])
    .collect()
}

/// The CHECK reply: outcome, counts, then up to 100 examples as `[problem, key, detail]`.
fn report(task: &Task, outcome: &str, duration_ms: u64) -> RedisValue {
    let mut fields = vec![
        text("outcome"),
        text(outcome),
        text("mode"),
        text(task.kind.name()),
        text("db"),
        RedisValue::Integer(task.db.into()),
        text("duration_ms"),
        int(duration_ms),
    ];
    fields.extend(progress_fields(&task.progress));
    let examples = task
        .examples
        .iter()
        .map(|e| {
            RedisValue::Array(vec![text(e.problem), text(e.key.as_str()), text(e.detail.as_str())])
        })
        .collect();
    fields.extend([text("examples"), RedisValue::Array(examples)]);
    RedisValue::Array(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(pattern("sipdomain:"), "sipdomain:*");
        assert_eq!(pattern("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\*");
    }
}
