//! The only place kamsync reads and writes Redis.
//!
//! Every write is propagated to replicas and the AOF inside the same MULTI/EXEC as the user's
//! command that caused it: [`Calls::write`] uses `RM_Call` with the `!` flag (plain
//! `Context::call` is not propagated, and replicas would silently diverge), and the hash
//! writes ([`Calls::hash_set`], [`Calls::hash_del`]) go through the key API and propagate the
//! equivalent HSET/HDEL with `RM_Replicate`. The hashes (rows and kamsync's state) are most of
//! the work per event; the key API spares them the command dispatch of `RM_Call`. Such writes
//! fire no keyspace notification (kamsync would ignore its own anyway); WATCH still sees them.

use std::os::raw::{c_int, c_void};
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

/// An open key, closed on drop.
struct OpenKey(*mut raw::RedisModuleKey);

impl Drop for OpenKey {
    fn drop(&mut self) {
        // SAFETY: the pointer came from RM_OpenKey and is closed once.
        unsafe {
            if let Some(close) = raw::RedisModule_CloseKey {
                close(self.0);
            }
        }
    }
}

impl Calls<'_> {
    /// Opens a key; None for a missing key opened only for reading (RM_OpenKey's answer).
    fn open(&self, key: &[u8], mode: u32) -> Option<OpenKey> {
        let name = RedisString::create_from_slice(self.ctx.ctx, key);
        // SAFETY: valid context and key name. RM_OpenKey keeps its own reference to the name,
        // so ours may go at the end of this function.
        let handle = unsafe {
            raw::RedisModule_OpenKey.map(|open| open(self.ctx.ctx, name.inner, mode as c_int))
        }
        .unwrap_or(std::ptr::null_mut());
        (!handle.is_null()).then_some(OpenKey(handle))
    }

    /// Whether an open key may be used as a hash: missing or a hash.
    fn check_hash(&self, key: &OpenKey, command: &'static str) -> Result<bool, SyncError> {
        // SAFETY: an open key.
        let kind = unsafe { raw::RedisModule_KeyType.map_or(-1, |t| t(key.0)) };
        match kind as isize {
            raw::REDISMODULE_KEYTYPE_EMPTY => Ok(false),
            raw::REDISMODULE_KEYTYPE_HASH => Ok(true),
            _ => Err(SyncError::Redis {
                command,
                message: "WRONGTYPE the key holds a value that is not a hash".into(),
            }),
        }
    }

    /// HMGET through the key API: one value per field, None where absent.
    pub fn hash_get(
        &self,
        key: &[u8],
        fields: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>, SyncError> {
        let Some(handle) = self.open(key, raw::REDISMODULE_READ) else {
            return Ok(vec![None; fields.len()]);
        };
        if !self.check_hash(&handle, "HMGET")? {
            return Ok(vec![None; fields.len()]);
        }
        let get = unsafe { raw::RedisModule_HashGet }
            .ok_or(SyncError::Redis { command: "HMGET", message: "no HashGet API".into() })?;
        let mut values = Vec::with_capacity(fields.len());
        for field in fields {
            let field = RedisString::create_from_slice(self.ctx.ctx, field);
            let mut value: *mut raw::RedisModuleString = std::ptr::null_mut();
            // SAFETY: an open hash key, a field string and an out pointer, NULL-terminated.
            unsafe {
                get(
                    handle.0,
                    raw::REDISMODULE_HASH_NONE as c_int,
                    field.inner,
                    &mut value as *mut *mut raw::RedisModuleString,
                    std::ptr::null_mut::<c_void>(),
                );
            }
            if value.is_null() {
                values.push(None);
            } else {
                // Takes ownership: freed when dropped.
                let value = RedisString::from_redis_module_string(self.ctx.ctx, value);
                values.push(Some(value.as_slice().to_vec()));
            }
        }
        Ok(values)
    }

    /// HSET through the key API, propagated as HSET.
    pub fn hash_set(&self, key: &[u8], pairs: &[(&[u8], &[u8])]) -> Result<(), SyncError> {
        self.hash_update(key, "HSET", pairs.iter().map(|(f, v)| (*f, Some(*v))))?;
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 2 * pairs.len());
        args.push(key);
        for (field, value) in pairs {
            args.extend([*field, *value]);
        }
        self.ctx.replicate("HSET", args.as_slice());
        Ok(())
    }

    /// HDEL through the key API, propagated as HDEL. A hash left empty is deleted.
    pub fn hash_del(&self, key: &[u8], fields: &[&[u8]]) -> Result<(), SyncError> {
        self.hash_update(key, "HDEL", fields.iter().map(|f| (*f, None)))?;
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + fields.len());
        args.push(key);
        args.extend(fields);
        self.ctx.replicate("HDEL", args.as_slice());
        Ok(())
    }

    fn hash_update<'f>(
        &self,
        key: &[u8],
        command: &'static str,
        changes: impl Iterator<Item = (&'f [u8], Option<&'f [u8]>)>,
    ) -> Result<(), SyncError> {
        let handle = self
            .open(key, raw::REDISMODULE_READ | raw::REDISMODULE_WRITE)
            .ok_or(SyncError::Redis { command, message: "cannot open the key".into() })?;
        self.check_hash(&handle, command)?;
        let set = unsafe { raw::RedisModule_HashSet }
            .ok_or(SyncError::Redis { command, message: "no HashSet API".into() })?;
        for (field, value) in changes {
            let field = RedisString::create_from_slice(self.ctx.ctx, field);
            let value = value.map(|v| RedisString::create_from_slice(self.ctx.ctx, v));
            let value_ptr = value.as_ref().map_or(raw::REDISMODULE_HASH_DELETE, |v| v.inner);
            // SAFETY: an open writable key, field and value strings, NULL-terminated.
            unsafe {
                set(
                    handle.0,
                    raw::REDISMODULE_HASH_NONE as c_int,
                    field.inner,
                    value_ptr,
                    std::ptr::null_mut::<c_void>(),
                );
            }
        }
        Ok(())
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
