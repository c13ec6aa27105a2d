//! Model lifecycle under a memory budget: measured footprints, LRU eviction, pinning, load on
//! demand (one load for many waiting requests, bounded by deadlines), version policies, and a
//! model larger than the budget failing alone. Real models, real daemon.

use std::collections::BTreeMap;

use rxd_client::{ClientError, ErrorCode, Tensor};
use rxd_e2e::*;
use rxd_protocol::{InferRequest, ModelState, ModelSummary};

const THREE: [&str; 3] = ["yolov8n", "ppocr_det", "ppocr_rec"];

/// A real input for each of the three models (and its name).
fn input_for(model: &str, seed: u64) -> Tensor {
    let (name, shape): (&str, Vec<u64>) = match model {
        "yolov8n" => ("images", vec![1, 3, 320, 320]),
        "ppocr_det" => ("x", vec![1, 3, 64, 96]),
        "ppocr_rec" => ("x", vec![1, 3, 48, 160]),
        other => panic!("no input for {other}"),
    };
    let n = shape.iter().product::<u64>() as usize;
    f32_tensor(name, &shape, &random_f32(n, seed))
}

fn three_models() -> Repo {
    let repo = Repo::new();
    for m in THREE {
        repo.link(m, 1, m);
    }
    repo
}

fn rss_bytes(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

fn code_of(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server(w) => w.kind().unwrap(),
        other => panic!("not a server error: {other}"),
    }
}

/// What each model measures when loaded alone, and how the accounting compares with the
/// daemon's resident set seen from outside.
fn measure_footprints() -> BTreeMap<String, u64> {
    let repo = three_models();
    let d = TestDaemon::start_with(repo.path(), &[], "preload = []\n");
    let base = rss_bytes(d.pid());
    let mut out = BTreeMap::new();
    for m in THREE {
        assert!(d.rxctl(&["load", m]).status.success());
        let s = &d.summaries()[m];
        assert_eq!(s.state, ModelState::Ready);
        let bytes = s.memory_bytes.expect("measured");
        let file = std::fs::metadata(model_file(m)).unwrap().len();
        assert!(
            bytes >= file,
            "{m}: {bytes} accounted, the weights alone are {file}"
        );
        assert!(s.estimated_bytes.is_some() && s.load_ms.is_some());
        out.insert(m.to_string(), bytes);
    }
    // The accounting agrees with the resident-set growth seen from outside (the daemon
    // measures each load alone; allocator slack and shared pages make up the rest).
    let accounted: u64 = out.values().sum();
    let grew = rss_bytes(d.pid()).saturating_sub(base);
    let devices = d.client_inline().devices().unwrap();
    assert_eq!(devices[0].used_bytes, accounted);
    assert!(
        grew.abs_diff(accounted) <= accounted / 5 + (4 << 20),
        "accounted {accounted} bytes, resident set grew {grew}"
    );
    // Unloading frees the memory for real: the accounting drops by the model's figure, and
    // the resident set by what loading the model costs. Part of what a model's first load
    // in a process allocates inside ONNX Runtime stays, once (about half of ppocr_rec's first
    // footprint; see BENCHMARKS.md, lifecycle); what a reload takes is the model's own cost.
    let rss = || rss_bytes(d.pid());
    let before = rss();
    assert!(d.rxctl(&["unload", "ppocr_rec"]).status.success());
    let devices = d.client_inline().devices().unwrap();
    assert_eq!(devices[0].used_bytes, accounted - out["ppocr_rec"]);
    let unloaded = rss();
    let freed = before.saturating_sub(unloaded);
    assert!(d.rxctl(&["load", "ppocr_rec"]).status.success());
    let reload = rss().saturating_sub(unloaded);
    assert!(
        reload >= out["ppocr_rec"] / 5,
        "reloading a {} byte model took {reload} bytes",
        out["ppocr_rec"]
    );
    assert!(
        freed >= reload * 3 / 4,
        "unloading freed {freed} bytes; loading the model again took {reload}"
    );
    // Load/unload cycles leave nothing behind: the heap gives back what each cycle freed.
    let mut last = 0;
    for cycle in 0..3 {
        if cycle > 0 {
            assert!(d.rxctl(&["load", "ppocr_rec"]).status.success());
        }
        let loaded = rss();
        assert!(d.rxctl(&["unload", "ppocr_rec"]).status.success());
        last = rss();
        let freed = loaded.saturating_sub(last);
        eprintln!(
            "cycle {cycle}: loaded {loaded}, unloaded {last}, freed {freed}, a reload took {reload}"
        );
        assert!(
            freed >= reload * 3 / 4,
            "cycle {cycle}: unloading freed {freed} bytes, a load takes {reload}"
        );
    }
    assert!(
        last <= unloaded + (4 << 20),
        "three load/unload cycles grew the resident set from {unloaded} to {last} bytes"
    );
    out
}

#[test]
fn a_budget_for_two_of_three_models_evicts_in_lru_order_and_keeps_pinned_models() {
    let sizes = measure_footprints();
    let total: u64 = sizes.values().sum();
    let max_pair = total - sizes.values().min().unwrap();
    // Room for any two, never for three.
    let budget = max_pair + (total - max_pair) / 2;
    eprintln!("measured alone: {sizes:?}; budget {budget}");
    let repo = three_models();
    let config = format!("preload = []\nmemory-budget = {budget}\n");
    let d = TestDaemon::start_with(repo.path(), &[], &config);
    // Each model measured once with nothing else running, as above: a footprint is the
    // resident set's growth over the load, and memory that another model's request frees
    // during it (its buffers, given back late) reads as the load's shrinking — ppocr_det has
    // read 8.7 MiB instead of 14.1 that way. The daemon accounts each version at the largest
    // figure measured for it, so the steps below are accounted at these.
    for m in THREE {
        assert!(d.rxctl(&["load", m]).status.success());
        assert!(d.rxctl(&["unload", m]).status.success());
    }
    let c = d.client();
    let mut refs: BTreeMap<&str, Reference> = THREE
        .iter()
        .map(|&m| (m, Reference::new(&model_file(m))))
        .collect();

    // Requests cycle over the three models: each one finds its model evicted and evicts the
    // least recently used of the other two.
    let mut order: Vec<&str> = Vec::new();
    for step in 0..7 {
        let m = THREE[step % 3];
        let x = input_for(m, step as u64);
        let got = c.infer(m, vec![x.clone()]).unwrap();
        assert_eq!(
            got,
            refs.get_mut(m).unwrap().run(&[x]),
            "{m} at step {step}"
        );
        order.push(m);
        let s = d.summaries();
        let resident: Vec<&str> = THREE
            .iter()
            .copied()
            .filter(|n| s[*n].state == ModelState::Ready)
            .collect();
        assert!(resident.len() <= 2, "step {step}: {resident:?} resident");
        if step >= 2 {
            let victim = order[step - 2];
            assert_eq!(s[victim].state, ModelState::Evicted, "step {step}: {s:?}");
        }
        let dev = &c.devices().unwrap()[0];
        assert!(dev.used_bytes <= budget);
        // Resident, least recently used first: the last two models used.
        let want: Vec<String> = order[step.saturating_sub(1)..]
            .iter()
            .map(|m| format!("{m}:1"))
            .collect();
        assert_eq!(dev.models, want, "step {step}");
        // Accounting follows what is resident.
        let sum: u64 = s.values().filter_map(|m| m.memory_bytes).sum();
        assert_eq!(dev.used_bytes, sum);
    }
    let s = d.summaries();
    assert!(THREE.iter().all(|m| s[*m].evictions >= 1), "{s:?}");

    // Pin the detector: from now on the other two evict each other and it stays.
    assert!(d.rxctl(&["pin", "ppocr_det"]).status.success());
    let det_evictions = d.summaries()["ppocr_det"].evictions;
    for step in 0..4 {
        let m = ["yolov8n", "ppocr_rec"][step % 2];
        c.infer(m, vec![input_for(m, 100 + step as u64)]).unwrap();
        let s = d.summaries();
        assert_eq!(s["ppocr_det"].state, ModelState::Ready);
        assert!(s["ppocr_det"].pinned);
        assert_eq!(s["ppocr_det"].evictions, det_evictions);
    }
    // An explicit load cannot make room when the rest is pinned or in use: over budget,
    // naming what is resident; everything else keeps serving.
    assert!(d.rxctl(&["pin", "ppocr_rec"]).status.success());
    let err = c
        .load("yolov8n", None)
        .map(|_| format!("{:?} {:?}", d.summaries(), c.devices()))
        .unwrap_err();
    let ClientError::Server(w) = err else {
        panic!("not a server error")
    };
    assert_eq!(w.kind(), Some(ErrorCode::OverBudget), "{w}");
    assert!(
        w.message.contains("ppocr_det:1") && w.message.contains("pinned"),
        "{w}"
    );
    c.infer("ppocr_det", vec![input_for("ppocr_det", 7)])
        .unwrap();
    // Unpinned, it can go again.
    assert!(d.rxctl(&["unpin", "ppocr_rec"]).status.success());
    c.infer("yolov8n", vec![input_for("yolov8n", 8)]).unwrap();
    assert_eq!(d.summaries()["ppocr_rec"].state, ModelState::Evicted);
}

#[test]
fn a_model_larger_than_the_budget_fails_alone() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("ppocr_rec", 1, "ppocr_rec");
    // The recogniser's weights alone are 10 MiB.
    let d = TestDaemon::start_with(repo.path(), &[], "memory-budget = '8MiB'\n");
    let s = d.summaries();
    assert_eq!(s["digits"].state, ModelState::Ready);
    assert_eq!(s["ppocr_rec"].state, ModelState::Failed, "{s:?}");
    let c = d.client();
    let err = c.load("ppocr_rec", None).expect_err("cannot fit");
    assert_eq!(code_of(err), ErrorCode::OverBudget);
    c.infer("digits", vec![example_npy("digit.npy", "input")])
        .unwrap();
    let out = d.rxctl(&["health"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ppocr_rec"),
        "{out:?}"
    );
}

#[test]
fn concurrent_requests_for_a_cold_model_share_one_load_and_deadlines_bound_the_wait() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("yolov8n", 1, "yolov8n");
    let d = TestDaemon::start_with(repo.path(), &[], "preload = []\n");
    let s = d.summaries();
    assert_eq!(s["digits"].state, ModelState::Available);
    assert_eq!(s["digits"].loads, 0);

    // A deadline shorter than the load: deadline_exceeded, and the load still completes.
    let c = d.client();
    let mut req = InferRequest::new("yolov8n", vec![input_for("yolov8n", 1)]);
    req.timeout_ms = Some(1);
    assert_eq!(
        code_of(c.infer_request(req).unwrap_err()),
        ErrorCode::DeadlineExceeded
    );

    let x = example_npy("digit.npy", "input");
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&x));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (socket, x) = (d.socket.clone(), x.clone());
            std::thread::spawn(move || {
                let c = rxd_client::blocking::Client::connect(&socket).unwrap();
                c.infer("digits", vec![x]).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), want);
    }
    let s = d.summaries();
    assert_eq!(s["digits"].state, ModelState::Ready);
    assert_eq!(s["digits"].loads, 1, "eight waiting requests, one load");
    // The load that the timed-out request started finished.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.summaries()["yolov8n"].state != ModelState::Ready {
        assert!(
            std::time::Instant::now() < end,
            "yolov8n never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(d.summaries()["yolov8n"].loads, 1);
}

#[test]
fn the_version_policy_decides_what_is_served() {
    let repo = Repo::new();
    repo.link("m", 1, "digits")
        .link("m", 2, "digits")
        .link("m", 3, "digits")
        .settings("m", "version-policy = { latest = 2 }\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let versions: BTreeMap<u64, ModelSummary> = d
        .client_inline()
        .list_models()
        .unwrap()
        .into_iter()
        .map(|m| (m.version, m))
        .collect();
    assert!(!versions[&1].served && versions[&2].served && versions[&3].served);
    assert_eq!(versions[&1].state, ModelState::Available);
    assert_eq!(versions[&2].state, ModelState::Ready);
    assert_eq!(versions[&3].state, ModelState::Ready);
    let c = d.client();
    let x = example_npy("digit.npy", "input");
    // Without a version: the highest served one.
    assert_eq!(
        c.infer_request(InferRequest::new("m", vec![x.clone()]))
            .unwrap()
            .version,
        3
    );
    let mut req = InferRequest::new("m", vec![x.clone()]);
    req.version = Some(2);
    assert_eq!(c.infer_request(req).unwrap().version, 2);
    // An unserved version is refused to requests, loadable by an admin.
    let mut req = InferRequest::new("m", vec![x.clone()]);
    req.version = Some(1);
    let err = c.infer_request(req.clone()).unwrap_err();
    assert_eq!(code_of(err), ErrorCode::ModelNotReady);
    assert!(d.rxctl(&["load", "m", "--version", "1"]).status.success());
    assert_eq!(c.infer_request(req).unwrap().version, 1);
}

#[test]
fn models_are_placed_by_preference_and_spill_to_the_next_device() {
    let repo = Repo::new();
    repo.link("a", 1, "yolov8n")
        .link("b", 1, "yolov8n")
        .link("c", 1, "digits")
        .link("e", 1, "digits")
        .settings("e", "devices = ['gpu7']\n")
        .settings("a", "devices = ['small', 'big']\npinned = true\n")
        .settings("b", "devices = ['small', 'big']\npinned = true\n")
        .settings("c", "devices = ['big']\n");
    // Room for one YOLOv8n on `small` (12 MiB of weights, estimated at 2× before anything is
    // measured, about 16 MiB measured), not for two.
    let config = "preload = []\n\
        [[device]]\nname = 'small'\nmemory-budget = '28MiB'\n\
        [[device]]\nname = 'big'\nmemory-budget = '64MiB'\n";
    let d = TestDaemon::start_with(repo.path(), &[], config);
    let c = d.client();
    let x = example_npy("digit.npy", "input");
    for m in ["a", "b"] {
        c.infer(m, vec![input_for("yolov8n", 1)]).unwrap();
    }
    c.infer("c", vec![x.clone()]).unwrap();
    let s = d.summaries();
    assert_eq!(s["a"].device, "small", "first preference has room");
    assert_eq!(
        s["b"].device, "big",
        "small is full of a pinned model: next preference"
    );
    assert_eq!(s["c"].device, "big");
    let devices = c.devices().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].models, vec!["a:1".to_string()]);
    assert_eq!(devices[1].models.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d.used_bytes <= d.budget_bytes.unwrap())
    );
    // Rebalancing: move c to `small` (room after unpinning a and evicting it).
    assert!(d.rxctl(&["unpin", "a"]).status.success());
    let out = d.rxctl(&["configure", "c", "--device", "small"]);
    assert!(out.status.success(), "{out:?}");
    let s = d.summaries();
    assert_eq!(s["c"].device, "small");
    c.infer("c", vec![x.clone()]).unwrap();
    let devices = c.devices().unwrap();
    assert!(
        devices[0].models.contains(&"c:1".to_string()),
        "{devices:?}"
    );
    assert!(
        !devices[1].models.contains(&"c:1".to_string()),
        "{devices:?}"
    );
    assert!(
        devices
            .iter()
            .all(|d| d.used_bytes <= d.budget_bytes.unwrap())
    );
    // A preference naming no configured device fails that model's load, with the reason.
    let err = c.infer("e", vec![x]).unwrap_err();
    let ClientError::Server(w) = err else {
        panic!("not a server error")
    };
    assert_eq!(w.kind(), Some(ErrorCode::LoadFailed));
    assert!(w.message.contains("gpu7"), "{w}");
}

#[test]
fn a_config_reload_changes_budgets_on_demand_loading_and_preloads() {
    let repo = Repo::new();
    repo.link("a", 1, "digits")
        .link("b", 1, "ppocr_cls")
        .link("c", 1, "yolov8n");
    let d = TestDaemon::start_with(repo.path(), &[], "preload = ['a', 'b']\n");
    let config = d.dir.path().join("rxd.toml");
    let c = d.client();
    let s = d.summaries();
    assert_eq!(
        (s["a"].state, s["b"].state),
        (ModelState::Ready, ModelState::Ready)
    );
    assert_eq!(s["c"].state, ModelState::Available);
    c.infer(
        "b",
        vec![f32_tensor(
            "x",
            &[1, 3, 48, 192],
            &random_f32(3 * 48 * 192, 1),
        )],
    )
    .unwrap();
    // A budget that holds b but not a and b: the least recently used (a) is evicted.
    let b_bytes = s["b"].memory_bytes.unwrap();
    std::fs::write(
        &config,
        format!(
            "preload = ['a', 'b', 'c']\nmemory-budget = {}\nload-on-demand = false\n",
            b_bytes + (512 << 10)
        ),
    )
    .unwrap();
    let out = d.rxctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let s = d.summaries();
    assert_eq!(s["a"].state, ModelState::Evicted, "{s:?}");
    assert_eq!(s["b"].state, ModelState::Ready);
    // c was added to the preload list and loaded at once, but its weights alone exceed the
    // new budget: it failed, saying so.
    assert_eq!(s["c"].state, ModelState::Failed);
    assert!(
        s["c"].error.as_deref().unwrap().contains("memory budget"),
        "{:?}",
        s["c"]
    );
    let devices = c.devices().unwrap();
    assert_eq!(devices[0].budget_bytes, Some(b_bytes + (512 << 10)));
    // load-on-demand is off now: a request for the evicted model is refused, not loaded.
    assert_eq!(
        code_of(
            c.infer("a", vec![example_npy("digit.npy", "input")])
                .unwrap_err()
        ),
        ErrorCode::ModelNotReady
    );
    let status = c.status().unwrap();
    assert_eq!(
        status.config["load-on-demand"], "false",
        "the config in force"
    );
    assert_eq!(
        status.config["device.cpu.memory-budget"],
        (b_bytes + (512 << 10)).to_string()
    );
    // A config with problems changes nothing and says why.
    std::fs::write(&config, "memory-budget = 'lots'\n").unwrap();
    let out = d.rxctl(&["reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("memory-budget"),
        "{out:?}"
    );
    assert_eq!(
        c.devices().unwrap()[0].budget_bytes,
        Some(b_bytes + (512 << 10))
    );
    // SIGHUP does the same as rxctl reload: back to unlimited and on-demand loading.
    std::fs::write(&config, "preload = ['a', 'b']\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while c.devices().unwrap()[0].budget_bytes.is_some() {
        assert!(
            std::time::Instant::now() < end,
            "SIGHUP did not reload the config"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.infer("a", vec![example_npy("digit.npy", "input")])
        .unwrap();
}
