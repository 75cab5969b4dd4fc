//! Model-based and crash tests: long random sequences of operations, then the whole set of rows
//! compared with what a simple model of the entities expects.

mod common;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;

const KEYS_PER_KIND: usize = 150;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Domain,
    Credential,
}

impl Kind {
    fn key(self, i: usize) -> String {
        match self {
            Kind::Domain => format!("sipdomain:{i}"),
            Kind::Credential => format!("credential:{i}"),
        }
    }
    /// A valid document whose row key is unique to `version`, and that row key.
    fn doc(self, version: u64) -> (Value, String) {
        match self {
            Kind::Domain => {
                let name = format!("v{version}.org");
                (json!({"name": name}), format!("domain:entry::{name}"))
            }
            Kind::Credential => {
                let user = format!("u{version}");
                let domain = format!("d{}.org", version % 3);
                (
                    json!({"username": user, "domain": domain, "password": format!("p{version}")}),
                    format!("subscriber:entry::{user}:{domain}"),
                )
            }
        }
    }
}

/// What the model knows about one entity key.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Empty,
    /// A valid document mapping to this row.
    Valid {
        row: String,
    },
    /// An invalid document; the row of the last valid one stays (if there was one).
    Invalid {
        last_row: Option<String>,
    },
    /// A non-JSON value.
    NonJson,
}

impl Slot {
    fn row(&self) -> Option<&String> {
        match self {
            Slot::Valid { row } => Some(row),
            Slot::Invalid { last_row } => last_row.as_ref(),
            _ => None,
        }
    }
}

struct Model {
    slots: BTreeMap<String, Slot>,
    /// Ids seen right after an entity was created, to check they never change.
    ids: BTreeMap<String, i64>,
    version: u64,
}

impl Model {
    fn slot(&self, key: &str) -> Slot {
        self.slots.get(key).cloned().unwrap_or(Slot::Empty)
    }
    fn set(&mut self, key: &str, slot: Slot) {
        if matches!(slot, Slot::Empty | Slot::NonJson) {
            self.ids.remove(key);
        }
        self.slots.insert(key.to_owned(), slot);
    }
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }
    fn expected_rows(&self) -> BTreeSet<String> {
        self.slots.values().filter_map(|s| s.row().cloned()).collect()
    }
}

/// One random operation, applied to Redis and to the model. Returns the command for a MULTI
/// when `queue` is given instead of running it.
fn random_op(rng: &mut fastrand::Rng, con: &mut Connection, model: &mut Model) {
    let kind = if rng.bool() { Kind::Domain } else { Kind::Credential };
    let key = kind.key(rng.usize(..KEYS_PER_KIND));
    let before = model.slot(&key);
    match rng.u32(..100) {
        0..=34 => {
            let version = model.next_version();
            let (doc, row) = kind.doc(version);
            if before == Slot::NonJson {
                let _: () = cmd("DEL").arg(&key).query(con).unwrap();
            }
            json_set(con, &key, &doc);
            let is_new =
                !matches!(before, Slot::Valid { .. } | Slot::Invalid { last_row: Some(_) });
            model.set(&key, Slot::Valid { row });
            if is_new {
                let id = json_get(con, &key)["externalId"].as_i64().unwrap();
                model.ids.insert(key, id);
            }
        }
        35..=42 => {
            if before == Slot::NonJson {
                let _: () = cmd("DEL").arg(&key).query(con).unwrap();
            }
            json_set(con, &key, &json!({"name": "bad name", "username": 5}));
            model.set(&key, Slot::Invalid { last_row: before.row().cloned() });
        }
        43..=52 => {
            if let Slot::Valid { row } = before {
                let (path, value) = match kind {
                    Kind::Domain => ("$.did", format!("\"did{}\"", rng.u32(..1000))),
                    Kind::Credential => ("$.password", format!("\"pw{}\"", rng.u32(..1000))),
                };
                let _: () = cmd("JSON.SET").arg(&key).arg(path).arg(value).query(con).unwrap();
                model.set(&key, Slot::Valid { row });
            }
        }
        53..=60 => {
            let _: () = cmd("DEL").arg(&key).query(con).unwrap();
            model.set(&key, Slot::Empty);
        }
        61..=65 => {
            if before != Slot::Empty {
                let _: () = cmd("PEXPIRE").arg(&key).arg(1).query(con).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                let _: bool = cmd("EXISTS").arg(&key).query(con).unwrap();
                model.set(&key, Slot::Empty);
            }
        }
        66..=70 => {
            let _: () = cmd("SET").arg(&key).arg("plain").query(con).unwrap();
            model.set(&key, Slot::NonJson);
        }
        71..=78 => {
            let target = kind.key(rng.usize(..KEYS_PER_KIND));
            if before != Slot::Empty && target != key {
                let _: () = cmd("RENAME").arg(&key).arg(&target).query(con).unwrap();
                let id = model.ids.remove(&key);
                model.set(&target, before);
                model.ids.remove(&target);
                if let Some(id) = id {
                    model.ids.insert(target.clone(), id);
                }
                model.set(&key, Slot::Empty);
            }
        }
        79..=83 => {
            if matches!(before, Slot::Valid { .. } | Slot::Invalid { .. }) {
                let _: i64 = cmd("JSON.DEL").arg(&key).arg("$").query(con).unwrap();
                model.set(&key, Slot::Empty);
            }
        }
        _ => multi(rng, con, model, kind),
    }
}

/// A MULTI/EXEC of valid writes, partial updates and deletes on a few keys of one kind. kamsync
/// sees only the final state of each key; the model's rows agree with that, and ids of keys
/// touched here are not checked afterwards.
fn multi(rng: &mut fastrand::Rng, con: &mut Connection, model: &mut Model, kind: Kind) {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for _ in 0..rng.usize(2..5) {
        let key = kind.key(rng.usize(..KEYS_PER_KIND));
        if rng.bool() {
            let (doc, row) = kind.doc(model.next_version());
            if model.slot(&key) == Slot::NonJson {
                pipe.cmd("DEL").arg(&key).ignore();
            }
            pipe.cmd("JSON.SET").arg(&key).arg("$").arg(doc.to_string()).ignore();
            model.set(&key, Slot::Valid { row });
        } else {
            pipe.cmd("DEL").arg(&key).ignore();
            model.set(&key, Slot::Empty);
        }
        model.ids.remove(&key);
    }
    let _: () = pipe.query(con).unwrap();
}

fn check_against_model(con: &mut Connection, model: &Model, seed: u64) {
    let mut actual: BTreeSet<String> = keys(con, "domain:entry::*");
    actual.extend(keys(con, "subscriber:entry::*"));
    let expected = model.expected_rows();
    let missing: Vec<_> = expected.difference(&actual).collect();
    let orphans: Vec<_> = actual.difference(&expected).collect();
    assert!(
        missing.is_empty() && orphans.is_empty(),
        "seed {seed}: missing {missing:?}, orphans {orphans:?}"
    );

    let mut seen_ids = BTreeSet::new();
    for (key, slot) in &model.slots {
        let Some(row) = slot.row() else { continue };
        let id = row_id(con, row);
        let table = row.split(':').next().unwrap().to_owned();
        assert!(seen_ids.insert((table, id)), "seed {seed}: id {id} used twice");
        if let Some(expected) = model.ids.get(key) {
            assert_eq!(id, *expected, "seed {seed}: id of {key} changed");
        }
        if let Slot::Valid { .. } = slot {
            assert_eq!(json_get(con, key)["externalId"], id, "seed {seed}: {key}");
        }
    }
}

on_every_server! {
    /// 3000 random creates, updates, row key changes, invalid writes, deletes, expiries,
    /// overwrites, RENAMEs, root JSON.DELs and MULTIs over 300 keys: afterwards the rows are
    /// exactly those the model expects (no orphan, none missing), ids unique and stable.
    fn random_operation_sequences_leave_exactly_the_expected_rows(flavor: Flavor) {
        let seed = std::env::var("KAMSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
        eprintln!("model test seed {seed} (set KAMSYNC_SEED to replay)");
        let server = Server::start(flavor);
        let mut con = server.connect();
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut model = Model { slots: BTreeMap::new(), ids: BTreeMap::new(), version: 0 };

        for step in 0..3000 {
            random_op(&mut rng, &mut con, &mut model);
            if step % 1000 == 999 {
                check_against_model(&mut con, &model, seed);
            }
        }

        check_against_model(&mut con, &model, seed);
        // Deleting everything leaves no row and no state.
        let all: Vec<String> = cmd("KEYS").arg("*").query(&mut con).unwrap();
        for key in all.iter().filter(|k| k.starts_with("sipdomain:") || k.starts_with("credential:")) {
            let _: () = cmd("DEL").arg(key).query(&mut con).unwrap();
        }
        assert!(keys(&mut con, "*:entry::*").is_empty());
        assert!(keys(&mut con, "kamsync:*").is_empty());
    }
}

/// Every synced entity has its row, and every row belongs to an entity that exists.
fn check_consistency(con: &mut Connection) -> (usize, usize) {
    let mut rows = 0;
    let mut entities = 0;
    for (kind, table) in [("domain", "domain"), ("credential", "subscriber")] {
        let state = hgetall(con, &format!("kamsync:state:{kind}"));
        for (field, value) in &state {
            if let Some(row) = field.strip_prefix("r:") {
                assert!(
                    cmd("EXISTS").arg(value).query::<bool>(con).unwrap(),
                    "{row} owned by missing {value}"
                );
                assert_eq!(
                    state.get(&format!("e:{value}")).map(|s| s.rsplit(' ').next().unwrap()),
                    Some(row)
                );
            }
        }
        for row in keys(con, &format!("{table}:entry::*")) {
            let owner =
                state.get(&format!("r:{row}")).unwrap_or_else(|| panic!("orphan row {row}"));
            let id: i64 = state[&format!("e:{owner}")].split(' ').next().unwrap().parse().unwrap();
            assert_eq!(row_id(con, &row), id, "{row} vs {owner}");
            rows += 1;
        }
        let prefix = if kind == "domain" { "sipdomain:*" } else { "credential:*" };
        for key in keys(con, prefix) {
            if !state.contains_key(&format!("e:{key}")) {
                // Only a conflict may leave a valid entity without its row: another entity
                // owns the row it maps to.
                let doc = json_get(con, &key);
                let row = match kind {
                    "domain" => format!("domain:entry::{}", doc["name"].as_str().unwrap()),
                    _ => format!(
                        "subscriber:entry::{}:{}",
                        doc["username"].as_str().unwrap(),
                        doc["domain"].as_str().unwrap()
                    ),
                };
                let owner = state.get(&format!("r:{row}"));
                assert!(owner.is_some_and(|o| *o != key), "entity {key} has no row and no rival");
            }
            entities += 1;
        }
    }
    (rows, entities)
}

on_every_server! {
    /// Crash consistency: with appendfsync always, SIGKILL under a write load, then restart:
    /// every entity has its row and no row lacks its entity.
    fn kill_9_under_load_leaves_rows_and_entities_consistent(flavor: Flavor) {
        let mut server = Options::new(flavor).arg("appendonly", "yes").arg("appendfsync", "always").start();
        let port = server.port;
        let writer = std::thread::spawn(move || {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            let Ok(mut con) = client.get_connection() else { return 0 };
            let mut rng = fastrand::Rng::with_seed(7);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut done = 0;
            while Instant::now() < deadline {
                let i = rng.usize(..200);
                let result: redis::RedisResult<()> = match rng.u32(..10) {
                    0..=6 => cmd("JSON.SET").arg(format!("credential:{i}")).arg("$")
                        .arg(json!({"username": format!("u{i}"), "domain": "d.org", "password": format!("p{}", rng.u32(..))}).to_string())
                        .query(&mut con),
                    7 => cmd("DEL").arg(format!("credential:{i}")).query(&mut con),
                    _ => cmd("JSON.SET").arg(format!("sipdomain:{i}")).arg("$")
                        .arg(json!({"name": format!("n{}.org", rng.u32(..300))}).to_string())
                        .query(&mut con),
                };
                if result.is_err() {
                    break;
                }
                done += 1;
            }
            done
        });
        std::thread::sleep(Duration::from_millis(1500));

        server.kill9();
        let written = writer.join().unwrap();
        server.restart();

        let mut con = server.connect();
        let (rows, entities) = check_consistency(&mut con);
        assert!(written > 100, "only {written} writes before the kill");
        assert!(rows > 50 && entities >= rows, "rows {rows}, entities {entities}");
    }
}
