//! rxd on an NVIDIA GPU with the CUDA execution provider, next to in-process ONNX Runtime CUDA
//! in the same run: YOLOv8n-320 outputs vs the CPU EP, and items/s and p50 latency at batch
//! 1–32 through rxd (one client, the request carrying the whole batch) and in-process.
//! Needs a GPU machine and the onnxruntime-gpu build of ONNX Runtime: run `scripts/gpu-cuda`,
//! which fetches it and sets RXD_TEST_ORT_LIBRARY. Prints a Markdown section for BENCHMARKS.md.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::Tensor as OrtTensor;
use rxd_e2e::*;

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
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
        .unwrap_or(50);
    let model = model_file("yolov8n");
    let repo = Repo::new();
    repo.link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", "devices = ['gpu0']\nmax-batch-rows = 32\n");
    // The daemon starts with a cleared environment: hand it the CUDA libraries' path.
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let d = TestDaemon::start_env(
        repo.path(),
        &[("LD_LIBRARY_PATH", ld.as_str())],
        "[[device]]\nname = 'gpu0'\nkind = 'cuda'\ndevice-id = 0\n[[device]]\nname = 'cpu'\n",
        &[],
    );
    let c = d.client();
    let s = c.model_info("yolov8n", None).unwrap().summary;
    assert_eq!(s.ep.as_deref(), Some("CUDAExecutionProvider"), "{s:?}");
    let card = c.devices().unwrap()[0]
        .adapter
        .clone()
        .unwrap_or_else(|| "unknown NVIDIA GPU".into());

    // Outputs: rxd on CUDA vs the CPU EP in this process.
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 1));
    let got = c.infer("yolov8n", vec![image.clone()]).unwrap();
    let want = Reference::new(&model).run(std::slice::from_ref(&image));
    let rel = got
        .iter()
        .zip(&want)
        .map(|(g, w)| max_rel_diff(g, w))
        .fold(0.0, f64::max);

    // In-process ORT with the CUDA EP.
    let mut session = Session::builder(reference_env())
        .unwrap()
        .with_execution_providers([ort::ep::CUDA::default()
            .with_device_id(0)
            .build()
            .error_on_failure()])
        .unwrap()
        .commit_from_file(&model)
        .unwrap();
    let mut rows = Vec::new();
    for batch in [1u64, 2, 4, 8, 16, 32] {
        let count = (3 * 320 * 320 * batch) as usize;
        let data = random_f32(count, batch);
        let mut local = Vec::with_capacity(n);
        for i in 0..n + 5 {
            let x = OrtTensor::from_array(([batch as i64, 3, 320, 320], data.clone())).unwrap();
            let t = Instant::now();
            session.run(ort::inputs!["images" => x]).unwrap();
            if i >= 5 {
                local.push(t.elapsed());
            }
        }
        let x = f32_tensor("images", &[batch, 3, 320, 320], &data);
        let mut remote = Vec::with_capacity(n);
        for i in 0..n + 5 {
            let t = Instant::now();
            c.infer("yolov8n", vec![x.clone()]).unwrap();
            if i >= 5 {
                remote.push(t.elapsed());
            }
        }
        let (l, r) = (p50(local), p50(remote));
        rows.push(format!(
            "| {batch} | {l:.2} | {:.0} | {r:.2} | {:.0} | {:.2} |",
            batch as f64 / l * 1e3,
            batch as f64 / r * 1e3,
            l / r
        ));
    }
    println!("### YOLOv8n-320 on {card}, CUDA EP (p50 of {n} runs)\n");
    println!("Outputs through rxd (CUDA) vs the CPU EP: max relative error {rel:.2e}.\n");
    println!(
        "| batch | in-process ms | in-process items/s | rxd ms | rxd items/s | rxd / in-process throughput |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
}
