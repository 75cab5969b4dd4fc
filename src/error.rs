//! The one error type of kamsync. Messages name the key and the reason, never a secret: they go
//! to the server log, to `KAMSYNC.STATUS` and to command replies.

use std::fmt;

/// Why an entity was not synced, or why a command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncError {
    /// The document root is not a JSON object (the type it is instead).
    NotAnObject(&'static str),
    /// A field is missing or has a value that cannot go into a Kamailio row.
    Field { field: &'static str, problem: String },
    /// A credential with neither `ha1` nor `password`: nothing could authenticate it.
    NoSecret,
    /// The entity key holds something other than a RedisJSON document.
    NotJson(String),
    /// The document could not be parsed (should not happen with RedisJSON's own output).
    BadJson(String),
    /// Another entity already owns the row this entity maps to.
    Conflict { row: String, owner: String },
    /// A command kamsync issued failed.
    Redis { command: &'static str, message: String },
    /// A configuration value was refused.
    Config(String),
    /// A background task is already running (what it is and how to see or stop it).
    Busy(String),
}

impl SyncError {
    pub fn field(field: &'static str, problem: impl Into<String>) -> Self {
        SyncError::Field { field, problem: problem.into() }
    }

    /// A short, stable category, used for per-reason counters.
    pub fn category(&self) -> &'static str {
        match self {
            SyncError::NotAnObject(_)
            | SyncError::Field { .. }
            | SyncError::NoSecret
            | SyncError::BadJson(_) => "invalid",
            SyncError::NotJson(_) => "not_json",
            SyncError::Conflict { .. } => "conflict",
            SyncError::Redis { .. } => "redis",
            SyncError::Config(_) => "config",
            SyncError::Busy(_) => "busy",
        }
    }
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::NotAnObject(found) => {
                write!(f, "the document must be a JSON object, not {found}")
            }
            SyncError::Field { field, problem } => write!(f, "{field} {problem}"),
            SyncError::NoSecret => {
                f.write_str("a credential needs ha1 or password; it has neither ha1 nor password")
            }
            SyncError::NotJson(found) => write!(
                f,
                "the key holds a {found} value, not a RedisJSON document; its row was removed"
            ),
            SyncError::BadJson(why) => write!(f, "the document could not be parsed: {why}"),
            SyncError::Conflict { row, owner } => write!(
                f,
                "row {row} already belongs to {owner}; this entity waits and takes the row when \
                 that one lets it go"
            ),
            SyncError::Redis { command, message } => write!(f, "{command} failed: {message}"),
            SyncError::Config(why) | SyncError::Busy(why) => f.write_str(why),
        }
    }
}

impl From<SyncError> for redis_module::RedisError {
    fn from(err: SyncError) -> Self {
        redis_module::RedisError::String(format!("ERR {err}"))
    }
}
