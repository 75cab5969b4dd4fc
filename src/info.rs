//! The `kamsync` section of INFO: every counter, plus the facts an operator checks first.

use std::os::raw::c_int;

use redis_module::raw;

use crate::stats::COUNTERS;

/// Registered with `RedisModule_RegisterInfoFunc`; Redis prefixes each field with `kamsync_`.
pub extern "C" fn info_func(ctx: *mut raw::RedisModuleInfoCtx, _for_crash_report: c_int) {
    // A panic must not cross into Redis; INFO without the section is the worst outcome.
    let _ = std::panic::catch_unwind(|| {
        raw::add_info_section(ctx, None);
        raw::add_info_field_str(ctx, "version", env!("CARGO_PKG_VERSION"));
        raw::add_info_field_str(
            ctx,
            "cluster_mode",
            if crate::cluster_mode() { "yes" } else { "no" },
        );
        for (name, value) in COUNTERS.snapshot() {
            raw::add_info_field_long_long(ctx, name, i64::try_from(value).unwrap_or(i64::MAX));
        }
        let (running, last) = crate::tasks::snapshot();
        let (state, kind, progress, remaining) = match (running, last) {
            (Some(r), _) => ("running", r.kind.name(), r.progress, r.remaining),
            (None, Some(last)) => (last.outcome, last.kind.name(), last.progress, 0),
            (None, None) => ("none", "none", Default::default(), 0),
        };
        raw::add_info_field_str(ctx, "task_state", state);
        raw::add_info_field_str(ctx, "task", kind);
        for (name, value) in [
            ("task_scanned", progress.scanned),
            ("task_synced", progress.synced),
            ("task_rejected", progress.rejected),
            ("task_remaining_estimate", remaining),
            ("task_longest_batch_us", progress.longest_batch_us),
        ] {
            raw::add_info_field_long_long(ctx, name, i64::try_from(value).unwrap_or(i64::MAX));
        }
        for (i, (url, stats)) in crate::reload::snapshot().into_iter().enumerate() {
            raw::add_info_field_str(ctx, &format!("reload_{i}_url"), &url);
            for (name, value) in [
                ("sent", stats.reloads_sent as i64),
                ("failures", stats.failures as i64),
                ("pending", stats.pending as i64),
                ("last_success_ms", stats.last_success_ms),
            ] {
                raw::add_info_field_long_long(ctx, &format!("reload_{i}_{name}"), value);
            }
        }
    });
}
