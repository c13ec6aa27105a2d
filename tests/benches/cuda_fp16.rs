//! Float16 arithmetic on the GPU: each model as shipped (float32) and as `rxd compress
//! --strategy fp16` makes it, in-process on ONNX Runtime's CUDA EP with the options rxd uses
//! by default (cuDNN's heuristic algorithm choice; ORT's default TF32 for float32), at batch
//! 1, 8 and 32: p50 run time (input from host memory, outputs left in ORT's values), where
//! the nodes ran (ORT's profile), and what the answers kept on real inputs where there are
//! some — the rendered word crops of scripts/fetch-deps for the PP-OCR models (classifier:
//! top-1 class; recogniser: the greedy CTC reading; detector: the text map thresholded at
//! 0.3, on images made of stacked word crops) — with the cosine and the largest error relative
//! to the float32 output's largest magnitude. Prints Markdown for BENCHMARKS.md.
//! Needs the onnxruntime-gpu library: run `scripts/gpu-cuda`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;
use rxd_compress::report::{self, Data, Input};
use rxd_e2e::*;

fn session(model: &[u8], profile: bool) -> Session {
    let mut b = Session::builder(reference_env()).unwrap();
    if profile {
        b = b.with_profiling("/tmp/rxd-fp16-prof").unwrap();
    }
    // RXD_BENCH_EP=cpu runs the same comparison on the CPU EP (checks this bench without a
    // GPU; the CPU EP computes float16 nodes in float32 between the casts it inserts).
    if std::env::var("RXD_BENCH_EP").as_deref() == Ok("cpu") {
        return b.commit_from_memory(model).unwrap();
    }
    b.with_execution_providers([ort::ep::CUDA::default()
        .with_device_id(0)
        .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
        .build()
        .error_on_failure()])
        .unwrap()
        .commit_from_memory(model)
        .unwrap()
}

/// Operator types that ran on the CPU, from one profiled run.
fn on_cpu(model: &[u8], input: &str, shape: &[usize], x: &[f32]) -> BTreeMap<String, usize> {
    let mut s = session(model, true);
    run(&mut s, input, shape, x);
    let file = s.end_profiling().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut nodes: BTreeMap<String, String> = BTreeMap::new();
    for e in &events {
        let args = &e["args"];
        if e["cat"] == "Node" && args["provider"] == "CPUExecutionProvider" {
            let name = e["name"].as_str().unwrap_or("").to_string();
            nodes.insert(name, args["op_name"].as_str().unwrap_or("?").to_string());
        }
    }
    let mut out = BTreeMap::new();
    for op in nodes.values() {
        *out.entry(op.clone()).or_default() += 1;
    }
    out
}

fn run(s: &mut Session, input: &str, shape: &[usize], x: &[f32]) -> Vec<f32> {
    let t = TensorRef::from_array_view((shape.to_vec(), x)).unwrap();
    let out = s.run(ort::inputs![input => t]).unwrap();
    out[0].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

fn p50(s: &mut Session, input: &str, shape: &[usize], x: &[f32], n: usize) -> f64 {
    // A TensorRef over the same host memory each run (cloning a value copies it through an
    // ORT session, which is not what is measured here).
    let mut once = || {
        let t = TensorRef::from_array_view((shape.to_vec(), x)).unwrap();
        let t0 = Instant::now();
        std::hint::black_box(s.run(ort::inputs![input => t]).unwrap());
        t0.elapsed()
    };
    for _ in 0..5 {
        once();
    }
    let mut v: Vec<Duration> = (0..n).map(|_| once()).collect();
    v.sort();
    v[n / 2].as_secs_f64() * 1e3
}

/// `b` items of the model's input: word crops where the model reads text, else random.
fn inputs(model: &str, words: Option<&Input>, b: usize) -> (Vec<usize>, Vec<f32>, bool) {
    let words = words.map(|w| {
        let Data::F32(d) = &w.data else { panic!() };
        (w.shape.iter().map(|&x| x as usize).collect::<Vec<_>>(), d)
    });
    match (model, words) {
        ("ppocr_rec", Some((s, d))) => {
            let per = s[1] * s[2] * s[3];
            let x = (0..b)
                .flat_map(|i| d[(i % s[0]) * per..][..per].to_vec())
                .collect();
            (vec![b, 3, 48, 320], x, true)
        }
        ("ppocr_cls", Some((s, d))) => {
            // The left 192 columns of each crop.
            let mut x = Vec::with_capacity(b * 3 * 48 * 192);
            for i in 0..b {
                for c in 0..3 {
                    for r in 0..48 {
                        let at = (((i % s[0]) * 3 + c) * 48 + r) * 320;
                        x.extend_from_slice(&d[at..at + 192]);
                    }
                }
            }
            (vec![b, 3, 48, 192], x, true)
        }
        ("ppocr_det", Some((s, d))) => {
            // 320×320 pages of word crops stacked (6 full crops and a part of a 7th).
            let mut x = vec![0f32; b * 3 * 320 * 320];
            for i in 0..b {
                for c in 0..3 {
                    for r in 0..320 {
                        let w = (i * 7 + r / 48) % s[0];
                        let at = ((w * 3 + c) * 48 + r % 48) * 320;
                        let to = ((i * 3 + c) * 320 + r) * 320;
                        x[to..to + 320].copy_from_slice(&d[at..at + 320]);
                    }
                }
            }
            (vec![b, 3, 320, 320], x, true)
        }
        ("yolov8n", _) => (
            vec![b, 3, 320, 320],
            random_f32(b * 3 * 320 * 320, 11),
            false,
        ),
        _ => (vec![b, 3, 48, 192], random_f32(b * 3 * 48 * 192, 11), false),
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// What the answers kept: the task's own measure, if it has one on real inputs.
fn kept(model: &str, shape: &[usize], real: bool, want: &[f32], got: &[f32]) -> String {
    let b = shape[0];
    match (model, real) {
        ("ppocr_cls", true) => {
            let same = want
                .chunks_exact(2)
                .zip(got.chunks_exact(2))
                .filter(|(p, q)| (p[0] > p[1]) == (q[0] > q[1]))
                .count();
            format!("top-1 {same}/{b}")
        }
        ("ppocr_rec", true) => {
            let per = want.len() / b;
            let classes = 6625;
            let f = f64s;
            let same = want
                .chunks_exact(per)
                .zip(got.chunks_exact(per))
                .filter(|(p, q)| {
                    report::ctc_greedy(&f(p), classes) == report::ctc_greedy(&f(q), classes)
                })
                .count();
            format!("same reading {same}/{b}")
        }
        ("ppocr_det", true) => {
            let text = want.iter().filter(|&&p| p > 0.3).count();
            let same = want
                .iter()
                .zip(got)
                .filter(|(p, q)| (**p > 0.3) == (**q > 0.3))
                .count();
            format!(
                "text map {:.3} % of pixels agree ({:.1} % text)",
                same as f64 * 100.0 / want.len() as f64,
                text as f64 * 100.0 / want.len() as f64
            )
        }
        _ => "—".into(),
    }
}

fn main() {
    if std::env::var("RXD_BENCH_EP").as_deref() != Ok("cpu") {
        require_gpu_library();
    }
    let n: usize = bench_setting("RXD_BENCH_N", 30);
    let words = report::read_npy("x", &repo_root().join(".deps/ocr-words/words.npy")).ok();
    println!("### Float16 arithmetic on the GPU (`fp16`), in-process CUDA EP, p50 of {n} runs");
    println!();
    println!(
        "| model | batch | float32 ms | fp16 ms | fp16 / float32 | cosine | max relative error | kept |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let mut placement = Vec::new();
    for (model, input) in [
        ("yolov8n", "images"),
        ("ppocr_cls", "x"),
        ("ppocr_det", "x"),
        ("ppocr_rec", "x"),
    ] {
        let path = model_file(model);
        if !path.is_file() {
            eprintln!("{model}: not found, skipped");
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (half, _) = rxd_compress::compress(&bytes, "fp16".parse().unwrap()).unwrap();
        let (mut full, mut h) = (session(&bytes, false), session(&half, false));
        for b in [1usize, 8, 32] {
            let (shape, x, real) = inputs(model, words.as_ref(), b);
            if b == 1 {
                placement.push(format!(
                    "{model}: on the CPU, float32 {:?}, fp16 {:?}",
                    on_cpu(&bytes, input, &shape, &x),
                    on_cpu(&half, input, &shape, &x)
                ));
            }
            let want = run(&mut full, input, &shape, &x);
            let got = run(&mut h, input, &shape, &x);
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let rel = want
                .iter()
                .zip(&got)
                .map(|(p, q)| (p - q).abs() as f64)
                .fold(0f64, f64::max)
                / largest.max(f64::MIN_POSITIVE);
            let (a, c) = (
                p50(&mut full, input, &shape, &x, n),
                p50(&mut h, input, &shape, &x, n),
            );
            println!(
                "| {model} | {b} | {a:.2} | {c:.2} | {:.2}× | {:.6} | {rel:.1e} | {} |",
                c / a,
                report::cosine(&want, &got),
                kept(model, &shape, real, &want, &got)
            );
        }
    }
    println!();
    for p in placement {
        println!("- {p}");
    }
    println!();
}
