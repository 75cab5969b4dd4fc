//! Replication and persistence: kamsync's writes travel with the writes that caused them, so a
//! replica and an AOF replay end with exactly the primary's data, and neither issues ids.

mod common;
use std::time::{Duration, Instant};

use common::*;

/// A workload touching every path: creates, updates, renames of the row key, deletes, invalid
/// documents, conflicts, a transaction.
pub fn mixed_workload(con: &mut Connection) {
    for i in 0..20 {
        json_set(con, &format!("sipdomain:{i}"), &json!({"name": format!("d{i}.org")}));
        json_set(
            con,
            &format!("credential:{i}"),
            &json!({"username": format!("u{i}"), "domain": format!("d{}.org", i % 5), "password": format!("pw{i}")}),
        );
    }
    for i in 0..20 {
        match i % 5 {
            0 => json_set(
                con,
                &format!("sipdomain:{i}"),
                &json!({"name": format!("renamed{i}.org")}),
            ),
            1 => {
                let _: () = cmd("DEL").arg(format!("credential:{i}")).query(con).unwrap();
            }
            2 => json_set(
                con,
                &format!("credential:{i}"),
                &json!({"username": "bad name", "domain": "d"}),
            ),
            3 => json_set(con, &format!("sipdomain:dup{i}"), &json!({"name": format!("d{i}.org")})),
            _ => {
                let _: () = cmd("JSON.SET")
                    .arg(format!("credential:{i}"))
                    .arg("$.password")
                    .arg("\"new\"")
                    .query(con)
                    .unwrap();
            }
        }
    }
    // The lifecycle: renames, moves, copies, expiry, overwrites, root deletes.
    let _: () = cmd("RENAME").arg("sipdomain:1").arg("sipdomain:renamed").query(con).unwrap();
    let _: () = cmd("RENAME").arg("credential:2").arg("credential:4").query(con).unwrap();
    let _: bool = cmd("MOVE").arg("sipdomain:2").arg(1).query(con).unwrap();
    let _: bool =
        cmd("COPY").arg("credential:5").arg("credential:5").arg("DB").arg(2).query(con).unwrap();
    let _: () = cmd("PEXPIRE").arg("credential:8").arg(1).query(con).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let _: bool = cmd("EXISTS").arg("credential:8").query(con).unwrap();
    let _: () = cmd("SET").arg("credential:9").arg("plain").query(con).unwrap();
    let _: i64 = cmd("JSON.DEL").arg("sipdomain:4").arg("$").query(con).unwrap();
    let _: () = cmd("DEL").arg("sipdomain:3").query(con).unwrap();
    let _: () = redis::pipe()
        .atomic()
        .cmd("JSON.SET")
        .arg("sipdomain:tx")
        .arg("$")
        .arg(r#"{"name":"tx.org"}"#)
        .ignore()
        .cmd("JSON.SET")
        .arg("sipdomain:tx")
        .arg("$.did")
        .arg(r#""t""#)
        .ignore()
        .cmd("DEL")
        .arg("sipdomain:0")
        .ignore()
        .query(con)
        .unwrap();
}

fn wait_for_replica(primary: &mut Connection, replica: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let acked: i64 = cmd("WAIT").arg(1).arg(1000).query(primary).unwrap();
        if acked == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "replica never caught up; log:\n{}", replica.log());
    }
}

fn wait_for_link(replica: &Server) {
    let mut con = replica.connect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = cmd("INFO").arg("replication").query(&mut con).unwrap();
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(Instant::now() < deadline, "replica link never came up:\n{info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

on_every_server! {
    /// A real replica ends byte-identical to its primary, and its own kamsync does nothing.
    fn replica_ends_byte_identical_to_primary(flavor: Flavor) {
        let primary = Server::start(flavor);
        let replica = Options::new(flavor).arg("replicaof", &format!("127.0.0.1 {}", primary.port)).start();
        wait_for_link(&replica);
        let mut con = primary.connect();

        mixed_workload(&mut con);
        wait_for_replica(&mut con, &replica);

        let mut replica_con = replica.connect();
        for db in 0..3 {
            for c in [&mut con, &mut replica_con] {
                let _: () = cmd("SELECT").arg(db).query(c).unwrap();
            }
            let on_primary = dump_all(&mut con);
            assert!(on_primary.len() > 1, "db {db}: workload produced {} keys", on_primary.len());
            assert_eq!(on_primary, dump_all(&mut replica_con), "db {db}");
        }
        assert_eq!(replica.counter(&mut replica_con, "jobs_run"), 0);
        assert!(replica.counter(&mut replica_con, "events_ignored") > 0);
    }
}

on_every_server! {
    /// After an AOF restart the data is identical and loading issued no id and ran no job.
    fn aof_restart_restores_identical_data_without_issuing_ids(flavor: Flavor) {
        let mut server = Options::new(flavor).arg("appendonly", "yes").arg("appendfsync", "always").start();
        let mut con = server.connect();
        mixed_workload(&mut con);
        let before = dump_all(&mut con);
        drop(con);

        server.restart();

        let mut con = server.connect();
        assert_eq!(dump_all(&mut con), before);
        assert_eq!(server.counter(&mut con, "ids_issued"), 0);
        assert_eq!(server.counter(&mut con, "jobs_run"), 0);
        assert!(server.counter(&mut con, "events_ignored") > 0, "AOF replay fired events");
    }
}

on_every_server! {
    /// An update that changes no row propagates only the user's write and the audit fields.
    fn unchanged_update_propagates_only_the_audit_write(flavor: Flavor) {
        let server = Options::new(flavor).arg("appendonly", "yes").arg("appendfsync", "always").start();
        let mut con = server.connect();
        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "n": 1}));
        let before = aof_text(&server);

        json_set(&mut con, "sipdomain:1", &json!({"name": "a.org", "n": 2}));

        let added = aof_text(&server)[before.len()..].to_owned();
        let commands: Vec<&str> = added
            .lines()
            .filter(|l| {
                let upper = l.to_ascii_uppercase();
                ["JSON.", "HSET", "HDEL", "DEL", "XADD", "INCR"].iter().any(|c| upper.starts_with(c))
            })
            .collect();
        assert_eq!(commands.iter().map(|c| c.to_ascii_uppercase()).collect::<Vec<_>>(), ["JSON.SET", "JSON.MERGE"], "{added}");
    }
}

/// The text of every AOF file of a server, concatenated (base first, then increments).
fn aof_text(server: &Server) -> String {
    let dir = server.dir.join("appendonlydir");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "aof"))
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect()
}
