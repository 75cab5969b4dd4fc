//! Reload delivery: kamsync calls Kamailio's domain.reload over JSON-RPC by itself, coalesced,
//! at least once, and Redis keeps answering while a Kamailio hangs.

mod common;
use std::time::{Duration, Instant};

use common::kamailio::*;
use common::*;

fn set_targets(con: &mut Connection, value: &str) {
    let _: () =
        cmd("CONFIG").arg("SET").arg("kamsync.reload-targets").arg(value).query(con).unwrap();
}

fn target_url(kamailio_http: u16) -> String {
    format!("http://127.0.0.1:{kamailio_http}/RPC")
}

/// Polls `check` every 20 ms until it holds; the time it took, or None after `limit`.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn reload_info(server: &Server, con: &mut Connection) -> (u64, u64, u64) {
    let info = server.kamsync_info(con);
    let get = |name: &str| info.get(name).map_or(0, |v| v.parse().unwrap_or(0));
    (get("reload_0_sent"), get("reload_0_failures"), get("reload_0_pending"))
}

fn start() -> (Server, Connection, Kamailio) {
    let server = Options::new(Flavor::Redis74).arg("appendonly", "yes").start();
    let mut con = server.connect();
    json_set(&mut con, "sipdomain:1", &json!({"name": "example.com"}));
    let kamailio = Kamailio::start(server.port);
    set_targets(&mut con, &target_url(kamailio.http_port));
    let first = within(Duration::from_secs(3), || {
        let (sent, _, pending) = reload_info(&server, &mut con);
        sent >= 1 && pending == 0
    });
    assert!(first.is_some(), "the first domain's reload was never delivered");
    (server, con, kamailio)
}

#[test]
fn new_domain_is_accepted_within_two_seconds_without_a_manual_reload() {
    require_kamailio!();
    let (server, mut con, kamailio) = start();
    set_credential(&mut con, "credential:1", "u", "new.org", "p");

    json_set(&mut con, "sipdomain:new", &json!({"name": "new.org"}));

    let took =
        within(Duration::from_secs(2), || kamailio.register("200", "u", "new.org", "u", "p"));
    assert!(took.is_some(), "new.org not served within 2 s; log:\n{}", kamailio.log());
    eprintln!("new domain served after {took:?}");
    // The timer records the answer at its next tick.
    let recorded = within(Duration::from_secs(2), || reload_info(&server, &mut con).2 == 0);
    let (sent, failures, pending) = reload_info(&server, &mut con);
    assert!(recorded.is_some() && sent >= 1 && failures == 0, "{sent} {failures} {pending}");
}

#[test]
fn renamed_domain_takes_effect_without_a_manual_reload() {
    require_kamailio!();
    let (_server, mut con, kamailio) = start();
    json_set(&mut con, "sipdomain:x", &json!({"name": "old.org"}));
    set_credential(&mut con, "credential:old", "u", "old.org", "p");
    set_credential(&mut con, "credential:new", "u", "new.org", "p");
    assert!(within(Duration::from_secs(2), || kamailio.register("200", "u", "old.org", "u", "p"))
        .is_some());

    let _: () = cmd("JSON.SET")
        .arg("sipdomain:x")
        .arg("$.name")
        .arg("\"new.org\"")
        .query(&mut con)
        .unwrap();

    assert!(within(Duration::from_secs(2), || kamailio.register("200", "u", "new.org", "u", "p"))
        .is_some());
    assert!(kamailio.register("403", "u", "old.org", "u", "p"));
}

#[test]
fn a_frozen_kamailio_gets_the_change_when_it_resumes_and_redis_keeps_answering() {
    require_kamailio!();
    let (server, mut con, kamailio) = start();
    set_credential(&mut con, "credential:1", "u", "late.org", "p");
    kamailio.signal_all("STOP");

    json_set(&mut con, "sipdomain:late", &json!({"name": "late.org"}));
    let mut worst = Duration::ZERO;
    let frozen_for = Instant::now();
    while frozen_for.elapsed() < Duration::from_secs(4) {
        let at = Instant::now();
        let _: String = cmd("PING").query(&mut con).unwrap();
        worst = worst.max(at.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, _, pending_while_frozen) = reload_info(&server, &mut con);
    kamailio.signal_all("CONT");

    eprintln!("worst PING while Kamailio was frozen: {worst:?}");
    assert_eq!(pending_while_frozen, 1, "the change waits for the frozen Kamailio");
    let took =
        within(Duration::from_secs(20), || kamailio.register("200", "u", "late.org", "u", "p"));
    assert!(took.is_some(), "late.org never arrived; log:\n{}", kamailio.log());
    assert!(within(Duration::from_secs(5), || reload_info(&server, &mut con).2 == 0).is_some());
}

#[test]
fn a_burst_of_1000_domain_writes_leads_to_a_handful_of_reloads() {
    require_kamailio!();
    let (server, mut con, kamailio) = start();
    let before = reload_info(&server, &mut con).0;

    for i in 0..1000 {
        json_set(&mut con, &format!("sipdomain:b{i}"), &json!({"name": format!("b{i}.org")}));
    }
    set_credential(&mut con, "credential:1", "u", "b999.org", "p");

    assert!(within(Duration::from_secs(5), || kamailio.register("200", "u", "b999.org", "u", "p"))
        .is_some());
    assert!(within(Duration::from_secs(5), || reload_info(&server, &mut con).2 == 0).is_some());
    let reloads = reload_info(&server, &mut con).0 - before;
    eprintln!("1000 domain writes -> {reloads} reloads");
    assert!((1..=10).contains(&reloads), "{reloads} reloads");
}

#[test]
fn an_undelivered_change_survives_a_redis_restart() {
    require_kamailio!();
    let http_port = free_tcp_port();
    let mut server =
        Options::new(Flavor::Redis74).arg("appendonly", "yes").arg("appendfsync", "always").start();
    let mut con = server.connect();
    set_targets(&mut con, &target_url(http_port));
    json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
    assert!(
        within(Duration::from_secs(3), || reload_info(&server, &mut con).1 >= 1).is_some(),
        "nobody listens yet: failures"
    );

    server.restart();
    let mut con = server.connect();
    set_targets(&mut con, &target_url(http_port));
    let kamailio = Kamailio::start_on(server.port, http_port);

    let delivered = within(Duration::from_secs(15), || {
        let (sent, _, pending) = reload_info(&server, &mut con);
        sent >= 1 && pending == 0
    });
    assert!(delivered.is_some(), "{:?}; log:\n{}", reload_info(&server, &mut con), kamailio.log());
    let recorded: Option<String> =
        cmd("HGET").arg("kamsync:reload").arg(target_url(http_port)).query(&mut con).unwrap();
    let newest: Vec<(String, Vec<(String, String)>)> = cmd("XREVRANGE")
        .arg("reload:domain")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .unwrap();
    assert_eq!(recorded.as_deref(), Some(newest[0].0.as_str()));
}

#[test]
fn an_undelivered_change_is_delivered_by_the_replica_after_a_failover() {
    require_kamailio!();
    let http_port = free_tcp_port();
    let mut primary = Server::start(Flavor::Redis74);
    let replica = Options::new(Flavor::Redis74)
        .arg("replicaof", &format!("127.0.0.1 {}", primary.port))
        .start();
    let mut con = primary.connect();
    let mut replica_con = replica.connect();
    set_targets(&mut con, &target_url(http_port));
    set_targets(&mut replica_con, &target_url(http_port));
    json_set(&mut con, "sipdomain:1", &json!({"name": "a.org"}));
    assert!(within(Duration::from_secs(3), || reload_info(&primary, &mut con).1 >= 1).is_some());
    // WAIT can answer an error while the replica is still in its first sync: retry until the
    // deadline.
    let acked = within(Duration::from_secs(20), || {
        match cmd("WAIT").arg(1).arg(100).query::<i64>(&mut con) {
            Ok(acked) => acked == 1,
            Err(e) => {
                eprintln!("WAIT: {e}");
                false
            }
        }
    });
    assert!(acked.is_some(), "replica never caught up");
    assert_eq!(reload_info(&replica, &mut replica_con).0, 0, "a replica delivers nothing");

    primary.kill9();
    let _: () = cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut replica_con).unwrap();
    let kamailio = Kamailio::start_on(replica.port, http_port);

    let delivered = within(Duration::from_secs(15), || {
        let (sent, _, pending) = reload_info(&replica, &mut replica_con);
        sent >= 1 && pending == 0
    });
    assert!(
        delivered.is_some(),
        "{:?}; log:\n{}",
        reload_info(&replica, &mut replica_con),
        kamailio.log()
    );
}
