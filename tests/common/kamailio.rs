//! Kamailio and sipp for the end-to-end tests: a Kamailio started with the shipped example
//! configuration, and digest REGISTERs.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{deps, root};

const KAMAILIO: &str = "/usr/sbin/kamailio";
const KAMCMD: &str = "/usr/sbin/kamcmd";
const SIPP: &str = "/usr/bin/sipp";

/// Why the end-to-end tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if let Ok(reason) = std::fs::read_to_string(deps().join("kamailio-unavailable")) {
        return Some(reason.trim().to_owned());
    }
    [KAMAILIO, KAMCMD, SIPP]
        .iter()
        .find(|tool| !std::path::Path::new(tool).exists())
        .map(|tool| format!("{tool} is not installed (run `make setup`)"))
}

#[macro_export]
macro_rules! require_kamailio {
    () => {
        if let Some(reason) = unavailable() {
            eprintln!("SKIPPED (Kamailio end-to-end): {reason}");
            return;
        }
    };
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Kamailio started with the shipped example configuration against a Redis port.
pub struct Kamailio {
    child: Option<Child>,
    pub dir: PathBuf,
    pub sip_port: u16,
    pub http_port: u16,
}

impl Kamailio {
    pub fn start(redis_port: u16) -> Kamailio {
        Self::start_on(redis_port, free_tcp_port())
    }

    /// Starts with a chosen HTTP port (a reload target configured before Kamailio runs).
    pub fn start_on(redis_port: u16, http_port: u16) -> Kamailio {
        let dir = std::env::temp_dir().join(format!(
            "kamsync-kam-{}-{}",
            std::process::id(),
            free_tcp_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sip_port = free_udp_port();
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default()
    }

    /// Runs kamcmd; (succeeded, output). kamcmd exits 0 even on an RPC error, so success
    /// also requires no "error:" in its output.
    pub fn kamcmd(&self, command: &str) -> (bool, String) {
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
    pub fn reload_over_http(&self) -> String {
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
    pub fn register(
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

impl Kamailio {
    /// Stops (STOP) or resumes (CONT) Kamailio's processes: a frozen Kamailio.
    pub fn signal_all(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        // Kamailio's workers are children of its main process; only those and the main
        // process are signalled, never a process group (the test runner's own).
        let _ = Command::new("pkill").arg(format!("-{signal}")).arg("-P").arg(&pid).status();
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status();
    }
}
