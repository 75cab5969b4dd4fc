//! Operations: backfill with RESYNC, CHECK and REPAIR, adoption of the Gears library's ids,
//! STATUS and INFO, and the commands' flags.

mod common;
use std::time::{Duration, Instant};

use common::*;

/// Name/value pairs of a reply (STATUS, CHECK) as strings, nested arrays left out.
fn pairs(reply: &[redis::Value]) -> std::collections::BTreeMap<String, String> {
    reply
        .chunks(2)
        .filter_map(|pair| {
            let name: String = redis::from_redis_value(&pair[0]).ok()?;
            let value: String = redis::from_redis_value(pair.get(1)?).ok()?;
            Some((name, value))
        })
        .collect()
}

fn nested(reply: &[redis::Value], name: &str) -> Vec<redis::Value> {
    let at = reply
        .iter()
        .position(|v| redis::from_redis_value::<String>(v).is_ok_and(|s| s == name))
        .unwrap_or_else(|| panic!("no {name}"));
    match &reply[at + 1] {
        redis::Value::Array(items) => items.clone(),
        other => panic!("{name} is {other:?}"),
    }
}

fn check(
    con: &mut Connection,
    repair: bool,
) -> (std::collections::BTreeMap<String, String>, Vec<Vec<String>>) {
    let mut command = cmd("KAMSYNC.CHECK");
    if repair {
        command.arg("REPAIR");
    }
    let reply: Vec<redis::Value> = command.query(con).unwrap();
    let examples = nested(&reply, "examples")
        .iter()
        .map(|e| redis::from_redis_value::<Vec<String>>(e).unwrap())
        .collect();
    (pairs(&reply), examples)
}

fn task_status(con: &mut Connection) -> std::collections::BTreeMap<String, String> {
    let status: Vec<redis::Value> = cmd("KAMSYNC.STATUS").query(con).unwrap();
    pairs(&nested(&status, "task"))
}

fn wait_for_task(con: &mut Connection) -> std::collections::BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let task = task_status(con);
        if task["state"] != "running" {
            return task;
        }
        assert!(Instant::now() < deadline, "task still running: {task:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Loads `n` credentials and `n / 10` domains without kamsync, in pipelines.
fn load_entities(con: &mut Connection, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let doc = json!({"username": format!("u{i}"), "domain": format!("d{}.org", i % 100), "password": format!("p{i}")});
            pipe.cmd("JSON.SET")
                .arg(format!("credential:{i}"))
                .arg("$")
                .arg(doc.to_string())
                .ignore();
            if i % 10 == 0 {
                let doc = json!({"name": format!("n{i}.org")});
                pipe.cmd("JSON.SET")
                    .arg(format!("sipdomain:{i}"))
                    .arg("$")
                    .arg(doc.to_string())
                    .ignore();
            }
        }
        let _: () = pipe.query(con).unwrap();
    }
}

on_every_server! {
    /// MODULE LOAD into a server already holding 100k credentials and 10k domains, then
    /// RESYNC: every row ends right (CHECK finds all in step), while a client keeps PINGing;
    /// the worst PING is reported, not asserted. A second RESYNC meanwhile is refused.
    fn resync_after_module_load_syncs_100k_entities_while_redis_keeps_answering(flavor: Flavor) {
        let server = Options::new(flavor).without_module().start();
        let mut con = server.connect();
        load_entities(&mut con, 100_000);
        let _: () = cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).query(&mut con).unwrap();
        let pinger = Pinger::start(&server);

        let started = Instant::now();
        let reply: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
        let second: redis::RedisResult<String> = cmd("KAMSYNC.RESYNC").query(&mut con);
        let task = wait_for_task(&mut con);
        let took = started.elapsed();
        let (worst, pings) = pinger.stop();
        eprintln!(
            "{flavor:?}: RESYNC of 110000 entities took {took:?} ({:.0}/s); worst PING {worst:?} over {pings} pings; longest batch {} us",
            110_000.0 / took.as_secs_f64(),
            task["longest_batch_us"]
        );

        assert!(reply.starts_with("started"));
        assert!(second.unwrap_err().to_string().contains("already running"));
        assert_eq!(task["state"], "done");
        assert_eq!(task["synced"], "110000");
        assert_eq!(task["rejected"], "0");
        assert!(pings > 10, "the pinger was starved: {pings} pings");
        assert_eq!(keys(&mut con, "subscriber:entry::*").len(), 100_000);
        let row = hgetall(&mut con, "subscriber:entry::u4242:d42.org");
        assert_eq!(row["ha1"], md5_hex("u4242:d42.org:p4242"));
        let (report, examples) = check(&mut con, false);
        assert_eq!(report["in_step"], "110000", "{examples:?}");
        assert_eq!(report["missing"], "0");
        assert_eq!(report["orphans"], "0");
    }
}

on_every_server! {
    /// CHECK finds each kind of problem planted (missing row, differing row, orphan row,
    /// conflict, invalid document) without writing; CHECK REPAIR fixes what can be fixed.
    fn check_finds_each_planted_problem_and_repair_fixes_them(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:fine", &json!({"name": "fine.org"}));
        json_set(&mut con, "sipdomain:missing", &json!({"name": "missing.org"}));
        json_set(&mut con, "credential:differs", &json!({"username": "u", "domain": "d.org", "password": "p"}));
        json_set(&mut con, "sipdomain:owner", &json!({"name": "taken.org"}));
        json_set(&mut con, "sipdomain:rival", &json!({"name": "taken.org"}));
        json_set(&mut con, "sipdomain:invalid", &json!({"name": "bad name"}));
        let _: () = cmd("DEL").arg("domain:entry::missing.org").query(&mut con).unwrap();
        let _: () = cmd("HSET").arg("subscriber:entry::u:d.org").arg("ha1").arg("0".repeat(32)).query(&mut con).unwrap();
        let _: () = cmd("HSET").arg("domain:entry::ghost.org").arg("id").arg(99).arg("domain").arg("ghost.org").arg("did").arg("ghost.org").query(&mut con).unwrap();
        let before = dump_all(&mut con);

        let (report, examples) = check(&mut con, false);

        assert_eq!(dump_all(&mut con), before, "CHECK wrote something");
        for (field, count) in [("in_step", "2"), ("missing", "1"), ("differs", "1"), ("orphans", "1"), ("conflicts", "1"), ("invalid", "1"), ("repaired", "0")] {
            assert_eq!(report[field], count, "{field}: {report:?}");
        }
        let found: Vec<(String, String)> = examples.iter().map(|e| (e[0].clone(), e[1].clone())).collect();
        for expected in [
            ("missing", "sipdomain:missing"),
            ("differs", "credential:differs"),
            ("orphan", "domain:entry::ghost.org"),
            ("conflict", "sipdomain:rival"),
            ("invalid", "sipdomain:invalid"),
        ] {
            assert!(found.contains(&(expected.0.to_owned(), expected.1.to_owned())), "{expected:?} not in {found:?}");
        }

        let (repair, _) = check(&mut con, true);
        let (after, _) = check(&mut con, false);

        assert_eq!(repair["repaired"], "3");
        assert_eq!(row_id(&mut con, "domain:entry::missing.org"), 2);
        assert_eq!(hgetall(&mut con, "subscriber:entry::u:d.org")["ha1"], md5_hex("u:d.org:p"));
        assert!(!cmd("EXISTS").arg("domain:entry::ghost.org").query::<bool>(&mut con).unwrap());
        for (field, count) in [("missing", "0"), ("differs", "0"), ("orphans", "0"), ("conflicts", "1"), ("invalid", "1")] {
            assert_eq!(after[field], count, "{field} after repair: {after:?}");
        }
    }
}

on_every_server! {
    /// A migration from the Gears library: documents carry externalId and dateCreated, rows
    /// exist (some stale), the sequence is behind. RESYNC adopts the ids, keeps dateCreated,
    /// moves the sequence past them, and new entities get fresh ids.
    fn resync_adopts_external_ids_and_moves_sequences_past_them(flavor: Flavor) {
        let server = Options::new(flavor).without_module().start();
        let mut con = server.connect();
        for i in 1..=5 {
            json_set(&mut con, &format!("sipdomain:{i}"), &json!({"name": format!("d{i}.org"), "externalId": 100 + i, "dateCreated": 1_700_000_000_000_i64}));
            let _: () = cmd("HSET").arg(format!("domain:entry::d{i}.org")).arg("id").arg(100 + i).arg("domain").arg(format!("d{i}.org")).arg("did").arg(format!("d{i}.org")).query(&mut con).unwrap();
        }
        json_set(&mut con, "sipdomain:copy", &json!({"name": "copy.org", "externalId": 103}));
        let _: () = cmd("SET").arg("id:sequence:domain").arg(50).query(&mut con).unwrap();
        let _: () = cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).query(&mut con).unwrap();

        let _: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
        let task = wait_for_task(&mut con);

        assert_eq!(task["synced"], "6");
        let log = server.log();
        assert!(log.contains("resync started in db 0"), "{log}");
        assert!(log.contains("resync done in db 0 after") && log.contains("6 synced, 0 rejected"), "{log}");
        for i in [1, 2, 4, 5] {
            assert_eq!(row_id(&mut con, &format!("domain:entry::d{i}.org")), 100 + i);
            let doc = json_get(&mut con, &format!("sipdomain:{i}"));
            assert_eq!(doc["externalId"], 100 + i);
            assert_eq!(doc["dateCreated"], 1_700_000_000_000_i64);
        }
        // Two documents carry 103 (a copy): the first scanned adopts it, the other gets a fresh
        // id beyond every adopted one.
        let mut contested = [row_id(&mut con, "domain:entry::d3.org"), row_id(&mut con, "domain:entry::copy.org")];
        contested.sort();
        assert_eq!(contested[0], 103);
        assert!(contested[1] > 105, "{contested:?}");
        let copy_id = contested[1];
        assert!(get_int(&mut con, "id:sequence:domain").unwrap() >= copy_id);
        json_set(&mut con, "sipdomain:new", &json!({"name": "new.org"}));
        assert!(row_id(&mut con, "domain:entry::new.org") > copy_id);
    }
}

on_every_server! {
    /// RESYNC of entities already in step writes nothing: no row, no dateUpdated.
    fn resync_of_synced_entities_changes_nothing(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        for i in 0..20 {
            json_set(&mut con, &format!("credential:{i}"), &json!({"username": format!("u{i}"), "domain": "d", "password": "p"}));
        }
        let before = dump_all(&mut con);

        let _: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
        let task = wait_for_task(&mut con);

        assert_eq!(task["synced"], "20");
        assert_eq!(dump_all(&mut con), before);
    }
}

on_every_server! {
    /// RESYNC and CHECK REPAIR are refused on a replica (they would write); CHECK is allowed.
    fn resync_and_repair_are_refused_on_a_replica(flavor: Flavor) {
        let primary = Server::start(flavor);
        let replica = Options::new(flavor).arg("replicaof", &format!("127.0.0.1 {}", primary.port)).start();
        let mut con = replica.connect();

        let resync: redis::RedisResult<String> = cmd("KAMSYNC.RESYNC").query(&mut con);
        let repair: redis::RedisResult<redis::Value> = cmd("KAMSYNC.CHECK").arg("REPAIR").query(&mut con);
        let (report, _) = check(&mut con, false);

        let resync = resync.unwrap_err().to_string();
        assert!(resync.contains("read only replica"), "{resync}");
        assert!(repair.unwrap_err().to_string().contains("only on the primary"));
        assert_eq!(report["outcome"], "done");
    }
}

on_every_server! {
    /// STATUS and INFO report environment facts and the last task; the commands carry the
    /// flags (and so the ACL categories) they are documented with.
    fn status_info_and_command_flags_are_as_documented(flavor: Flavor) {
        let server = Server::start(flavor);
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
        let _: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
        wait_for_task(&mut con);

        let status: Vec<redis::Value> = cmd("KAMSYNC.STATUS").query(&mut con).unwrap();
        let top = pairs(&status);
        let info = server.kamsync_info(&mut con);

        assert_eq!(top["role"], "primary");
        assert_eq!(top["cluster_mode"], "no");
        assert!(top["redisjson"].parse::<u32>().is_ok_and(|v| v >= 20600), "{top:?}");
        assert_eq!(pairs(&nested(&status, "config"))["domain-prefix"], "sipdomain:");
        assert_eq!(task_status(&mut con)["task"], "resync");
        assert_eq!(info["task_state"], "done");
        assert_eq!(info["task_synced"], "1");
        for (command, flags, categories) in [
            ("kamsync.status", &["readonly", "loading", "stale"][..], &["@read", "@slow"][..]),
            ("kamsync.sync", &["write", "denyoom"], &["@write", "@slow"]),
            ("kamsync.resync", &["write", "admin", "noscript"], &["@admin", "@dangerous", "@write"]),
            ("kamsync.check", &["readonly", "admin", "noscript"], &["@admin", "@dangerous", "@read"]),
        ] {
            let info: Vec<redis::Value> = cmd("COMMAND").arg("INFO").arg(command).query(&mut con).unwrap();
            let text = format!("{info:?}");
            for word in flags.iter().chain(categories) {
                assert!(text.contains(&format!("\"{word}\")")), "{command} lacks {word}: {text}");
            }
        }
    }
}

/// RESYNC ABORT stops a running resync after its current batch; STATUS says so.
#[test]
fn resync_abort_stops_the_running_resync() {
    let server = Options::new(Flavor::Redis74).without_module().start();
    let mut con = server.connect();
    load_entities(&mut con, 50_000);
    let _: () =
        cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).query(&mut con).unwrap();

    let _: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
    let aborting: String = cmd("KAMSYNC.RESYNC").arg("ABORT").query(&mut con).unwrap();
    let task = wait_for_task(&mut con);
    let nothing: String = cmd("KAMSYNC.RESYNC").arg("ABORT").query(&mut con).unwrap();

    assert_eq!(aborting, "aborting");
    assert_eq!(task["state"], "aborted");
    assert!(task["synced"].parse::<u64>().unwrap() < 55_000, "{task:?}");
    assert_eq!(nothing, "nothing running");
    assert!(server.log().contains("resync aborted in db 0"));
}
