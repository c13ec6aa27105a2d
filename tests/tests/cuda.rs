//! rxd on an NVIDIA GPU through ONNX Runtime's CUDA execution provider: placement asserted
//! from ORT's own profile, batched outputs against the CPU EP in this process, device memory
//! measured through NVML and given back on unload, a GPU budget that evicts by LRU, and the
//! failure paths (no such GPU, no TensorRT). They need a GPU and the onnxruntime-gpu build of
//! ONNX Runtime, so they are ignored by default: `scripts/gpu-cuda` fetches that build and runs
//! them with `--ignored` (RXD_TEST_ORT_LIBRARY names the library, LD_LIBRARY_PATH finds CUDA's).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rxd_client::{ClientError, ErrorCode};
use rxd_e2e::*;
use rxd_protocol::{HealthState, ModelState, Tensor};

const CUDA: &str = "CUDAExecutionProvider";
const CPU: &str = "CPUExecutionProvider";

/// CUDA EP options for gpu0 and the in-process reference: TF32 off, so convolutions round
/// like float32 (ORT enables TF32 by default), and cuDNN's heuristic algorithm choice instead
/// of its timed search, so rxd and the reference pick the same kernels.
const OPTIONS: [(&str, &str); 2] = [("use_tf32", "0"), ("cudnn_conv_algo_search", "DEFAULT")];

fn gpu0(extra: &str) -> String {
    let mut s = format!(
        "[[device]]\nname = 'gpu0'\nkind = 'cuda'\ndevice-id = 0\n{extra}\n[device.options]\n"
    );
    for (k, v) in OPTIONS {
        s += &format!("{k} = '{v}'\n");
    }
    s
}

/// Largest relative error over the outputs, and the largest absolute one.
fn errors(got: &[Tensor], want: &[Tensor]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let mut rel = 0f64;
    let mut abs = 0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!((&g.name, &g.shape), (&w.name, &w.shape));
        rel = rel.max(max_rel_diff(g, w));
        let (a, b) = (tensor_f32(g), tensor_f32(w));
        abs = a
            .iter()
            .zip(&b)
            .fold(abs, |m, (x, y)| m.max((x - y).abs() as f64));
    }
    (rel, abs)
}

fn start(repo: &Repo, config: &str) -> TestDaemon {
    // The daemon starts with a cleared environment: hand it the CUDA libraries' path.
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    TestDaemon::start_env(
        repo.path(),
        &[("LD_LIBRARY_PATH", ld.as_str())],
        config,
        &[],
    )
}

fn nvml_used(d: &TestDaemon, device: &str) -> u64 {
    let devices = d.client().devices().unwrap();
    let dev = devices.iter().find(|x| x.name == device).unwrap();
    dev.memory_used_bytes
        .unwrap_or_else(|| panic!("no NVML memory figure: {dev:?}"))
}

#[test]
#[ignore = "needs an NVIDIA GPU and onnxruntime-gpu: scripts/gpu-cuda"]
fn models_on_a_cuda_device_run_on_the_cuda_ep_batched_and_agree_with_the_cpu_ep() {
    let repo = Repo::new();
    let batching = "devices = ['gpu0']\nmax-batch-rows = 16\nmax-queue-delay-us = 20000\n";
    repo.link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", batching)
        .link("ppocr_cls", 1, "ppocr_cls")
        .settings("ppocr_cls", batching);
    let d = start(&repo, &format!("{}[[device]]\nname = 'cpu'\n", gpu0("")));
    let s = d.summaries();
    for m in ["yolov8n", "ppocr_cls"] {
        let m = &s[m];
        assert_eq!(m.state, ModelState::Ready, "{m:?}");
        assert_eq!(
            (m.device.as_str(), m.ep.as_deref()),
            ("gpu0", Some(CUDA)),
            "{m:?}"
        );
        assert!(m.fallback.is_none(), "{m:?}");
        // ORT's profile of the warmup: the compute on CUDA; at most shape arithmetic on the CPU.
        let on_gpu = m.node_placement.get(CUDA).copied().unwrap_or(0);
        let on_cpu = m.node_placement.get(CPU).copied().unwrap_or(0);
        assert!(
            on_gpu > 4 * on_cpu && on_gpu >= 50,
            "{:?}",
            m.node_placement
        );
        assert!(m.memory_bytes.unwrap() > 0);
        // On a GPU, batches are padded to warmed sizes: no new shape (and no cuDNN kernel
        // search) in the request path.
        assert_eq!(m.batch_sizes, vec![1, 2, 4, 8, 16], "{m:?}");
    }
    let devices = d.client().devices().unwrap();
    let g = &devices[0];
    assert_eq!((g.name.as_str(), g.ep.as_str()), ("gpu0", CUDA));
    assert!(
        g.adapter.as_deref().unwrap_or("").contains("NVIDIA") && g.error.is_none(),
        "{g:?}"
    );
    assert!(g.memory_total_bytes.unwrap() > 1 << 30, "{g:?}");
    assert_eq!(g.models.len(), 2);

    // 12 clients at once, each with its own inputs, three times each: the daemon batches them
    // on the GPU; every answer matches the CPU EP run here on the same input.
    let clients = 12u64;
    let answers: Vec<Vec<(String, Tensor, Vec<Tensor>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let d = &d;
                scope.spawn(move || {
                    let c = d.client();
                    let mut out = Vec::new();
                    for round in 0..3u64 {
                        let seed = 100 * i + round;
                        let (model, input) = if (i + round) % 2 == 0 {
                            let x = random_f32(3 * 320 * 320, seed);
                            ("yolov8n", f32_tensor("images", &[1, 3, 320, 320], &x))
                        } else {
                            let x = random_f32(3 * 48 * 192, seed);
                            ("ppocr_cls", f32_tensor("x", &[1, 3, 48, 192], &x))
                        };
                        let got = c.infer(model, vec![input.clone()]).unwrap();
                        out.push((model.to_string(), input, got));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut refs: BTreeMap<String, Reference> = BTreeMap::new();
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    for (model, input, got) in answers.into_iter().flatten() {
        let want = refs
            .entry(model.clone())
            .or_insert_with(|| Reference::new(&model_file(&model)))
            .run(&[input]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.name, &g.shape), (&w.name, &w.shape));
            let rel = max_rel_diff(g, w);
            let e = worst.entry(format!("{model}/{}", g.name)).or_default();
            *e = e.max(rel);
        }
    }
    println!("max relative error, CUDA (TF32 off) vs CPU EP: {worst:?}");
    for (output, rel) in &worst {
        assert!(*rel <= 1e-3, "{output}: relative error {rel}");
    }
    // Batches formed: fewer batches than requests on at least one model.
    let s = d.summaries();
    let (requests, batches): (u64, u64) = ["yolov8n", "ppocr_cls"]
        .iter()
        .map(|m| (s[*m].requests, s[*m].batches))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(requests, 3 * clients);
    assert!(
        batches < requests,
        "{requests} requests in {batches} batches"
    );
    for m in ["yolov8n", "ppocr_cls"] {
        let m = &s[m];
        println!(
            "{}: {} rows, {} rows of padding, {} batches",
            m.name, m.rows, m.padded_rows, m.batches
        );
        assert!(m.rows + m.padded_rows <= 2 * m.rows, "{m:?}");
    }
    // NVML's GPU figures reach the Prometheus exposition.
    let out = d.rxctl(&["metrics", "--prometheus"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("rxd_gpu_memory_used_bytes{gpu=\"nvidia:0\"}")),
        "{text}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and onnxruntime-gpu: scripts/gpu-cuda"]
fn gpu_memory_is_measured_given_back_on_unload_and_a_gpu_budget_evicts_by_lru() {
    let repo = Repo::new();
    repo.link("yolo", 1, "yolov8n")
        .settings("yolo", "devices = ['gpu0']\n")
        .link("det", 1, "ppocr_det")
        .settings("det", "devices = ['gpu0']\n");
    let config = format!("preload = []\n{}[[device]]\nname = 'cpu'\n", gpu0(""));
    let d = start(&repo, &config);
    let c = d.client();
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 1));
    let page = f32_tensor("x", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 2));

    // Each model's footprint counts its GPU memory; unloading gives that memory back.
    let mut footprint = BTreeMap::new();
    for (model, input) in [("yolo", &image), ("det", &page)] {
        c.load(model, None).unwrap();
        c.infer(model, vec![input.clone()]).unwrap();
        let loaded = nvml_used(&d, "gpu0");
        let bytes = d.summaries()[model].memory_bytes.unwrap();
        c.unload(model, None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut freed = 0;
        while Instant::now() < deadline {
            freed = loaded.saturating_sub(nvml_used(&d, "gpu0"));
            if freed >= 1 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "{model}: footprint {} MiB, GPU memory given back on unload {} MiB",
            bytes >> 20,
            freed >> 20
        );
        assert!(freed >= 1 << 20, "{model}: unload gave back {freed} bytes");
        assert!(
            bytes as f64 >= 0.8 * freed as f64,
            "{model}: footprint {bytes} < GPU memory it held {freed}"
        );
        footprint.insert(model, bytes);
    }
    drop(c);
    drop(d);

    // A GPU budget that holds either model but not both: each load evicts the other, the
    // accounting never passes the budget and every answer is right.
    let (big, small) = (
        footprint.values().copied().max().unwrap(),
        footprint.values().copied().min().unwrap(),
    );
    let budget = big + small / 2;
    let config = format!(
        "preload = []\nload-on-demand = true\n{}[[device]]\nname = 'cpu'\n",
        gpu0(&format!("memory-budget = {budget}"))
    );
    let d = start(&repo, &config);
    let c = d.client();
    // rxd's answers against ORT's CUDA EP in this process with the same options (the same
    // kernels: close to bit-identical), and against the CPU EP (reported: the detector's
    // sigmoid map on noise input is where cuDNN's and MLAS's float32 sums part most).
    let mut want = BTreeMap::new();
    for (model, input) in [("yolo", &image), ("det", &page)] {
        let file = model_file(if model == "yolo" {
            "yolov8n"
        } else {
            "ppocr_det"
        });
        let gpu = Reference::cuda(&file, &OPTIONS).run(std::slice::from_ref(input));
        let cpu = Reference::new(&file).run(std::slice::from_ref(input));
        want.insert(model, (gpu, cpu));
    }
    for (i, model) in ["yolo", "det", "yolo", "det"].into_iter().enumerate() {
        let input = if model == "yolo" { &image } else { &page };
        let got = c.infer(model, vec![input.clone()]).unwrap();
        let (gpu, cpu) = &want[model];
        let (rel, abs) = errors(&got, gpu);
        let (cpu_rel, cpu_abs) = errors(&got, cpu);
        println!(
            "{model}: vs in-process CUDA rel {rel:.2e} abs {abs:.2e}; vs CPU EP rel {cpu_rel:.2e} abs {cpu_abs:.2e}"
        );
        assert!(
            rel <= 1e-4,
            "{model}: relative error {rel} vs in-process CUDA"
        );
        let s = d.summaries();
        let other = if model == "yolo" { "det" } else { "yolo" };
        assert_eq!(s[model].state, ModelState::Ready);
        if i > 0 {
            assert_eq!(s[other].state, ModelState::Evicted, "{s:?}");
        }
        let g = c
            .devices()
            .unwrap()
            .into_iter()
            .find(|x| x.name == "gpu0")
            .unwrap();
        assert!(g.used_bytes <= budget, "{g:?}");
        assert_eq!(g.models, vec![format!("{model}:1")]);
    }
    let s = d.summaries();
    assert_eq!(s["yolo"].evictions + s["det"].evictions, 3, "{s:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU and onnxruntime-gpu: scripts/gpu-cuda"]
fn a_missing_gpu_or_tensorrt_fails_the_load_and_with_fallback_serves_on_the_cpu_degraded() {
    let repo = Repo::new();
    repo.link("strict", 1, "digits")
        .settings("strict", "devices = ['ghost']\n")
        .link("lenient", 1, "digits")
        .settings("lenient", "devices = ['ghost-ok']\n")
        .link("trt", 1, "digits")
        .settings("trt", "devices = ['trt']\n");
    // No GPU 7 on a one-GPU machine; TensorRT's libraries are not installed with onnxruntime-gpu.
    let config = "preload = []\nload-on-demand = true\n\
        [[device]]\nname = 'ghost'\nkind = 'cuda'\ndevice-id = 7\n\
        [[device]]\nname = 'ghost-ok'\nkind = 'cuda'\ndevice-id = 7\ncpu-fallback = true\n\
        [[device]]\nname = 'trt'\nkind = 'tensorrt'\ndevice-id = 0\n\
        [[device]]\nname = 'cpu'\n";
    let d = start(&repo, config);
    let c = d.client();
    let digit = example_npy("digit.npy", "input");
    for (model, word) in [("strict", "CUDA"), ("trt", "TensorRT")] {
        match c.infer(model, vec![digit.clone()]).unwrap_err() {
            ClientError::Server(w) => {
                println!("{model}: {w}");
                assert_eq!(w.kind(), Some(ErrorCode::LoadFailed), "{w}");
                assert!(w.message.contains(word), "{w}");
            }
            other => panic!("{other}"),
        }
    }
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&digit));
    assert_eq!(c.infer("lenient", vec![digit]).unwrap(), want);
    let s = d.summaries();
    assert_eq!(
        (s["lenient"].device.as_str(), s["lenient"].ep.as_deref()),
        ("cpu", Some(CPU))
    );
    assert!(s["lenient"].fallback.as_deref().unwrap().contains(CUDA));
    let h = c.health().unwrap();
    assert_eq!(h.state, HealthState::Degraded, "{h:?}");
    let devices = c.devices().unwrap();
    let ghost = devices.iter().find(|x| x.name == "ghost").unwrap();
    assert!(ghost.error.as_deref().unwrap().contains("7"), "{ghost:?}");
}

/// `compress = 'fp16'` on a GPU: the daemon serves the float16-arithmetic form of YOLOv8n and
/// the PP-OCR classifier on the CUDA EP (no node falls back to the CPU), clients keep sending
/// and receiving float32, and the answers stay close to the float32 model run in this process
/// on the same GPU (the classifier's probabilities within 1e-2, YOLOv8n's boxes within a pixel
/// and its scores within 1e-2), and bit-identical to the same float16 model run by ORT here.
#[test]
#[ignore = "needs an NVIDIA GPU and onnxruntime-gpu: scripts/gpu-cuda"]
fn fp16_models_serve_on_the_gpu_in_half_precision_close_to_float32() {
    let repo = Repo::new();
    let settings = "devices = ['gpu0']\ncompress = 'fp16'\nmax-batch-rows = 8\n";
    repo.link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", settings)
        .link("ppocr_cls", 1, "ppocr_cls")
        .settings("ppocr_cls", settings);
    let d = start(&repo, &gpu0(""));
    let s = d.summaries();
    for m in ["yolov8n", "ppocr_cls"] {
        let m = &s[m];
        assert_eq!(m.state, ModelState::Ready, "{m:?}");
        assert!(
            m.compression
                .as_deref()
                .unwrap_or("")
                .starts_with("served compressed (fp16"),
            "{m:?}"
        );
        assert_eq!(m.ep.as_deref(), Some(CUDA), "{m:?}");
        let on_gpu = m.node_placement.get(CUDA).copied().unwrap_or(0);
        let on_cpu = m.node_placement.get(CPU).copied().unwrap_or(0);
        assert!(on_gpu > 4 * on_cpu, "{:?}", m.node_placement);
    }
    let c = d.client();
    let dir = tempfile::tempdir().unwrap();
    for (model, input, item) in [
        ("yolov8n", "images", [3u64, 320, 320]),
        ("ppocr_cls", "x", [3, 48, 192]),
    ] {
        let mut full = Reference::cuda(&model_file(model), &OPTIONS);
        // The same compression in this process, run by ORT here with the same options.
        let bytes = std::fs::read(model_file(model)).unwrap();
        let (half, _) = rxd_compress::compress(&bytes, "fp16".parse().unwrap()).unwrap();
        let half_path = dir.path().join(format!("{model}.onnx"));
        std::fs::write(&half_path, half).unwrap();
        let mut half = Reference::cuda(&half_path, &OPTIONS);
        for seed in 0..4 {
            let x = random_f32(item.iter().product::<u64>() as usize, 40 + seed);
            let t = f32_tensor(input, &[1, item[0], item[1], item[2]], &x);
            let got = c.infer(model, vec![t.clone()]).unwrap();
            for g in &got {
                assert_eq!(g.dtype, rxd_protocol::DType::Float32, "{g:?}");
            }
            // rxd adds nothing to ORT's float16 run: the same bits.
            assert!(
                got == half.run(std::slice::from_ref(&t)),
                "{model}: rxd ≠ in-process fp16"
            );
            let want = full.run(&[t]);
            let (rel, abs) = errors(&got, &want);
            println!("{model} fp16 on the GPU vs float32: relative {rel:.2e}, absolute {abs:.2e}");
            assert!(rel > 0.0, "{model}: bit-identical, not float16 arithmetic");
            if model == "ppocr_cls" {
                // Two class probabilities: each within 1e-2.
                assert!(abs <= 1e-2, "{model}: probabilities moved {abs}");
                continue;
            }
            // YOLOv8n's [1, 4 + classes, anchors]: rows 0-3 are box centre and size in
            // pixels, the rest class scores in [0, 1]. On noise every anchor's box is a flat
            // DFL distribution, the least stable case.
            let (g, w) = (tensor_f32(&got[0]), tensor_f32(&want[0]));
            let rows = got[0].shape[1] as usize;
            let anchors = g.len() / rows;
            let worst = |rows: std::ops::Range<usize>| {
                rows.flat_map(|r| r * anchors..(r + 1) * anchors)
                    .map(|i| (g[i] - w[i]).abs())
                    .fold(0f32, f32::max)
            };
            let (boxes, scores) = (worst(0..4), worst(4..rows));
            println!("  boxes within {boxes:.3} px, scores within {scores:.2e}");
            assert!(scores <= 1e-2, "scores moved {scores}");
            assert!(boxes <= 1.0, "boxes moved {boxes} px");
        }
    }
}
