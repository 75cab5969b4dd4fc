//! The full lifecycle: deletes, expiry, eviction, overwrites, renames, moves, copies, restores,
//! row key changes, conflicts, transactions and scripts keep the Kamailio tables exact.

mod common;
use std::time::{Duration, Instant};

use common::*;

fn del(con: &mut Connection, key: &str) {
    let _: () = cmd("DEL").arg(key).query(con).unwrap();
}

fn exists(con: &mut Connection, key: &str) -> bool {
    cmd("EXISTS").arg(key).query(con).unwrap()
}

fn domain(con: &mut Connection, key: &str, name: &str) {
    json_set(con, key, &json!({"name": name}));
}

fn credential(con: &mut Connection, key: &str, user: &str, password: &str) {
    json_set(con, key, &json!({"username": user, "domain": "example.com", "password": password}));
}

fn state_fields(con: &mut Connection) -> Vec<String> {
    let mut fields = Vec::new();
    for kind in ["domain", "credential"] {
        let map = hgetall(con, &format!("kamsync:state:{kind}"));
        fields.extend(map.into_keys());
    }
    fields
}

/// Polls until `check` holds, failing after a deadline.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

on_every_server! {
    /// DEL of a credential removes its subscriber row at once; the state goes with it.
    fn credential_delete_removes_subscriber_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:1", "alice", "pw");

        del(&mut con, "credential:1");

        assert!(!exists(&mut con, "subscriber:entry::alice:example.com"));
        assert!(state_fields(&mut con).is_empty());
        assert_eq!(server.counter(&mut con, "rows_deleted"), 1);
    }
}

on_every_server! {
    /// UNLINK of a domain removes its row and requests a reload.
    fn domain_unlink_removes_row_and_requests_reload(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");
        let reloads = xlen(&mut con, "reload:domain");

        let _: () = cmd("UNLINK").arg("sipdomain:1").query(&mut con).unwrap();

        assert!(!exists(&mut con, "domain:entry::a.org"));
        assert_eq!(xlen(&mut con, "reload:domain"), reloads + 1);
    }
}

on_every_server! {
    /// A credential that expires (active expiry, no client touching it) loses its row.
    fn expired_credential_removes_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:1", "alice", "pw");

        let _: () = cmd("PEXPIRE").arg("credential:1").arg(30).query(&mut con).unwrap();

        assert!(exists(&mut con, "subscriber:entry::alice:example.com"), "a TTL alone changes nothing");
        eventually("row removed after expiry", || !exists(&mut con, "subscriber:entry::alice:example.com"));
        assert!(state_fields(&mut con).is_empty());
    }
}

on_every_server! {
    /// An entity evicted under maxmemory loses its row.
    fn evicted_domain_removes_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");
        // Only keys with a TTL may be evicted under volatile-ttl: the entity is the only one.
        let _: () = cmd("EXPIRE").arg("sipdomain:1").arg(3600).query(&mut con).unwrap();
        let info: String = cmd("INFO").arg("memory").query(&mut con).unwrap();
        let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
        let _: () = cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("volatile-ttl").query(&mut con).unwrap();
        let _: () = cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + 256 * 1024).query(&mut con).unwrap();

        let filler = "x".repeat(512 * 1024);
        let _: redis::RedisResult<()> = cmd("SET").arg("filler").arg(&filler).query(&mut con);

        let _: () = cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query(&mut con).unwrap();
        assert!(!exists(&mut con, "sipdomain:1"), "the entity was not evicted");
        assert!(!exists(&mut con, "domain:entry::a.org"));
        assert!(state_fields(&mut con).is_empty());
    }
}

on_every_server! {
    /// JSON.DEL of the root deletes the key with only a json.del event: the row goes.
    /// JSON.DEL of a path is an update.
    fn json_del_root_removes_row_and_json_del_path_updates(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "did": "t1"}));
        json_set(&mut con, "sipdomain:2", &json!({"name": "b.org"}));

        let _: i64 = cmd("JSON.DEL").arg("sipdomain:1").arg("$.did").query(&mut con).unwrap();
        let _: i64 = cmd("JSON.DEL").arg("sipdomain:2").arg("$").query(&mut con).unwrap();

        assert_eq!(hgetall(&mut con, "domain:entry::a.org")["did"], "a.org");
        assert!(!exists(&mut con, "domain:entry::b.org"));
    }
}

on_every_server! {
    /// SET over an entity key removes the row and records an error.
    fn non_json_overwrite_removes_row_and_records_error(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:1", "alice", "pw");

        let _: () = cmd("SET").arg("credential:1").arg("oops").query(&mut con).unwrap();

        assert!(!exists(&mut con, "subscriber:entry::alice:example.com"));
        assert_eq!(server.counter(&mut con, "rejected_not_json"), 1);
        assert!(server.log().contains("credential:1 (db 0) not synced: the key holds a string value"));
    }
}

on_every_server! {
    /// RESTORE ... REPLACE of another type over an entity removes its row too.
    fn restore_replace_with_another_type_removes_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");
        let _: () = cmd("HSET").arg("plain").arg("f").arg("v").query(&mut con).unwrap();
        let dump: Vec<u8> = cmd("DUMP").arg("plain").query(&mut con).unwrap();

        let _: () = cmd("RESTORE").arg("sipdomain:1").arg(0).arg(dump).arg("REPLACE").query(&mut con).unwrap();

        assert!(!exists(&mut con, "domain:entry::a.org"));
        assert_eq!(server.counter(&mut con, "rejected_not_json"), 1);
    }
}

on_every_server! {
    /// RENAME within a kind keeps the id and the row; nothing is reissued.
    fn rename_keeps_id_and_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:old", "a.org");
        let row = hgetall(&mut con, "domain:entry::a.org");

        let _: () = cmd("RENAME").arg("sipdomain:old").arg("sipdomain:new").query(&mut con).unwrap();

        assert_eq!(hgetall(&mut con, "domain:entry::a.org"), row, "row untouched");
        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(1));
        assert_eq!(state_fields(&mut con), ["e:sipdomain:new", "r:domain:entry::a.org"]);
        del(&mut con, "sipdomain:new");
        assert!(!exists(&mut con, "domain:entry::a.org"));
    }
}

on_every_server! {
    /// RENAME onto another entity: the overwritten entity's row goes, the moved one keeps its.
    fn rename_onto_an_entity_removes_the_overwritten_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:a", "alice", "pw");
        credential(&mut con, "credential:b", "bob", "pw");

        let _: () = cmd("RENAME").arg("credential:a").arg("credential:b").query(&mut con).unwrap();

        assert!(!exists(&mut con, "subscriber:entry::bob:example.com"));
        assert_eq!(row_id(&mut con, "subscriber:entry::alice:example.com"), 1);
        assert_eq!(state_fields(&mut con), ["e:credential:b", "r:subscriber:entry::alice:example.com"]);
    }
}

on_every_server! {
    /// RENAME out of the prefix removes the row; RENAME into it creates one.
    fn rename_out_of_and_into_the_prefix(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");

        let _: () = cmd("RENAME").arg("sipdomain:1").arg("archive:1").query(&mut con).unwrap();
        assert!(!exists(&mut con, "domain:entry::a.org"));

        let _: () = cmd("RENAME").arg("archive:1").arg("sipdomain:2").query(&mut con).unwrap();
        // Back under the prefix it is a new entity: a new id, whatever the document carried.
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 2);
        assert_eq!(json_get(&mut con, "sipdomain:2")["externalId"], 2);
    }
}

on_every_server! {
    /// MOVE to another database: the row leaves the source database and appears in the target,
    /// with the target's own sequence.
    fn move_between_databases_moves_the_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");

        let moved: bool = cmd("MOVE").arg("sipdomain:1").arg(3).query(&mut con).unwrap();

        assert!(moved);
        assert!(!exists(&mut con, "domain:entry::a.org"));
        assert!(state_fields(&mut con).is_empty());
        let _: () = cmd("SELECT").arg(3).query(&mut con).unwrap();
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);
        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(1));
        assert_eq!(xlen(&mut con, "reload:domain"), 1);
    }
}

on_every_server! {
    /// COPY to another database syncs the copy there; COPY within one database is a second
    /// claim on the same row, refused as a conflict.
    fn copy_syncs_in_the_target_database_and_conflicts_in_the_same_one(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:1", "alice", "pw");

        let _: bool = cmd("COPY").arg("credential:1").arg("credential:1").arg("DB").arg(2).query(&mut con).unwrap();
        let _: bool = cmd("COPY").arg("credential:1").arg("credential:2").query(&mut con).unwrap();

        assert_eq!(server.counter(&mut con, "rejected_conflict"), 1);
        assert_eq!(row_id(&mut con, "subscriber:entry::alice:example.com"), 1);
        let _: () = cmd("SELECT").arg(2).query(&mut con).unwrap();
        assert_eq!(row_id(&mut con, "subscriber:entry::alice:example.com"), 1);
        assert_eq!(hgetall(&mut con, "kamsync:state:credential").len(), 2);
    }
}

on_every_server! {
    /// RESTORE of a dumped entity brings its row back.
    fn restore_of_an_entity_writes_its_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");
        let dump: Vec<u8> = cmd("DUMP").arg("sipdomain:1").query(&mut con).unwrap();
        del(&mut con, "sipdomain:1");
        assert!(!exists(&mut con, "domain:entry::a.org"));

        let _: () = cmd("RESTORE").arg("sipdomain:1").arg(0).arg(dump).query(&mut con).unwrap();

        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 2, "a restored entity is a new one");
        assert_eq!(json_get(&mut con, "sipdomain:1")["externalId"], 2);
    }
}

on_every_server! {
    /// A renamed domain and a credential whose username changes: the old row is deleted, the
    /// new one has the same id, and hashes derived from the password follow the new name.
    fn row_key_change_moves_the_row_with_the_same_id(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");
        credential(&mut con, "credential:1", "alice", "pw");

        let _: () = cmd("JSON.SET").arg("sipdomain:1").arg("$.name").arg("\"b.org\"").query(&mut con).unwrap();
        let _: () = cmd("JSON.SET").arg("credential:1").arg("$.username").arg("\"alicia\"").query(&mut con).unwrap();

        assert!(!exists(&mut con, "domain:entry::a.org"));
        assert_eq!(row_id(&mut con, "domain:entry::b.org"), 1);
        assert!(!exists(&mut con, "subscriber:entry::alice:example.com"));
        let row = hgetall(&mut con, "subscriber:entry::alicia:example.com");
        assert_eq!(row["id"], "1");
        assert_eq!(row["ha1"], md5_hex("alicia:example.com:pw"));
        assert_eq!(row["ha1b"], md5_hex("alicia@example.com:example.com:pw"));
        assert_eq!(state_fields(&mut con).len(), 4);
    }
}

on_every_server! {
    /// Conflict lifecycle: deleting a refused entity leaves the owner's row; deleting the
    /// owner hands the row, in the same transaction, to an entity still waiting for it (with
    /// its own new id), and a waiter that moved on to another name is just forgotten.
    fn conflict_lifecycle_hands_the_row_to_a_waiting_entity(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:owner", "a.org");
        domain(&mut con, "sipdomain:second", "a.org");
        domain(&mut con, "sipdomain:third", "a.org");
        domain(&mut con, "sipdomain:fourth", "a.org");
        domain(&mut con, "sipdomain:fourth", "elsewhere.org");

        del(&mut con, "sipdomain:second");
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);

        del(&mut con, "sipdomain:owner");

        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 3, "third waited and took the row");
        assert_eq!(json_get(&mut con, "sipdomain:third")["externalId"], 3);
        assert_eq!(row_id(&mut con, "domain:entry::elsewhere.org"), 2);
        assert_eq!(server.counter(&mut con, "rejected_conflict"), 3);
        del(&mut con, "sipdomain:third");
        del(&mut con, "sipdomain:fourth");
        assert!(keys(&mut con, "kamsync:*").is_empty(), "no waiter left behind");
    }
}

on_every_server! {
    /// A Lua script and a function that touch entities several times end with the rows of the
    /// final state, and one reload request.
    fn scripts_and_functions_end_with_rows_of_the_final_state(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let script = r#"
            redis.call('JSON.SET', KEYS[1], '$', '{"name":"a.org"}')
            redis.call('JSON.SET', KEYS[1], '$.name', '"b.org"')
            redis.call('JSON.SET', KEYS[2], '$', '{"name":"c.org"}')
            redis.call('DEL', KEYS[2])
            return 1"#;

        let _: i64 = cmd("EVAL").arg(script).arg(2).arg("sipdomain:1").arg("sipdomain:2").query(&mut con).unwrap();

        assert_eq!(keys(&mut con, "domain:entry::*"), ["domain:entry::b.org".to_owned()].into());
        assert_eq!(xlen(&mut con, "reload:domain"), 1);

        let library = "#!lua name=kamsynctest\n\
            redis.register_function('mkcred', function(keys, args)\n\
              redis.call('JSON.SET', keys[1], '$', '{\"username\":\"u\",\"domain\":\"d\",\"password\":\"p\"}')\n\
              redis.call('JSON.SET', keys[1], '$.username', '\"v\"')\n\
              return 1\n\
            end)";
        let _: String = cmd("FUNCTION").arg("LOAD").arg(library).query(&mut con).unwrap();
        let _: i64 = cmd("FCALL").arg("mkcred").arg(1).arg("credential:1").query(&mut con).unwrap();

        assert_eq!(keys(&mut con, "subscriber:entry::*"), ["subscriber:entry::v:d".to_owned()].into());
        assert_eq!(get_int(&mut con, "id:sequence:subscriber"), Some(1));
    }
}

on_every_server! {
    /// After every entity is deleted, only the sequences and the reload stream remain.
    fn nothing_leaks_after_every_entity_is_deleted(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        for i in 0..50 {
            domain(&mut con, &format!("sipdomain:{i}"), &format!("d{}.org", i % 40));
            credential(&mut con, &format!("credential:{i}"), &format!("u{i}"), "pw");
        }
        for i in 0..50 {
            let _: () = cmd("JSON.SET").arg(format!("credential:{i}")).arg("$.username").arg(format!("\"w{i}\"")).query(&mut con).unwrap();
        }
        let _: () = cmd("RENAME").arg("sipdomain:1").arg("sipdomain:renamed").query(&mut con).unwrap();

        let all: Vec<String> = cmd("KEYS").arg("*").query(&mut con).unwrap();
        for key in all.iter().filter(|k| k.starts_with("sipdomain:") || k.starts_with("credential:")) {
            del(&mut con, key);
        }

        let left: Vec<String> = {
            let mut k: Vec<String> = cmd("KEYS").arg("*").query(&mut con).unwrap();
            k.sort();
            k
        };
        assert_eq!(left, ["id:sequence:domain", "id:sequence:subscriber", "reload:domain"]);
    }
}

on_every_server! {
    /// FLUSHALL sends no key events: rows and state go with the data, and syncing starts over
    /// cleanly.
    fn flushall_takes_rows_and_state_along_and_syncing_starts_over(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        domain(&mut con, "sipdomain:1", "a.org");

        let _: () = cmd("FLUSHALL").query(&mut con).unwrap();
        domain(&mut con, "sipdomain:1", "a.org");

        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);
        assert_eq!(state_fields(&mut con), ["e:sipdomain:1", "r:domain:entry::a.org"]);
    }
}

on_every_server! {
    /// SWAPDB moves entities, rows and state together: the entity stays in step in its new
    /// database.
    fn swapdb_keeps_entities_and_rows_together(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        credential(&mut con, "credential:1", "alice", "pw");

        let _: () = cmd("SWAPDB").arg(0).arg(1).query(&mut con).unwrap();
        let _: () = cmd("SELECT").arg(1).query(&mut con).unwrap();
        del(&mut con, "credential:1");

        assert!(!exists(&mut con, "subscriber:entry::alice:example.com"));
        assert!(state_fields(&mut con).is_empty());
    }
}
