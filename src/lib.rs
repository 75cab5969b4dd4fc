//! kamsync: a Redis module that keeps Kamailio's `domain` and `subscriber` tables, as read by
//! Kamailio's `db_redis`, in step with a SIP platform's RedisJSON entities in the same Redis.
//!
//! Layout, one concern per file:
//!
//! * `lib.rs` (this file): registration with Redis and the load-time checks.
//! * [`config`]: the `kamsync.*` settings and their validation.
//! * [`events`]: the keyspace notification callback, the work queue, the post-notification job
//!   and the guard against kamsync's own writes.
//! * [`sync`]: the rules — reconcile one entity with its row (upsert, remove, rename).
//! * [`mapping`]: entity document → Kamailio row, validation, HA1. No Redis in it.
//! * [`store`]: what kamsync remembers per entity and how it is laid out in Redis.
//! * [`calls`]: the only place commands are issued (replicated writes).
//! * [`tasks`]: RESYNC and CHECK, in timer-driven batches.
//! * [`reload`]: delivering `domain.reload` to Kamailio over JSON-RPC.
//! * [`commands`], [`info`], [`stats`], [`log`]: what operators see.
//! * [`error`]: the one error type.

pub mod calls;
pub mod commands;
pub mod config;
pub mod error;
pub mod events;
pub mod info;
pub mod log;
pub mod mapping;
pub mod reload;
pub mod stats;
pub mod store;
pub mod sync;
pub mod tasks;

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::{
    raw, redis_module, Context, ContextFlags, NotifyEvent, RedisError, RedisResult, RedisString,
    Status,
};

static CLUSTER_MODE: AtomicBool = AtomicBool::new(false);

/// Whether the server runs in cluster mode, where kamsync cannot yet place rows (see README).
pub fn cluster_mode() -> bool {
    CLUSTER_MODE.load(Ordering::Relaxed)
}

/// The whole load, after the crate's `RedisModule_Init`. The version check comes before anything
/// is registered, so that a refusal leaves nothing behind in the server: on Redis 7.0 a failed
/// load does not undo keyspace subscriptions, and a dangling one would crash the server on the
/// next write; on Redis 6 even registering a configuration would abort it.
fn init(ctx: &Context, args: &[RedisString]) -> Status {
    // SAFETY: reading a function pointer the API export filled in (or left empty).
    if unsafe { raw::RedisModule_AddPostNotificationJob }.is_none() {
        crate::log::warning(
            ctx,
            "kamsync needs Redis 7.2 or newer (or Valkey 7.2 or newer): this server lacks \
             RedisModule_AddPostNotificationJob, without which writes cannot be synced \
             atomically. Module not loaded.",
        );
        return Status::Err;
    }
    if let Err(why) = config::register(ctx, args) {
        crate::log::warning(ctx, &format!("{why}. Module not loaded."));
        return Status::Err;
    }
    let refusals = config::load_refusals();
    if !refusals.is_empty() {
        for why in refusals {
            crate::log::warning(ctx, &format!("invalid configuration: {why}. Module not loaded."));
        }
        return Status::Err;
    }
    if let Err(why) = register(ctx) {
        crate::log::warning(ctx, &format!("{why}. Module not loaded."));
        return Status::Err;
    }
    config::mark_loaded();
    reload::start(ctx);
    if ctx.get_flags().contains(ContextFlags::CLUSTER) {
        CLUSTER_MODE.store(true, Ordering::Relaxed);
        crate::log::warning(
            ctx,
            "cluster mode is not supported yet: rows of entities on this shard may belong to \
             other shards, and writes to them will fail and be counted as redis_errors",
        );
    }
    let config = config::get();
    crate::log::notice(
        ctx,
        &format!(
            "kamsync {} loaded: '{}*' -> {}, '{}*' -> {}",
            env!("CARGO_PKG_VERSION"),
            config.domain_prefix,
            config.domain_table,
            config.credential_prefix,
            config.subscriber_table,
        ),
    );
    Status::Ok
}

fn register(ctx: &Context) -> Result<(), String> {
    // SAFETY: the load context is valid here, and the callback lives as long as the module.
    let subscribed = unsafe {
        raw::RedisModule_SubscribeToKeyspaceEvents.ok_or("no keyspace events API")?(
            ctx.ctx,
            NotifyEvent::ALL.bits(),
            Some(keyspace_callback),
        )
    };
    if subscribed != raw::REDISMODULE_OK as c_int {
        return Err("could not subscribe to keyspace events".into());
    }
    if register_commands(ctx.ctx) != raw::REDISMODULE_OK as c_int {
        return Err("could not register the KAMSYNC.* commands".into());
    }
    raw::register_info_function(ctx.ctx, Some(info::info_func));
    Ok(())
}

extern "C" fn keyspace_callback(
    ctx: *mut raw::RedisModuleCtx,
    _type: c_int,
    event: *const c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let context = Context::new(ctx);
        // SAFETY: Redis passes a NUL-terminated event name and a valid key for the call.
        let event = unsafe { CStr::from_ptr(event) }.to_str().unwrap_or("");
        let key = RedisString::string_as_slice(key);
        events::on_event(&context, event, key);
    }));
    if result.is_err() {
        crate::log::warning(
            &Context::new(ctx),
            "internal error in the keyspace callback (a bug in kamsync)",
        );
    }
    raw::REDISMODULE_OK as c_int
}

/// A command handler that turns a panic into an error reply instead of aborting Redis.
fn guarded(
    handler: fn(&Context, Vec<RedisString>) -> RedisResult,
) -> impl Fn(&Context, Vec<RedisString>) -> RedisResult {
    move |ctx, args| {
        catch_unwind(AssertUnwindSafe(|| handler(ctx, args))).unwrap_or_else(|_| {
            Err(RedisError::Str("ERR internal error in kamsync (a bug); nothing was changed"))
        })
    }
}

fn register_commands(ctx: *mut raw::RedisModuleCtx) -> c_int {
    // SAFETY: the crate's registration macro reads the API table Redis filled in at load.
    unsafe { register_commands_unchecked(ctx) }
}

unsafe fn register_commands_unchecked(ctx: *mut raw::RedisModuleCtx) -> c_int {
    redis_module::redis_command!(
        ctx,
        "kamsync.status",
        guarded(commands::status),
        "readonly allow-loading allow-stale",
        0,
        0,
        0,
        "read slow"
    );
    redis_module::redis_command!(
        ctx,
        "kamsync.sync",
        guarded(commands::sync),
        "write deny-oom",
        1,
        1,
        1,
        "write slow"
    );
    redis_module::redis_command!(
        ctx,
        "kamsync.resync",
        guarded(commands::resync),
        "write admin deny-script",
        0,
        0,
        0,
        "write admin dangerous slow"
    );
    redis_module::redis_command!(
        ctx,
        "kamsync.check",
        guarded(commands::check),
        "readonly admin deny-script",
        0,
        0,
        0,
        "read admin dangerous slow"
    );
    raw::REDISMODULE_OK as c_int
}

// Inside Redis, Rust allocates through Redis's allocator (counted in used_memory); unit tests run
// without a server, so they use the system allocator.
#[cfg(not(test))]
use redis_module::alloc::RedisAlloc as Allocator;
#[cfg(test)]
use std::alloc::System as Allocator;

redis_module! {
    name: "kamsync",
    version: 1,
    allocator: (Allocator, Allocator),
    data_types: [],
    init: init,
}
