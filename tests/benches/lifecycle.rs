//! Model lifecycle costs, measured in one run next to their baselines:
//! - cold load + warmup through rxd (`rxctl load`-equivalent request, client-side time) vs. bare
//!   ONNX Runtime in this process creating a session with the same options and running the
//!   same warmup (zero inputs at batch 1 and 32 for batchable models, other dynamic
//!   dimensions 32);
//! - the first request to an evicted model (evict + load + warmup + run) vs. a warm request;
//! - each model's footprint: estimated before loading, measured (accounted), ORT arena;
//! - the daemon's resident set over load/unload cycles of one model beside two resident ones
//!   (what an unload gives back, and whether cycles leave memory behind); with
//!   `RXD_BENCH_RXD_BEFORE=<rxd>` an older build is measured beside it in the same run.
//!
//! Run: `scripts/bench lifecycle`. `RXD_BENCH_N` sets the repeats per model (default 5).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use rxd_e2e::*;
use rxd_protocol::ModelSummary;

const MODELS: [&str; 4] = ["ppocr_cls", "ppocr_det", "ppocr_rec", "yolov8n"];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The warmup rxd runs: zero inputs, `rows` in a dynamic first dimension, 32 elsewhere.
fn warmup(session: &mut Session, rows: i64) {
    let mut values: Vec<(String, DynValue)> = Vec::new();
    for o in session.inputs() {
        let ValueType::Tensor { ty, shape, .. } = o.dtype() else {
            panic!("non-tensor input")
        };
        let dims: Vec<i64> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, -1) => rows,
                (_, d) if d >= 0 => d,
                _ => 32,
            })
            .collect();
        let n = dims.iter().product::<i64>() as usize;
        let v: DynValue = match ty {
            TensorElementType::Float32 => OrtTensor::from_array((dims, vec![0f32; n]))
                .unwrap()
                .into_dyn(),
            TensorElementType::Int64 => OrtTensor::from_array((dims, vec![0i64; n]))
                .unwrap()
                .into_dyn(),
            other => panic!("bench warmup: {other:?}"),
        };
        values.push((o.name().to_string(), v));
    }
    session.run(values).unwrap();
}

fn batchable(session: &Session) -> bool {
    session
        .inputs()
        .iter()
        .chain(session.outputs())
        .all(|o| matches!(o.dtype(), ValueType::Tensor { shape, .. } if shape.first() == Some(&-1)))
}

/// Bare ORT: session with rxd's options + the same warmup, in this process.
fn bare_load_here(model: &str) -> f64 {
    let t = Instant::now();
    let mut s = Session::builder(reference_env())
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .with_config_entry("session.intra_op.allow_spinning", "0")
        .unwrap()
        .commit_from_file(model_file(model))
        .unwrap();
    warmup(&mut s, 1);
    if batchable(&s) {
        warmup(&mut s, 32);
    }
    t.elapsed().as_secs_f64() * 1e3
}

/// Bare ORT in a fresh process (this bench re-run with `RXD_BENCH_BARE=model`): ORT primed
/// with a one-node graph first, as rxd does, then one timed session + warmup. A fresh process
/// is what a cold load is: rxd hands freed memory back to the kernel when it unloads, so its
/// next load starts from fresh pages too; timing bare loads in one long-lived process would
/// let each reuse the previous session's pages.
fn bare_load(model: &str) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("RXD_BENCH_BARE", model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn summary(d: &TestDaemon, name: &str) -> ModelSummary {
    d.client_inline()
        .list_models()
        .unwrap()
        .into_iter()
        .find(|m| m.name == name)
        .unwrap()
}

fn input_for(model: &str) -> Vec<rxd_client::Tensor> {
    let f = |name: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        f32_tensor(name, shape, &random_f32(n, 1))
    };
    match model {
        "ppocr_rec" => vec![f("x", &[1, 3, 48, 320])],
        "yolov8n" => vec![f("images", &[1, 3, 320, 320])],
        other => panic!("{other}"),
    }
}

fn main() {
    if let Ok(model) = std::env::var("RXD_BENCH_BARE") {
        bare_load_here("slice_first");
        println!("{}", bare_load_here(&model));
        return;
    }
    let n: usize = bench_setting("RXD_BENCH_N", 5);
    let repo = Repo::new();
    for m in MODELS {
        repo.link(m, 1, m);
    }
    // One daemon for the load timings: loads and unloads each model n times.
    let d = TestDaemon::start_with(repo.path(), &[], "preload = []\n");
    let c = d.client_inline();
    // Interleave the two.
    let mut rows = Vec::new();
    let mut footprints: BTreeMap<&str, ModelSummary> = BTreeMap::new();
    for m in MODELS {
        let (mut rxd_ms, mut rxd_own, mut bare_ms) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            bare_ms.push(bare_load(m));
            let t = Instant::now();
            let s = c.load(m, None).unwrap();
            rxd_ms.push(t.elapsed().as_secs_f64() * 1e3);
            rxd_own.push(s.load_ms.unwrap() as f64);
            if i == 0 {
                footprints.insert(m, s);
            }
            c.unload(m, None).unwrap();
        }
        let (r, b) = (median(rxd_ms), median(bare_ms));
        rows.push(format!(
            "| {m} | {b:.1} | {r:.1} | {:.0} | {:.2}× |",
            median(rxd_own),
            r / b
        ));
    }
    drop(c);
    drop(d);

    println!("### Cold load + warmup: rxd vs bare ONNX Runtime (median of {n}, ms)\n");
    println!(
        "| model | bare ORT: session + warmup | rxd: `load` request, client side | rxd: its own load_ms | ratio |"
    );
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!("{r}");
    }

    println!("\n### Footprint per model (first load in one daemon, in this order)\n");
    println!("| model | file | estimated | measured (accounted) | ORT arena (TotalAllocated) |");
    println!("|---|---:|---:|---:|---:|");
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    for m in MODELS {
        let s = &footprints[m];
        let file = std::fs::metadata(model_file(m)).unwrap().len();
        println!(
            "| {m} | {} | {} | {} | {} |",
            mib(file),
            s.estimated_bytes.map_or("—".into(), mib),
            s.memory_bytes.map_or("—".into(), mib),
            s.arena_bytes.map_or("—".into(), mib)
        );
    }

    // First request to an evicted model: a budget that holds one of the two models, requests
    // alternating between them, so each request finds its model evicted.
    let pair = ["ppocr_rec", "yolov8n"];
    // Each footprint as a fresh daemon measures it in this part's order: a model's first load
    // in a process measures more than later ones (ppocr_rec 33.9 MiB loaded first, 26 after
    // the other models), and the daemon accounts the larger figure.
    let fresh = TestDaemon::start_with(repo.path(), &[], "preload = []\n");
    let fc = fresh.client_inline();
    let sizes: Vec<u64> = pair
        .iter()
        .map(|m| {
            let s = fc.load(m, None).unwrap();
            fc.unload(m, None).unwrap();
            s.memory_bytes
                .unwrap()
                .max(footprints[m].memory_bytes.unwrap())
        })
        .collect();
    drop(fc);
    drop(fresh);
    let (big, small) = (sizes[0].max(sizes[1]), sizes[0].min(sizes[1]));
    let config = format!("preload = []\nmemory-budget = {}\n", big + small / 2);
    let d = TestDaemon::start_with(repo.path(), &[], &config);
    let c = d.client();
    let mut cold: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut warm: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..(2 * n + 2) {
        let m = pair[i % 2];
        let x = input_for(m);
        let t = Instant::now();
        c.infer(m, x.clone()).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        c.infer(m, x).unwrap();
        let second = t.elapsed();
        if i >= 2 {
            cold.entry(m).or_default().push(ms(first));
            warm.entry(m).or_default().push(ms(second));
        }
    }
    let evictions: u64 = pair.iter().map(|m| summary(&d, m).evictions).sum();
    println!(
        "\n### First request to an evicted model (budget holds one of two; {evictions} evictions, median ms)\n"
    );
    println!(
        "| model | first request after eviction (evict + load + warmup + run) | warm request |"
    );
    println!("|---|---:|---:|");
    for m in pair {
        println!(
            "| {m} | {:.1} | {:.2} |",
            median(cold[m].clone()),
            median(warm[m].clone())
        );
    }
    drop(c);
    drop(d);

    // The resident set over load/unload cycles, this build and (if given) an older one.
    let cycles = 2 * n;
    let mut rows = Vec::new();
    if let Some(before) = std::env::var_os("RXD_BENCH_RXD_BEFORE") {
        let d = TestDaemon::start_program(
            std::path::Path::new(&before),
            repo.path(),
            &[],
            "preload = []\n",
            &[],
        );
        rows.push(cycles_row("before", &d, cycles));
    }
    let d = TestDaemon::start_with(repo.path(), &[], "preload = []\n");
    rows.push(cycles_row("this build", &d, cycles));
    println!(
        "\n### Resident set over {cycles} load/unload cycles of ppocr_rec, YOLOv8n and ppocr_det resident (MiB)\n"
    );
    println!(
        "| rxd | first load grew | a reload grows (median) | after the first unload | after the last | cycles left behind |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!("{r}");
    }
}

/// The daemon's resident set over `cycles` load/unload cycles of ppocr_rec with YOLOv8n and
/// ppocr_det resident: one table row for the rxd binary `label`.
fn cycles_row(label: &str, d: &TestDaemon, cycles: usize) -> String {
    let rss = || proc_status_bytes(d.pid(), "VmRSS");
    let c = d.client_inline();
    for m in ["yolov8n", "ppocr_det"] {
        c.load(m, None).unwrap();
    }
    let (mut loads, mut unloads) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        let before = rss();
        c.load("ppocr_rec", None).unwrap();
        let loaded = rss();
        c.unload("ppocr_rec", None).unwrap();
        let after = rss();
        loads.push(loaded.saturating_sub(before));
        unloads.push(after);
        eprintln!("{label}: loaded {loaded}, unloaded {after}");
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let reload = median(loads[1..].iter().map(|&b| mib(b)).collect());
    format!(
        "| {label} | {:.1} | {reload:.1} | {:.1} | {:.1} | {:+.1} |",
        mib(loads[0]),
        mib(unloads[0]),
        mib(unloads[cycles - 1]),
        mib(unloads[cycles - 1]) - mib(unloads[0]),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
