//! End to end: real Redis 7.4 + RedisJSON + kamsync, real Kamailio 5.6 with
//! examples/kamailio/kamailio.cfg, real sipp digest REGISTERs.
//!
//! If Debian's kamailio, kamailio-redis-modules or sip-tester could not be installed,
//! scripts/setup.sh leaves `.deps/kamailio-unavailable` with the reason, and every test here
//! prints a SKIPPED line with it (and `make test` repeats it at the end) instead of passing
//! silently.

mod common;
use std::time::Duration;

use common::kamailio::*;
use common::*;

fn setup(format: &str) -> (Server, Connection, Kamailio) {
    let server =
        Options::new(Flavor::Redis74).module_args(&["last-modified-format", format]).start();
    let mut con = server.connect();
    json_set(&mut con, "sipdomain:1", &json!({"name": "example.com"}));
    let kamailio = Kamailio::start(server.port);
    (server, con, kamailio)
}

fn assert_clean_log(kamailio: &Kamailio) {
    let log = kamailio.log();
    for bad in ["ERROR", "CRITICAL", "segfault", "Aborted"] {
        assert!(!log.contains(bad), "kamailio logged {bad}:\n{log}");
    }
}

#[test]
fn credential_with_ha1_and_ha1b_authenticates() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    let ha1 = md5_hex("alice:example.com:secret");
    let ha1b = md5_hex("alice@example.com:example.com:secret");

    json_set(
        &mut con,
        "credential:alice",
        &json!({"username": "alice", "domain": "example.com", "ha1": ha1, "ha1b": ha1b}),
    );

    assert!(kamailio.register("200", "alice", "example.com", "alice", "secret"));
    assert!(
        kamailio.register("200", "alice", "example.com", "alice@example.com", "secret"),
        "ha1b path"
    );
    assert_clean_log(&kamailio);
}

#[test]
fn credential_with_only_a_password_authenticates_both_ways() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");

    set_credential(&mut con, "credential:bob", "bob", "example.com", "pw1");

    assert!(kamailio.register("200", "bob", "example.com", "bob", "pw1"));
    assert!(kamailio.register("200", "bob", "example.com", "bob@example.com", "pw1"), "ha1b path");
}

#[test]
fn wrong_password_gets_401() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    set_credential(&mut con, "credential:bob", "bob", "example.com", "pw1");

    assert!(kamailio.register("401", "bob", "example.com", "bob", "wrong"));
    assert!(!kamailio.register("200", "bob", "example.com", "bob", "wrong"));
}

#[test]
fn deleted_or_expired_credential_stops_authenticating_at_once() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    set_credential(&mut con, "credential:a", "a", "example.com", "p");
    set_credential(&mut con, "credential:b", "b", "example.com", "p");
    assert!(kamailio.register("200", "a", "example.com", "a", "p"));
    assert!(kamailio.register("200", "b", "example.com", "b", "p"));

    let _: () = cmd("DEL").arg("credential:a").query(&mut con).unwrap();
    let _: () = cmd("PEXPIRE").arg("credential:b").arg(1).query(&mut con).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let _: bool = cmd("EXISTS").arg("credential:b").query(&mut con).unwrap();

    assert!(kamailio.register("401", "a", "example.com", "a", "p"));
    assert!(kamailio.register("401", "b", "example.com", "b", "p"));
    assert_clean_log(&kamailio);
}

#[test]
fn changed_password_takes_effect_at_once() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    set_credential(&mut con, "credential:c", "carol", "example.com", "old");
    assert!(kamailio.register("200", "carol", "example.com", "carol", "old"));

    let _: () = cmd("JSON.SET")
        .arg("credential:c")
        .arg("$.password")
        .arg("\"new\"")
        .query(&mut con)
        .unwrap();

    assert!(kamailio.register("401", "carol", "example.com", "carol", "old"));
    assert!(kamailio.register("200", "carol", "example.com", "carol", "new"));
}

#[test]
fn domains_follow_kamsync_after_domain_reload() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    set_credential(&mut con, "credential:d", "dave", "new.org", "p");
    assert!(
        kamailio.register("403", "dave", "new.org", "dave", "p"),
        "not served before it exists"
    );

    json_set(&mut con, "sipdomain:new", &json!({"name": "new.org"}));
    let (ok, out) = kamailio.kamcmd("domain.reload");
    assert!(ok, "{out}");
    assert!(kamailio.register("200", "dave", "new.org", "dave", "p"), "created domain accepted");

    let _: () = cmd("JSON.SET")
        .arg("sipdomain:new")
        .arg("$.name")
        .arg("\"renamed.org\"")
        .query(&mut con)
        .unwrap();
    assert!(kamailio.reload_over_http().contains("\"result\""));
    assert!(kamailio.register("403", "dave", "new.org", "dave", "p"), "renamed domain refused");

    let _: () = cmd("DEL").arg("sipdomain:new").query(&mut con).unwrap();
    assert!(kamailio.reload_over_http().contains("\"result\""));
    let (_, dump) = kamailio.kamcmd("domain.dump");
    assert!(!dump.contains("renamed.org") && dump.contains("example.com"), "{dump}");
    assert_clean_log(&kamailio);
}

#[test]
fn domain_reload_loads_every_kamsync_table_in_both_last_modified_formats() {
    require_kamailio!();
    for format in ["datetime", "epoch"] {
        let (_server, mut con, kamailio) = setup(format);
        for i in 0..50 {
            json_set(
                &mut con,
                &format!("sipdomain:{i}"),
                &json!({"name": format!("d{i}.org"), "did": if i % 2 == 0 { json!(null) } else { json!(format!("tenant{i}")) }}),
            );
            json_set(
                &mut con,
                &format!("credential:{i}"),
                &json!({"username": format!("u{i}"), "domain": format!("d{i}.org"), "password": "p"}),
            );
        }
        json_set(
            &mut con,
            "credential:hashonly",
            &json!({"username": "h", "domain": "d1.org", "ha1": md5_hex("h:d1.org:p")}),
        );

        let (ok, out) = kamailio.kamcmd("domain.reload");
        let (_, dump) = kamailio.kamcmd("domain.dump");

        assert!(ok, "{format}: {out}\n{}", kamailio.log());
        assert!(dump.contains("d49.org") && dump.contains("tenant49"), "{format}: {dump}");
        assert!(kamailio.register("200", "u7", "d7.org", "u7", "p"), "{format}");
        assert!(
            kamailio.register("200", "h", "d1.org", "h", "p"),
            "{format}: empty ha1b row loads"
        );
        assert_clean_log(&kamailio);
    }
}
