//! Upsert of domains and credentials: the rows the Gears library meant to write, without its
//! bugs. Each test runs against Redis 7.4, Redis 7.2 and Valkey 9.1.

mod common;
use common::*;

fn is_24h_datetime(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 19
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && text[11..13].parse::<u32>().is_ok_and(|h| h < 24)
}

on_every_server! {
    /// A new domain document gets the row the original meant to write: id, domain, did,
    /// last_modified, with the id also written back to the document.
    fn domain_json_set_writes_domain_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();

        json_set(&mut con, "sipdomain:1", &json!({"name": "example.com"}));

        let row = hgetall(&mut con, "domain:entry::example.com");
        assert_eq!(row["id"], "1");
        assert_eq!(row["domain"], "example.com");
        assert_eq!(row["did"], "example.com");
        assert!(is_24h_datetime(&row["last_modified"]), "{row:?}");
        assert_eq!(row.len(), 4, "{row:?}");
        let doc = json_get(&mut con, "sipdomain:1");
        assert_eq!(doc["externalId"], 1);
        assert!(doc["dateCreated"].as_i64().unwrap() > 1_600_000_000_000);
        assert_eq!(doc["dateCreated"], doc["dateUpdated"]);
    }
}

on_every_server! {
    /// The original threw on every credential; kamsync writes the subscriber row, with both
    /// hashes computed from the password the way kamctl does.
    fn credential_with_password_writes_subscriber_row(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();

        json_set(
            &mut con,
            "credential:alice",
            &json!({"username": "alice", "domain": "example.com", "password": "secret"}),
        );

        let row = hgetall(&mut con, "subscriber:entry::alice:example.com");
        assert_eq!(row["id"], "1");
        assert_eq!(row["username"], "alice");
        assert_eq!(row["domain"], "example.com");
        assert_eq!(row["ha1"], "b1726872c344b6dc8365b774f8fd6412");
        assert_eq!(row["ha1b"], "c79656e4f06dbae9fdf6727654273c65");
        assert!(!row.contains_key("password"), "plaintext password stored: {row:?}");
        assert_eq!(json_get(&mut con, "credential:alice")["externalId"], 1);
    }
}

on_every_server! {
    /// Given hashes are used as they are (lower-cased); a missing ha1b without a password is
    /// written empty, never left out.
    fn credential_with_hashes_writes_both_columns(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let ha1 = "AB".repeat(16);

        json_set(&mut con, "credential:b", &json!({"username": "bob", "domain": "d.io", "ha1": ha1}));

        let row = hgetall(&mut con, "subscriber:entry::bob:d.io");
        assert_eq!(row["ha1"], "ab".repeat(16));
        assert_eq!(row["ha1b"], "");
    }
}

on_every_server! {
    /// Updates keep the id and dateCreated (the original reissued the id and overwrote
    /// dateCreated on every event); dateUpdated moves.
    fn update_keeps_id_and_date_created(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        let first = json_get(&mut con, "sipdomain:1");
        std::thread::sleep(std::time::Duration::from_millis(5));

        let _: () = cmd("JSON.SET").arg("sipdomain:1").arg("$.did").arg("\"t1\"").query(&mut con).unwrap();

        let doc = json_get(&mut con, "sipdomain:1");
        assert_eq!(doc["externalId"], 1);
        assert_eq!(doc["dateCreated"], first["dateCreated"]);
        assert!(doc["dateUpdated"].as_i64() > first["dateUpdated"].as_i64());
        let row = hgetall(&mut con, "domain:entry::a.org");
        assert_eq!((row["id"].as_str(), row["did"].as_str()), ("1", "t1"));
        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(1));
    }
}

on_every_server! {
    /// A full rewrite that drops the audit fields gets them back with the same values.
    fn full_rewrite_keeps_id_external_id_and_date_created(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "credential:c", &json!({"username": "c", "domain": "d", "password": "p"}));
        let first = json_get(&mut con, "credential:c");

        json_set(&mut con, "credential:c", &json!({"username": "c", "domain": "d", "password": "q"}));

        let doc = json_get(&mut con, "credential:c");
        assert_eq!(doc["externalId"], first["externalId"]);
        assert_eq!(doc["dateCreated"], first["dateCreated"]);
        assert_eq!(row_id(&mut con, "subscriber:entry::c:d"), 1);
        assert_eq!(get_int(&mut con, "id:sequence:subscriber"), Some(1));
    }
}

on_every_server! {
    /// kamsync's own writes (row, state, JSON.MERGE on the entity) never trigger it again: the
    /// sequences advance once per new entity, and every job comes from a client write.
    fn own_writes_do_not_retrigger_and_sequences_advance_once_per_entity(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();

        for round in 0..5 {
            for i in 0..3 {
                json_set(&mut con, &format!("sipdomain:{i}"), &json!({"name": format!("d{i}.org"), "round": round}));
                json_set(&mut con, &format!("credential:{i}"), &json!({"username": format!("u{i}"), "domain": "d.org", "password": format!("p{round}")}));
            }
        }

        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(3));
        assert_eq!(get_int(&mut con, "id:sequence:subscriber"), Some(3));
        assert_eq!(server.counter(&mut con, "events_seen"), 30);
        assert_eq!(server.counter(&mut con, "jobs_run"), 30);
        assert_eq!(server.counter(&mut con, "ids_issued"), 6);
    }
}

on_every_server! {
    /// An update that does not change the row writes no row and requests no reload.
    fn unchanged_update_writes_no_row_and_requests_no_reload(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "note": 1}));
        let _: () = cmd("HSET").arg("domain:entry::a.org").arg("last_modified").arg("sentinel").query(&mut con).unwrap();
        let reloads = xlen(&mut con, "reload:domain");

        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "note": 2}));

        assert_eq!(hgetall(&mut con, "domain:entry::a.org")["last_modified"], "sentinel");
        assert_eq!(xlen(&mut con, "reload:domain"), reloads);
        assert_eq!(server.counter(&mut con, "rows_unchanged"), 1);
        assert_eq!(server.counter(&mut con, "rows_written"), 1);
    }
}

on_every_server! {
    /// Domain changes ask for a reload on the bounded stream; credentials never do.
    fn domain_changes_request_a_bounded_reload(flavor: Flavor) {
        let server = Options::new(flavor).module_args(&["reload-stream-maxlen", "10"]).start();
        let mut con = server.connect();

        json_set(&mut con, "credential:x", &json!({"username": "x", "domain": "d", "password": "p"}));
        assert_eq!(xlen(&mut con, "reload:domain"), 0);
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        let entries: Vec<(String, Vec<String>)> = {
            let reply: Vec<(String, Vec<(String, String)>)> =
                cmd("XRANGE").arg("reload:domain").arg("-").arg("+").query(&mut con).unwrap();
            reply.into_iter().map(|(id, fields)| (id, fields.into_iter().flat_map(|(k, v)| [k, v]).collect())).collect()
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1, vec!["cmd".to_owned(), "domain.reload".to_owned()]);

        for i in 0..1000 {
            json_set(&mut con, &format!("sipdomain:{i}"), &json!({"name": format!("n{i}.org")}));
        }

        // MAXLEN ~ trims whole stream nodes (100 entries each by default), never below 10.
        let len = xlen(&mut con, "reload:domain");
        assert!((10..=110).contains(&len), "stream length {len}");
    }
}

on_every_server! {
    /// last_modified can be written as epoch seconds (the int type of the db_redis schema).
    fn last_modified_epoch_format_writes_seconds(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        let _: () = cmd("CONFIG").arg("SET").arg("kamsync.last-modified-format").arg("epoch").query(&mut con).unwrap();

        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));

        let value: i64 = hgetall(&mut con, "domain:entry::a.org")["last_modified"].parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((now - value).abs() < 60, "{value} vs {now}");
    }
}

on_every_server! {
    /// With audit off, kamsync leaves the document alone but still keeps the id.
    fn audit_off_leaves_the_document_untouched(flavor: Flavor) {
        let server = Options::new(flavor).module_args(&["audit", "no"]).start();
        let mut con = server.connect();

        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "x": 1}));

        assert_eq!(json_get(&mut con, "sipdomain:1"), json!({"name": "a.org", "x": 1}));
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);
        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(1));
    }
}

on_every_server! {
    /// store-password yes writes the password column; turning it off removes the column again.
    fn store_password_controls_the_password_column(flavor: Flavor) {
        let server = Options::new(flavor).module_args(&["store-password", "yes"]).start();
        let mut con = server.connect();
        let doc = json!({"username": "u", "domain": "d", "password": "pw"});

        json_set(&mut con, "credential:1", &doc);
        assert_eq!(hgetall(&mut con, "subscriber:entry::u:d")["password"], "pw");

        let _: () = cmd("CONFIG").arg("SET").arg("kamsync.store-password").arg("no").query(&mut con).unwrap();
        json_set(&mut con, "credential:1", &doc);

        assert!(!hgetall(&mut con, "subscriber:entry::u:d").contains_key("password"));
    }
}

on_every_server! {
    /// Two domains with one name: the first keeps the row, the second is refused and counted.
    fn second_entity_claiming_a_row_is_refused(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:first", &json!({"name": "a.org"}));

        json_set(&mut con, "sipdomain:second", &json!({"name": "a.org", "did": "other"}));

        let row = hgetall(&mut con, "domain:entry::a.org");
        assert_eq!((row["id"].as_str(), row["did"].as_str()), ("1", "a.org"));
        assert_eq!(server.counter(&mut con, "rejected_conflict"), 1);
        assert!(json_get(&mut con, "sipdomain:second").get("externalId").is_none());
        assert!(server.log().contains("sipdomain:second (db 0) not synced: row domain:entry::a.org already belongs to sipdomain:first"));
    }
}

on_every_server! {
    /// Neither HA1, HA1B nor the password ever reaches the server log, even at debug level and
    /// for rejected documents.
    fn secrets_never_reach_the_log(flavor: Flavor) {
        let server = Options::new(flavor).arg("loglevel", "debug").start();
        let mut con = server.connect();

        json_set(&mut con, "credential:1", &json!({"username": "u", "domain": "d", "password": "Sup3rSecret"}));
        json_set(&mut con, "credential:2", &json!({"username": "u b", "domain": "d", "password": "Sup3rSecret"}));
        json_set(&mut con, "credential:3", &json!({"username": "v", "domain": "d", "ha1": "Sup3rSecret"}));
        json_set(&mut con, "credential:4", &json!({"username": "w", "domain": "d", "ha1": "0123456789abcdef0123456789abcdef", "ha1b": "fedcba9876543210fedcba9876543210", "x": []}));
        json_set(&mut con, "credential:4", &json!({"username": "w", "domain": "d", "ha1": "0123456789abcdef0123456789abcdef", "ha1b": 5}));

        let ha1 = hgetall(&mut con, "subscriber:entry::u:d")["ha1"].clone();
        let log = server.log();
        assert_eq!(server.counter(&mut con, "rejected"), 3);
        assert!(log.contains("credential:2 (db 0) not synced"), "rejections are logged");
        for secret in ["Sup3rSecret", ha1.as_str(), "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"] {
            assert!(!log.contains(secret), "log contains a secret");
        }
    }
}

on_every_server! {
    /// MULTI/EXEC that touches an entity several times ends with the rows of its final state.
    fn transaction_ends_with_rows_of_the_final_state(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();

        let _: () = redis::pipe()
            .atomic()
            .cmd("JSON.SET").arg("sipdomain:1").arg("$").arg(r#"{"name":"a.org"}"#).ignore()
            .cmd("JSON.SET").arg("sipdomain:1").arg("$.name").arg(r#""b.org""#).ignore()
            .cmd("JSON.SET").arg("sipdomain:2").arg("$").arg(r#"{"name":"c.org"}"#).ignore()
            .query(&mut con)
            .unwrap();

        assert_eq!(keys(&mut con, "domain:entry::*"), ["domain:entry::b.org", "domain:entry::c.org"].map(String::from).into());
        assert_eq!(get_int(&mut con, "id:sequence:domain"), Some(2));
        assert_eq!(xlen(&mut con, "reload:domain"), 1, "one reload for the whole transaction");
    }
}

on_every_server! {
    /// KAMSYNC.SYNC reconciles one key on demand and says what it did.
    fn sync_command_reports_what_it_did(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        let _: () = cmd("DEL").arg("domain:entry::a.org").query(&mut con).unwrap();

        let restored: String = cmd("KAMSYNC.SYNC").arg("sipdomain:1").query(&mut con).unwrap();
        let unchanged: String = cmd("KAMSYNC.SYNC").arg("sipdomain:1").query(&mut con).unwrap();
        let nothing: String = cmd("KAMSYNC.SYNC").arg("sipdomain:none").query(&mut con).unwrap();
        let wrong: redis::RedisResult<String> = cmd("KAMSYNC.SYNC").arg("other:1").query(&mut con);

        assert_eq!(restored, "written domain:entry::a.org id 1");
        assert_eq!(row_id(&mut con, "domain:entry::a.org"), 1);
        assert_eq!(unchanged, "unchanged domain:entry::a.org id 1");
        assert_eq!(nothing, "nothing to do");
        assert!(wrong.unwrap_err().to_string().contains("matches neither"));
    }
}
