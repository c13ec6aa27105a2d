//! Throughput of many small clients through rxd's batching vs the best in-process ONNX
//! Runtime configuration, in one run: PP-OCR's direction classifier (dynamic batch, light, so
//! per-request overhead matters), single-item requests from 1, 8 and 32 concurrent clients.
//! The in-process baseline is the best over batch sizes *and* thread layouts (one session
//! with N intra-op threads, or N 1-thread sessions run concurrently). rxd runs twice: with a
//! static row limit and no queue delay, and in the adaptive mode.
//!
//! Run: `scripts/bench batching`. `RXD_BENCH_SECS` sets seconds per measurement (default 4);
//! `RXD_BENCH_MODELS` the models (default `ppocr_cls,yolov8n`); `RXD_BENCH_MODEL_TOML` extra
//! model.toml lines for rxd (e.g. `coalesce-max-bytes = 0`; with a `max-batch-rows` they
//! replace both configurations); `RXD_BENCH_THREADS` the compute threads both sides get
//! (default 2: in-process one session with N intra-op threads or N 1-thread sessions, rxd N
//! 1-thread instances).

use std::time::{Duration, Instant};

use rxd_e2e::*;

/// A benchmarked model: name, input name, shape of one item, max-batch-rows for rxd.
struct Case {
    model: &'static str,
    input: &'static str,
    item: [usize; 3],
    max_rows: u32,
}

const CASES: [Case; 2] = [
    Case {
        model: "ppocr_cls",
        input: "x",
        item: [3, 48, 192],
        max_rows: 8,
    },
    Case {
        model: "yolov8n",
        input: "images",
        item: [3, 320, 320],
        max_rows: 8,
    },
];

/// Items per second of `sessions` sessions run concurrently at batch size `b`.
fn in_process(case: &Case, threads: usize, sessions: usize, b: usize, secs: f64) -> f64 {
    let [c, h, w] = case.item;
    let per = c * h * w;
    let model = case.model;
    let data = random_f32(b * per, 5);
    let handles: Vec<_> = (0..sessions)
        .map(|_| {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut s = bench_session(model, threads);
                let x = ndarray::Array4::from_shape_vec((b, c, h, w), data).unwrap();
                for _ in 0..3 {
                    s.run(ort::inputs![
                        ort::value::TensorRef::from_array_view(x.view()).unwrap()
                    ])
                    .unwrap();
                }
                let start = Instant::now();
                let end = start + Duration::from_secs_f64(secs);
                let mut items = 0usize;
                while Instant::now() < end {
                    let t = ort::value::TensorRef::from_array_view(x.view()).unwrap();
                    std::hint::black_box(s.run(ort::inputs![t]).unwrap());
                    items += b;
                }
                // Rate over the time actually spent (the last run ends after `end`).
                items as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

fn main() {
    let secs: f64 = bench_setting("RXD_BENCH_SECS", 4.0);
    let threads: usize = bench_setting("RXD_BENCH_THREADS", 2);
    let wanted = std::env::var("RXD_BENCH_MODELS").unwrap_or_else(|_| "ppocr_cls,yolov8n".into());
    for case in CASES
        .iter()
        .filter(|c| wanted.split(',').any(|w| w == c.model))
    {
        bench(case, secs, threads);
    }
}

fn bench(case: &Case, secs: f64, threads: usize) {
    let [c, h, w] = case.item;
    // In-process: every batch size under both thread layouts.
    let mut best = (0.0, String::new());
    let mut rows = Vec::new();
    for b in [1, 2, 4, 8, 16, 32] {
        let one = in_process(case, threads, 1, b, secs / 2.0);
        let many = in_process(case, 1, threads, b, secs / 2.0);
        rows.push((b, one, many));
        for (v, layout) in [
            (one, format!("1 session × {threads} threads")),
            (many, format!("{threads} sessions × 1 thread")),
        ] {
            if v > best.0 {
                best = (v, format!("batch {b}, {layout}"));
            }
        }
    }

    // rxd: 1-thread instances (the better layout on 2 cores), each batching configuration
    // in a daemon of its own: static (a row limit, no queue delay) and the adaptive mode.
    // Extra settings go to both; one that sets the row limit replaces the two.
    let extra = std::env::var("RXD_BENCH_MODEL_TOML").unwrap_or_default();
    let configs: Vec<(String, String)> = if extra.contains("max-batch-rows") {
        vec![(
            format!("`{}`", extra.trim().replace('\n', "; ")),
            extra.clone(),
        )]
    } else {
        vec![
            (
                format!("max-batch-rows {}, no queue delay", case.max_rows),
                format!("max-batch-rows = {}\n{extra}", case.max_rows),
            ),
            (
                "adaptive: latency-target-ms 25, max-batch-rows 32".into(),
                format!("latency-target-ms = 25\nmax-batch-rows = 32\n{extra}"),
            ),
        ]
    };
    let item = f32_tensor(
        case.input,
        &[1, c as u64, h as u64, w as u64],
        &random_f32(c * h * w, 6),
    );
    let io = std::env::var("RXD_BENCH_IO_THREADS").unwrap_or_else(|_| "1".into());
    let reports: Vec<_> = configs
        .iter()
        .map(|(_, settings)| {
            let repo = Repo::new();
            repo.link(case.model, 1, case.model).settings(
                case.model,
                &format!("instances = {threads}\nintra-op-threads = 1\n{settings}"),
            );
            let d = TestDaemon::start(repo.path(), &["--io-threads", &io]);
            closed_loop(&d.socket, case.model, &item, &[1, 8, 32], secs)
        })
        .collect();

    println!(
        "### Batching: `{}`, single-item requests of {:?}\n",
        case.model, case.item
    );
    println!("In-process ONNX Runtime, items/s by batch size and thread layout:\n");
    println!("| batch | 1 session × {threads} threads | {threads} sessions × 1 thread |");
    println!("|---:|---:|---:|");
    for (b, one, two) in &rows {
        println!("| {b} | {one:.1} | {two:.1} |");
    }
    println!(
        "\nBest in-process: **{:.1} items/s** ({}).\n",
        best.0, best.1
    );
    for ((name, _), reports) in configs.iter().zip(&reports) {
        println!(
            "rxd ({threads} instances × 1 thread, {name}), 1 item per request, load generator on the same machine ({} cores):\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        print_client_table(reports, best.0);
    }
}
