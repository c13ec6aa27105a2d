//! Float16 arithmetic on the GPU: each model as shipped (float32) and as `rxd compress
//! --strategy fp16` makes it, in-process on ONNX Runtime's CUDA EP with the options rxd uses
//! by default (cuDNN's heuristic algorithm choice; ORT's default TF32 for float32), at batch
//! 1, 8 and 32: p50 run time and the fp16 model's largest error relative to the float32
//! output's largest magnitude. Prints a Markdown table for BENCHMARKS.md.
//! Needs the onnxruntime-gpu library: run `scripts/gpu-cuda`.

use std::time::{Duration, Instant};

use rxd_e2e::*;

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn time(r: &mut Reference, input: &rxd_protocol::Tensor, n: usize) -> f64 {
    for _ in 0..5 {
        r.run(std::slice::from_ref(input));
    }
    p50((0..n)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(r.run(std::slice::from_ref(input)));
            t.elapsed()
        })
        .collect())
}

fn main() {
    if std::env::var_os("RXD_TEST_ORT_LIBRARY").is_none() {
        eprintln!(
            "set RXD_TEST_ORT_LIBRARY to the onnxruntime-gpu library (scripts/gpu-cuda does)"
        );
        std::process::exit(2);
    }
    let n: usize = std::env::var("RXD_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let options = [("cudnn_conv_algo_search", "HEURISTIC")];
    let dir = std::env::temp_dir().join(format!("rxd-fp16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("### Float16 arithmetic on the GPU (`fp16`), in-process CUDA EP, p50 of {n} runs");
    println!();
    println!("| model | batch | float32 ms | fp16 ms | fp16 / float32 | max relative error |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (model, input, item) in [
        ("yolov8n", "images", [3u64, 320, 320]),
        ("ppocr_cls", "x", [3, 48, 192]),
        ("ppocr_det", "x", [3, 320, 320]),
        ("ppocr_rec", "x", [3, 48, 320]),
    ] {
        let path = model_file(model);
        if !path.is_file() {
            eprintln!("{model}: not found, skipped");
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (half, _) = rxd_compress::compress(&bytes, "fp16".parse().unwrap()).unwrap();
        let half_path = dir.join(format!("{model}.onnx"));
        std::fs::write(&half_path, &half).unwrap();
        let mut full = Reference::cuda(&path, &options);
        let mut h = Reference::cuda(&half_path, &options);
        let per: u64 = item.iter().product();
        for b in [1u64, 8, 32] {
            let x = random_f32((b * per) as usize, 11);
            let t = f32_tensor(input, &[b, item[0], item[1], item[2]], &x);
            let want = full.run(std::slice::from_ref(&t));
            let got = h.run(std::slice::from_ref(&t));
            let rel = got
                .iter()
                .zip(&want)
                .map(|(g, w)| max_rel_diff(g, w))
                .fold(0f64, f64::max);
            let (a, c) = (time(&mut full, &t, n), time(&mut h, &t, n));
            println!(
                "| {model} | {b} | {a:.2} | {c:.2} | {:.2}× | {rel:.1e} |",
                c / a
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
}
