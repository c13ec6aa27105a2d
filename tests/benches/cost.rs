//! What one request costs the daemon outside ONNX Runtime's own run (issue 26): CPU µs,
//! allocations and syscalls per request, on `sigmoid` (inline, 240 bytes) and the PP-OCR
//! direction classifier (`ppocr_cls`, a 3×48×192 crop through the arena), at 1 and 32
//! closed-loop clients (the load generator of `rxctl bench`: every request differs, so
//! nothing is coalesced or cached). Prints a Markdown section for BENCHMARKS.md.
//!
//! - CPU: the daemon's user + system time (`/proc/PID/stat`) over `RXD_BENCH_N` requests,
//!   minus in-process ONNX Runtime's thread CPU time per row at the daemon's mean batch size
//!   (one intra-op thread on both sides), measured in the same run.
//! - Allocations: only with `RXD_BENCH_RXD_ALLOC`, an rxd built with `--features alloc-count`
//!   (it logs its allocation totals on every `status` request; the default build counts
//!   nothing). Rust allocations only: ONNX Runtime's own are not counted.
//! - Syscalls: `strace -c -f` attached to the daemon for a further `RXD_BENCH_N / 4` requests
//!   (`RXD_BENCH_STRACE=0` skips it). strace slows the daemon, so batches may differ a little.
//!
//! Run: `scripts/bench cost` (release binaries, and the alloc-count build), or by hand:
//! `cargo build --release --bins && cargo bench -p rxd-e2e --bench cost`.
//! `RXD_BENCH_LOG_LEVEL` (default `info`, the packaged default) sets the daemon's log level;
//! `RXD_BENCH_MODELS` and `RXD_BENCH_CLIENTS` narrow the run; `RXD_BENCH_MODEL_TOML` adds
//! settings to both models (`coalesce-max-bytes = 0` measures what coalescing costs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rxd_client::Tensor;
use rxd_client::bench::{Load, run};
use rxd_e2e::*;

fn item(model: &str, rows: u64) -> Tensor {
    match model {
        "sigmoid" => f32_tensor("x", &[3, 4, 5], &random_f32(60, 7)),
        "ppocr_cls" => {
            let n = (rows * 3 * 48 * 192) as usize;
            f32_tensor("x", &[rows, 3, 48, 192], &random_f32(n, 7))
        }
        other => panic!("no input for {other}"),
    }
}

fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// In-process ONNX Runtime's CPU µs per row at batch `rows` (one intra-op thread).
fn ort_cpu_per_row(reference: &mut Reference, model: &str, rows: u64, n: usize) -> f64 {
    let input = item(model, rows);
    let runs = (n as u64 / rows).max(20) as usize;
    for _ in 0..runs / 10 + 5 {
        std::hint::black_box(reference.run(std::slice::from_ref(&input)));
    }
    let start = thread_cpu();
    for _ in 0..runs {
        std::hint::black_box(reference.run(std::slice::from_ref(&input)));
    }
    (thread_cpu() - start).as_secs_f64() * 1e6 / (runs as u64 * rows) as f64
}

/// The alloc-count build's totals (allocations, reallocations, bytes), from the log line its
/// `status` writes.
fn alloc_totals(d: &TestDaemon) -> (u64, u64, u64) {
    d.client().status().unwrap();
    let log = d.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("alloc totals"))
        .expect("no alloc totals in the log: is RXD_BENCH_RXD_ALLOC an alloc-count build?");
    let field = |name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("allocations"), field("reallocations"), field("bytes"))
}

fn load(d: &TestDaemon, model: &str, clients: usize, requests: u64) -> rxd_client::bench::Report {
    let load = Load {
        concurrency: clients,
        requests: Some(requests),
        duration: Duration::from_secs(600),
        warmup: Duration::ZERO,
        arena: model != "sigmoid",
        ..Load::new(&d.socket, model, vec![item(model, 1)])
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(run(&load, |_, _| {})).unwrap();
    assert!(r.errors.is_empty(), "{model}: {:?}", r.error_messages);
    r
}

/// Syscalls per request by name, from `strace -c -f` attached while `requests` run.
fn syscalls(d: &TestDaemon, model: &str, clients: usize, requests: u64) -> BTreeMap<String, f64> {
    let out = d.dir.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-c", "-f", "-q", "-o"])
        .arg(&out)
        .args(["-p", &d.pid().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    std::thread::sleep(Duration::from_millis(500));
    load(d, model, clients, requests);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    strace.wait().unwrap();
    parse_strace(&std::fs::read_to_string(&out).unwrap(), requests)
}

fn parse_strace(text: &str, requests: u64) -> BTreeMap<String, f64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let name = f[f.len() - 1].to_string();
        if let Ok(n) = f[3].parse::<u64>() {
            *calls.entry(name).or_insert(0.0) += n as f64 / requests as f64;
        }
    }
    calls
}

/// The two models as the examples serve them, plus `RXD_BENCH_MODEL_TOML` (e.g.
/// `coalesce-max-bytes = 0`) in each one's model.toml.
fn repo() -> Repo {
    let repo = Repo::new();
    let extra = std::env::var("RXD_BENCH_MODEL_TOML").unwrap_or_default();
    for m in ["sigmoid", "ppocr_cls"] {
        repo.example(m);
        let toml = repo_root()
            .join("examples/repository")
            .join(m)
            .join("model.toml");
        let base = std::fs::read_to_string(toml).unwrap_or_default();
        repo.settings(m, &format!("{base}\n{extra}\n"));
    }
    repo
}

fn main() {
    let n: u64 = bench_setting("RXD_BENCH_N", 6000);
    let strace = bench_setting("RXD_BENCH_STRACE", 1) != 0;
    let log_level = std::env::var("RXD_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let models_env =
        std::env::var("RXD_BENCH_MODELS").unwrap_or_else(|_| "sigmoid,ppocr_cls".into());
    let models: Vec<&str> = models_env.split(',').collect();
    let clients_env = std::env::var("RXD_BENCH_CLIENTS").unwrap_or_else(|_| "1,32".into());
    let clients: Vec<usize> = clients_env.split(',').map(|c| c.parse().unwrap()).collect();
    let alloc_bin = std::env::var_os("RXD_BENCH_RXD_ALLOC").map(PathBuf::from);

    let repo = repo();
    let extra = ["--log-level", log_level.as_str()];
    let d = TestDaemon::start(repo.path(), &extra);
    let a = alloc_bin
        .as_deref()
        .map(|bin: &Path| TestDaemon::start_program(bin, repo.path(), &[], "", &extra));

    println!(
        "{n} requests per row (strace: {} more); daemon log level {log_level}; \
         \"ORT\" is in-process ONNX Runtime's thread CPU per row at the daemon's mean batch size, \
         measured in this run.\n",
        n / 4
    );
    println!(
        "| model | clients | req/s | mean batch | daemon CPU µs/req | ORT CPU µs/row | outside ORT µs/req | allocs + reallocs /req | alloc bytes/req | syscalls/req | of which |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for &model in &models {
        let mut reference = Reference::new(&model_file(model));
        let mut ort_at: BTreeMap<u64, f64> = BTreeMap::new();
        for &c in &clients {
            load(&d, model, c, n / 4); // warm-up
            let before = d.summaries()[model].clone();
            let cpu0 = process_cpu(d.pid());
            let r = load(&d, model, c, n);
            let cpu = (process_cpu(d.pid()) - cpu0).as_secs_f64() * 1e6 / n as f64;
            let after = d.summaries()[model].clone();
            let batches = after.batches - before.batches;
            let mean_batch = (after.rows - before.rows) as f64 / batches.max(1) as f64;
            let b = mean_batch.round().max(1.0) as u64;
            let ort = *ort_at
                .entry(b)
                .or_insert_with(|| ort_cpu_per_row(&mut reference, model, b, n as usize));
            let allocs = a.as_ref().map(|a| {
                load(a, model, c, n / 4);
                let (n0, r0, b0) = alloc_totals(a);
                load(a, model, c, n);
                let (n1, r1, b1) = alloc_totals(a);
                // Two `status` requests are in the difference (one each side): negligible.
                let per = |x: u64| x as f64 / n as f64;
                (per(n1 - n0), per(r1 - r0), per(b1 - b0))
            });
            let sys = strace.then(|| syscalls(&d, model, c, n / 4));
            let (total, top) = match &sys {
                Some(s) => {
                    let mut v: Vec<(&String, &f64)> =
                        s.iter().filter(|(k, _)| *k != "total").collect();
                    v.sort_by(|x, y| y.1.total_cmp(x.1));
                    let top: Vec<String> = v
                        .iter()
                        .filter(|(_, x)| **x >= 0.05)
                        .map(|(k, x)| format!("{k} {x:.2}"))
                        .collect();
                    (
                        format!("{:.2}", s.get("total").copied().unwrap_or(0.0)),
                        top.join(", "),
                    )
                }
                None => ("–".into(), String::new()),
            };
            let (al, ab) = match allocs {
                Some((x, r, y)) => (format!("{x:.1} + {r:.1}"), format!("{y:.0}")),
                None => ("–".into(), "–".into()),
            };
            println!(
                "| {model} | {c} | {:.0} | {mean_batch:.2} | {cpu:.1} | {ort:.1} | {:.1} | {al} | {ab} | {total} | {top} |",
                r.throughput_per_s,
                cpu - ort,
            );
        }
    }
}
