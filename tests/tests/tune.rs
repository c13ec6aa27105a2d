//! Issue 23: load-time tuning. A model whose model.toml leaves the layout unset is measured at
//! load over layouts and batch sizes; it serves with the choice, answers as in-process ONNX
//! Runtime does, and the choice is kept in the cache directory, so a restart reads it instead
//! of measuring. What model.toml sets wins, and a model whose request shapes are not known is
//! not tuned at made-up sizes. (The choice itself is unit-tested on simulated cost tables in
//! `daemon/src/registry/tune.rs`.)

use rxd_e2e::*;
use rxd_protocol::{ModelInfo, Tensor};

/// The PP-OCR direction classifier with its shapes declared, as the example repository has it.
fn classifier_repo() -> Repo {
    let repo = Repo::new();
    repo.link("cls", 1, "ppocr_cls")
        .settings("cls", "warmup-dims = { x = [1, 3, 48, 192] }\n");
    repo
}

/// `rows` word crops of random pixels.
fn crops(rows: u64, seed: u64) -> Vec<Tensor> {
    let n = rows as usize * 3 * 48 * 192;
    vec![f32_tensor("x", &[rows, 3, 48, 192], &random_f32(n, seed))]
}

fn info(d: &TestDaemon, model: &str) -> ModelInfo {
    d.client_inline().model_info(model, None).unwrap()
}

/// Two cores for the daemon (whatever this machine has), a cache directory that outlives it.
fn start(repo: &Repo, cache: &std::path::Path, model_config: &str) -> TestDaemon {
    TestDaemon::start_with(
        repo.path(),
        &["--intra-op-threads", "2"],
        &format!(
            "tune = true\ncache-directory = '{}'\n{model_config}",
            cache.display()
        ),
    )
}

#[test]
fn a_model_is_tuned_at_load_serves_the_choice_correctly_and_a_restart_reuses_it() {
    let repo = classifier_repo();
    let cache = tempfile::tempdir().unwrap();
    let d = start(&repo, cache.path(), "");
    let i = info(&d, "cls");
    let t = i.tuning.clone().expect("tuned");
    assert!(!t.cached && t.measured_ms > 0, "{t:?}");
    assert!(t.instances * t.threads <= 2 && t.instances >= 1, "{t:?}");
    // Both layouts of two cores were measured, at batch sizes from 1 up.
    for (instances, threads) in [(1, 2), (2, 1)] {
        assert!(
            t.table
                .iter()
                .any(|c| c.instances == instances && c.threads == threads && c.rows == 1),
            "{:?}",
            t.table
        );
    }
    assert!(
        t.table
            .iter()
            .all(|c| c.items_per_s > 0.0 && c.run_ms > 0.0)
    );
    assert!(t.table.iter().any(|c| c.rows == t.max_batch_rows));
    // What serves is what was chosen.
    let s = i.settings.expect("settings");
    assert_eq!(s.instances, t.instances);
    assert_eq!(s.max_batch_rows, t.max_batch_rows);
    let target = s
        .latency_target_ms
        .expect("the adaptive batch policy is on");
    assert!((target - t.latency_target_ms).abs() < 1e-3, "{target}");
    assert!(t.latency_target_ms > 0.0);

    // Answers as in-process ORT's, singly and batched by the daemon (several threads may
    // round differently from the one-thread reference: within 1e-4).
    let mut reference = Reference::new(&model_file("ppocr_cls"));
    let client = d.client_inline();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..12u64)
            .map(|k| {
                let c = &client;
                s.spawn(move || {
                    let x = crops(1 + k % 3, 900 + k);
                    (x.clone(), c.infer("cls", x).unwrap())
                })
            })
            .collect();
        for h in handles {
            let (x, got) = h.join().unwrap();
            let want = reference.run(&x);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.shape, w.shape);
                assert!(max_rel_diff(g, w) < 1e-4, "{}", max_rel_diff(g, w));
            }
        }
    });
    drop(client);
    drop(d);

    // A restart reads the choice from the cache directory instead of measuring again.
    let d = start(&repo, cache.path(), "");
    let again = info(&d, "cls").tuning.expect("tuned");
    assert!(again.cached, "{again:?}");
    assert_eq!(
        (again.instances, again.threads, again.max_batch_rows),
        (t.instances, t.threads, t.max_batch_rows)
    );
    // The same table (JSON in the cache keeps a float to within its last digit).
    assert_eq!(again.table.len(), t.table.len());
    for (a, b) in again.table.iter().zip(&t.table) {
        assert_eq!(
            (a.instances, a.threads, a.rows),
            (b.instances, b.threads, b.rows)
        );
        assert!((a.items_per_s - b.items_per_s).abs() <= 1e-9 * b.items_per_s);
    }
    // The render says what was chosen and shows the table.
    let out = std::process::Command::new(bin("rxctl"))
        .args(["--socket"])
        .arg(&d.socket)
        .args(["models", "cls"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("tuning (from the cache)"), "{text}");
    assert!(text.contains("← chosen"), "{text}");

    // `rxctl configure --retune` measures again and rebuilds with the new choice; the
    // version serves throughout and after.
    let out = std::process::Command::new(bin("rxctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["configure", "cls", "--retune"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = info(&d, "cls").tuning.expect("tuned");
    assert!(!fresh.cached && fresh.measured_ms > 0, "{fresh:?}");
    assert_eq!(info(&d, "cls").settings.unwrap().instances, fresh.instances);
    let x = crops(2, 77);
    let want = Reference::new(&model_file("ppocr_cls")).run(&x);
    let got = d.client_inline().infer("cls", x).unwrap();
    assert!(max_rel_diff(&got[0], &want[0]) < 1e-4);
}

#[test]
fn what_model_toml_sets_is_not_tuned_and_unknown_shapes_are_not_measured() {
    let repo = Repo::new();
    // The layout set: not tuned, served as set.
    repo.link("fixed", 1, "ppocr_cls").settings(
        "fixed",
        "warmup-dims = { x = [1, 3, 48, 192] }\ninstances = 1\nintra-op-threads = 1\n",
    );
    // Tuning turned off for this model.
    repo.link("off", 1, "ppocr_cls").settings(
        "off",
        "warmup-dims = { x = [1, 3, 48, 192] }\ntune = false\n",
    );
    // The recogniser's width is dynamic and no warmup-dims say what requests will send.
    repo.link("rec", 1, "ppocr_rec");
    // Only the batch policy left to tuning: the row limit set here is kept.
    repo.link("rows", 1, "ppocr_cls").settings(
        "rows",
        "warmup-dims = { x = [1, 3, 48, 192] }\nmax-batch-rows = 3\n",
    );
    let cache = tempfile::tempdir().unwrap();
    let d = start(&repo, cache.path(), "");
    let fixed = info(&d, "fixed");
    assert!(fixed.tuning.is_none());
    // Model info says why each was not tuned.
    let why = |m: &str| info(&d, m).not_tuned.unwrap_or_default();
    assert!(
        why("fixed").contains("the layout is set"),
        "{}",
        why("fixed")
    );
    assert!(why("off").contains("tune = false"), "{}", why("off"));
    assert!(why("rec").contains("warmup-dims"), "{}", why("rec"));
    assert!(info(&d, "rows").not_tuned.is_none());
    assert_eq!(fixed.settings.unwrap().instances, 1);
    let retune = |model: &str| {
        d.client_inline().configure(rxd_protocol::Configure {
            model: model.into(),
            retune: true,
            ..Default::default()
        })
    };
    let err = retune("fixed").unwrap_err().to_string();
    assert!(err.contains("nothing to tune"), "{err}");
    let err = retune("off").unwrap_err().to_string();
    assert!(err.contains("tune = false"), "{err}");
    assert!(info(&d, "off").tuning.is_none());
    assert!(info(&d, "rec").tuning.is_none());
    let rows = info(&d, "rows");
    assert!(rows.tuning.is_some());
    assert_eq!(rows.settings.unwrap().max_batch_rows, 3);
    assert!(
        d.log_text()
            .contains("not tuned: input 'x' has dynamic dimensions besides the batch"),
        "the log says why the recogniser was not tuned"
    );
    // All serve.
    let client = d.client_inline();
    for m in ["fixed", "off", "rows"] {
        let got = client.infer(m, crops(2, 7)).unwrap();
        assert_eq!(got[0].shape, vec![2, 2]);
    }
    let word = vec![f32_tensor(
        "x",
        &[1, 3, 48, 160],
        &random_f32(3 * 48 * 160, 8),
    )];
    let want = Reference::new(&model_file("ppocr_rec")).run(&word);
    let got = client.infer("rec", word).unwrap();
    assert!(max_rel_diff(&got[0], &want[0]) < 1e-4);

    // The daemon-wide switch: `tune = false` in rxd.toml leaves every model untuned.
    drop(client);
    drop(d);
    let repo = classifier_repo();
    let d = TestDaemon::start_with(repo.path(), &["--intra-op-threads", "2"], "tune = false\n");
    assert!(info(&d, "cls").tuning.is_none());
}

/// The CPUs this process may run on (its affinity), from `taskset -p`.
fn affinity(pid: u32) -> String {
    let out = std::process::Command::new("taskset")
        .args(["-p", &pid.to_string()])
        .output()
        .expect("taskset (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit(':').next().unwrap().trim().to_string()
}

/// Pins every thread of `pid` to the CPUs of `mask` (hex).
fn pin(pid: i32, mask: &str) {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", mask, &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Waits (up to a minute) until the model's tuning satisfies `done`.
fn wait_for_tuning(
    d: &TestDaemon,
    done: impl Fn(&rxd_protocol::Tuning) -> bool,
) -> rxd_protocol::Tuning {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let t = info(d, "cls").tuning.expect("tuned");
        if done(&t) {
            return t;
        }
        assert!(std::time::Instant::now() < end, "not re-tuned: {t:?}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// With `intra-op-threads` automatic, the daemon follows the cores it may use: pinned to one
/// CPU (as `taskset`, systemd's CPUAffinity= or a cgroup quota would), it measures its tuned
/// model again over the layouts of one core and serves that; given its CPUs back, it re-tunes
/// for two. Answers stay those of in-process ONNX Runtime throughout.
#[test]
fn the_daemon_re_tunes_when_the_cores_it_may_use_change() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: needs two cores");
        return;
    }
    let repo = classifier_repo();
    let cache = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with(
        repo.path(),
        &["--intra-op-threads", "0"],
        &format!(
            "tune = true\ncache-directory = '{}'\n",
            cache.path().display()
        ),
    );
    let first = info(&d, "cls").tuning.expect("tuned");
    let spread = |t: &rxd_protocol::Tuning| {
        t.table
            .iter()
            .map(|c| c.instances * c.threads)
            .max()
            .unwrap_or(0)
    };
    assert!(
        spread(&first) >= 2,
        "tuned over every core: {:?}",
        first.table
    );
    let full = affinity(std::process::id());
    // The lowest CPU this test may use.
    let mask = u128::from_str_radix(&full, 16).unwrap();
    let one = format!("{:x}", mask & mask.wrapping_neg());
    pin(d.pid(), &one);
    let narrow = wait_for_tuning(&d, |t| spread(t) == 1 && !t.cached);
    assert_eq!((narrow.instances, narrow.threads), (1, 1), "{narrow:?}");
    let s = info(&d, "cls").settings.expect("settings");
    assert_eq!(s.instances, 1);
    let mut reference = Reference::new(&model_file("ppocr_cls"));
    let client = d.client_inline();
    for seed in 0..3 {
        let got = client.infer("cls", crops(1, seed)).unwrap();
        let want = reference.run(&crops(1, seed));
        assert!(max_rel_diff(&got[0], &want[0]) <= 1e-4);
    }
    pin(d.pid(), &full);
    let wide = wait_for_tuning(&d, |t| spread(t) >= 2);
    assert!(!wide.cached, "measured again: {wide:?}");
    assert!(d.log_text().contains("re-tuning"), "the log says why");
}
