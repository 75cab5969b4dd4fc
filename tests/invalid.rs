//! Bad input: every invalid document or non-JSON value at an entity key is refused with a
//! clear, counted error; no row is written, nothing crashes, and a good row survives a bad
//! update.

mod common;
use common::*;

/// Documents that must never produce a row, each with a word its error message must contain.
fn invalid_domains() -> Vec<(Value, &'static str)> {
    vec![
        (json!({}), "name is missing"),
        (json!({"name": ""}), "name is empty"),
        (json!({"name": null}), "name is missing"),
        (json!({"name": 42}), "must be a string, not number"),
        (json!({"name": true}), "must be a string, not boolean"),
        (json!({"name": ["a.org"]}), "must be a string, not array"),
        (json!({"name": {"x": 1}}), "must be a string, not object"),
        (json!({"name": "a b.org"}), "U+0020"),
        (json!({"name": "a\tb.org"}), "U+0009"),
        (json!({"name": "a:b.org"}), "':'"),
        (json!({"name": "a\u{0}b"}), "U+0000"),
        (json!({"name": "line\nbreak"}), "U+000A"),
        (json!({"name": "\u{a0}nbsp.org"}), "U+00A0"),
        (json!({"name": "x".repeat(300)}), "over the limit"),
        (json!({"name": "ok.org", "did": ""}), "did is empty"),
        (json!({"name": "ok.org", "did": 5}), "did must be a string"),
        (json!({"name": "ok.org", "did": "a b"}), "did contains"),
        (json!([]), "not array"),
        (json!("example.org"), "not string"),
        (json!(42), "not number"),
        (json!(null), "not null"),
    ]
}

fn invalid_credentials() -> Vec<(Value, &'static str)> {
    let p = "pw";
    vec![
        (json!({}), "username is missing"),
        (json!({"username": "u"}), "domain is missing"),
        (json!({"domain": "d", "password": p}), "username is missing"),
        (json!({"username": "u", "domain": "d"}), "neither ha1 nor password"),
        (json!({"username": "", "domain": "d", "password": p}), "username is empty"),
        (json!({"username": "u", "domain": "d", "password": ""}), "password is empty"),
        (json!({"username": "u", "domain": "d", "password": 123}), "password must be a string"),
        (json!({"username": "u", "domain": "d", "ha1": "xyz"}), "ha1 must be 32"),
        (json!({"username": "u", "domain": "d", "ha1": "g".repeat(32)}), "only hex digits"),
        (json!({"username": "u", "domain": "d", "ha1": "a".repeat(33)}), "ha1 must be 32"),
        (
            json!({"username": "u", "domain": "d", "password": p, "ha1b": 1}),
            "ha1b must be a string",
        ),
        (json!({"username": "u:1", "domain": "d", "password": p}), "username contains ':'"),
        (json!({"username": "u", "domain": "d d", "password": p}), "domain contains"),
        (
            json!({"username": "u", "domain": "d", "password": "p".repeat(5000)}),
            "password is 5000 bytes",
        ),
        (json!({"username": 7, "domain": "d", "password": p}), "username must be a string"),
        (json!([1, 2, 3]), "not array"),
        (json!(true), "not boolean"),
    ]
}

fn recent_reasons(con: &mut Connection) -> Vec<(String, String)> {
    let status: Vec<redis::Value> = cmd("KAMSYNC.STATUS").query(con).unwrap();
    let at = status
        .iter()
        .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"recent_errors"))
        .unwrap();
    let redis::Value::Array(errors) = &status[at + 1] else { panic!("recent_errors not an array") };
    errors
        .iter()
        .map(|e| {
            let fields: Vec<String> = redis::from_redis_value(e).unwrap();
            (fields[5].clone(), fields[7].clone())
        })
        .collect()
}

on_every_server! {
    /// 38 invalid documents and 6 non-JSON values: no row, no id, each rejection counted and
    /// recorded with its reason, the server alive.
    fn invalid_documents_are_refused_counted_and_write_nothing(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let mut expected = Vec::new();

        for (i, (doc, why)) in invalid_domains().into_iter().enumerate() {
            let key = format!("sipdomain:bad{i}");
            json_set(&mut con, &key, &doc);
            expected.push((key, why));
        }
        for (i, (doc, why)) in invalid_credentials().into_iter().enumerate() {
            let key = format!("credential:bad{i}");
            json_set(&mut con, &key, &doc);
            expected.push((key, why));
        }
        let _: () = cmd("SET").arg("sipdomain:string").arg("x").query(&mut con).unwrap();
        let _: () = cmd("HSET").arg("credential:hash").arg("username").arg("u").query(&mut con).unwrap();
        let _: () = cmd("LPUSH").arg("sipdomain:list").arg("a").query(&mut con).unwrap();
        let _: () = cmd("SADD").arg("credential:set").arg("a").query(&mut con).unwrap();
        let _: () = cmd("ZADD").arg("sipdomain:zset").arg(1).arg("a").query(&mut con).unwrap();
        let _: String = cmd("XADD").arg("credential:stream").arg("*").arg("a").arg("b").query(&mut con).unwrap();
        for (key, found) in [("sipdomain:string", "string"), ("credential:hash", "hash"), ("sipdomain:list", "list"), ("credential:set", "set"), ("sipdomain:zset", "zset"), ("credential:stream", "stream")] {
            expected.push((key.to_owned(), if found == "string" { "holds a string value" } else { "not a RedisJSON document" }));
        }

        let ping: String = cmd("PING").query(&mut con).unwrap();
        assert_eq!(ping, "PONG");
        assert!(expected.len() >= 30);
        assert!(keys(&mut con, "domain:entry::*").is_empty());
        assert!(keys(&mut con, "subscriber:entry::*").is_empty());
        assert!(keys(&mut con, "id:sequence:*").is_empty(), "no id issued for invalid entities");
        assert_eq!(server.counter(&mut con, "rejected"), expected.len() as u64);
        assert_eq!(server.counter(&mut con, "rejected_not_json"), 6);
        let reasons = recent_reasons(&mut con);
        for (key, why) in &expected {
            let (_, reason) = reasons.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{key} not recorded"));
            assert!(reason.contains(why), "{key}: {reason:?} lacks {why:?}");
        }
    }
}

on_every_server! {
    /// An invalid update leaves the last good row exactly as it was.
    fn invalid_update_keeps_the_last_good_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "credential:1", &json!({"username": "u", "domain": "d", "password": "p"}));
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        let credential_row = hgetall(&mut con, "subscriber:entry::u:d");
        let domain_row = hgetall(&mut con, "domain:entry::a.org");

        json_set(&mut con, "credential:1", &json!({"username": "u", "domain": "d", "ha1": "nothex"}));
        json_set(&mut con, "sipdomain:1", &json!({"name": "a b"}));
        let _: () = cmd("JSON.SET").arg("sipdomain:1").arg("$").arg("[]").query(&mut con).unwrap();

        assert_eq!(hgetall(&mut con, "subscriber:entry::u:d"), credential_row);
        assert_eq!(hgetall(&mut con, "domain:entry::a.org"), domain_row);
        assert_eq!(server.counter(&mut con, "rejected_invalid"), 3);
    }
}

on_every_server! {
    /// Binary key names work as entity keys, and show escaped in errors and logs.
    fn binary_key_names_sync_and_are_logged_escaped(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let good = b"sipdomain:\xff\x00\x01".to_vec();
        let bad = b"credential:\xfe\n".to_vec();

        let _: () = cmd("JSON.SET").arg(&good).arg("$").arg(r#"{"name":"bin.org"}"#).query(&mut con).unwrap();
        let _: () = cmd("JSON.SET").arg(&bad).arg("$").arg(r#"{"username":"x"}"#).query(&mut con).unwrap();

        // A printf conversion in a key name must reach the log as text.
        json_set(&mut con, "credential:%s%n%p", &json!({"username": "x"}));

        assert_eq!(row_id(&mut con, "domain:entry::bin.org"), 1);
        let log = server.log();
        assert!(log.contains(r"credential:\xfe\x0a (db 0) not synced: domain is missing"), "{log}");
        assert!(log.contains("credential:%s%n%p (db 0) not synced: domain is missing"), "{log}");
        let _: () = cmd("DEL").arg(&good).query(&mut con).unwrap();
        assert!(keys(&mut con, "domain:entry::*").is_empty());
    }
}
