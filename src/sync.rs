//! The work itself: bring one entity's row in line with the entity, in the database it lives in.
//!
//! Everything here runs inside a post-notification job (or a command), never inside a
//! notification callback. It reads the entity's *current* state rather than replaying events:
//! after a MULTI/EXEC or a script that touched a key several times, one reconcile of that key
//! gives the rows of the final state.
//!
//! Per entity kamsync keeps an [`EntityState`] (see `store.rs`). The rules, in one place:
//!
//! | entity key now holds | state | effect |
//! |---|---|---|
//! | a valid document | none | new id from the sequence, row written, state recorded |
//! | a valid document | some | same id; row rewritten only if its content changed; if the row key changed, the old row is deleted first |
//! | a valid document whose row another entity owns | any | conflict: recorded as waiting for the row, error recorded; gets the row when the owner lets it go |
//! | an invalid document | any | nothing written (the last good row stays), error recorded |
//! | nothing | some | row deleted (if still owned), state forgotten |
//! | a non-JSON value | some or none | as "nothing", plus an error recorded |

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::calls::{Calls, KeyKind, Reply};
use crate::config::{Config, LastModifiedFormat};
use crate::error::SyncError;
use crate::mapping::{self, Kind, Row};
use crate::stats::{self, ErrorRecord, COUNTERS};
use crate::store::{self, EntityState};

/// One unit of work, queued by the notification callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Make the entity at `key` and its row agree.
    Reconcile { db: i32, key: Vec<u8> },
    /// RENAME onto `to`: whatever entity `to` held is gone (its row goes); if `from` was an
    /// entity of the same kind, it keeps its id and row under its new key.
    Move { db: i32, from: Option<Vec<u8>>, to: Vec<u8> },
}

/// What a reconcile did, for `KAMSYNC.SYNC` and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The row was written (new entity, changed content or new row key).
    Written { id: i64, row: String },
    /// The entity is synced and its row already had this content.
    Unchanged { id: i64, row: String },
    /// The entity is gone and its row was deleted.
    Removed { row: String },
    /// Nothing to do: no entity and no row of its.
    Nothing,
    /// A new entity that needs an id from the sequence, put off by [`Syncer::defer_fresh_ids`].
    Deferred,
}

/// The clock of one job: every row and document written by it carries the same time.
/// `last_modified` is formatted on first use only (credential rows do not carry it).
pub struct Clock {
    pub now_ms: i64,
    format: LastModifiedFormat,
    last_modified: std::cell::OnceCell<String>,
}

impl Clock {
    pub fn now(format: LastModifiedFormat) -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Clock { now_ms, format, last_modified: std::cell::OnceCell::new() }
    }

    fn last_modified(&self) -> &str {
        self.last_modified.get_or_init(|| {
            let at = chrono::DateTime::from_timestamp_millis(self.now_ms)
                .unwrap_or_default()
                .with_timezone(&chrono::Local);
            format_last_modified(&at, self.format)
        })
    }
}

/// `last_modified` as written into rows.
pub fn format_last_modified<Tz: chrono::TimeZone>(
    at: &chrono::DateTime<Tz>,
    format: LastModifiedFormat,
) -> String
where
    Tz::Offset: std::fmt::Display,
{
    match format {
        LastModifiedFormat::Datetime => at.format("%Y-%m-%d %H:%M:%S").to_string(),
        LastModifiedFormat::Epoch => at.timestamp().to_string(),
    }
}

/// Why the syncer runs, which decides how much it checks and what it may take from documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// After a client's write: trust the remembered fingerprint (one read less per event),
    /// issue ids from the sequence, stamp `dateUpdated`.
    Write,
    /// KAMSYNC.SYNC, RESYNC, CHECK REPAIR: compare rows with what Redis holds (repairs rows
    /// changed behind kamsync's back); adopt `externalId` and `dateCreated` from documents that
    /// kamsync does not know yet (a migration keeps Kamailio's ids); touch audit fields only
    /// where they are wrong, so a resync does not fake an update of every entity.
    Command,
}

/// Ids adopted from documents, so that two documents carrying one id (a copy) do not both get
/// it, and so that the sequences can be moved past them.
#[derive(Debug, Default)]
pub struct Adoption {
    taken: HashMap<(i32, Kind), HashSet<i64>>,
    /// Highest adopted id not yet reflected in the sequence.
    pending_max: HashMap<(i32, Kind), i64>,
}

/// What an entity key holds, as [`Syncer::reconcile`] and [`Syncer::inspect`] read it.
enum Entity {
    Missing,
    Document(Value),
    /// A non-JSON value, or a document that does not parse: the reason.
    Unreadable(SyncError),
}

/// What [`Syncer::inspect`] finds about one entity, without writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    InStep,
    /// Invalid document or non-JSON value (the reason).
    Invalid(String),
    /// Valid, but its row is absent (never synced, or deleted behind kamsync's back).
    Missing {
        row: String,
    },
    /// Valid, but the row's content (or key) is not what the entity says.
    Differs {
        row: String,
    },
    /// Valid, but another entity owns the row.
    Conflict {
        row: String,
        owner: String,
    },
}

/// A batch of work against one context and one configuration snapshot.
pub struct Syncer<'a> {
    calls: Calls<'a>,
    config: Arc<Config>,
    clock: Clock,
    /// Databases whose domain table changed: each gets one reload request at [`finish`].
    reload_dbs: BTreeSet<i32>,
    db: i32,
    mode: Mode,
    /// Ids taken over from documents in command mode, per database and kind.
    adoption: Adoption,
    /// Entities refused for a row that this batch released: reconciled at [`finish`].
    waiters: Vec<(i32, Vec<u8>)>,
    /// Put off entities that would take a new id from the sequence (RESYNC's first pass, so
    /// that every id documents already carry is adopted before any new one is issued).
    pub defer_fresh_ids: bool,
}

impl<'a> Syncer<'a> {
    pub fn new(calls: Calls<'a>, config: Arc<Config>) -> Self {
        let clock = Clock::now(config.last_modified_format);
        let db = Calls::selected_db(calls.ctx);
        Syncer {
            calls,
            config,
            clock,
            reload_dbs: BTreeSet::new(),
            db,
            mode: Mode::Write,
            adoption: Adoption::default(),
            waiters: Vec::new(),
            defer_fresh_ids: false,
        }
    }

    /// Switches to [`Mode::Command`], carrying the ids adopted so far (a resync runs in many
    /// batches; [`Syncer::finish`] hands them back).
    pub fn for_command(mut self, adoption: Adoption) -> Self {
        self.mode = Mode::Command;
        self.adoption = adoption;
        self
    }

    /// Runs queued ops: moves first, in order, then one reconcile per distinct key. Reconciles
    /// read the final state of each key, so their order does not matter; moves must come first
    /// so that a renamed entity is found under its new key.
    pub fn run_ops(&mut self, ops: Vec<Op>) {
        let mut seen = HashSet::new();
        let mut reconciles = Vec::new();
        for op in ops {
            match op {
                Op::Move { db, from, to } => {
                    if let Err(err) = self.transfer(db, from.as_deref(), &to) {
                        self.report(db, &to, &err);
                    }
                }
                Op::Reconcile { db, key } => {
                    if seen.insert((db, key.clone())) {
                        reconciles.push((db, key));
                    }
                }
            }
        }
        for (db, key) in reconciles {
            // Errors are already reported inside.
            let _ = self.reconcile(db, &key);
        }
    }

    /// Hands released rows to the entities waiting for them, appends one reload request per
    /// database whose domain rows changed, and restores the database the context had selected.
    pub fn finish(mut self) -> Adoption {
        self.serve_waiters();
        self.advance_sequences();
        let original = self.db;
        let dbs = std::mem::take(&mut self.reload_dbs);
        for db in dbs {
            let maxlen = self.config.reload_stream_maxlen.to_string();
            let result = self.select(db).and_then(|()| {
                self.calls.write(
                    "XADD",
                    &[
                        self.config.reload_stream.as_bytes(),
                        b"MAXLEN",
                        b"~",
                        maxlen.as_bytes(),
                        b"*",
                        b"cmd",
                        b"domain.reload",
                    ],
                )
            });
            match result {
                Ok(_) => COUNTERS.reload_requests.incr(),
                Err(err) => self.report(db, self.config.reload_stream.clone().as_bytes(), &err),
            }
        }
        let _ = self.select(original);
        std::mem::take(&mut self.adoption)
    }

    /// Moves each sequence past the ids adopted in this batch, so that new entities never get
    /// an adopted id.
    fn advance_sequences(&mut self) {
        let pending = std::mem::take(&mut self.adoption.pending_max);
        let current_db = self.db;
        for ((db, kind), max) in pending {
            let sequence = self.config.sequence(kind).to_owned();
            let result = self.select(db).and_then(|()| {
                let current = self.calls.read("GET", &[sequence.as_bytes()])?.into_bulk();
                let current: i64 =
                    current.and_then(|raw| String::from_utf8(raw).ok()?.parse().ok()).unwrap_or(0);
                if current < max {
                    self.calls.write("SET", &[sequence.as_bytes(), max.to_string().as_bytes()])?;
                }
                Ok(())
            });
            if let Err(err) = result {
                self.report(db, sequence.as_bytes(), &err);
            }
        }
        let _ = self.select(current_db);
    }

    /// Reconciles the entities that were waiting for a row released in this batch. Each one
    /// that still maps to the row takes it or, if another waiter was first, waits again. The
    /// bound only guards against a bug looping forever.
    fn serve_waiters(&mut self) {
        for _ in 0..10_000 {
            let Some((db, key)) = self.waiters.pop() else { return };
            let _ = self.reconcile(db, &key);
        }
    }

    /// Brings one entity key and its row in line; reports (counts, logs, records) any error.
    pub fn reconcile(&mut self, db: i32, key: &[u8]) -> Result<Action, SyncError> {
        let result = self.select(db).and_then(|()| self.reconcile_here(key));
        if let Err(err) = &result {
            self.report(db, key, err);
        }
        result
    }

    fn select(&mut self, db: i32) -> Result<(), SyncError> {
        if self.db != db {
            self.calls.select_db(db)?;
            self.db = db;
        }
        Ok(())
    }

    fn reconcile_here(&mut self, key: &[u8]) -> Result<Action, SyncError> {
        let Some(kind) = self.config.kind_of(key) else {
            return Ok(Action::Nothing);
        };
        match self.read_entity(key) {
            Entity::Document(doc) => self.upsert(kind, key, &doc),
            Entity::Missing => self.remove(kind, key),
            // A non-JSON value replaced the entity: its row goes. A document that does not
            // parse is only invalid: its last good row stays.
            Entity::Unreadable(err @ SyncError::NotJson(_)) => {
                self.remove(kind, key)?;
                Err(err)
            }
            Entity::Unreadable(err) => Err(err),
        }
    }

    /// What the key holds now. JSON.GET answers nil for a missing key and an error for any
    /// other type: one call on the common path; the key's type is looked up only to name it in
    /// the error.
    fn read_entity(&self, key: &[u8]) -> Entity {
        match self.calls.read("JSON.GET", &[key]) {
            Ok(Reply::Bulk(text)) => match serde_json::from_slice(&text) {
                Ok(doc) => Entity::Document(doc),
                Err(e) => Entity::Unreadable(SyncError::BadJson(e.to_string())),
            },
            Ok(Reply::Nil) => Entity::Missing,
            _ => match self.calls.key_kind(key) {
                KeyKind::Missing => Entity::Missing,
                KeyKind::Module => Entity::Unreadable(SyncError::NotJson("module".into())),
                KeyKind::Core(found) => Entity::Unreadable(SyncError::NotJson(found.into())),
            },
        }
    }

    fn row_for(&self, kind: Kind, doc: &Value) -> Result<Row, SyncError> {
        let table = self.config.table(kind);
        match kind {
            Kind::Domain => mapping::domain_row(doc, table),
            Kind::Credential => mapping::credential_row(doc, table, self.config.store_password),
        }
    }

    fn upsert(&mut self, kind: Kind, key: &[u8], doc: &Value) -> Result<Action, SyncError> {
        COUNTERS.upserts.incr();
        let row = self.row_for(kind, doc)?;
        let state_key = store::state_key(kind);
        let (state, owner) = self.state_and_owner(state_key, key, &row.key)?;
        if let Some(owner) = owner.filter(|owner| owner.as_slice() != key) {
            self.wait_for(state_key, &row.key, key)?;
            return Err(SyncError::Conflict { row: row.key, owner: stats::printable_key(&owner) });
        }

        let (id, created_ms) = match &state {
            Some(state) => (state.id, state.created_ms),
            None => match self.new_identity(kind, doc)? {
                Some(identity) => identity,
                None => return Ok(Action::Deferred),
            },
        };
        if self.config.audit {
            self.write_audit_fields(key, doc, id, created_ms)?;
        }

        let fingerprint = row.fingerprint(id);
        let old_row = state.as_ref().map(|s| s.row.as_str()).filter(|old| *old != row.key);
        if let Some(old_row) = old_row {
            self.calls.write("DEL", &[old_row.as_bytes()])?;
            let waiters =
                self.calls.read("HGET", &[state_key.as_bytes(), &store::waiters_field(old_row)])?;
            self.release(state_key, old_row, waiters.into_bulk(), &[])?;
            COUNTERS.rows_deleted.incr();
        }
        let unchanged =
            state.as_ref().is_some_and(|s| s.row == row.key && s.fingerprint == fingerprint);
        if unchanged && (self.mode == Mode::Write || self.row_matches(&row, id)?) {
            COUNTERS.rows_unchanged.incr();
            return Ok(Action::Unchanged { id, row: row.key });
        }

        self.write_row(&row, id)?;
        if state.as_ref().is_some_and(|s| s.row_has_password && s.row == row.key)
            && !row.has_password()
        {
            self.calls.write("HDEL", &[row.key.as_bytes(), b"password"])?;
        }
        let new_state = EntityState {
            id,
            created_ms,
            fingerprint,
            row_has_password: row.has_password(),
            row: row.key.clone(),
        };
        self.record_state(state_key, key, &new_state)?;
        if row.reload_relevant {
            self.reload_dbs.insert(self.db);
        }
        Ok(Action::Written { id, row: row.key })
    }

    /// The entity's state and the current owner of `row`, in one HMGET.
    fn state_and_owner(
        &self,
        state_key: &str,
        key: &[u8],
        row: &str,
    ) -> Result<(Option<EntityState>, Option<Vec<u8>>), SyncError> {
        let reply = self.calls.read(
            "HMGET",
            &[state_key.as_bytes(), &store::entity_field(key), &store::owner_field(row)],
        )?;
        let Reply::Array(mut items) = reply else {
            return Err(SyncError::Redis { command: "HMGET", message: "unexpected reply".into() });
        };
        let owner = items.pop().and_then(Reply::into_bulk);
        let state =
            items.pop().and_then(Reply::into_bulk).and_then(|raw| EntityState::decode(&raw));
        Ok((state, owner))
    }

    fn entity_state(&self, state_key: &str, key: &[u8]) -> Result<Option<EntityState>, SyncError> {
        let reply = self.calls.read("HGET", &[state_key.as_bytes(), &store::entity_field(key)])?;
        Ok(reply.into_bulk().and_then(|raw| EntityState::decode(&raw)))
    }

    fn issue_id(&mut self, kind: Kind) -> Result<i64, SyncError> {
        if self.mode == Mode::Command {
            // Ids adopted so far must never come out of the sequence.
            self.advance_sequences();
        }
        let id = match self.calls.write("INCR", &[self.config.sequence(kind).as_bytes()])? {
            Reply::Int(id) => id,
            _ => {
                return Err(SyncError::Redis {
                    command: "INCR",
                    message: "unexpected reply".into(),
                })
            }
        };
        COUNTERS.ids_issued.incr();
        if self.mode == Mode::Command {
            // Nor may a document adopted later bring an id issued here.
            self.adoption.taken.entry((self.db, kind)).or_default().insert(id);
        }
        Ok(id)
    }

    /// Id and dateCreated for an entity kamsync does not know yet: from the sequence, or in
    /// command mode adopted from the document (`externalId` and `dateCreated` the Gears library
    /// or an earlier kamsync wrote), unless another document already took that id.
    fn new_identity(&mut self, kind: Kind, doc: &Value) -> Result<Option<(i64, i64)>, SyncError> {
        let positive = |field: &str| doc.get(field).and_then(Value::as_i64).filter(|v| *v > 0);
        if self.mode == Mode::Command {
            if let Some(id) = positive("externalId") {
                let slot = (self.db, kind);
                if self.adoption.taken.entry(slot).or_default().insert(id) {
                    let max = self.adoption.pending_max.entry(slot).or_insert(0);
                    *max = (*max).max(id);
                    let created = positive("dateCreated").unwrap_or(self.clock.now_ms);
                    return Ok(Some((id, created)));
                }
            }
            if self.defer_fresh_ids {
                return Ok(None);
            }
        }
        Ok(Some((self.issue_id(kind)?, self.clock.now_ms)))
    }

    /// `externalId`, `dateCreated`, `dateUpdated` into the document, in one JSON.MERGE. After a
    /// client's write `dateUpdated` is always stamped; in command mode only wrong or missing
    /// fields are written, and nothing when all are right.
    fn write_audit_fields(
        &self,
        key: &[u8],
        doc: &Value,
        id: i64,
        created_ms: i64,
    ) -> Result<(), SyncError> {
        let mut patch = serde_json::Map::new();
        let differs =
            |field: &str, value: i64| doc.get(field).and_then(Value::as_i64) != Some(value);
        if self.mode == Mode::Write || differs("externalId", id) {
            patch.insert("externalId".into(), id.into());
        }
        if self.mode == Mode::Write || differs("dateCreated", created_ms) {
            patch.insert("dateCreated".into(), created_ms.into());
        }
        if self.mode == Mode::Write || doc.get("dateUpdated").and_then(Value::as_i64).is_none() {
            patch.insert("dateUpdated".into(), self.clock.now_ms.into());
        }
        if patch.is_empty() {
            return Ok(());
        }
        let patch = Value::Object(patch).to_string();
        self.calls.write("JSON.MERGE", &[key, b"$", patch.as_bytes()])?;
        Ok(())
    }

    /// One `SCAN` call in database `db`: the next cursor and the keys.
    pub fn scan(
        &mut self,
        db: i32,
        cursor: &str,
        pattern: &str,
        count: &str,
    ) -> Result<(String, Vec<Vec<u8>>), SyncError> {
        self.select(db)?;
        let reply = self.calls.read(
            "SCAN",
            &[cursor.as_bytes(), b"MATCH", pattern.as_bytes(), b"COUNT", count.as_bytes()],
        )?;
        let unexpected =
            || SyncError::Redis { command: "SCAN", message: "unexpected reply".into() };
        let Reply::Array(mut parts) = reply else { return Err(unexpected()) };
        let (Some(Reply::Array(keys)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop()) else {
            return Err(unexpected());
        };
        let next = String::from_utf8(next).map_err(|_| unexpected())?;
        Ok((next, keys.into_iter().filter_map(Reply::into_bulk).collect()))
    }

    /// Read-only: how the entity at `key` stands against its row (for KAMSYNC.CHECK).
    pub fn inspect(&mut self, db: i32, key: &[u8]) -> Result<Finding, SyncError> {
        self.select(db)?;
        let Some(kind) = self.config.kind_of(key) else {
            return Ok(Finding::InStep);
        };
        let doc = match self.read_entity(key) {
            Entity::Missing => return Ok(Finding::InStep),
            Entity::Document(doc) => doc,
            Entity::Unreadable(err) => return Ok(Finding::Invalid(err.to_string())),
        };
        let row = match self.row_for(kind, &doc) {
            Ok(row) => row,
            Err(err) => return Ok(Finding::Invalid(err.to_string())),
        };
        let (state, owner) = self.state_and_owner(store::state_key(kind), key, &row.key)?;
        if let Some(owner) = owner.filter(|owner| owner.as_slice() != key) {
            return Ok(Finding::Conflict { row: row.key, owner: stats::printable_key(&owner) });
        }
        let Some(state) = state else {
            return Ok(Finding::Missing { row: row.key });
        };
        if state.row != row.key || state.fingerprint != row.fingerprint(state.id) {
            return Ok(Finding::Differs { row: row.key });
        }
        if self.row_matches(&row, state.id)? {
            return Ok(Finding::InStep);
        }
        match self.calls.read("EXISTS", &[row.key.as_bytes()])? {
            Reply::Int(0) => Ok(Finding::Missing { row: row.key }),
            _ => Ok(Finding::Differs { row: row.key }),
        }
    }

    /// Whether a row key has no living owner: no entity recorded, or one whose key is gone or
    /// that no longer names this row. (For KAMSYNC.CHECK's orphan scan.)
    pub fn is_orphan_row(&mut self, db: i32, kind: Kind, row: &[u8]) -> Result<bool, SyncError> {
        self.select(db)?;
        let state_key = store::state_key(kind);
        let owner_field = store::owner_field(row);
        let Some(owner) =
            self.calls.read("HGET", &[state_key.as_bytes(), &owner_field])?.into_bulk()
        else {
            return Ok(true);
        };
        if self.calls.key_kind(&owner) == KeyKind::Missing {
            return Ok(true);
        }
        let state = self.entity_state(state_key, &owner)?;
        Ok(state.is_none_or(|s| s.row.as_bytes() != row))
    }

    /// Deletes an orphan row and any ownership recorded for it.
    pub fn remove_orphan_row(&mut self, db: i32, kind: Kind, row: &[u8]) -> Result<(), SyncError> {
        self.select(db)?;
        let state_key = store::state_key(kind);
        let owner_field = store::owner_field(row);
        self.calls.write("DEL", &[row])?;
        self.calls.write("HDEL", &[state_key.as_bytes(), &owner_field])?;
        COUNTERS.rows_deleted.incr();
        if kind == Kind::Domain {
            self.reload_dbs.insert(db);
        }
        Ok(())
    }

    /// Whether the row in Redis has exactly the content kamsync would write (`last_modified`
    /// aside).
    fn row_matches(&self, row: &Row, id: i64) -> Result<bool, SyncError> {
        let Reply::Array(items) = self.calls.read("HGETALL", &[row.key.as_bytes()])? else {
            return Ok(false);
        };
        let mut actual: Vec<(Vec<u8>, Vec<u8>)> = items
            .chunks(2)
            .filter_map(|pair| match pair {
                [Reply::Bulk(name), Reply::Bulk(value)] => Some((name.clone(), value.clone())),
                _ => None,
            })
            .filter(|(name, _)| name != b"last_modified")
            .collect();
        let mut expected: Vec<(Vec<u8>, Vec<u8>)> = std::iter::once(("id", id.to_string()))
            .chain(row.fields.iter().cloned())
            .map(|(name, value)| (name.as_bytes().to_vec(), value.into_bytes()))
            .collect();
        actual.sort();
        expected.sort();
        Ok(actual == expected)
    }

    fn write_row(&self, row: &Row, id: i64) -> Result<(), SyncError> {
        let id = id.to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(4 + 2 * row.fields.len());
        args.push(row.key.as_bytes());
        args.extend([b"id".as_slice(), id.as_bytes()]);
        for (name, value) in &row.fields {
            args.extend([name.as_bytes(), value.as_bytes()]);
        }
        if row.reload_relevant {
            args.extend([b"last_modified".as_slice(), self.clock.last_modified().as_bytes()]);
        }
        self.calls.write("HSET", &args)?;
        COUNTERS.rows_written.incr();
        Ok(())
    }

    /// Deletes the row the entity at `key` owns, if any, and forgets the entity.
    fn remove(&mut self, kind: Kind, key: &[u8]) -> Result<Action, SyncError> {
        COUNTERS.removes.incr();
        let state_key = store::state_key(kind);
        let Some(state) = self.entity_state(state_key, key)? else {
            return Ok(Action::Nothing);
        };
        let entity_field = store::entity_field(key);
        let reply = self.calls.read(
            "HMGET",
            &[
                state_key.as_bytes(),
                &store::owner_field(&state.row),
                &store::waiters_field(&state.row),
            ],
        )?;
        let (owner, waiters) = match reply {
            Reply::Array(items) => {
                let mut items = items.into_iter().map(Reply::into_bulk);
                (items.next().flatten(), items.next().flatten())
            }
            _ => (None, None),
        };
        if owner.as_deref() == Some(key) {
            self.calls.write("DEL", &[state.row.as_bytes()])?;
            self.release(state_key, &state.row, waiters, &entity_field)?;
            COUNTERS.rows_deleted.incr();
            if kind == Kind::Domain {
                self.reload_dbs.insert(self.db);
            }
        } else {
            // The row went to another entity meanwhile (a repair did it): leave it.
            self.calls.write("HDEL", &[state_key.as_bytes(), &entity_field])?;
        }
        Ok(Action::Removed { row: state.row })
    }

    /// Drops the ownership of a deleted row (and `also`, another field to delete in the same
    /// HDEL), and queues the entities that were waiting for it.
    fn release(
        &mut self,
        state_key: &str,
        row: &str,
        waiters: Option<Vec<u8>>,
        also: &[u8],
    ) -> Result<(), SyncError> {
        let owner_field = store::owner_field(row);
        let waiters_field = store::waiters_field(row);
        let mut fields: Vec<&[u8]> = vec![state_key.as_bytes(), &owner_field];
        if !also.is_empty() {
            fields.push(also);
        }
        if waiters.is_some() {
            fields.push(&waiters_field);
        }
        self.calls.write("HDEL", &fields)?;
        for waiter in waiters.as_deref().map(store::decode_waiters).unwrap_or_default() {
            self.waiters.push((self.db, waiter));
        }
        Ok(())
    }

    /// Records `key` among the entities waiting for `row`.
    fn wait_for(&self, state_key: &str, row: &str, key: &[u8]) -> Result<(), SyncError> {
        let field = store::waiters_field(row);
        let current = self.calls.read("HGET", &[state_key.as_bytes(), &field])?.into_bulk();
        let mut waiters = current.as_deref().map(store::decode_waiters).unwrap_or_default();
        if waiters.iter().any(|w| w.as_slice() == key) {
            return Ok(());
        }
        waiters.push(key.to_vec());
        self.calls
            .write("HSET", &[state_key.as_bytes(), &field, &store::encode_waiters(&waiters)])?;
        Ok(())
    }

    /// A RENAME onto `to`. The entity `to` held before is gone: its row goes. If `from` was a
    /// synced entity of the same kind, its state — id, dateCreated, row ownership — follows the
    /// key; the reconcile of `to` that follows then finds nothing to change.
    fn transfer(&mut self, db: i32, from: Option<&[u8]>, to: &[u8]) -> Result<(), SyncError> {
        self.select(db)?;
        let Some(kind) = self.config.kind_of(to) else {
            return Ok(());
        };
        if from == Some(to) {
            return Ok(());
        }
        let state_key = store::state_key(kind);
        if self.entity_state(state_key, to)?.is_some() {
            self.remove(kind, to)?;
        }
        let Some(from) = from.filter(|from| self.config.kind_of(from) == Some(kind)) else {
            return Ok(());
        };
        let Some(state) = self.entity_state(state_key, from)? else {
            return Ok(());
        };
        self.record_state(state_key, to, &state)?;
        self.calls.write("HDEL", &[state_key.as_bytes(), &store::entity_field(from)])?;
        Ok(())
    }

    /// Records an entity's state and its ownership of the row, in one HSET.
    fn record_state(
        &self,
        state_key: &str,
        key: &[u8],
        state: &EntityState,
    ) -> Result<(), SyncError> {
        self.calls.write(
            "HSET",
            &[
                state_key.as_bytes(),
                &store::entity_field(key),
                state.encode().as_bytes(),
                &store::owner_field(&state.row),
                key,
            ],
        )?;
        Ok(())
    }

    fn report(&self, db: i32, key: &[u8], err: &SyncError) {
        COUNTERS.count_error(err);
        let printable = stats::printable_key(key);
        let (may_log, suppressed) = stats::may_warn(self.clock.now_ms / 1000);
        if may_log {
            let mut line = format!("{printable} (db {db}) not synced: {err}");
            if suppressed > 0 {
                line.push_str(&format!(" [{suppressed} similar warnings suppressed]"));
            }
            crate::log::warning(self.calls.ctx, &line);
        }
        stats::record_error(ErrorRecord {
            time_ms: self.clock.now_ms,
            db,
            key: printable,
            reason: err.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn last_modified_uses_a_24_hour_clock() {
        let afternoon = chrono::Utc.with_ymd_and_hms(2026, 3, 4, 17, 5, 9).unwrap();

        assert_eq!(
            format_last_modified(&afternoon, LastModifiedFormat::Datetime),
            "2026-03-04 17:05:09"
        );
        assert_eq!(format_last_modified(&afternoon, LastModifiedFormat::Epoch), "1772643909");
    }
}
