//! The only place kamsync issues Redis commands.
//!
//! Every write goes through [`Calls::write`], which uses `RM_Call` with the `!` flag: the command
//! is propagated to replicas and the AOF, inside the same MULTI/EXEC as the user's command that
//! caused it. Plain `Context::call` is not propagated, and replicas would silently diverge.

use std::sync::LazyLock;

use redis_module::{
    raw, CallOptions, CallOptionsBuilder, CallReply, CallResult, Context, RedisString,
};

use crate::error::SyncError;

static WRITE: LazyLock<CallOptions> =
    LazyLock::new(|| CallOptionsBuilder::new().replicate().errors_as_replies().build());
static READ: LazyLock<CallOptions> =
    LazyLock::new(|| CallOptionsBuilder::new().errors_as_replies().build());

/// An owned reply: call replies borrow from the context, these do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    /// Simple strings, doubles, and anything else kamsync only checks for success.
    Other,
}

impl Reply {
    pub fn into_bulk(self) -> Option<Vec<u8>> {
        match self {
            Reply::Bulk(bytes) => Some(bytes),
            _ => None,
        }
    }
}

/// What an entity key holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Missing,
    /// A module type: RedisJSON's, or another module's (told apart by JSON.GET).
    Module,
    /// A core type, named for messages.
    Core(&'static str),
}

/// Commands in the database currently selected on the context.
pub struct Calls<'a> {
    pub ctx: &'a Context,
}

impl<'a> Calls<'a> {
    pub fn new(ctx: &'a Context) -> Self {
        Calls { ctx }
    }

    pub fn select_db(&self, db: i32) -> Result<(), SyncError> {
        // SAFETY: the context is valid for the duration of the job or command that owns it;
        // SelectDb exists on every server kamsync loads on (checked at load).
        let status = unsafe { raw::RedisModule_SelectDb.map(|select| select(self.ctx.ctx, db)) };
        if status == Some(raw::REDISMODULE_OK as i32) {
            Ok(())
        } else {
            Err(SyncError::Redis { command: "SELECT", message: format!("db {db} not available") })
        }
    }

    pub fn selected_db(ctx: &Context) -> i32 {
        // SAFETY: as above.
        unsafe { raw::RedisModule_GetSelectedDb.map_or(0, |selected| selected(ctx.ctx)) }
    }

    /// The type of a key, through the key API (no command dispatch).
    pub fn key_kind(&self, key: &[u8]) -> KeyKind {
        // Not `create_string`: it goes through a C string and stops at a NUL in a binary key.
        let name = RedisString::create_from_slice(self.ctx.ctx, key);
        let handle = self.ctx.open_key(&name);
        match handle.key_type() {
            raw::KeyType::Empty => KeyKind::Missing,
            raw::KeyType::Module => KeyKind::Module,
            raw::KeyType::String => KeyKind::Core("string"),
            raw::KeyType::List => KeyKind::Core("list"),
            raw::KeyType::Hash => KeyKind::Core("hash"),
            raw::KeyType::Set => KeyKind::Core("set"),
            raw::KeyType::ZSet => KeyKind::Core("zset"),
            raw::KeyType::Stream => KeyKind::Core("stream"),
        }
    }

    pub fn read(&self, command: &'static str, args: &[&[u8]]) -> Result<Reply, SyncError> {
        self.call(command, &READ, args)
    }

    pub fn write(&self, command: &'static str, args: &[&[u8]]) -> Result<Reply, SyncError> {
        self.call(command, &WRITE, args)
    }

    fn call(
        &self,
        command: &'static str,
        options: &CallOptions,
        args: &[&[u8]],
    ) -> Result<Reply, SyncError> {
        let result: CallResult = self.ctx.call_ext(command, options, args);
        match result {
            Ok(reply) => Ok(owned(&reply)),
            Err(err) => Err(SyncError::Redis {
                command,
                message: err.to_utf8_string().unwrap_or_else(|| "(binary error)".into()),
            }),
        }
    }
}

fn owned(reply: &CallReply) -> Reply {
    match reply {
        CallReply::Null(_) => Reply::Nil,
        CallReply::I64(n) => Reply::Int(n.to_i64()),
        CallReply::String(s) => Reply::Bulk(s.as_bytes().to_vec()),
        CallReply::Array(items) => Reply::Array(
            items.iter().map(|item| item.map_or(Reply::Other, |r| owned(&r))).collect(),
        ),
        _ => Reply::Other,
    }
}
