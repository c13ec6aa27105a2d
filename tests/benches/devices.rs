//! Issue 25: one model on several devices at once, under a closed loop of 32 single-item
//! clients, in one run: one device; two equal devices (data parallel); the CPU with an
//! accelerator (WebGPU on lavapipe, Mesa's software Vulkan: the only second kind of device a
//! machine without a GPU has, and 20–45 times slower than the CPU); and on each pair of
//! devices cost-aware routing (`route = "expected-finish"`, the default) against round-robin.
//!
//! Every device has a core of its own (`[[device]] cores`), as two GPUs would have their own
//! silicon: "one device" is one core, "two devices" two. In-process ONNX Runtime measured
//! the same way (one single-thread session on one core, then one per core, batch 1) is the
//! yardstick, taken between the daemon's runs. The load generator and the daemon's socket
//! thread are not pinned: they take what the devices leave.
//!
//! Run: `scripts/bench devices`. `RXD_BENCH_SECS` sets seconds per measurement (default 6),
//! `RXD_BENCH_ROUNDS` the rounds (default 2; each round runs every configuration once, in
//! turn), `RXD_BENCH_MODEL` the model (default yolov8n; ppocr_cls also works).

use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::Tensor;

struct Setup {
    name: &'static str,
    /// model.toml beyond the shapes.
    toml: &'static str,
    /// Devices, by kind ("cpu" or "webgpu"), each on its own core.
    devices: &'static [&'static str],
}

const SETUPS: [Setup; 5] = [
    Setup {
        name: "one CPU device (1 core)",
        toml: "",
        devices: &["cpu"],
    },
    Setup {
        name: "two CPU devices (1 core each), expected finish",
        toml: "spread = true\n",
        devices: &["cpu", "cpu"],
    },
    Setup {
        name: "two CPU devices (1 core each), round-robin",
        toml: "spread = true\nroute = 'round-robin'\n",
        devices: &["cpu", "cpu"],
    },
    Setup {
        name: "CPU + lavapipe (1 core each), expected finish",
        toml: "spread = true\n",
        devices: &["cpu", "webgpu"],
    },
    Setup {
        name: "CPU + lavapipe (1 core each), round-robin",
        toml: "spread = true\nroute = 'round-robin'\n",
        devices: &["cpu", "webgpu"],
    },
];

fn input(model: &str) -> Tensor {
    let (name, h, w) = match model {
        "yolov8n" => ("images", 320, 320),
        "ppocr_cls" => ("x", 48, 192),
        other => panic!("RXD_BENCH_MODEL: {other} is not set up here"),
    };
    f32_tensor(name, &[1, 3, h, w], &random_f32((3 * h * w) as usize, 7))
}

/// Items per second of one single-thread session per core in `cores` (each thread pinned),
/// batch 1, for `secs`.
fn in_process(model: &str, item: &Tensor, cores: &[usize], secs: f64) -> f64 {
    std::thread::scope(|s| {
        let handles: Vec<_> = cores
            .iter()
            .map(|&core| {
                s.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(core).unwrap();
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                    let mut sess = bench_session(model, 1);
                    let mut run = || {
                        let values = vec![(item.name.clone(), to_ort(item))];
                        std::hint::black_box(sess.run(values).unwrap());
                    };
                    run();
                    let start = Instant::now();
                    let end = start + Duration::from_secs_f64(secs);
                    let mut runs = 0u64;
                    while Instant::now() < end {
                        run();
                        runs += 1;
                    }
                    runs as f64 / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// A daemon serving `model` as `setup` says, every share serving.
fn daemon(setup: &Setup, model: &str, cores: &[usize]) -> TestDaemon {
    let (env, plugin) = if setup.devices.contains(&"webgpu") {
        webgpu_env()
    } else {
        (Vec::new(), std::path::PathBuf::new())
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut config = String::from("preload = ['m']\ntune = false\n");
    let mut names = Vec::new();
    for (i, kind) in setup.devices.iter().enumerate() {
        let name = format!("{kind}{i}");
        config += &format!(
            "[[device]]\nname = '{name}'\nkind = '{kind}'\ncores = [{}]\n",
            cores[i % cores.len()]
        );
        if *kind == "webgpu" {
            config += &format!("ep-library = '{}'\n", plugin.display());
        }
        names.push(format!("'{name}'"));
    }
    let repo = Repo::new();
    repo.link("m", 1, model).settings(
        "m",
        &format!(
            "devices = [{}]\nmax-batch-rows = 8\n{}",
            names.join(", "),
            setup.toml
        ),
    );
    let d = TestDaemon::start_env(repo.path(), &env, &config, &["--log-level", "warn"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = d.summaries().remove("m").expect("the model");
        let serving = s.shares.iter().filter(|x| x.state == "serving").count();
        if s.state == rxd_protocol::ModelState::Ready && serving >= setup.devices.len().min(2) {
            break;
        }
        if setup.devices.len() == 1 && s.state == rxd_protocol::ModelState::Ready {
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::mem::forget(repo);
    d
}

fn main() {
    let secs: f64 = bench_setting("RXD_BENCH_SECS", 6.0);
    let rounds: usize = bench_setting("RXD_BENCH_ROUNDS", 2);
    let model = std::env::var("RXD_BENCH_MODEL").unwrap_or_else(|_| "yolov8n".into());
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let mine: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    assert!(mine.len() >= 2, "two cores needed");
    let cores = [mine[0], mine[1]];
    let item = input(&model);
    println!(
        "### Several devices: {model}, 32 single-item clients, max-batch-rows 8, {secs} s per run, cores {} and {}\n",
        cores[0], cores[1]
    );
    println!(
        "| round | configuration | req/s | × one device | p50 ms | p99 ms | mean batch | rows per device | in-process, 1 core / 2 cores (items/s, measured after) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---|");
    for round in 1..=rounds {
        let mut one = None;
        for setup in &SETUPS {
            let d = daemon(setup, &model, &cores);
            let warm = closed_loop_inputs(&d.socket, "m", std::slice::from_ref(&item), &[32], 1.0);
            drop(warm);
            let r = closed_loop_inputs(&d.socket, "m", std::slice::from_ref(&item), &[32], secs)
                .remove(0);
            assert!(r.errors.is_empty(), "{}: {:?}", setup.name, r.errors);
            let s = d.summaries().remove("m").unwrap();
            drop(d);
            let rows: Vec<String> = if s.shares.len() > 1 {
                s.shares
                    .iter()
                    .map(|x| format!("{} {}", x.device, x.rows))
                    .collect()
            } else {
                Vec::new()
            };
            let rate = r.throughput_per_s;
            let base = *one.get_or_insert(rate);
            let ip1 = in_process(&model, &item, &cores[..1], secs / 2.0);
            let ip2 = in_process(&model, &item, &cores, secs / 2.0);
            println!(
                "| {round} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {:.1} / {:.1} |",
                setup.name,
                rate,
                rate / base,
                r.latency_ms.p50,
                r.latency_ms.p99,
                r.mean_batch_size,
                rows.join(", "),
                ip1,
                ip2
            );
        }
    }
}
