//! Adaptive batching vs static configurations under a load that changes from light to heavy
//! to light (open loop: requests leave on schedule whatever the answers do), on PP-OCR's
//! direction classifier. Every configuration gets the same load in the same run; the heavy
//! phase is set from the capacity measured first (closed loop, 32 clients).
//!
//! This machine is shared: the same configuration's p99 moved 6–180 ms between runs. So
//! every configuration runs `RXD_BENCH_ROUNDS` times (default 3), the order rotated each
//! round so none always follows another, and the tables give the median of the rounds (each
//! column its own median).
//!
//! Run: `scripts/bench adaptive`. `RXD_BENCH_PHASE_SECS` sets seconds per phase (default 4).

use std::time::Duration;

use rxd_client::bench::{Load, Report, run};
use rxd_e2e::*;

const TARGET_MS: f64 = 25.0;

fn daemon(layout: &str, settings: &str) -> (Repo, TestDaemon) {
    let repo = Repo::new();
    repo.link("ppocr_cls", 1, "ppocr_cls").settings(
        "ppocr_cls",
        &format!("{layout}coalesce-max-bytes = 0\n{settings}"),
    );
    let d = TestDaemon::start(repo.path(), &[]);
    (repo, d)
}

fn load(d: &TestDaemon, phases: Vec<(f64, f64)>, concurrency: usize) -> Load {
    Load {
        socket: d.socket.clone(),
        model: "ppocr_cls".into(),
        inputs: vec![f32_tensor(
            "x",
            &[1, 3, 48, 192],
            &random_f32(3 * 48 * 192, 9),
        )],
        concurrency,
        rate_phases: phases,
        duration: Duration::from_secs(4),
        requests: None,
        warmup: Duration::from_secs(1),
        arena: true,
        timeout_ms: None,
    }
}

fn main() {
    let secs: f64 = bench_setting("RXD_BENCH_PHASE_SECS", 4.0);
    let rounds: usize = bench_setting("RXD_BENCH_ROUNDS", 3);
    for (name, layout) in [
        (
            "2 instances × 1 thread",
            "instances = 2\nintra-op-threads = 1\n",
        ),
        (
            "1 instance × 2 threads",
            "instances = 1\nintra-op-threads = 2\n",
        ),
    ] {
        let only = std::env::var("RXD_BENCH_LAYOUT").unwrap_or_default();
        if only.is_empty() || name.starts_with(&only) {
            scenario(name, layout, secs, rounds);
        }
    }
}

/// The median of the rounds' values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One configuration over the rounds: medians of throughput, p99 (all and per phase), mean
/// batch and errors.
struct Summary {
    throughput: f64,
    p99: f64,
    phases: Vec<f64>,
    batch: f64,
    errors: f64,
}

fn summarize(runs: &[Report]) -> Summary {
    let m = |f: &dyn Fn(&Report) -> f64| median(runs.iter().map(f).collect());
    let phases = runs[0].phases.len();
    Summary {
        throughput: m(&|r| r.throughput_per_s),
        p99: m(&|r| r.latency_ms.p99),
        phases: (0..phases)
            .map(|i| m(&|r| r.phases.get(i).map_or(f64::NAN, |p| p.latency_ms.p99)))
            .collect(),
        batch: m(&|r| r.mean_batch_size),
        errors: m(&|r| r.errors.values().sum::<u64>() as f64),
    }
}

fn scenario(layout_name: &str, layout: &str, secs: f64, rounds: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Capacity with the default (work-conserving) configuration.
    let (_r, d) = daemon(layout, "max-batch-rows = 32\n");
    let cap = rt
        .block_on(run(&load(&d, Vec::new(), 32), |_, _| {}))
        .unwrap()
        .throughput_per_s;
    drop(d);
    let (light, heavy) = ((0.15 * cap).round(), (0.9 * cap).round());
    let phases = vec![(light, secs), (heavy, secs), (light, secs)];

    let configs: Vec<(String, String)> = vec![
        (
            "static: rows 1 (no batching)".into(),
            "max-batch-rows = 1\n".into(),
        ),
        (
            "static: rows 4, no wait".into(),
            "max-batch-rows = 4\n".into(),
        ),
        (
            "static: rows 8, no wait".into(),
            "max-batch-rows = 8\n".into(),
        ),
        (
            "static: rows 32, no wait".into(),
            "max-batch-rows = 32\n".into(),
        ),
        (
            "static: rows 8, wait 2 ms".into(),
            "max-batch-rows = 8\nmax-queue-delay-us = 2000\n".into(),
        ),
        (
            "static: rows 32, wait 5 ms".into(),
            "max-batch-rows = 32\nmax-queue-delay-us = 5000\n".into(),
        ),
        (
            format!("adaptive: target {TARGET_MS} ms, rows ≤ 32"),
            format!("max-batch-rows = 32\nlatency-target-ms = {TARGET_MS}\n"),
        ),
    ];
    let mut runs: Vec<Vec<Report>> = vec![Vec::new(); configs.len()];
    let mut adaptive_p99s: Vec<f64> = Vec::new();
    let mut best_static_p99s: Vec<f64> = Vec::new();
    for round in 0..rounds.max(1) {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let (_r, d) = daemon(layout, &configs[i].1);
            let r = rt
                .block_on(run(&load(&d, phases.clone(), 32), |_, _| {}))
                .unwrap();
            runs[i].push(r);
        }
        // Per round: the adaptive p99 against the best static of that round.
        let n = configs.len();
        let best = runs[..n - 1]
            .iter()
            .map(|r| r.last().expect("ran"))
            .max_by(|a, b| {
                a.throughput_per_s
                    .round()
                    .total_cmp(&b.throughput_per_s.round())
                    .then(b.latency_ms.p99.total_cmp(&a.latency_ms.p99))
            })
            .expect("static runs");
        best_static_p99s.push(best.latency_ms.p99);
        adaptive_p99s.push(runs[n - 1].last().expect("ran").latency_ms.p99);
    }
    let results: Vec<(String, Summary)> = configs
        .iter()
        .zip(&runs)
        .map(|((name, _), r)| (name.clone(), summarize(r)))
        .collect();

    println!(
        "### Adaptive vs static batching: `ppocr_cls`, {layout_name}, load light → heavy → light\n"
    );
    println!(
        "Capacity (closed loop, 32 clients, default settings): {cap:.0} req/s. Phases: {light:.0} req/s, {heavy:.0} req/s, {light:.0} req/s, {secs} s each (open loop, 32 connections). Medians of {rounds} rounds.\n"
    );
    println!(
        "| configuration | achieved req/s | p99 ms (all) | p99 light | p99 heavy | p99 light | mean batch | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, r) in &results {
        let p: Vec<String> = r.phases.iter().map(|p| format!("{p:.2}")).collect();
        println!(
            "| {name} | {:.0} | {:.2} | {} | {:.2} | {:.0} |",
            r.throughput,
            r.p99,
            p.join(" | "),
            r.batch,
            r.errors
        );
    }
    let (aname, adaptive) = results.last().expect("adaptive ran");
    // Best static: highest median throughput (to the request/s), then lowest median p99.
    let best_static = results[..results.len() - 1]
        .iter()
        .max_by(|a, b| {
            a.1.throughput
                .round()
                .total_cmp(&b.1.throughput.round())
                .then(b.1.p99.total_cmp(&a.1.p99))
        })
        .expect("static runs");
    println!(
        "\n- best static (median throughput, then median p99): {} ({:.0} req/s, p99 {:.2} ms); {aname}: {:.0} req/s, p99 {:.2} ms",
        best_static.0,
        best_static.1.throughput,
        best_static.1.p99,
        adaptive.throughput,
        adaptive.p99
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "- per round, p99 ms of the adaptive mode: {}; of that round's best static: {}",
        fmt(&adaptive_p99s),
        fmt(&best_static_p99s)
    );
    let within = adaptive.phases.iter().all(|p| *p <= TARGET_MS);
    println!(
        "- adaptive median p99 within the {TARGET_MS} ms target in every phase (all below capacity): {within}"
    );
}
