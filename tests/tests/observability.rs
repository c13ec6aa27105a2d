//! Metrics, Prometheus, health and run-time control against the real daemon: counters agree
//! with what the test sent, promtool accepts the exposition, health turns degraded/unhealthy
//! for its reasons and back, instances scale under load without a failed request, batch
//! settings change the batch sizes the daemon runs, the cache is controllable, changes persist,
//! and `rxctl top` renders in a real terminal (tmux).

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rxd_client::{ClientError, DType, ErrorCode, Tensor};
use rxd_e2e::*;
use rxd_protocol::metrics::ModelMetrics;
use rxd_protocol::{Configure, HealthState, InferRequest, MetricsReport};

fn digit() -> Tensor {
    example_npy("digit.npy", "input")
}

fn model<'a>(m: &'a MetricsReport, name: &str) -> &'a ModelMetrics {
    m.models
        .iter()
        .find(|x| x.name == name)
        .expect("model in metrics")
}

fn code_of(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server(w) => w.kind().unwrap(),
        other => panic!("not a server error: {other}"),
    }
}

#[test]
fn counters_and_histograms_agree_with_what_was_sent_and_promtool_accepts_them() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    for _ in 0..50 {
        c.infer("digits", vec![digit()]).unwrap();
    }
    let wrong = Tensor::inline("input", DType::Float64, vec![1, 64], vec![0; 512]);
    for _ in 0..5 {
        assert_eq!(
            code_of(c.infer("digits", vec![wrong.clone()]).unwrap_err()),
            ErrorCode::DtypeMismatch
        );
    }
    for _ in 0..3 {
        assert_eq!(
            code_of(c.infer("nope", vec![digit()]).unwrap_err()),
            ErrorCode::UnknownModel
        );
    }
    let m = c.metrics().unwrap();
    let dm = model(&m, "digits");
    assert_eq!(dm.outcomes.get("ok"), Some(&50));
    assert_eq!(dm.outcomes.get("dtype_mismatch"), Some(&5));
    assert_eq!(dm.outcomes.len(), 2, "{:?}", dm.outcomes);
    assert_eq!(m.errors.get("unknown_model"), Some(&3));
    assert_eq!(m.errors.get("dtype_mismatch"), Some(&5));
    // One request at a time: 50 batches of one row, 50 queue and total observations.
    assert_eq!(dm.total.count, 50);
    assert_eq!(dm.queue.count, 50);
    assert_eq!(dm.compute.count, dm.batches);
    assert_eq!(dm.batch_rows.sum, dm.rows as f64);
    assert_eq!(dm.rows, 50);
    assert_eq!(dm.total.recent.count, 50);
    let (p50, p99) = (dm.total.recent.p50.unwrap(), dm.total.recent.p99.unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{p50} {p99}");
    // Buckets are cumulative and end at the count.
    let counts: Vec<u64> = dm.total.buckets.iter().map(|b| b.1).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    assert!(*counts.last().unwrap() <= 50);
    assert!(m.requests_total >= 58);
    assert!(m.process.rss_bytes.unwrap() > 0 && m.process.cpu_seconds.is_some());
    assert!(m.gpus.is_empty(), "no GPU here: absent, not zero");

    let out = d.rxctl(&["metrics", "--prometheus"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(r#"rxd_model_requests_total{model="digits",version="1",outcome="ok"} 50"#),
        "{text}"
    );
    assert!(text.contains(r#"rxd_request_errors_total{code="unknown_model"} 3"#));
    assert!(
        text.contains(r#"rxd_model_request_duration_seconds_count{model="digits",version="1"} 50"#)
    );
    assert!(
        !text.contains("rxd_gpu_"),
        "GPU metrics are absent without a GPU"
    );
    assert!(
        !text.contains("rxd_device_memory_budget_bytes{"),
        "unlimited budget: absent"
    );
    promtool_accepts(&text);
}

#[test]
fn the_metrics_endpoint_serves_prometheus_on_loopback_only() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start_with(
        repo.path(),
        &[],
        &format!("metrics-listen = '127.0.0.1:{port}'\nmemory-budget = '64MiB'\n"),
    );
    d.client().infer("digits", vec![digit()]).unwrap();
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let resp = get("/metrics");
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    let text = resp.split_once("\r\n\r\n").unwrap().1;
    assert!(text.contains(r#"rxd_device_memory_budget_bytes{device="cpu"} 67108864"#));
    promtool_accepts(text);
    assert!(get("/other").starts_with("HTTP/1.1 404"));
    // A request header sent a byte at a time is read whole.
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        for b in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
        }
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    }
    // Any local user may connect over loopback TCP: 200 connections that say nothing hold
    // at most the exporter's 32 of the daemon's fds, and a scrape made while they are all
    // open is served at once — it takes the place of the oldest (it once waited up to 5 s
    // for one to time out, and a peer reconnecting kept scrapes out for good).
    let fds = || d.fd_targets().len();
    let before = fds();
    let idle: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(fds() <= before + 34, "{} fds, {before} before", fds());
    for _ in 0..3 {
        let t = Instant::now();
        assert!(get("/metrics").starts_with("HTTP/1.1 200 OK"));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a scrape beside 200 idle connections took {:?}",
            t.elapsed()
        );
    }
    assert!(fds() <= before + 34, "{} fds, {before} before", fds());
    drop(idle);
    // The status names the listener; a non-loopback address is a config error.
    let status = d.client().status().unwrap();
    assert_eq!(status.config["metrics-listen"], format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rxd.toml"),
        "metrics-listen = '0.0.0.0:9464'\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("rxd"))
        .args(["check-config", "--config"])
        .arg(dir.path().join("rxd.toml"))
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--ort-library")
        .arg(ort_library())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics-listen"));
}

fn wait_for_health(d: &TestDaemon, want: HealthState, reason: &str) -> rxd_protocol::Health {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let h = d.client_inline().health().unwrap();
        let named = if reason.is_empty() {
            h.reasons.is_empty()
        } else {
            h.reasons.iter().any(|r| r.contains(reason))
        };
        if h.state == want && named {
            return h;
        }
        assert!(
            Instant::now() < end,
            "wanted {want:?} ({reason}), last: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_turns_degraded_for_its_reasons_and_back() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .write("broken", 1, b"not a model")
        .link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", "queue-capacity = 4\n")
        .link("ppocr_rec", 1, "ppocr_rec")
        .settings("digits", "pinned = true\n");
    let d = TestDaemon::start_with(
        repo.path(),
        &[],
        "preload = ['digits', 'broken', 'yolov8n']\nmemory-budget = '36MiB'\n",
    );
    // A model that failed to load: degraded, named.
    let h = wait_for_health(
        &d,
        HealthState::Degraded,
        "'broken' version 1 failed to load",
    );
    assert!(
        h.engine_running && h.workers >= 2 && h.models_servable >= 3,
        "{h:?}"
    );
    assert!(!h.gpu_available);
    // Back: the broken model leaves the repository.
    std::fs::remove_dir_all(repo.path().join("broken")).unwrap();
    assert!(d.rxctl(&["reload"]).status.success());
    wait_for_health(&d, HealthState::Healthy, "");
    let out = d.rxctl(&["health", "--strict"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A queue kept full by many clients: degraded while it lasts.
    let stop = Arc::new(AtomicBool::new(false));
    let image = {
        let n = 3 * 320 * 320;
        f32_tensor("images", &[1, 3, 320, 320], &random_f32(n, 3))
    };
    let load: Vec<_> = (0..12)
        .map(|i| {
            let (stop, socket, mut image) = (stop.clone(), d.socket.clone(), image.clone());
            std::thread::spawn(move || {
                // Distinct inputs: identical ones would be coalesced into one run.
                if let rxd_protocol::TensorData::Inline(b) = &mut image.data {
                    b[0] = i as u8;
                }
                let c = rxd_client::blocking::Client::connect(&socket).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.infer("yolov8n", vec![image.clone()]);
                }
            })
        })
        .collect();
    let h = wait_for_health(&d, HealthState::Degraded, "queue saturated");
    assert!(h.queue_size >= 3, "{h:?}");
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    wait_for_health(&d, HealthState::Healthy, "");

    // The budget keeps a served model out (the rest is pinned): degraded; unpinning lets it in.
    // A budget with room for what is resident and 4 MiB more (footprints are measured, and
    // how much ONNX Runtime's shared arena lends a load varies, so it is set from them).
    assert!(d.rxctl(&["pin", "yolov8n"]).status.success());
    let resident: u64 = d
        .summaries()
        .values()
        .filter(|m| m.state == rxd_protocol::ModelState::Ready)
        .map(|m| m.memory_bytes.unwrap_or(0))
        .sum();
    std::fs::write(
        d.dir.path().join("rxd.toml"),
        format!(
            "preload = ['digits', 'yolov8n']\nmemory-budget = {}\n",
            resident + (4 << 20)
        ),
    )
    .unwrap();
    assert!(d.rxctl(&["reload"]).status.success());
    let c = d.client();
    let x = f32_tensor("x", &[1, 3, 48, 160], &random_f32(3 * 48 * 160, 1));
    assert_eq!(
        code_of(c.infer("ppocr_rec", vec![x.clone()]).unwrap_err()),
        ErrorCode::OverBudget
    );
    wait_for_health(&d, HealthState::Degraded, "memory budget exhausted");
    assert!(d.rxctl(&["unpin", "yolov8n"]).status.success());
    c.infer("ppocr_rec", vec![x]).unwrap();
    wait_for_health(&d, HealthState::Healthy, "");
}

#[test]
fn a_stuck_worker_makes_health_unhealthy() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits").link("wedge", 1, "digits");
    let d = TestDaemon::start_env(
        repo.path(),
        &[("RXD_TEST_WEDGE", "wedge")],
        "watchdog-stuck-secs = 1\n",
        &[],
    );
    let c = d.client();
    let mut req = InferRequest::new("wedge", vec![digit()]);
    req.timeout_ms = Some(60_000);
    let socket = d.socket.clone();
    std::thread::spawn(move || {
        let c = rxd_client::blocking::Client::connect(&socket).unwrap();
        let _ = c.infer_request(req);
    });
    let h = wait_for_health(&d, HealthState::Unhealthy, "stuck");
    assert!(h.reasons[0].contains("wedge"), "{h:?}");
    let out = d.rxctl(&["health"]);
    assert_eq!(out.status.code(), Some(2));
    // The other model still serves.
    c.infer("digits", vec![digit()]).unwrap();
}

/// Runs `clients` threads sending single-row ppocr_cls requests (distinct inputs) until `stop`.
fn cls_load(
    d: &TestDaemon,
    clients: usize,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicU64>,
    failed: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (stop, ok, failed, socket) =
                (stop.clone(), ok.clone(), failed.clone(), d.socket.clone());
            std::thread::spawn(move || {
                let x = f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, i as u64));
                let c = rxd_client::blocking::Client::connect(&socket).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match c.infer("ppocr_cls", vec![x.clone()]) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect()
}

#[test]
fn scaling_instances_under_load_drops_no_request() {
    let repo = Repo::new();
    repo.link("ppocr_cls", 1, "ppocr_cls");
    let d = TestDaemon::start(repo.path(), &[]);
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let threads = cls_load(&d, 6, &stop, &ok, &failed);
    let c = d.client_inline();
    for n in [2u32, 3, 1, 2] {
        std::thread::sleep(Duration::from_millis(300));
        let v = c
            .configure(Configure {
                model: "ppocr_cls".into(),
                instances: Some(n),
                ..Configure::default()
            })
            .unwrap();
        assert_eq!(v.instances, n);
        let m = c.metrics().unwrap();
        assert_eq!(model(&m, "ppocr_cls").instances, n);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 50);
    let m = c.metrics().unwrap();
    let cls = model(&m, "ppocr_cls");
    assert_eq!(
        cls.outcomes.get("ok").copied(),
        Some(ok.load(Ordering::Relaxed))
    );
    assert_eq!(cls.outcomes.len(), 1, "{:?}", cls.outcomes);
}

#[test]
fn changed_batch_settings_change_the_batch_sizes_the_daemon_runs() {
    let repo = Repo::new();
    repo.link("ppocr_cls", 1, "ppocr_cls")
        .settings("ppocr_cls", "max-batch-rows = 1\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client_inline();
    let phase = |c: &rxd_client::blocking::Client| {
        let before = model(&c.metrics().unwrap(), "ppocr_cls").clone();
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let threads = cls_load(&d, 8, &stop, &ok, &failed);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0);
        let after = model(&c.metrics().unwrap(), "ppocr_cls").clone();
        (after.rows - before.rows) as f64 / (after.batches - before.batches) as f64
    };
    let unbatched = phase(&c);
    assert_eq!(unbatched, 1.0);
    let v = c
        .configure(Configure {
            model: "ppocr_cls".into(),
            max_batch_rows: Some(8),
            max_queue_delay_us: Some(2000),
            ..Configure::default()
        })
        .unwrap();
    assert_eq!((v.max_batch_rows, v.max_queue_delay_us), (8, 2000));
    let batched = phase(&c);
    assert!(batched > 1.5, "mean batch {batched} rows after allowing 8");
    // Run-time settings show in the metrics and in `rxctl models`-style settings.
    let m = c.metrics().unwrap();
    assert_eq!(model(&m, "ppocr_cls").settings.max_batch_rows, 8);
}

#[test]
fn the_cache_is_switched_on_cleared_and_off_at_run_time_and_changes_persist() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .settings("digits", "# tuned by hand\ninstances = 1\n");
    let mut d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let conf = |cache: Option<u64>, clear: bool| Configure {
        model: "digits".into(),
        cache_bytes: cache,
        clear_cache: clear,
        ..Configure::default()
    };
    let hits = |c: &rxd_client::blocking::Client| {
        let m = c.metrics().unwrap();
        (
            model(&m, "digits").cache_hits,
            model(&m, "digits").cache_misses,
        )
    };
    c.configure(conf(Some(1 << 20), false)).unwrap();
    let first = c.infer("digits", vec![digit()]).unwrap();
    assert_eq!(c.infer("digits", vec![digit()]).unwrap(), first);
    assert_eq!(hits(&c), (1, 1));
    c.configure(conf(None, true)).unwrap();
    c.infer("digits", vec![digit()]).unwrap();
    assert_eq!(hits(&c), (1, 2), "cleared: a miss");
    c.configure(conf(Some(0), false)).unwrap();
    c.infer("digits", vec![digit()]).unwrap();
    c.infer("digits", vec![digit()]).unwrap();
    assert_eq!(hits(&c), (1, 2), "off: neither hit nor miss");

    // Persisted changes are in model.toml (comments kept) and survive a restart.
    let out = d.rxctl(&[
        "configure",
        "digits",
        "--max-batch-rows",
        "4",
        "--priority-aging-ms",
        "0",
        "--persist",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("(strict)"));
    let toml = std::fs::read_to_string(repo.path().join("digits/model.toml")).unwrap();
    assert!(
        toml.contains("# tuned by hand") && toml.contains("max-batch-rows = 4"),
        "{toml}"
    );
    d.terminate();
    let d = TestDaemon::start(repo.path(), &[]);
    let m = d.client().metrics().unwrap();
    let s = &model(&m, "digits").settings;
    assert_eq!((s.max_batch_rows, s.priority_aging_ms), (4, 0));
}

#[test]
fn rxctl_top_renders_live_numbers_in_a_terminal_and_quits_on_q() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    for _ in 0..37 {
        c.infer("digits", vec![digit()]).unwrap();
    }
    let tmux_socket = format!("rxd-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .arg("-L")
            .arg(&tmux_socket)
            .args(args)
            .output()
            .unwrap()
    };
    let cmd = format!(
        "{} --socket {} top --interval-ms 200",
        bin("rxctl").display(),
        d.socket.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(out.status.success(), "{out:?}");
    let end = Instant::now() + Duration::from_secs(15);
    let screen = loop {
        let out = tmux(&["capture-pane", "-p", "-t", "top"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = text.lines().find(|l| l.starts_with("digits"));
        if let Some(row) = row
            && row.split_whitespace().nth(5) == Some("37")
        {
            break text;
        }
        assert!(
            Instant::now() < end,
            "top never showed 37 requests:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(screen.contains("MODEL") && screen.contains("REQ/S") && screen.contains("P99 ms"));
    assert!(
        screen.contains("cpu") && screen.contains("unlimited"),
        "{screen}"
    );
    let row = screen.lines().find(|l| l.starts_with("digits")).unwrap();
    assert!(row.contains("ready"), "{row}");
    // q quits cleanly: the pane's program exits and tmux closes the session.
    tmux(&["send-keys", "-t", "top", "q"]);
    let end = Instant::now() + Duration::from_secs(5);
    while tmux(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < end, "rxctl top did not quit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tmux(&["kill-server"]);
}
