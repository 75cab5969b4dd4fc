//! `make bench`: what kamsync costs a Redis user, as ratios against the same Redis without it.
//!
//! In one run, interleaved rounds of (a) Redis 7.4 + RedisJSON and (b) the same with kamsync,
//! each on a fresh server, driven by the bundle's own `redis-benchmark` (random keys, 20
//! clients): JSON.SET of new domains and new credentials, updates that leave the row as it is
//! and updates that change it. For each: throughput, p50/p99 latency, server CPU per write
//! (INFO cpu delta / operations) and RSS; the medians of the rounds and the kamsync/bare ratio.
//! Then RESYNC of 100k and 1M existing credentials (entities/s, worst PING meanwhile) and the
//! memory kamsync keeps per entity. The table is printed and written to
//! `bench-results/latest.md`.
//!
//! `KAMSYNC_BENCH_OPS` (operations per workload, default 100000), `KAMSYNC_BENCH_ROUNDS`
//! (default 3) and `KAMSYNC_BENCH_RESYNC` (comma-separated entity counts, default
//! `100000,1000000`) scale it down for a quick look.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: &str = "20";
/// Keys updated by the update workloads (prepopulated).
const UPDATE_KEYS: usize = 10_000;

struct Workload {
    name: &'static str,
    /// Keys to create before the run, with the doc for key i.
    prepare: Option<fn(usize) -> (String, String)>,
    /// redis-benchmark command; `__rand_int__` is a 12-digit random number below `range`.
    command: &'static [&'static str],
    range: usize,
}

fn domain_key(i: usize) -> (String, String) {
    (format!("sipdomain:{i:012}"), format!(r#"{{"name":"d{i:012}.org"}}"#))
}

fn credential_key(i: usize) -> (String, String) {
    (
        format!("credential:{i:012}"),
        format!(r#"{{"username":"u{i:012}","domain":"example.com","password":"p"}}"#),
    )
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "new domains",
        prepare: None,
        command: &["JSON.SET", "sipdomain:__rand_int__", "$", r#"{"name":"d__rand_int__.org"}"#],
        range: 1_000_000_000,
    },
    Workload {
        name: "new credentials",
        prepare: None,
        command: &[
            "JSON.SET",
            "credential:__rand_int__",
            "$",
            r#"{"username":"u__rand_int__","domain":"example.com","password":"secret"}"#,
        ],
        range: 1_000_000_000,
    },
    Workload {
        name: "domain update, row unchanged",
        prepare: Some(domain_key),
        command: &["JSON.SET", "sipdomain:__rand_int__", "$.note", "1"],
        range: UPDATE_KEYS,
    },
    Workload {
        name: "credential update, new password",
        prepare: Some(credential_key),
        command: &["JSON.SET", "credential:__rand_int__", "$.password", r#""p__rand_int__""#],
        range: UPDATE_KEYS,
    },
];

#[derive(Default, Clone)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_op: f64,
    rss_mb: f64,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn info_field(con: &mut Connection, section: &str, field: &str) -> f64 {
    let text: String = cmd("INFO").arg(section).query(con).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn cpu_seconds(con: &mut Connection) -> f64 {
    info_field(con, "cpu", "used_cpu_user") + info_field(con, "cpu", "used_cpu_sys")
}

fn prepare(con: &mut Connection, make: fn(usize) -> (String, String), n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let (key, doc) = make(i);
            pipe.cmd("JSON.SET").arg(key).arg("$").arg(doc).ignore();
        }
        let _: () = pipe.query(con).unwrap();
    }
}

fn run_workload(with_module: bool, workload: &Workload, ops: usize) -> Figures {
    let mut options = Options::new(Flavor::Redis74);
    if !with_module {
        options = options.without_module();
    }
    let server = options.start();
    let mut con = server.connect();
    if let Some(make) = workload.prepare {
        prepare(&mut con, make, workload.range);
    }
    let cpu_before = cpu_seconds(&mut con);
    let out = Command::new(deps().join("redis-7.4/bin/redis-benchmark"))
        .env("LD_LIBRARY_PATH", deps().join("libssl1.1/usr/lib/x86_64-linux-gnu"))
        .args(["-p", &server.port.to_string(), "-c", CLIENTS, "-n", &ops.to_string()])
        .args(["-r", &workload.range.to_string(), "--csv", "-q"])
        .args(workload.command)
        .output()
        .expect("redis-benchmark");
    let cpu_after = cpu_seconds(&mut con);
    let csv = String::from_utf8_lossy(&out.stdout);
    // "name","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
    // "p99_latency_ms","max_latency_ms"
    // The name column holds the command, commas included: read the figures from the end.
    let row = csv.lines().last().unwrap_or_default();
    let mut cols: Vec<f64> =
        row.rsplit(',').take(7).map(|c| c.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
    cols.reverse();
    assert!(cols.len() == 7 && cols[0].is_finite(), "unexpected redis-benchmark output: {csv}");
    Figures {
        rps: cols[0],
        p50_ms: cols[3],
        p99_ms: cols[5],
        cpu_us_per_op: (cpu_after - cpu_before) * 1e6 / ops as f64,
        rss_mb: info_field(&mut con, "memory", "used_memory_rss") / 1e6,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn medians(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        rps: pick(|f| f.rps),
        p50_ms: pick(|f| f.p50_ms),
        p99_ms: pick(|f| f.p99_ms),
        cpu_us_per_op: pick(|f| f.cpu_us_per_op),
        rss_mb: pick(|f| f.rss_mb),
    }
}

/// RESYNC of `n` credentials loaded before the module: entities/s and the worst PING.
fn resync(n: usize) -> (f64, Duration, u64) {
    let server = Options::new(Flavor::Redis74).without_module().start();
    let mut con = server.connect();
    prepare(&mut con, credential_key, n);
    let _: () =
        cmd("MODULE").arg("LOAD").arg(module_path().to_str().unwrap()).query(&mut con).unwrap();
    let pinger = Pinger::start(&server);
    let started = Instant::now();
    let _: String = cmd("KAMSYNC.RESYNC").query(&mut con).unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if server.kamsync_info(&mut con)["task_state"] != "running" {
            break;
        }
    }
    let took = started.elapsed();
    let (worst, _) = pinger.stop();
    let info = server.kamsync_info(&mut con);
    assert_eq!(info["task_synced"], n.to_string(), "{info:?}");
    let longest = info["task_longest_batch_us"].parse().unwrap_or(0);
    (n as f64 / took.as_secs_f64(), worst, longest)
}

/// used_memory with kamsync minus without, per entity, for `n` domains and `n` credentials.
fn memory_per_entity(n: usize) -> (f64, f64) {
    let mut used = Vec::new();
    for with_module in [false, true] {
        let mut options = Options::new(Flavor::Redis74);
        if !with_module {
            options = options.without_module();
        }
        let server = options.start();
        let mut con = server.connect();
        prepare(&mut con, domain_key, n);
        prepare(&mut con, credential_key, n);
        let state: u64 = if with_module {
            let a: Option<u64> =
                cmd("MEMORY").arg("USAGE").arg("kamsync:state:domain").query(&mut con).unwrap();
            let b: Option<u64> =
                cmd("MEMORY").arg("USAGE").arg("kamsync:state:credential").query(&mut con).unwrap();
            a.unwrap_or(0) + b.unwrap_or(0)
        } else {
            0
        };
        used.push((info_field(&mut con, "memory", "used_memory"), state as f64));
    }
    let entities = 2.0 * n as f64;
    ((used[1].0 - used[0].0) / entities, used[1].1 / entities)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ops = env_usize("KAMSYNC_BENCH_OPS", 100_000);
    let rounds = env_usize("KAMSYNC_BENCH_ROUNDS", 3);
    let resync_sizes: Vec<usize> = std::env::var("KAMSYNC_BENCH_RESYNC")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "Redis 7.4.1 + RedisJSON, redis-benchmark -c {CLIENTS}, {ops} operations per run, median \
         of {rounds} interleaved rounds (bare, kamsync, bare, kamsync, ...).\n"
    );
    let _ = writeln!(
        report,
        "| workload | figure | bare | kamsync | kamsync/bare |\n|---|---|---|---|---|"
    );
    for workload in &WORKLOADS {
        let mut bare = Vec::new();
        let mut with = Vec::new();
        for round in 0..rounds {
            eprintln!("{}: round {}", workload.name, round + 1);
            bare.push(run_workload(false, workload, ops));
            with.push(run_workload(true, workload, ops));
        }
        let (b, k) = (medians(&bare), medians(&with));
        for (figure, bv, kv) in [
            ("throughput (ops/s)", b.rps, k.rps),
            ("p50 latency (ms)", b.p50_ms, k.p50_ms),
            ("p99 latency (ms)", b.p99_ms, k.p99_ms),
            ("server CPU per write (µs)", b.cpu_us_per_op, k.cpu_us_per_op),
            ("RSS after (MB)", b.rss_mb, k.rss_mb),
        ] {
            let _ = writeln!(
                report,
                "| {} | {figure} | {bv:.1} | {kv:.1} | **{:.2}** |",
                workload.name,
                kv / bv
            );
        }
    }
    let _ = writeln!(report, "\n| RESYNC of existing credentials | entities/s | worst PING during it | longest batch |\n|---|---|---|---|");
    for n in resync_sizes {
        eprintln!("resync of {n}");
        let (rate, worst, longest) = resync(n);
        let _ = writeln!(
            report,
            "| {n} | {rate:.0} | {:.1} ms | {:.1} ms |",
            worst.as_secs_f64() * 1e3,
            longest as f64 / 1e3
        );
    }
    let (extra, state) = memory_per_entity(20_000);
    let _ = writeln!(
        report,
        "\nMemory kamsync adds per entity (20k domains + 20k credentials): {extra:.0} bytes of \
         used_memory in all (row, audit fields, state), of which {state:.0} bytes are \
         kamsync's own state hash."
    );
    println!("{report}");
    let dir = root().join("bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("latest.md"), &report).unwrap();
    eprintln!("written to {}", dir.join("latest.md").display());
}
