//! Issue 23: what load-time tuning gives with nothing but the shapes declared. For each model,
//! in one run: in-process ONNX Runtime's best throughput over batch sizes {1, 4, 8, 16, 32}
//! and thread layouts {1 session × all cores, one single-thread session per core}, then rxd
//! with a model.toml holding only `warmup-dims` (the shapes requests have) and every core
//! given to it, 32 single-item clients: throughput as a share of that best (two rounds, each
//! against the best cell measured again right after it), p99, what tuning chose and what it
//! cost the load. Then two models under load at once in one daemon, each
//! against its fair share (half) of its in-process best.
//!
//! Run: `scripts/bench tune`. `RXD_BENCH_SECS` sets seconds per measurement (default 4);
//! `RXD_BENCH_MODELS` the models (default all five); `RXD_BENCH_CELLS=1` prints every
//! in-process cell measured.

use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::{DType, Tensor};

/// A benchmarked model: its name and one request's inputs.
struct Case {
    model: &'static str,
    /// model.toml: the shapes (and where rows are, for a model whose rows are not along
    /// dimension 0 of every tensor), nothing else.
    toml: &'static str,
    inputs: fn() -> Vec<Tensor>,
    /// Inputs whose rows are not along dimension 0 (rank-0 inputs are shared by a batch).
    axes: &'static [(&'static str, usize)],
}

fn image(name: &str, c: u64, h: u64, w: u64) -> Vec<Tensor> {
    let n = (c * h * w) as usize;
    vec![f32_tensor(name, &[1, c, h, w], &random_f32(n, 11))]
}

const CASES: [Case; 5] = [
    Case {
        model: "ppocr_rec",
        toml: "warmup-dims = { x = [1, 3, 48, 320] }",
        inputs: || image("x", 3, 48, 320),
        axes: &[],
    },
    Case {
        model: "ppocr_det",
        toml: "warmup-dims = { x = [1, 3, 640, 640] }",
        inputs: || image("x", 3, 640, 640),
        axes: &[],
    },
    Case {
        model: "ppocr_cls",
        toml: "warmup-dims = { x = [1, 3, 48, 192] }",
        inputs: || image("x", 3, 48, 192),
        axes: &[],
    },
    Case {
        model: "yolov8n",
        toml: "warmup-dims = { images = [1, 3, 320, 320] }",
        inputs: || image("images", 3, 320, 320),
        axes: &[],
    },
    Case {
        model: "silero_vad",
        toml: "warmup-dims = { input = [1, 512], state = [2, 1, 128] }\n\
               batch-axes = { state = 1, stateN = 1 }",
        inputs: || {
            // 16 kHz audio, 512 samples a chunk: the rate the graph compares `sr` with, which
            // warmup and tuning fill it with (until 8a434cb they ran zeros: 8 kHz chunks of
            // 256 samples here, since 16 kHz ones failed that warmup).
            let audio: Vec<f32> = random_f32(512, 12).iter().map(|v| v * 0.2 - 0.1).collect();
            vec![
                f32_tensor("input", &[1, 512], &audio),
                f32_tensor("state", &[2, 1, 128], &[0.0; 256]),
                Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
            ]
        },
        axes: &[("state", 1)],
    },
];

/// `inputs` repeated `b` times along each one's rows dimension (rank-0 inputs as they are).
fn batch(case: &Case, inputs: &[Tensor], b: u64) -> Vec<Tensor> {
    if b == 1 {
        return inputs.to_vec();
    }
    inputs
        .iter()
        .map(|t| {
            if t.shape.is_empty() {
                return t.clone();
            }
            let a = case
                .axes
                .iter()
                .find(|(n, _)| *n == t.name)
                .map_or(0, |&(_, a)| a);
            let bytes = rxd_client::tensor::bytes(t).unwrap();
            let outer: u64 = t.shape[..a].iter().product();
            let block = bytes.len() / outer as usize;
            let mut shape = t.shape.clone();
            shape[a] *= b;
            let repeated = bytes
                .chunks(block)
                .flat_map(|c| c.repeat(b as usize))
                .collect();
            Tensor::inline(&t.name, t.dtype, shape, repeated)
        })
        .collect()
}

/// Items per second of `sessions` sessions of `threads` threads run concurrently at batch
/// `b`, and the time of one run (ms).
fn in_process(case: &Case, threads: usize, sessions: usize, b: u64, secs: f64) -> (f64, f64) {
    let inputs = batch(case, &(case.inputs)(), b);
    let model = case.model;
    let results: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|_| {
                let inputs = &inputs;
                s.spawn(move || {
                    let mut sess = bench_session(model, threads);
                    let run = |sess: &mut ort::session::Session| {
                        let values: Vec<(String, ort::value::DynValue)> =
                            inputs.iter().map(|t| (t.name.clone(), to_ort(t))).collect();
                        std::hint::black_box(sess.run(values).unwrap());
                    };
                    run(&mut sess);
                    let start = Instant::now();
                    let end = start + Duration::from_secs_f64(secs);
                    let mut runs = 0u64;
                    loop {
                        run(&mut sess);
                        runs += 1;
                        if Instant::now() >= end {
                            break;
                        }
                    }
                    let t = start.elapsed().as_secs_f64();
                    ((runs * b) as f64 / t, t * 1e3 / runs as f64)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let items = results.iter().map(|r| r.0).sum();
    let run_ms = results.iter().map(|r| r.1).sum::<f64>() / results.len() as f64;
    (items, run_ms)
}

/// The best in-process rate, where it was found, and how to measure that cell again.
fn best_in_process(case: &Case, cores: usize, secs: f64) -> (f64, String, (usize, usize, u64)) {
    let mut best = (0.0, String::new(), (1, 1, 1));
    let layouts = [(cores, 1), (1, cores)];
    let sizes: &[u64] = &[1, 4, 8, 16, 32];
    for (threads, sessions) in layouts {
        for &b in sizes {
            let (items, run_ms) = in_process(case, threads, sessions, b, secs / 2.0);
            if bench_setting("RXD_BENCH_CELLS", 0) != 0 {
                println!(
                    "{}: in-process batch {b}, {sessions} × {threads}: {items:.1} items/s, {run_ms:.2} ms a run ({} items in flight)",
                    case.model,
                    b * sessions as u64
                );
            }
            if items > best.0 {
                best = (
                    items,
                    format!("batch {b}, {sessions} session(s) × {threads} thread(s)"),
                    (threads, sessions, b),
                );
            }
            // Larger batches of a model this slow only add latency (and minutes).
            if run_ms > 1000.0 {
                break;
            }
        }
    }
    best
}

fn repo_of(cases: &[&Case]) -> Repo {
    let repo = Repo::new();
    for c in cases {
        repo.link(c.model, 1, c.model).settings(c.model, c.toml);
    }
    repo
}

/// rxd with every core and tuning on, as a fresh install runs, with an empty cache directory
/// (so it measures now; `cache` must outlive the daemon).
fn daemon(repo: &Repo, cache: &tempfile::TempDir) -> TestDaemon {
    TestDaemon::start_with(
        repo.path(),
        &["--intra-op-threads", "0", "--log-level", "info"],
        &format!(
            "tune = true\ncache-directory = '{}'\n",
            cache.path().display()
        ),
    )
}

fn main() {
    let secs: f64 = bench_setting("RXD_BENCH_SECS", 4.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = std::env::var("RXD_BENCH_MODELS").unwrap_or_default();
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| wanted.is_empty() || wanted.split(',').any(|w| w == c.model))
        .collect();
    println!("### Load-time tuning: 32 single-item clients, model.toml holding only the shapes\n");
    println!(
        "| model | best in-process items/s (where) | rxd req/s | share (per round) | p99 ms | tuning chose | tuning ms |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|");
    let mut bests = std::collections::HashMap::new();
    for case in &cases {
        let best = best_in_process(case, cores, secs);
        let repo = repo_of(&[case]);
        let cache = tempfile::tempdir().unwrap();
        let d = daemon(&repo, &cache);
        let info = d.client_inline().model_info(case.model, None).unwrap();
        // Two rounds of rxd's run, each followed by the best in-process cell measured again
        // (the machine is shared: a ratio is taken between neighbours in time); rxd's figures
        // are the rounds' means, the share the mean of the rounds' shares.
        let (threads, sessions, b) = best.2;
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let r =
                closed_loop_inputs(&d.socket, case.model, &(case.inputs)(), &[32], secs).remove(0);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            let base = in_process(case, threads, sessions, b, secs).0;
            rounds.push((r, base));
        }
        drop(d);
        let shares: Vec<f64> = rounds
            .iter()
            .map(|(r, base)| 100.0 * r.throughput_per_s / base)
            .collect();
        let share = shares.iter().sum::<f64>() / shares.len() as f64;
        let mean = |f: &dyn Fn(&rxd_client::bench::Report) -> f64| {
            rounds.iter().map(|(r, _)| f(r)).sum::<f64>() / rounds.len() as f64
        };
        let best = (
            rounds.iter().map(|(_, b)| *b).sum::<f64>() / rounds.len() as f64,
            best.1,
        );
        assert!(info.tuning.as_ref().is_none_or(|t| !t.cached));
        let chose = info.tuning.as_ref().map_or("not tuned".into(), |t| {
            format!(
                "{} × {} threads, ≤ {} rows, target {:.1} ms",
                t.instances, t.threads, t.max_batch_rows, t.latency_target_ms
            )
        });
        println!(
            "| {} | {:.1} ({}) | {:.1} | **{:.0} %** ({}) | {:.1} | {} | {} |",
            case.model,
            best.0,
            best.1,
            mean(&|r| r.throughput_per_s),
            share,
            shares
                .iter()
                .map(|s| format!("{s:.0} %"))
                .collect::<Vec<_>>()
                .join(", "),
            mean(&|r| r.latency_ms.p99),
            chose,
            info.tuning.as_ref().map_or(0, |t| t.measured_ms)
        );
        bests.insert(case.model, best.0);
    }

    // Two models under load at once, each with half the clients, against its fair share.
    let pair: Vec<&Case> = cases
        .iter()
        .copied()
        .filter(|c| c.model == "ppocr_cls" || c.model == "yolov8n")
        .collect();
    if pair.len() == 2 {
        let repo = repo_of(&pair);
        let cache = tempfile::tempdir().unwrap();
        let d = daemon(&repo, &cache);
        let reports: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = pair
                .iter()
                .map(|c| {
                    let socket = d.socket.clone();
                    s.spawn(move || {
                        closed_loop_inputs(&socket, c.model, &(c.inputs)(), &[16], secs).remove(0)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        println!(
            "\nTwo models under load at once in one daemon (16 clients each), against half of each one's in-process best:\n"
        );
        println!("| model | req/s | fair share (½ best) | share of fair | p99 ms |");
        println!("|---|---:|---:|---:|---:|");
        for (c, r) in pair.iter().zip(&reports) {
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            let fair = bests[c.model] / 2.0;
            println!(
                "| {} | {:.1} | {:.1} | **{:.0} %** | {:.1} |",
                c.model,
                r.throughput_per_s,
                fair,
                100.0 * r.throughput_per_s / fair,
                r.latency_ms.p99
            );
        }
    }
}
