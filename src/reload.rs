//! Delivering `domain.reload` to Kamailio: what the Gears library's stream trigger never
//! finished.
//!
//! Every domain change appends an entry to the reload stream (`sync.rs`). Here a timer on the
//! main thread compares, for each target in `kamsync.reload-targets`, the newest entry with the
//! last one delivered to that target, and hands "reload up to entry N" to the target's own
//! worker thread, which makes the HTTP JSON-RPC call without holding Redis's lock. When the
//! call succeeds, the timer records N as delivered in the hash `kamsync:reload` (a replicated
//! write: the progress survives a restart through the AOF/RDB and a failover through the
//! replica). A failed call is retried with a growing back-off. So:
//!
//! * at least once: an entry counts as delivered only after Kamailio answered the reload
//!   without error; a crash between the answer and the record repeats the reload, harmless;
//! * coalesced: one reload covers every entry up to the newest, and a burst is waited out
//!   ([`DEBOUNCE`]) before calling;
//! * never two calls in flight to one Kamailio: one worker per target, one call at a time;
//! * only the primary delivers; a replica's timer does nothing.
//!
//! Why a thread in the module rather than a companion process: it starts with the module and
//! its configuration, needs no second thing to deploy or supervise, and follows the role of the
//! server it runs in. The cost is a thread per target, idle but for the calls.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_module::{Context, ContextFlags};

use crate::calls::{Calls, Reply};
use crate::config;
use crate::error::SyncError;
use crate::events::OwnWrites;

/// How often the timer looks at the stream.
pub const TICK: Duration = Duration::from_millis(50);
/// A change is delivered once no newer one arrived for this long (or [`MAX_WAIT`] passed).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a pending change waits for a burst to end.
pub const MAX_WAIT: Duration = Duration::from_millis(500);
/// Connect and answer timeout of one call; a frozen Kamailio costs one of these per retry.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Hash of delivered stream ids, one field per target URL.
pub const DELIVERED_KEY: &str = "kamsync:reload";

/// An `http://host[:port][/path]` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses one target URL. Only plain HTTP: Kamailio's xhttp serves no TLS itself.
pub fn parse_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("reload target '{url}' must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/RPC"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => {
            (host, port.parse().map_err(|_| format!("reload target '{url}' has an invalid port"))?)
        }
        None => (authority, 80),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("reload target '{url}' has no valid host"));
    }
    Ok(Target { url: url.to_owned(), host: host.to_owned(), port, path: path.to_owned() })
}

/// Parses `kamsync.reload-targets`: URLs separated by spaces; empty means delivery is off.
pub fn parse_targets(value: &str) -> Result<Vec<Target>, String> {
    value.split_whitespace().map(parse_target).collect()
}

/// What one JSON-RPC call came to. An HTTP error status, or a JSON-RPC `error` member (Kamailio
/// answers `{"error":{"code":400,"message":"Reload of domain tables failed"}}` with HTTP 200),
/// is a failure.
pub fn classify_answer(answer: &str) -> Result<(), String> {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        let line = head.lines().next().unwrap_or("no answer");
        return Err(format!("HTTP {line}"));
    }
    match serde_json::from_str::<serde_json::Value>(body.trim()) {
        Ok(reply) if reply.get("error").is_some() => {
            let error = &reply["error"];
            Err(format!(
                "JSON-RPC error {}: {}",
                error.get("code").map_or("?".into(), |c| c.to_string()),
                error.get("message").and_then(|m| m.as_str()).unwrap_or("")
            ))
        }
        Ok(reply) if reply.get("result").is_some() => Ok(()),
        _ => Err("the answer is not a JSON-RPC result".into()),
    }
}

/// One `domain.reload` call. Runs on a worker thread, never with Redis's lock.
fn call(target: &Target) -> Result<(), String> {
    let address = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("no address for {}", target.host))?;
    let mut stream = TcpStream::connect_timeout(&address, CALL_TIMEOUT)
        .map_err(|e| format!("cannot connect: {e}"))?;
    stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
    let body = r#"{"jsonrpc":"2.0","method":"domain.reload","id":1}"#;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        target.path,
        target.host,
        target.port,
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send: {e}"))?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if answer.is_empty() => return Err(format!("no answer: {e}")),
            // Kamailio keeps the connection open after its answer: the answer is complete
            // once the body is; a timeout after some bytes is the end of it.
            Err(_) => break,
        }
        if answer_complete(&answer) {
            break;
        }
    }
    classify_answer(&String::from_utf8_lossy(&answer))
}

/// Whether an HTTP answer has its whole body (by Content-Length).
fn answer_complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|len| body.len() >= len)
}

/// The worker's answer to its last job: the stream id the call covered, and the outcome.
type Answer = Arc<Mutex<Option<(String, Result<(), String>)>>>;

/// The state of one target, shared by the timer and the target's worker.
pub struct TargetState {
    pub target: Target,
    jobs: Sender<String>,
    done: Answer,
    /// The stream id being delivered now, if a call is under way.
    in_flight: Option<String>,
    /// No call before this instant (back-off after failures).
    not_before: Option<Instant>,
    backoff: Duration,
    /// When the oldest undelivered change was first seen, for [`MAX_WAIT`].
    waiting_since: Option<Instant>,
    pub stats: TargetStats,
}

/// Per-target figures for STATUS and INFO.
#[derive(Debug, Clone, Default)]
pub struct TargetStats {
    pub reloads_sent: u64,
    pub failures: u64,
    pub last_success_ms: i64,
    pub last_error: String,
    pub last_error_ms: i64,
    pub delivered_id: String,
    pub pending: u64,
}

static TARGETS: Mutex<Vec<TargetState>> = Mutex::new(Vec::new());

fn lock() -> std::sync::MutexGuard<'static, Vec<TargetState>> {
    TARGETS.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_worker(target: &Target) -> TargetState {
    let (jobs, queue): (Sender<String>, Receiver<String>) = channel();
    let done = Arc::new(Mutex::new(None));
    let worker_target = target.clone();
    let worker_done = done.clone();
    // The thread ends when its sender is dropped (target removed from the configuration).
    let _ = std::thread::Builder::new().name("kamsync-reload".into()).spawn(move || {
        while let Ok(id) = queue.recv() {
            // A panic must not leave the target marked "in flight" for ever.
            let outcome = std::panic::catch_unwind(|| call(&worker_target))
                .unwrap_or_else(|_| Err("internal error in the reload call (a bug)".into()));
            *worker_done.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, outcome));
        }
    });
    TargetState {
        target: target.clone(),
        jobs,
        done,
        in_flight: None,
        not_before: None,
        backoff: BACKOFF_FIRST,
        waiting_since: None,
        stats: TargetStats::default(),
    }
}

/// Brings the worker set in line with the configured targets (kept by URL across changes).
fn sync_targets(states: &mut Vec<TargetState>, wanted: &[Target]) {
    states.retain(|state| wanted.iter().any(|t| t.url == state.target.url));
    for target in wanted {
        if !states.iter().any(|state| state.target.url == target.url) {
            states.push(spawn_worker(target));
        }
    }
}

/// Per-target figures, for STATUS and INFO.
pub fn snapshot() -> Vec<(String, TargetStats)> {
    lock().iter().map(|s| (s.target.url.clone(), s.stats.clone())).collect()
}

/// Starts the delivery timer (at load).
pub fn start(ctx: &Context) {
    ctx.create_timer(TICK, tick, ());
}

fn tick(ctx: &Context, (): ()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Err(err) = run_tick(ctx) {
            crate::log::warning(ctx, &format!("reload delivery: {err}"));
        }
    }));
    ctx.create_timer(TICK, tick, ());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The millisecond part of a stream id.
fn id_ms(id: &str) -> i64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

/// Orders stream ids (`<ms>-<seq>`).
fn id_key(id: &str) -> (u64, u64) {
    let mut parts = id.split('-').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn run_tick(ctx: &Context) -> Result<(), SyncError> {
    let config = config::get();
    let wanted = parse_targets(&config.reload_targets).unwrap_or_default();
    let mut states = lock();
    sync_targets(&mut states, &wanted);
    if states.is_empty() || ctx.get_flags().contains(ContextFlags::SLAVE) {
        return Ok(());
    }
    let _own_writes = OwnWrites::hold();
    let calls = Calls::new(ctx);
    let original_db = Calls::selected_db(ctx);
    calls.select_db(0)?;
    let stream = config.reload_stream.as_bytes();
    let newest = match calls.read("XREVRANGE", &[stream, b"+", b"-", b"COUNT", b"1"])? {
        Reply::Array(entries) => entries.into_iter().next().and_then(|entry| match entry {
            Reply::Array(mut parts) if !parts.is_empty() => {
                parts.swap_remove(0).into_bulk().and_then(|id| String::from_utf8(id).ok())
            }
            _ => None,
        }),
        _ => None,
    };
    // Answers first, so that the delivered ids read next include what they just recorded.
    for state in states.iter_mut() {
        collect_answer(ctx, &calls, state)?;
    }
    let delivered: BTreeMap<String, String> = {
        let mut map = BTreeMap::new();
        if let Reply::Array(items) = calls.read("HGETALL", &[DELIVERED_KEY.as_bytes()])? {
            for pair in items.chunks(2) {
                if let [Reply::Bulk(url), Reply::Bulk(id)] = pair {
                    map.insert(
                        String::from_utf8_lossy(url).into_owned(),
                        String::from_utf8_lossy(id).into_owned(),
                    );
                }
            }
        }
        map
    };
    for state in states.iter_mut() {
        let done_up_to = delivered.get(&state.target.url).cloned().unwrap_or_default();
        state.stats.delivered_id = done_up_to.clone();
        let Some(newest) = newest.as_deref().filter(|n| id_key(n) > id_key(&done_up_to)) else {
            state.stats.pending = 0;
            state.waiting_since = None;
            continue;
        };
        state.stats.pending = pending_count(&calls, stream, &done_up_to)?;
        let waiting_since = *state.waiting_since.get_or_insert_with(Instant::now);
        let quiet = now_ms() - id_ms(newest) >= DEBOUNCE.as_millis() as i64;
        let ready = state.in_flight.is_none()
            && state.not_before.is_none_or(|t| Instant::now() >= t)
            && (quiet || waiting_since.elapsed() >= MAX_WAIT);
        if ready && state.jobs.send(newest.to_owned()).is_ok() {
            state.in_flight = Some(newest.to_owned());
        }
    }
    drop(states);
    calls.select_db(original_db)?;
    Ok(())
}

/// Entries after `after` (exclusive), counted up to 10,000.
fn pending_count(calls: &Calls, stream: &[u8], after: &str) -> Result<u64, SyncError> {
    let start = if after.is_empty() { "-".to_owned() } else { format!("({after}") };
    match calls.read("XRANGE", &[stream, start.as_bytes(), b"+", b"COUNT", b"10000"])? {
        Reply::Array(entries) => Ok(entries.len() as u64),
        _ => Ok(0),
    }
}

/// Takes the worker's answer, if there is one: on success records the delivered id
/// (replicated), on failure backs off.
fn collect_answer(ctx: &Context, calls: &Calls, state: &mut TargetState) -> Result<(), SyncError> {
    let answer = state.done.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some((id, outcome)) = answer else { return Ok(()) };
    state.in_flight = None;
    match outcome {
        Ok(()) => {
            calls.write(
                "HSET",
                &[DELIVERED_KEY.as_bytes(), state.target.url.as_bytes(), id.as_bytes()],
            )?;
            state.stats.reloads_sent += 1;
            state.stats.last_success_ms = now_ms();
            state.not_before = None;
            state.backoff = BACKOFF_FIRST;
            state.waiting_since = None;
        }
        Err(why) => {
            if state.stats.failures == 0 || state.backoff >= BACKOFF_MAX {
                crate::log::warning(
                    ctx,
                    &format!("domain.reload to {} failed: {why}; retrying", state.target.url),
                );
            }
            state.stats.failures += 1;
            state.stats.last_error = why;
            state.stats.last_error_ms = now_ms();
            state.not_before = Some(Instant::now() + state.backoff);
            state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_defaults_and_refuse_what_cannot_be_called() {
        let target = parse_target("http://10.0.0.5:5071/RPC").unwrap();
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str()),
            ("10.0.0.5", 5071, "/RPC")
        );
        let bare = parse_target("http://kamailio").unwrap();
        assert_eq!((bare.port, bare.path.as_str()), (80, "/RPC"));
        assert_eq!(parse_targets("  ").unwrap(), vec![]);
        assert_eq!(parse_targets("http://a:1/x http://b:2/y").unwrap().len(), 2);
        for bad in ["https://a/RPC", "a:1", "http://:5/x", "http://a:port/x"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_rpc_errors_and_http_errors_are_failures() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 37\r\n\r\n{\"jsonrpc\":\"2.0\",\"result\":{},\"id\":1}";
        let rpc_error = "HTTP/1.1 200 OK\r\n\r\n{\"jsonrpc\":\"2.0\",\"error\":{\"code\":400,\"message\":\"Reload of domain tables failed\"},\"id\":1}";
        let http_error = "HTTP/1.1 404 Not Found\r\n\r\nuse /RPC";

        assert_eq!(classify_answer(ok), Ok(()));
        assert_eq!(
            classify_answer(rpc_error).unwrap_err(),
            "JSON-RPC error 400: Reload of domain tables failed"
        );
        assert!(classify_answer(http_error).unwrap_err().contains("404"));
        assert!(classify_answer("").is_err());
    }

    #[test]
    fn stream_ids_order_numerically() {
        assert!(id_key("1700000000000-10") > id_key("1700000000000-9"));
        assert!(id_key("1700000000001-0") > id_key("1700000000000-99"));
        assert!(id_key("1-0") > id_key(""));
        assert_eq!(id_ms("1700000000123-4"), 1_700_000_000_123);
    }

    #[test]
    fn answers_are_complete_by_content_length() {
        assert!(answer_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(!answer_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}"));
        assert!(!answer_complete(b"HTTP/1.1 200 OK\r\n"));
    }
}
