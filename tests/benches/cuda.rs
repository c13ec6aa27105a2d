//! rxd on an NVIDIA GPU with the CUDA execution provider, next to in-process ONNX Runtime CUDA
//! in the same run, for YOLOv8n-320 and the PP-OCR direction classifier: outputs vs the CPU EP;
//! items/s and p50 latency at batch 1–32 through rxd (one client, the request carrying the
//! whole batch) and in-process; and 1, 8, 32 clients sending single items, batched by rxd.
//! `RXD_BENCH_N` runs per batch size, `RXD_BENCH_SECS` seconds per client count,
//! `RXD_BENCH_MODELS` which models, `RXD_BENCH_MODEL_TOML` extra model.toml lines,
//! `RXD_BENCH_DEVICE_TOML` extra lines for the GPU's `[[device]]` table (e.g. options).
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

/// A benchmarked model: name, input name, shape of one item.
struct Case {
    model: &'static str,
    input: &'static str,
    item: [u64; 3],
}

const CASES: [Case; 2] = [
    Case {
        model: "yolov8n",
        input: "images",
        item: [3, 320, 320],
    },
    Case {
        model: "ppocr_cls",
        input: "x",
        item: [3, 48, 192],
    },
];

fn main() {
    require_gpu_library();
    let n: usize = bench_setting("RXD_BENCH_N", 50);
    let secs: f64 = bench_setting("RXD_BENCH_SECS", 4.0);
    let wanted = std::env::var("RXD_BENCH_MODELS").unwrap_or_else(|_| "yolov8n,ppocr_cls".into());
    for case in CASES
        .iter()
        .filter(|c| wanted.split(',').any(|w| w == c.model))
    {
        bench(case, n, secs);
    }
}

fn bench(case: &Case, n: usize, secs: f64) {
    let [ch, h, w] = case.item;
    let per = (ch * h * w) as usize;
    let model = model_file(case.model);
    let repo = Repo::new();
    repo.link(case.model, 1, case.model).settings(
        case.model,
        &format!(
            "devices = ['gpu0']\nmax-batch-rows = 32\n{}",
            std::env::var("RXD_BENCH_MODEL_TOML").unwrap_or_default()
        ),
    );
    // The daemon starts with a cleared environment: hand it the CUDA libraries' path.
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let d = TestDaemon::start_env(
        repo.path(),
        &[("LD_LIBRARY_PATH", ld.as_str())],
        &format!(
            "[[device]]\nname = 'cpu'\n[[device]]\nname = 'gpu0'\nkind = 'cuda'\ndevice-id = 0\n{}",
            std::env::var("RXD_BENCH_DEVICE_TOML").unwrap_or_default()
        ),
        &["--io-threads", "2"],
    );
    // An arena large enough for a 32-row batch and its outputs (the default 16 MiB would send
    // YOLOv8n batches of 16 or more inline through the socket).
    let c = rxd_client::blocking::Client::connect_with(
        &d.socket,
        rxd_client::ClientOptions {
            arena_bytes: 256 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let s = c.model_info(case.model, None).unwrap().summary;
    assert_eq!(s.ep.as_deref(), Some("CUDAExecutionProvider"), "{s:?}");
    let card = c
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.name == "gpu0")
        .unwrap()
        .adapter
        .clone()
        .unwrap_or_else(|| "unknown NVIDIA GPU".into());

    // Outputs: rxd on CUDA (ORT's defaults, TF32 on) vs the CPU EP in this process.
    let one = f32_tensor(case.input, &[1, ch, h, w], &random_f32(per, 1));
    let got = c.infer(case.model, vec![one.clone()]).unwrap();
    let want = Reference::new(&model).run(std::slice::from_ref(&one));
    let rel = got
        .iter()
        .zip(&want)
        .map(|(g, w)| max_rel_diff(g, w))
        .fold(0.0, f64::max);

    // In-process ORT with the CUDA EP, and rxd with one client sending the whole batch.
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
    let mut best = (0.0f64, 0u64);
    for batch in [1u64, 2, 4, 8, 16, 32] {
        let count = per * batch as usize;
        let data = random_f32(count, batch);
        let mut local = Vec::with_capacity(n);
        for i in 0..n + 5 {
            let x = OrtTensor::from_array((
                [batch as i64, ch as i64, h as i64, w as i64],
                data.clone(),
            ))
            .unwrap();
            let t = Instant::now();
            session.run(ort::inputs![case.input => x]).unwrap();
            if i >= 5 {
                local.push(t.elapsed());
            }
        }
        let x = f32_tensor(case.input, &[batch, ch, h, w], &data);
        let mut remote = Vec::with_capacity(n);
        for i in 0..n + 5 {
            let t = Instant::now();
            c.infer(case.model, vec![x.clone()]).unwrap();
            if i >= 5 {
                remote.push(t.elapsed());
            }
        }
        let (l, r) = (p50(local), p50(remote));
        let items = batch as f64 / l * 1e3;
        if items > best.0 {
            best = (items, batch);
        }
        rows.push(format!(
            "| {batch} | {l:.2} | {items:.0} | {r:.2} | {:.0} | {:.2} |",
            batch as f64 / r * 1e3,
            l / r
        ));
    }
    drop(session);

    // Many clients, one item per request: rxd batches them on the GPU.
    let item = f32_tensor(case.input, &[1, ch, h, w], &random_f32(per, 6));
    let reports = closed_loop(&d.socket, case.model, &item, &[1, 8, 32], secs);

    println!(
        "### `{}` {:?} on {card}, CUDA EP (p50 of {n} runs)\n",
        case.model, case.item
    );
    println!("Outputs through rxd (CUDA, TF32 on) vs the CPU EP: max relative error {rel:.2e}.\n");
    println!(
        "| batch | in-process ms | in-process items/s | rxd ms | rxd items/s | rxd / in-process throughput |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    let s = c.model_info(case.model, None).unwrap().summary;
    println!(
        "\nSingle-item requests from many clients (rxd max-batch-rows 32, no queue delay, batch \
         sizes {:?}; {} rows of padding for {} rows in all), vs the best in-process rate above \
         ({:.0} items/s at batch {}):\n",
        s.batch_sizes, s.padded_rows, s.rows, best.0, best.1
    );
    print_client_table(&reports, best.0);
}
