//! In-process ONNX Runtime on the CUDA EP: run time at batch 4 and 8 with the input in
//! reused or fresh memory, on another thread, with rxd's session options (one thread, no
//! spinning, a profiled warmup), and alternating between two batch sizes that were both warmed.
//! What it showed on an H200: everything runs in 1–3 ms except the alternation, 0.5–0.7 s per
//! run — ORT's CUDA EP re-plans a session's convolutions whenever its input shape changes. This
//! is why rxd pads batches to a few sizes and gives each size its own session on a GPU.
//! Needs the onnxruntime-gpu library: run `scripts/gpu-cuda`.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;
use rxd_e2e::*;

fn p50(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
    )
}

fn session(model: &str, rxd_like: bool, profile: bool) -> Session {
    let mut b = Session::builder(reference_env()).unwrap();
    if rxd_like {
        b = b
            .with_intra_threads(1)
            .unwrap()
            .with_inter_threads(1)
            .unwrap()
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .unwrap();
    }
    if profile {
        b = b.with_profiling("/tmp/rxd-probe-prof").unwrap();
    }
    let mut s = b
        .with_execution_providers([ort::ep::CUDA::default()
            .with_device_id(0)
            .build()
            .error_on_failure()])
        .unwrap()
        .commit_from_file(model_file(model))
        .unwrap();
    if profile {
        let f = s.end_profiling().unwrap();
        let _ = std::fs::remove_file(f);
    }
    s
}

fn run(s: &mut Session, input: &str, shape: &[usize], data: &[f32]) -> Duration {
    let t = TensorRef::from_array_view((shape.to_vec(), data)).unwrap();
    let t0 = Instant::now();
    std::hint::black_box(s.run(ort::inputs![input => t]).unwrap());
    t0.elapsed()
}

fn main() {
    require_gpu_library();
    for (model, input, item) in [
        ("ppocr_cls", "x", [3usize, 48, 192]),
        ("yolov8n", "images", [3, 320, 320]),
    ] {
        let per: usize = item.iter().product();
        for b in [4usize, 8] {
            let shape = [b, item[0], item[1], item[2]];
            let data = random_f32(b * per, 3);
            let mut s = session(model, false, false);
            for _ in 0..5 {
                run(&mut s, input, &shape, &data);
            }
            let n = 30;
            let reused: Vec<Duration> = (0..n).map(|_| run(&mut s, input, &shape, &data)).collect();
            let fresh: Vec<Duration> = (0..n)
                .map(|_| {
                    let d = data.clone();
                    run(&mut s, input, &shape, &d)
                })
                .collect();
            let thread = std::thread::scope(|sc| {
                sc.spawn(|| {
                    (0..n)
                        .map(|_| run(&mut s, input, &shape, &data))
                        .collect::<Vec<_>>()
                })
                .join()
                .unwrap()
            });
            let mut r = session(model, true, true);
            for _ in 0..5 {
                run(&mut r, input, &shape, &data);
            }
            let rxd_like: Vec<Duration> =
                (0..n).map(|_| run(&mut r, input, &shape, &data)).collect();
            // Alternating batch sizes (both warmed).
            let half = [b / 2, item[0], item[1], item[2]];
            for _ in 0..3 {
                run(&mut r, input, &half, &data[..b / 2 * per]);
            }
            let alternating: Vec<Duration> = (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        run(&mut r, input, &shape, &data)
                    } else {
                        run(&mut r, input, &half, &data[..b / 2 * per])
                    }
                })
                .collect();
            for (name, v) in [
                ("reused", reused),
                ("fresh", fresh),
                ("thread", thread),
                ("rxd-like+profiled", rxd_like),
                ("alternating b,b/2", alternating),
            ] {
                let (p, m) = p50(v);
                println!("{model} batch {b} {name}: p50 {p:.2} ms, max {m:.2} ms");
            }
        }
    }
}
