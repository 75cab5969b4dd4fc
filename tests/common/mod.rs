//! Test harness: real servers with real RedisJSON and the kamsync module built by this crate.
//!
//! Each [`Server`] gets a free port and a temporary directory; every wait has a deadline and
//! notices a server that died; the server log is printed when a test fails; Drop shuts the
//! server down and kills it if it does not go.

#![allow(dead_code, unused_imports)]

pub mod kamailio;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use redis::{cmd, Connection};
pub use serde_json::{json, Value};

/// The servers the suite runs against (DESIGN §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Redis74,
    Redis72,
    Valkey91,
    /// Debian's Redis 7.0: only to check that kamsync refuses it.
    Redis70,
}

impl Flavor {
    pub fn binary(self) -> PathBuf {
        match self {
            Flavor::Redis74 => deps().join("redis-7.4/bin/redis-server"),
            Flavor::Redis72 => deps().join("redis-7.2/bin/redis-server"),
            Flavor::Valkey91 => deps().join("valkey-9.1/bin/valkey-server"),
            Flavor::Redis70 => deps().join("redis-7.0/bin/redis-server"),
        }
    }

    /// RedisJSON for this server (Valkey loads the one of the Redis 7.4 bundle).
    pub fn rejson(self) -> Option<PathBuf> {
        match self {
            Flavor::Redis74 | Flavor::Valkey91 => Some(deps().join("redis-7.4/lib/rejson.so")),
            Flavor::Redis72 => Some(deps().join("redis-7.2/lib/rejson.so")),
            Flavor::Redis70 => None,
        }
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn deps() -> PathBuf {
    root().join(".deps")
}

/// The module built alongside this test binary (same profile), or `KAMSYNC_MODULE`.
pub fn module_path() -> PathBuf {
    if let Ok(path) = std::env::var("KAMSYNC_MODULE") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let module = profile_dir.join("libkamsync.so");
    // `cargo test` does not rebuild the cdylib; `make test` builds it first. Catch a stale one
    // rather than test old code.
    let built = std::fs::metadata(&module)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} not built; run `make test`", module.display()));
    let newest_source = std::fs::read_dir(root().join("src"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.metadata().ok()?.modified().ok())
        .max()
        .unwrap();
    assert!(built >= newest_source, "{} is older than src/; run `make test`", module.display());
    module
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

static DIR_SEQ: AtomicUsize = AtomicUsize::new(0);

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kamsync-test-{}-{}",
        std::process::id(),
        DIR_SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How a server is started.
#[derive(Clone)]
pub struct Options {
    pub flavor: Flavor,
    pub with_module: bool,
    pub module_args: Vec<String>,
    pub extra: Vec<String>,
}

impl Options {
    pub fn new(flavor: Flavor) -> Self {
        Options { flavor, with_module: true, module_args: Vec::new(), extra: Vec::new() }
    }
    pub fn module_args(mut self, args: &[&str]) -> Self {
        self.module_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// Extra `--name value` server arguments.
    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.extra.push(format!("--{name}"));
        self.extra.push(value.to_owned());
        self
    }
    pub fn without_module(mut self) -> Self {
        self.with_module = false;
        self
    }
    pub fn start(self) -> Server {
        Server::launch(self, free_port(), temp_dir())
    }
}

pub struct Server {
    pub options: Options,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

const READY_DEADLINE: Duration = Duration::from_secs(20);

impl Server {
    pub fn start(flavor: Flavor) -> Server {
        Options::new(flavor).start()
    }

    fn command(options: &Options, port: u16, dir: &Path) -> Command {
        let mut command = Command::new(options.flavor.binary());
        command
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("server.log"))
            .arg("--save")
            .arg("")
            .arg("--enable-debug-command")
            .arg("yes")
            .arg("--enable-module-command")
            .arg("yes")
            .env("LD_LIBRARY_PATH", deps().join("libssl1.1/usr/lib/x86_64-linux-gnu"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(rejson) = options.flavor.rejson() {
            command.arg("--loadmodule").arg(rejson);
        }
        if options.with_module {
            command.arg("--loadmodule").arg(module_path()).args(&options.module_args);
        }
        command.args(&options.extra);
        command
    }

    fn launch(options: Options, port: u16, dir: PathBuf) -> Server {
        let child = Self::command(&options, port, &dir).spawn().expect("spawn server");
        let mut server = Server { options, port, dir, child: Some(child) };
        server.wait_ready();
        server
    }

    /// Starts a server that is expected to exit on its own (e.g. a refused module); returns its
    /// exit status and log.
    pub fn run_to_exit(options: Options) -> (std::process::ExitStatus, String) {
        let dir = temp_dir();
        let mut child = Self::command(&options, free_port(), &dir).spawn().expect("spawn");
        let deadline = Instant::now() + READY_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit; log:\n{}", read_log(&dir));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = read_log(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        (status, log)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited during start-up ({status}); log:\n{}", self.log());
            }
            if let Ok(mut con) = self.try_connect() {
                let loading: Result<String, _> = cmd("PING").query(&mut con);
                if loading.is_ok() {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("server not ready after {READY_DEADLINE:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_connect(&self) -> redis::RedisResult<Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(con)
    }

    pub fn connect(&self) -> Connection {
        self.try_connect().unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Stops the server (SHUTDOWN, then kill after a deadline) and starts it again on the same
    /// port and directory, with the same options.
    pub fn restart(&mut self) {
        self.stop();
        let child = Self::command(&self.options, self.port, &self.dir).spawn().expect("respawn");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Kills the server with SIGKILL, no shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(mut con) = self.try_connect() {
            let _: Result<(), _> = cmd("SHUTDOWN").arg("NOSAVE").query(&mut con);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
    }

    /// INFO kamsync as a map, without the `kamsync_` prefix.
    pub fn kamsync_info(&self, con: &mut Connection) -> BTreeMap<String, String> {
        let text: String = cmd("INFO").arg("kamsync").query(con).unwrap();
        text.lines()
            .filter_map(|line| line.strip_prefix("kamsync_"))
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    }

    pub fn counter(&self, con: &mut Connection, name: &str) -> u64 {
        let info = self.kamsync_info(con);
        info.get(name).unwrap_or_else(|| panic!("no counter {name} in {info:?}")).parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {:?} server log ({}) ----\n{}",
                self.options.flavor,
                self.dir.display(),
                self.log()
            );
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_else(|e| format!("(no log: {e})"))
}

// ---- small client helpers ----

pub fn json_set(con: &mut Connection, key: &str, doc: &Value) {
    let _: () = cmd("JSON.SET").arg(key).arg("$").arg(doc.to_string()).query(con).unwrap();
}

pub fn json_get(con: &mut Connection, key: &str) -> Value {
    let text: String = cmd("JSON.GET").arg(key).query(con).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn hgetall(con: &mut Connection, key: &str) -> BTreeMap<String, String> {
    cmd("HGETALL").arg(key).query(con).unwrap()
}

pub fn keys(con: &mut Connection, pattern: &str) -> BTreeSet<String> {
    cmd("KEYS").arg(pattern).query(con).unwrap()
}

pub fn get_int(con: &mut Connection, key: &str) -> Option<i64> {
    cmd("GET").arg(key).query(con).unwrap()
}

pub fn xlen(con: &mut Connection, key: &str) -> i64 {
    cmd("XLEN").arg(key).query(con).unwrap()
}

/// Every key with its DUMP payload, for comparing whole datasets.
pub fn dump_all(con: &mut Connection) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let keys: Vec<Vec<u8>> = cmd("KEYS").arg("*").query(con).unwrap();
    keys.into_iter()
        .map(|key| {
            let dump: Vec<u8> = cmd("DUMP").arg(&key).query(con).unwrap();
            (key, dump)
        })
        .collect()
}

/// A credential document with a plaintext password.
pub fn set_credential(con: &mut Connection, key: &str, user: &str, domain: &str, password: &str) {
    json_set(con, key, &json!({"username": user, "domain": domain, "password": password}));
}

/// MD5 in hex, by the system's md5sum: an implementation independent of the module's.
pub fn md5_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()[..32].to_owned()
}

/// A client that PINGs a server every 200 µs from its own thread and keeps the worst answer
/// time: what a user would notice while the server is busy. Stop it to read the figures.
pub struct Pinger {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, u64)>,
}

impl Pinger {
    pub fn start(server: &Server) -> Pinger {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut con = server.connect();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut pings = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                let _: String = cmd("PING").query(&mut con).unwrap();
                worst = worst.max(at.elapsed());
                pings += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            (worst, pings)
        });
        Pinger { stop, thread }
    }

    /// The worst PING and how many were answered.
    pub fn stop(self) -> (Duration, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The `id` field of a row, parsed.
pub fn row_id(con: &mut Connection, key: &str) -> i64 {
    let row = hgetall(con, key);
    row.get("id").unwrap_or_else(|| panic!("{key} has no id: {row:?}")).parse().unwrap()
}

/// Generates one `#[test]` per server of the matrix, each calling `$body(flavor)`.
#[macro_export]
macro_rules! on_every_server {
    ($(#[$meta:meta])* fn $name:ident($flavor:ident: Flavor) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn body($flavor: Flavor) $body
            #[test]
            fn redis_7_4() {
                body(Flavor::Redis74)
            }
            #[test]
            fn redis_7_2() {
                body(Flavor::Redis72)
            }
            #[test]
            fn valkey_9_1() {
                body(Flavor::Valkey91)
            }
        }
    };
}
