//! Counters for INFO and STATUS, the bounded list of recent errors, and the rate limit on
//! warning lines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::SyncError;

/// A monotonically increasing counter.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn incr(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter kamsync keeps, in the order INFO prints them.
pub struct Counters {
    pub events_seen: Counter,
    pub events_ignored: Counter,
    pub jobs_run: Counter,
    pub upserts: Counter,
    pub removes: Counter,
    pub ids_issued: Counter,
    pub rows_written: Counter,
    pub rows_unchanged: Counter,
    pub rows_deleted: Counter,
    pub reload_requests: Counter,
    pub rejected: Counter,
    pub rejected_invalid: Counter,
    pub rejected_not_json: Counter,
    pub rejected_conflict: Counter,
    pub redis_errors: Counter,
}

pub static COUNTERS: Counters = Counters {
    events_seen: Counter::new(),
    events_ignored: Counter::new(),
    jobs_run: Counter::new(),
    upserts: Counter::new(),
    removes: Counter::new(),
    ids_issued: Counter::new(),
    rows_written: Counter::new(),
    rows_unchanged: Counter::new(),
    rows_deleted: Counter::new(),
    reload_requests: Counter::new(),
    rejected: Counter::new(),
    rejected_invalid: Counter::new(),
    rejected_not_json: Counter::new(),
    rejected_conflict: Counter::new(),
    redis_errors: Counter::new(),
};

impl Counters {
    /// Name and value of each counter, for INFO and STATUS.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("events_seen", self.events_seen.get()),
            ("events_ignored", self.events_ignored.get()),
            ("jobs_run", self.jobs_run.get()),
            ("upserts", self.upserts.get()),
            ("removes", self.removes.get()),
            ("ids_issued", self.ids_issued.get()),
            ("rows_written", self.rows_written.get()),
            ("rows_unchanged", self.rows_unchanged.get()),
            ("rows_deleted", self.rows_deleted.get()),
            ("reload_requests", self.reload_requests.get()),
            ("rejected", self.rejected.get()),
            ("rejected_invalid", self.rejected_invalid.get()),
            ("rejected_not_json", self.rejected_not_json.get()),
            ("rejected_conflict", self.rejected_conflict.get()),
            ("redis_errors", self.redis_errors.get()),
        ]
    }

    /// Counts a rejected entity or failed write under its category.
    pub fn count_error(&self, err: &SyncError) {
        match err.category() {
            "redis" => self.redis_errors.incr(),
            category => {
                self.rejected.incr();
                match category {
                    "not_json" => self.rejected_not_json.incr(),
                    "conflict" => self.rejected_conflict.incr(),
                    _ => self.rejected_invalid.incr(),
                }
            }
        }
    }
}

/// One recorded error, as `KAMSYNC.STATUS` shows it.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    pub time_ms: i64,
    pub db: i32,
    /// The entity key, printable (see [`printable_key`]).
    pub key: String,
    pub reason: String,
}

/// How many recent errors are kept.
pub const RECENT_ERRORS: usize = 100;

static RECENT: Mutex<VecDeque<ErrorRecord>> = Mutex::new(VecDeque::new());

pub fn record_error(record: ErrorRecord) {
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    if recent.len() == RECENT_ERRORS {
        recent.pop_front();
    }
    recent.push_back(record);
}

/// Newest first.
pub fn recent_errors() -> Vec<ErrorRecord> {
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().cloned().collect()
}

/// Longest key shown in logs and STATUS; longer ones are cut with their full length noted.
const KEY_SHOWN: usize = 200;

/// A key made safe for a log line: printable ASCII as is, every other byte as `\xNN`, cut after
/// [`KEY_SHOWN`] bytes.
pub fn printable_key(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len().min(KEY_SHOWN) + 8);
    for &byte in key.iter().take(KEY_SHOWN) {
        if byte.is_ascii_graphic() && byte != b'\\' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    if key.len() > KEY_SHOWN {
        out.push_str(&format!("...({} bytes)", key.len()));
    }
    out
}

/// Warnings allowed per second before further ones are only counted; a client looping over bad
/// writes must not flood the server log.
const WARNINGS_PER_SECOND: u32 = 20;

struct LogBudget {
    second: i64,
    used: u32,
    suppressed: u64,
}

static LOG_BUDGET: Mutex<LogBudget> = Mutex::new(LogBudget { second: 0, used: 0, suppressed: 0 });

/// Whether a warning may be logged now, and how many were suppressed since the last one logged.
pub fn may_warn(now_s: i64) -> (bool, u64) {
    let mut budget = LOG_BUDGET.lock().unwrap_or_else(|p| p.into_inner());
    if budget.second != now_s {
        budget.second = now_s;
        budget.used = 0;
    }
    if budget.used < WARNINGS_PER_SECOND {
        budget.used += 1;
        (true, std::mem::take(&mut budget.suppressed))
    } else {
        budget.suppressed += 1;
        (false, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_key_escapes_binary_and_cuts_long_keys() {
        assert_eq!(printable_key(b"sipdomain:a\x00\xff\\"), "sipdomain:a\\x00\\xff\\x5c");
        let long = vec![b'k'; 500];
        let shown = printable_key(&long);
        assert!(shown.ends_with("...(500 bytes)"));
        assert_eq!(shown.len(), KEY_SHOWN + "...(500 bytes)".len());
    }

    #[test]
    fn warnings_are_limited_per_second_and_suppressed_ones_reported() {
        let second = 1_000_000_007;
        let allowed = (0..WARNINGS_PER_SECOND + 5).filter(|_| may_warn(second).0).count();
        let (next_second_allowed, suppressed) = may_warn(second + 1);

        assert_eq!(allowed, WARNINGS_PER_SECOND as usize);
        assert!(next_second_allowed);
        assert_eq!(suppressed, 5);
    }
}
