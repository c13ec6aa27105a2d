//! The GPU path for real, without a GPU: ONNX Runtime's WebGPU plugin EP on Mesa's software
//! Vulkan driver (lavapipe), unpacked privately by scripts/fetch-webgpu. Models placed on a
//! `webgpu` device run on the WebGPU EP (asserted from ORT's own node placement, not inferred
//! from outputs) and agree with the CPU EP; devices place, spill and evict by their budgets; a
//! missing plugin fails the load, or with fallback allowed serves on the CPU, degraded.
//! Shader compilation makes the first run of a model take 10–20 s on a cold cache
//! (.deps/webgpu/shader-cache keeps it warm between runs).

use rxd_client::{ClientError, ErrorCode, Tensor};
use rxd_e2e::*;
use rxd_protocol::{HealthState, ModelState};

const WEBGPU: &str = "WebGpuExecutionProvider";
const CPU: &str = "CPUExecutionProvider";

fn start(repo: &Repo, devices: &str) -> TestDaemon {
    let (env, _) = webgpu_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestDaemon::start_env(repo.path(), &env, devices, &[])
}

fn gpu_device(name: &str, budget: &str) -> String {
    let (_, plugin) = webgpu_env();
    format!(
        "[[device]]\nname = '{name}'\nkind = 'webgpu'\nep-library = '{}'\nmemory-budget = '{budget}'\n",
        plugin.display()
    )
}

/// The daemon's outputs are the CPU EP's: same names and shapes, values within 1e-4 relative.
fn agree(got: &[Tensor], want: &[Tensor], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((&g.name, &g.shape), (&w.name, &w.shape), "{what}");
        let rel = max_rel_diff(g, w);
        assert!(rel <= 1e-4, "{what} {}: relative error {rel}", g.name);
    }
}

#[test]
fn models_on_the_webgpu_device_run_on_the_webgpu_ep_and_agree_with_the_cpu_ep() {
    let repo = Repo::new();
    repo.link("ppocr_cls", 1, "ppocr_cls")
        .settings("ppocr_cls", "devices = ['gpu0']\n")
        .link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", "devices = ['gpu0']\nmax-batch-rows = 1\n");
    let config = format!("{}[[device]]\nname = 'cpu'\n", gpu_device("gpu0", "2GiB"));
    let d = start(&repo, &config);
    let s = d.summaries();
    for m in ["ppocr_cls", "yolov8n"] {
        assert_eq!(s[m].state, ModelState::Ready, "{:?}", s[m]);
        assert_eq!(s[m].device, "gpu0");
        assert_eq!(s[m].ep.as_deref(), Some(WEBGPU));
        assert!(s[m].fallback.is_none());
    }
    // ORT's own account of where each node ran: every classifier node on WebGPU; most of
    // YOLO's (its int64 shape arithmetic stays on the CPU).
    let cls = &s["ppocr_cls"].node_placement;
    assert!(cls[WEBGPU] >= 100 && !cls.contains_key(CPU), "{cls:?}");
    let yolo = &s["yolov8n"];
    assert!(
        yolo.node_placement[WEBGPU] > 3 * yolo.node_placement.get(CPU).copied().unwrap_or(0),
        "{:?}",
        yolo.node_placement
    );
    assert!(!yolo.nodes_on_cpu.is_empty());

    let c = d.client();
    let crops = f32_tensor("x", &[2, 3, 48, 192], &random_f32(2 * 3 * 48 * 192, 5));
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 6));
    for (model, input) in [("ppocr_cls", crops), ("yolov8n", image)] {
        let got = c.infer(model, vec![input.clone()]).unwrap();
        let want = Reference::new(&model_file(model)).run(&[input]);
        agree(&got, &want, model);
    }
    let devices = c.devices().unwrap();
    assert_eq!(devices[0].ep, WEBGPU);
    assert!(
        devices[0].adapter.is_some() && devices[0].error.is_none(),
        "{devices:?}"
    );
    assert_eq!(devices[0].models.len(), 2);
}

#[test]
fn two_devices_place_by_tier_and_preference_spill_when_full_and_evict_by_lru() {
    let repo = Repo::new();
    repo.link("cls", 1, "ppocr_cls")
        .settings("cls", "devices = ['gpu0']\n")
        .link("digits", 1, "digits")
        .link("det", 1, "ppocr_det")
        .settings("det", "devices = ['cpu']\n")
        .link("yolo", 1, "yolov8n")
        .settings("yolo", "devices = ['cpu']\nmax-batch-rows = 1\n")
        .link("spill", 1, "yolov8n")
        .settings("spill", "devices = ['gpu1', 'cpu']\nmax-batch-rows = 1\n")
        .link("rec", 1, "ppocr_rec")
        .settings("rec", "devices = ['gpu1']\n");
    // gpu1 is the same adapter with a budget too small for any of these models' weights; the
    // CPU budget is set below once `spill` and the detector are measured.
    let config = |cpu_budget: &str| {
        format!(
            "preload = []\nload-on-demand = true\n{}{}[[device]]\nname = 'cpu'\nmemory-budget = '{cpu_budget}'\n",
            gpu_device("gpu0", "2GiB"),
            gpu_device("gpu1", "1MiB")
        )
    };
    let config_in = |d: &TestDaemon, cpu_budget: &str| {
        std::fs::write(d.dir.path().join("rxd.toml"), config(cpu_budget)).unwrap();
    };
    let d = start(&repo, &config("1GiB"));
    let c = d.client();
    let digit = example_npy("digit.npy", "input");
    let crops = f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, 1));
    let det_in = f32_tensor("x", &[1, 3, 64, 96], &random_f32(3 * 64 * 96, 2));
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 3));

    c.infer("cls", vec![crops]).unwrap();
    // No preference: accelerators first.
    c.infer("digits", vec![digit]).unwrap();
    let s = d.summaries();
    assert_eq!(
        (s["cls"].device.as_str(), s["cls"].ep.as_deref()),
        ("gpu0", Some(WEBGPU))
    );
    assert_eq!(s["digits"].device, "gpu0");
    // gpu1 cannot hold YOLO's weights: `spill` runs on the CPU, its next preference.
    c.infer("spill", vec![image.clone()]).unwrap();
    let s = d.summaries();
    assert_eq!(
        (s["spill"].device.as_str(), s["spill"].ep.as_deref()),
        ("cpu", Some(CPU))
    );
    // Only gpu1 allowed: over budget, naming the device; the rest keeps serving.
    let x = f32_tensor("x", &[1, 3, 48, 160], &random_f32(3 * 48 * 160, 4));
    match c.infer("rec", vec![x]).unwrap_err() {
        ClientError::Server(w) => {
            assert_eq!(w.kind(), Some(ErrorCode::OverBudget), "{w}");
            assert!(w.message.contains("gpu1"), "{w}");
        }
        other => panic!("{other}"),
    }
    // The CPU budget: det, then yolo evicts the least recently used CPU model. Footprints
    // are measured (resident-set growth, which varies from run to run), so the budget is
    // set from what `spill` and the detector measured: both fit, a third YOLOv8n (its
    // estimate is `spill`'s measure, the same file) does not, and the detector with it does.
    c.infer("det", vec![det_in.clone()]).unwrap();
    let s = d.summaries();
    let (spill, det) = (
        s["spill"].memory_bytes.expect("measured"),
        s["det"].memory_bytes.expect("measured"),
    );
    config_in(&d, &format!("{}B", spill + det + spill.min(det) / 2));
    c.reload().unwrap();
    assert_eq!(d.summaries()["spill"].state, ModelState::Ready);
    c.infer("yolo", vec![image.clone()]).unwrap();
    let s = d.summaries();
    assert_eq!(s["yolo"].device, "cpu");
    let evicted: Vec<&str> = ["spill", "det"]
        .into_iter()
        .filter(|m| s[*m].state == ModelState::Evicted)
        .collect();
    // The least recently used goes first; the detector only if YOLOv8n then measured more
    // than the room `spill` left (footprints are resident-set growth: another worker giving
    // back its arena during the load moves them by megabytes).
    let budget = spill + det + spill.min(det) / 2;
    let yolo = s["yolo"].memory_bytes.expect("measured");
    let want: Vec<&str> = if yolo + det > budget {
        vec!["spill", "det"]
    } else {
        vec!["spill"]
    };
    assert_eq!(
        evicted, want,
        "the least recently used CPU model goes (yolo measured {yolo} B, budget {budget} B): {s:?}"
    );
    // GPU residents were not touched by the CPU's pressure.
    assert_eq!(s["cls"].state, ModelState::Ready);
    assert_eq!(s["digits"].state, ModelState::Ready);
    for dev in c.devices().unwrap() {
        if let Some(b) = dev.budget_bytes {
            assert!(dev.used_bytes <= b, "{dev:?}");
        }
    }
}

#[test]
fn a_missing_plugin_fails_the_load_and_with_fallback_the_model_serves_on_the_cpu_degraded() {
    let repo = Repo::new();
    repo.link("strict", 1, "digits")
        .settings("strict", "devices = ['gpu0']\n")
        .link("lenient", 1, "digits")
        .settings("lenient", "devices = ['gpu1']\n");
    let config = "preload = []\n\
        [[device]]\nname = 'gpu0'\nkind = 'webgpu'\nep-library = '/nonexistent/libwebgpu.so'\n\
        [[device]]\nname = 'gpu1'\nkind = 'webgpu'\nep-library = '/nonexistent/libwebgpu.so'\ncpu-fallback = true\n\
        [[device]]\nname = 'cpu'\n";
    let d = start(&repo, config);
    let c = d.client();
    let digit: Tensor = example_npy("digit.npy", "input");
    match c.infer("strict", vec![digit.clone()]).unwrap_err() {
        ClientError::Server(w) => {
            assert_eq!(w.kind(), Some(ErrorCode::LoadFailed), "{w}");
            assert!(w.message.contains("/nonexistent/libwebgpu.so"), "{w}");
        }
        other => panic!("{other}"),
    }
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&digit));
    assert_eq!(c.infer("lenient", vec![digit]).unwrap(), want);
    let s = d.summaries();
    assert_eq!(s["lenient"].device, "cpu");
    assert_eq!(s["lenient"].ep.as_deref(), Some(CPU));
    assert!(
        s["lenient"]
            .fallback
            .as_deref()
            .unwrap()
            .contains("WebGpuExecutionProvider")
    );
    let h = c.health().unwrap();
    assert_eq!(h.state, HealthState::Degraded);
    assert!(
        h.reasons
            .iter()
            .any(|r| r.contains("lenient") && r.contains("runs on the CPU")),
        "{h:?}"
    );
    let devices = c.devices().unwrap();
    assert!(
        devices[0]
            .error
            .as_deref()
            .unwrap()
            .contains("does not exist"),
        "{devices:?}"
    );
}

#[test]
fn the_webgpu_device_is_probed_for_float16_and_integer_kernels_at_start() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let config = format!("{}[[device]]\nname = 'cpu'\n", gpu_device("gpu0", "1GiB"));
    let d = start(&repo, &config);
    let devices = d.client().devices().unwrap();
    let gpu = devices.iter().find(|x| x.name == "gpu0").unwrap();
    let caps = gpu.capabilities.expect("probed at start");
    // Mesa's lavapipe offers shaderFloat16, so ORT's WebGPU kernels run the float16 Add
    // themselves (CPU fallback is off for the probe); a Polaris card would say absent.
    assert_eq!(caps.float16, rxd_protocol::Support::Native, "{gpu:?}");
    // ORT's WebGPU EP has no MatMulInteger kernel: integer models run their integer nodes on
    // the CPU.
    assert_eq!(caps.int8, rxd_protocol::Support::Absent, "{gpu:?}");
    let cpu = devices.iter().find(|x| x.name == "cpu").unwrap();
    assert_eq!(
        cpu.capabilities.map(|c| c.float16),
        Some(rxd_protocol::Support::Emulated)
    );
    let log = d.log_text();
    let why = log
        .lines()
        .find(|l| l.contains("no integer kernels") && l.contains(WEBGPU))
        .unwrap_or_else(|| panic!("{log}"));
    println!("{why}");
    let out = d.rxctl(&["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("float16 native, int8 absent"),
        "rxctl devices:\n{text}"
    );
}

/// ORT's WebGPU EP keeps its state in one context per device, shared by every session on it,
/// and cannot run two of them at once: two models on one device, two instances of one model,
/// and a model loading beside another's runs must take turns, or the plugin crashes the
/// daemon. Clients hammer two models (one with two instances) on one WebGPU device while a
/// third loads on it; every answer must agree with the CPU EP and the daemon must live.
#[test]
fn concurrent_runs_and_loads_on_one_webgpu_device_take_turns_and_all_agree() {
    let repo = Repo::new();
    repo.link("cls", 1, "ppocr_cls")
        .settings(
            "cls",
            "devices = ['gpu0']\ninstances = 2\nmax-batch-rows = 1\n",
        )
        .link("digits", 1, "digits")
        .settings("digits", "devices = ['gpu0']\n")
        .link("late", 1, "ppocr_cls")
        .settings("late", "devices = ['gpu0']\n");
    let config = format!(
        "preload = ['cls', 'digits']\nload-on-demand = true\n{}[[device]]\nname = 'cpu'\n",
        gpu_device("gpu0", "2GiB")
    );
    let d = start(&repo, &config);
    let digit: Tensor = example_npy("digit.npy", "input");
    let want_digit = Reference::new(&model_file("digits")).run(std::slice::from_ref(&digit));
    let crops: Vec<Tensor> = (0..4)
        .map(|k| {
            let w = 64 + 32 * k;
            f32_tensor(
                "x",
                &[1, 3, 48, w],
                &random_f32(3 * 48 * w as usize, 40 + k),
            )
        })
        .collect();
    let mut reference = Reference::new(&model_file("ppocr_cls"));
    let want_crops: Vec<Vec<Tensor>> = crops
        .iter()
        .map(|t| reference.run(std::slice::from_ref(t)))
        .collect();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (d, crops, want_crops, digit, want_digit) =
                (&d, &crops, &want_crops, &digit, &want_digit);
            s.spawn(move || {
                let c = d.client();
                for i in 0..24u64 {
                    if (t + i) % 3 == 0 {
                        let got = c.infer("digits", vec![digit.clone()]).unwrap();
                        agree(&got, want_digit, "digits");
                    } else {
                        let k = ((t * 7 + i) % 4) as usize;
                        let got = c.infer("cls", vec![crops[k].clone()]).unwrap();
                        agree(&got, &want_crops[k], "cls");
                    }
                }
            });
        }
        // A load on the same device while the others run.
        let c = d.client();
        let got = c.infer("late", vec![crops[0].clone()]).unwrap();
        agree(&got, &want_crops[0], "late");
    });
    let s = d.summaries();
    for m in ["cls", "digits", "late"] {
        assert_eq!(s[m].state, ModelState::Ready, "{:?}", s[m]);
        assert_eq!(s[m].ep.as_deref(), Some(WEBGPU), "{m}");
    }
    assert_eq!(s["cls"].instances, 2, "{:?}", s["cls"]);
}
