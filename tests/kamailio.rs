//! End to end: real Redis 7.4 + RedisJSON + kamsync, real Kamailio 5.6 with
//! examples/kamailio/kamailio.cfg, real sipp digest REGISTERs.
//!
//! If Debian's kamailio, kamailio-redis-modules or sip-tester could not be installed,
//! scripts/setup.sh leaves `.deps/kamailio-unavailable` with the reason, and every test here
//! prints a SKIPPED line with it (and `make test` repeats it at the end) instead of passing
//! silently.

mod common;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KAMAILIO: &str = "/usr/sbin/kamailio";
const KAMCMD: &str = "/usr/sbin/kamcmd";
const SIPP: &str = "/usr/bin/sipp";

/// Why the end-to-end tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    if let Ok(reason) = std::fs::read_to_string(deps().join("kamailio-unavailable")) {
        return Some(reason.trim().to_owned());
    }
    [KAMAILIO, KAMCMD, SIPP]
        .iter()
        .find(|tool| !std::path::Path::new(tool).exists())
        .map(|tool| format!("{tool} is not installed (run `make setup`)"))
}

macro_rules! require_kamailio {
    () => {
        if let Some(reason) = unavailable() {
            eprintln!("SKIPPED (Kamailio end-to-end): {reason}");
            return;
        }
    };
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Kamailio started with the shipped example configuration against a Redis port.
struct Kamailio {
    child: Option<Child>,
    dir: PathBuf,
    sip_port: u16,
    http_port: u16,
}

impl Kamailio {
    fn start(redis_port: u16) -> Kamailio {
        let dir = std::env::temp_dir().join(format!(
            "kamsync-kam-{}-{}",
            std::process::id(),
            free_tcp_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sip_port = free_udp_port();
        let http_port = free_tcp_port();
        let log = std::fs::File::create(dir.join("kamailio.log")).unwrap();
        let child = Command::new(KAMAILIO)
            .arg("-f")
            .arg(root().join("examples/kamailio/kamailio.cfg"))
            .args(["-DD", "-E", "-Y"])
            .arg(&dir)
            .arg("-A")
            .arg(format!("DBURL=\"redis://127.0.0.1:{redis_port}/0\""))
            .arg("-A")
            .arg(format!("SIP_LISTEN=udp:127.0.0.1:{sip_port}"))
            .arg("-A")
            .arg(format!("HTTP_LISTEN=tcp:127.0.0.1:{http_port}"))
            .arg("-A")
            .arg(format!("CTL_SOCKET=\"unix:{}/ctl\"", dir.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kamailio");
        let mut kamailio = Kamailio { child: Some(child), dir, sip_port, http_port };
        kamailio.wait_ready();
        kamailio
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kamailio exited ({status}); log:\n{}", self.log());
            }
            if self.kamcmd("core.uptime").0 {
                return;
            }
            assert!(Instant::now() < deadline, "kamailio not ready; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default()
    }

    /// Runs kamcmd; (succeeded, output). kamcmd exits 0 even on an RPC error, so success
    /// also requires no "error:" in its output.
    fn kamcmd(&self, command: &str) -> (bool, String) {
        let out = Command::new(KAMCMD)
            .arg("-s")
            .arg(format!("unix:{}/ctl", self.dir.display()))
            .arg(command)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success() && !text.contains("error"), text)
    }

    /// domain.reload over JSON-RPC (HTTP), as kamsync's reload delivery would call it.
    fn reload_over_http(&self) -> String {
        use std::io::{Read, Write};
        let body = r#"{"jsonrpc":"2.0","method":"domain.reload","id":1}"#;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "POST /RPC HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply
    }

    /// A sipp REGISTER with digest auth; true if the scenario (`200`, `401` or `403`) played
    /// out as written.
    fn register(
        &self,
        scenario: &str,
        user: &str,
        domain: &str,
        auth_user: &str,
        password: &str,
    ) -> bool {
        let status = Command::new(SIPP)
            .arg(format!("127.0.0.1:{}", self.sip_port))
            .arg("-sf")
            .arg(root().join(format!("tests/sipp/register_{scenario}.xml")))
            .args(["-m", "1", "-i", "127.0.0.1", "-p"])
            .arg(free_udp_port().to_string())
            .args([
                "-key", "user", user, "-key", "domain", domain, "-au", auth_user, "-ap", password,
            ])
            .args(["-timeout", "10", "-timeout_error", "-nostdin"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        status.success()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- kamailio log ----\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

    json_set(
        &mut con,
        "credential:bob",
        &json!({"username": "bob", "domain": "example.com", "password": "pw1"}),
    );

    assert!(kamailio.register("200", "bob", "example.com", "bob", "pw1"));
    assert!(kamailio.register("200", "bob", "example.com", "bob@example.com", "pw1"), "ha1b path");
}

#[test]
fn wrong_password_gets_401() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    json_set(
        &mut con,
        "credential:bob",
        &json!({"username": "bob", "domain": "example.com", "password": "pw1"}),
    );

    assert!(kamailio.register("401", "bob", "example.com", "bob", "wrong"));
    assert!(!kamailio.register("200", "bob", "example.com", "bob", "wrong"));
}

#[test]
fn deleted_or_expired_credential_stops_authenticating_at_once() {
    require_kamailio!();
    let (_server, mut con, kamailio) = setup("datetime");
    json_set(
        &mut con,
        "credential:a",
        &json!({"username": "a", "domain": "example.com", "password": "p"}),
    );
    json_set(
        &mut con,
        "credential:b",
        &json!({"username": "b", "domain": "example.com", "password": "p"}),
    );
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
    json_set(
        &mut con,
        "credential:c",
        &json!({"username": "carol", "domain": "example.com", "password": "old"}),
    );
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
    json_set(
        &mut con,
        "credential:d",
        &json!({"username": "dave", "domain": "new.org", "password": "p"}),
    );
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

fn md5_hex(text: &str) -> String {
    use std::io::Write;
    let mut child =
        Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()[..32].to_owned()
}
