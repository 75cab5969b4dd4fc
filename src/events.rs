//! Keyspace notifications in, queued work out.
//!
//! The callback runs inside the command that changed the key, in the middle of it: writing from
//! here is unsafe (Redis may be half way through a multi-key operation, and a write would be
//! propagated before the command that caused it). So the callback only decides whether the event
//! matters, queues an [`Op`], and asks Redis for a post-notification job. The job runs after
//! the whole command, MULTI/EXEC or script, before its reply, atomically with it; it drains the
//! queue.
//!
//! kamsync's own writes in the job fire notifications again (Redis delivers them to every
//! subscriber). An [`OwnWrites`] guard is held for the whole job and makes the callback ignore
//! them, by construction rather than by recognising kamsync's keys.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use redis_module::{Context, ContextFlags};

use crate::calls::Calls;
use crate::config;
use crate::stats::COUNTERS;
use crate::sync::{Op, Syncer};

/// Events that change no entity content: a TTL set or cleared, a key created (NEW).
const IGNORED_EVENTS: [&str; 3] = ["expire", "persist", "new"];

struct Queue {
    ops: Vec<Op>,
    /// The `rename_from` half of a RENAME, waiting for its `rename_to`.
    rename_from: Option<(i32, Vec<u8>)>,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue { ops: Vec::new(), rename_from: None });

/// How many [`OwnWrites`] guards are held (a count, so that nested holds stay correct).
static OWN_WRITES: AtomicUsize = AtomicUsize::new(0);

/// Held while kamsync writes; the callback ignores every event meanwhile. Dropping it (also on
/// unwinding) lets events through again once no other guard is held.
pub struct OwnWrites(());

impl OwnWrites {
    pub fn hold() -> Self {
        OWN_WRITES.fetch_add(1, Ordering::SeqCst);
        OwnWrites(())
    }
}

impl Drop for OwnWrites {
    fn drop(&mut self) {
        OWN_WRITES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Pure decision: which ops an event on an entity key queues (none for a TTL change).
/// `rename_from` is the source of the RENAME whose `rename_to` this may be.
pub fn ops_for_event(
    event: &str,
    db: i32,
    key: &[u8],
    rename_from: &mut Option<(i32, Vec<u8>)>,
) -> Vec<Op> {
    if IGNORED_EVENTS.contains(&event) {
        return Vec::new();
    }
    let reconcile = Op::Reconcile { db, key: key.to_vec() };
    match event {
        "rename_to" => {
            let from = rename_from.take().filter(|(from_db, _)| *from_db == db).map(|(_, k)| k);
            vec![Op::Move { db, from, to: key.to_vec() }, reconcile]
        }
        _ => vec![reconcile],
    }
}

/// The keyspace notification callback (all classes but key-miss and new).
pub fn on_event(ctx: &Context, event: &str, key: &[u8]) {
    if OWN_WRITES.load(Ordering::SeqCst) > 0 {
        return;
    }
    if event == "rename_from" {
        // Kept whatever the key, so that the `rename_to` that follows (RENAME fires both, in
        // this order) pairs with its own source and never with an older one.
        let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        queue.rename_from = Some((Calls::selected_db(ctx), key.to_vec()));
    }
    if config::kind_of(key).is_none() {
        return;
    }
    COUNTERS.events_seen.incr();
    let flags = ctx.get_flags();
    if flags.intersects(ContextFlags::LOADING | ContextFlags::SLAVE) {
        // A replica gets kamsync's writes from its primary; loading replays them from the AOF.
        COUNTERS.events_ignored.incr();
        return;
    }
    let db = Calls::selected_db(ctx);
    {
        let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        let queue = &mut *queue;
        let ops = ops_for_event(event, db, key, &mut queue.rename_from);
        if ops.is_empty() {
            return;
        }
        queue.ops.extend(ops);
    }
    // One job per event: the first one to run drains the queue, the others find it empty. A
    // single "job pending" flag would save the no-op runs but could stall the queue for good if
    // Redis ever dropped a job.
    match ctx.add_post_notification_job(run_job) {
        Ok(redis_module::Status::Ok) => {}
        _ => {
            let dropped = std::mem::take(&mut QUEUE.lock().unwrap_or_else(|p| p.into_inner()).ops);
            COUNTERS.events_ignored.add(dropped.len() as u64);
            crate::log::warning(
                ctx,
                &format!(
                    "could not schedule a post-notification job; {} queued change(s) not synced, \
                 KAMSYNC.SYNC or a resync will catch up",
                    dropped.len()
                ),
            );
        }
    }
}

fn run_job(ctx: &Context) {
    let ops = std::mem::take(&mut QUEUE.lock().unwrap_or_else(|p| p.into_inner()).ops);
    if ops.is_empty() {
        return;
    }
    COUNTERS.jobs_run.incr();
    let _guard = OwnWrites::hold();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut syncer = Syncer::new(Calls::new(ctx), config::get().clone());
        syncer.run_ops(ops);
        syncer.finish();
    }));
    if result.is_err() {
        crate::log::warning(
            ctx,
            "internal error while syncing (a bug in kamsync); the server keeps running",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconcile(db: i32, key: &[u8]) -> Op {
        Op::Reconcile { db, key: key.to_vec() }
    }

    #[test]
    fn nested_guards_keep_events_out_until_the_last_is_dropped() {
        let outer = OwnWrites::hold();
        let inner = OwnWrites::hold();
        drop(inner);
        assert!(OWN_WRITES.load(Ordering::SeqCst) > 0);
        drop(outer);
        assert_eq!(OWN_WRITES.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn ttl_changes_queue_nothing() {
        let mut pending = None;
        for event in IGNORED_EVENTS {
            assert_eq!(ops_for_event(event, 0, b"sipdomain:a", &mut pending), Vec::new());
        }
    }

    #[test]
    fn writes_deletes_and_overwrites_queue_a_reconcile() {
        let mut pending = None;
        for event in ["json.set", "json.del", "del", "expired", "evicted", "set", "hset", "restore"]
        {
            assert_eq!(
                ops_for_event(event, 3, b"k", &mut pending),
                vec![reconcile(3, b"k")],
                "{event}"
            );
        }
    }

    #[test]
    fn rename_to_queues_a_move_from_its_source_before_the_reconcile() {
        let mut pending = Some((0, b"a".to_vec()));

        let to = ops_for_event("rename_to", 0, b"b", &mut pending);

        assert_eq!(
            to,
            vec![
                Op::Move { db: 0, from: Some(b"a".to_vec()), to: b"b".to_vec() },
                reconcile(0, b"b")
            ]
        );
        assert_eq!(pending, None);
    }

    #[test]
    fn rename_to_without_a_source_in_its_db_still_replaces_the_target() {
        let mut pending = Some((1, b"a".to_vec()));

        let to = ops_for_event("rename_to", 2, b"b", &mut pending);

        assert_eq!(to, vec![Op::Move { db: 2, from: None, to: b"b".to_vec() }, reconcile(2, b"b")]);
    }
}
