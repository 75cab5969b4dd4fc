//! `KAMSYNC.*` commands. Errors become Redis error replies here, and only here.

use redis_module::{
    Context, ContextFlags, NextArg, RedisError, RedisResult, RedisString, RedisValue,
};

use crate::calls::Calls;
use crate::config;
use crate::events::OwnWrites;
use crate::stats::{self, COUNTERS};
use crate::sync::{Action, Adoption, Syncer};
use crate::tasks::{self, TaskKind};

fn text(s: impl Into<String>) -> RedisValue {
    RedisValue::BulkString(s.into())
}

fn int(n: impl TryInto<i64>) -> RedisValue {
    RedisValue::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// `KAMSYNC.STATUS`: version, environment, effective configuration, counters and the most recent
/// errors (newest first), as name/value pairs.
pub fn status(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    let flags = ctx.get_flags();
    let role = if flags.contains(ContextFlags::SLAVE) { "replica" } else { "primary" };
    let settings = config::get()
        .settings()
        .into_iter()
        .flat_map(|(name, value)| [text(name), text(value)])
        .collect();
    let counters = COUNTERS
        .snapshot()
        .into_iter()
        .flat_map(|(name, value)| [text(name), int(value)])
        .collect();
    let errors = stats::recent_errors()
        .into_iter()
        .map(|e| {
            RedisValue::Array(vec![
                text("time_ms"),
                int(e.time_ms),
                text("db"),
                int(e.db),
                text("key"),
                text(e.key),
                text("reason"),
                text(e.reason),
            ])
        })
        .collect();
    Ok(RedisValue::Array(vec![
        text("version"),
        text(env!("CARGO_PKG_VERSION")),
        text("role"),
        text(role),
        text("cluster_mode"),
        text(if crate::cluster_mode() {
            "yes (unsupported: rows may belong to other shards)"
        } else {
            "no"
        }),
        text("redisjson"),
        text(redisjson_version(ctx).unwrap_or_else(|| "not loaded".into())),
        text("config"),
        RedisValue::Array(settings),
        text("counters"),
        RedisValue::Array(counters),
        text("task"),
        RedisValue::Array(task_fields()),
        text("reload_targets"),
        RedisValue::Array(reload_fields()),
        text("recent_errors"),
        RedisValue::Array(errors),
    ]))
}

/// RedisJSON's version as MODULE LIST reports it (`20809` for 2.8.9).
fn redisjson_version(ctx: &Context) -> Option<String> {
    let RedisValue::Array(modules) = ctx.call("MODULE", &["LIST"]).ok()? else {
        return None;
    };
    modules.into_iter().find_map(|module| {
        let RedisValue::Array(fields) = module else { return None };
        let mut pairs = fields.chunks(2);
        let is_json = pairs.clone().any(|pair| {
            pair[0] == RedisValue::SimpleString("name".into())
                && matches!(&pair.get(1), Some(RedisValue::SimpleString(n) | RedisValue::BulkString(n)) if n == "ReJSON")
        });
        if !is_json {
            return None;
        }
        pairs.find(|pair| matches!(&pair[0], RedisValue::SimpleString(n) if n == "ver")).and_then(
            |pair| match pair.get(1) {
                Some(RedisValue::Integer(v)) => Some(v.to_string()),
                _ => None,
            },
        )
    })
}

/// `KAMSYNC.SYNC <key>`: reconciles one entity now and says what it did.
pub fn sync(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    let mut args = args.into_iter().skip(1);
    let key = args.next_arg()?;
    if ctx.get_flags().contains(ContextFlags::SLAVE) {
        return Err(RedisError::Str(
            "ERR kamsync writes only on the primary; run KAMSYNC.SYNC there",
        ));
    }
    let config = config::get().clone();
    if config.kind_of(key.as_slice()).is_none() {
        return Err(RedisError::String(format!(
            "ERR {} matches neither kamsync.domain-prefix '{}' nor kamsync.credential-prefix '{}'",
            stats::printable_key(key.as_slice()),
            config.domain_prefix,
            config.credential_prefix
        )));
    }
    let _guard = OwnWrites::hold();
    let db = Calls::selected_db(ctx);
    let mut syncer = Syncer::new(Calls::new(ctx), config).for_command(Adoption::default());
    let result = syncer.reconcile(db, key.as_slice());
    syncer.finish();
    match result? {
        Action::Written { id, row } => Ok(text(format!("written {row} id {id}"))),
        Action::Unchanged { id, row } => Ok(text(format!("unchanged {row} id {id}"))),
        Action::Removed { row } => Ok(text(format!("removed {row}"))),
        Action::Nothing | Action::Deferred => Ok(text("nothing to do")),
    }
}

/// `KAMSYNC.RESYNC [ABORT]`: syncs every entity of the client's database in the background.
pub fn resync(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    match args.len() {
        1 => {}
        2 if args[1].to_string_lossy().eq_ignore_ascii_case("abort") => {
            return Ok(text(if tasks::abort() { "aborting" } else { "nothing running" }));
        }
        _ => return Err(RedisError::WrongArity),
    }
    refuse_on_replica(ctx, "KAMSYNC.RESYNC")?;
    tasks::start(ctx, TaskKind::Resync, None)?;
    Ok(text("started; KAMSYNC.STATUS shows progress"))
}

/// `KAMSYNC.CHECK [REPAIR]`: compares every entity with its row and looks for orphan rows; the
/// client waits for the report while Redis keeps serving others.
pub fn check(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let repair = match args.len() {
        1 => false,
        2 if args[1].to_string_lossy().eq_ignore_ascii_case("repair") => true,
        _ => return Err(RedisError::WrongArity),
    };
    if repair {
        refuse_on_replica(ctx, "KAMSYNC.CHECK REPAIR")?;
    }
    if ctx.get_flags().intersects(ContextFlags::MULTI | ContextFlags::LUA) {
        return Err(RedisError::Str("ERR KAMSYNC.CHECK cannot run inside MULTI or a script"));
    }
    tasks::ensure_idle()?;
    let client = ctx.block_client();
    tasks::start(ctx, TaskKind::Check { repair }, Some(client))?;
    Ok(RedisValue::NoReply)
}

fn refuse_on_replica(ctx: &Context, command: &str) -> Result<(), RedisError> {
    if ctx.get_flags().contains(ContextFlags::SLAVE) {
        return Err(RedisError::String(format!(
            "ERR {command} writes, and kamsync writes only on the primary; run it there"
        )));
    }
    Ok(())
}

/// STATUS fields of the running or last background task.
fn task_fields() -> Vec<RedisValue> {
    let (running, last) = tasks::snapshot();
    let mut fields = Vec::new();
    if let Some(running) = running {
        fields.extend([
            text("state"),
            text("running"),
            text("task"),
            text(running.kind.name()),
            text("db"),
            int(running.db),
            text("elapsed_ms"),
            int(running.elapsed_ms),
            text("remaining_estimate"),
            int(running.remaining),
        ]);
        fields.extend(tasks::progress_fields(&running.progress));
    } else if let Some(last) = last {
        fields.extend([
            text("state"),
            text(last.outcome),
            text("task"),
            text(last.kind.name()),
            text("db"),
            int(last.db),
            text("duration_ms"),
            int(last.duration_ms),
        ]);
        fields.extend(tasks::progress_fields(&last.progress));
    } else {
        fields.extend([text("state"), text("none")]);
    }
    fields
}

/// STATUS fields of each reload target.
fn reload_fields() -> Vec<RedisValue> {
    crate::reload::snapshot()
        .into_iter()
        .map(|(url, stats)| {
            RedisValue::Array(vec![
                text("url"),
                text(url),
                text("reloads_sent"),
                int(stats.reloads_sent),
                text("failures"),
                int(stats.failures),
                text("pending"),
                int(stats.pending),
                text("delivered_id"),
                text(stats.delivered_id),
                text("last_success_ms"),
                int(stats.last_success_ms),
                text("last_error"),
                text(stats.last_error),
                text("last_error_ms"),
                int(stats.last_error_ms),
            ])
        })
        .collect()
}
