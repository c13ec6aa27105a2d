//! What the repository can do to the daemon: model files that vanish and come back, loads
//! that hang, and the files a load writes.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rxd_client::Tensor;
use rxd_e2e::*;
use rxd_protocol::{
    ErrorCode, InferRequest, ModelRef, Outcome, Reply, Request, RequestFrame, WireError,
};

use crate::common::*;

/// Sends one request on `conn` and reads its answer.
fn ask(conn: &mut RawConn, id: u64, body: Request) -> Outcome {
    conn.send(&RequestFrame { id, body });
    let r = conn.read_response();
    assert_eq!(r.id, id);
    r.outcome
}

fn infer(conn: &mut RawConn, id: u64, model: &str, inputs: Vec<Tensor>) -> Outcome {
    ask(conn, id, Request::Infer(InferRequest::new(model, inputs)))
}

/// The error of an answer that must be one, with the code it must have.
#[track_caller]
fn refused(outcome: Outcome, code: ErrorCode) -> WireError {
    match outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind(), Some(code), "{e}");
            e
        }
        Outcome::Ok(r) => panic!("expected {code:?}, got an answer: {r:?}"),
    }
}

/// An admin connection (the test's own uid) whose answers must come within 20 s.
fn admin(d: &TestDaemon) -> RawConn {
    let mut c = RawConn::connect(&d.socket).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    c.handshake().unwrap();
    c
}

fn model_ref(model: &str) -> ModelRef {
    ModelRef {
        model: model.into(),
        version: None,
    }
}

#[track_caller]
fn ok(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Ok(r) => r,
        Outcome::Err(e) => panic!("{e}"),
    }
}

/// A connection made as `nobody`, handshaken.
fn nobody(d: &TestDaemon) -> RawConn {
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    c
}

fn sigmoid_input() -> Tensor {
    f32_tensor("x", &[3, 4, 5], &random_f32(60, 3))
}

/// Paths planted in the shared temporary directory, removed when dropped.
struct Planted(Vec<PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The local time of `unix_secs` as ONNX Runtime writes it in profile file names.
fn profile_time(unix_secs: u64) -> String {
    let out = std::process::Command::new("date")
        .arg("-d")
        .arg(format!("@{unix_secs}"))
        .arg("+%Y-%m-%d_%H-%M-%S")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Every name ONNX Runtime could give a profile with `prefix` (`<prefix>_<time>_<ms>.json`)
/// in the next `secs` seconds.
fn profile_names(tmp: &Path, prefix: &str, secs: u64) -> Vec<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut names = Vec::new();
    for s in now..now + secs {
        let t = profile_time(s);
        for ms in 0..1000 {
            names.push(tmp.join(format!("{prefix}_{t}_{ms:03}.json")));
            names.push(tmp.join(format!("{prefix}_{t}_{ms}.json")));
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Entries of `dir` whose names start with `prefix`.
fn entries_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Regression (issue 19, item 3): every load wrote ONNX Runtime's profile to
/// `/tmp/rxd-profile-<model>-<version>_<time>.json`, following symlinks (a local user could
/// make a root daemon overwrite any file) and opening FIFOs (hanging the load, with
/// `load_lock` held, forever). Loads write nothing at predictable paths of the shared
/// temporary directory: traps planted at every name ONNX Runtime could pick are left alone.
#[test]
fn loads_write_nothing_at_predictable_paths_in_the_shared_tmp() {
    let _serial = serial();
    let tmp = std::env::temp_dir();
    let tag = std::process::id();
    let (linked, piped) = (format!("trap{tag}l"), format!("trap{tag}f"));
    let repo = repo_with(&[]);
    repo.link(&linked, 1, "sigmoid").link(&piped, 1, "mul_1");
    let mut d = shared_daemon(repo.path(), "preload = [\"digits\"]\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("precious");
    std::fs::write(&victim, "precious").unwrap();
    let mut planted = Planted(Vec::new());
    let link_prefix = format!("rxd-profile-{linked}-1");
    for p in profile_names(&tmp, &link_prefix, 10) {
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        planted.0.push(p);
    }
    let fifo_prefix = format!("rxd-profile-{piped}-1");
    for p in profile_names(&tmp, &fifo_prefix, 10) {
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        planted.0.push(p);
    }
    let traps = planted.0.len();

    let mut admin = admin(&d);
    for (id, model) in [(1, &linked), (2, &piped)] {
        let t = Instant::now();
        ok(ask(&mut admin, id, Request::Load(model_ref(model))));
        assert!(t.elapsed() < Duration::from_secs(10), "{model}");
    }

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let found: Vec<PathBuf> = [&link_prefix, &fifo_prefix]
        .iter()
        .flat_map(|p| entries_with(&tmp, p))
        .collect();
    assert_eq!(
        found.len(),
        traps,
        "a load wrote a file in {}",
        tmp.display()
    );
    for p in &found {
        let meta = std::fs::symlink_metadata(p).unwrap();
        assert!(
            meta.file_type().is_symlink() || meta.file_type().is_fifo(),
            "{} was replaced",
            p.display()
        );
    }
    drop(admin);
    assert!(
        entries_with(&tmp, &format!("rxd-profile-{tag}")).is_empty()
            && !d
                .log_text()
                .contains(&format!("{}/rxd-profile", tmp.display())),
        "profiles go to the daemon's private directory"
    );

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// Regression (issue 19, item 3): a load that never finishes (here: a test hook that hangs
/// session creation, as a FIFO in a profile path did) held `load_lock` forever: every later
/// load and unload waited, and SIGTERM never finished. Loads have a deadline: past it the load
/// fails with `load_failed`, the lock and the registry slot are released, and shutdown does
/// not wait for the stuck thread.
#[test]
fn a_hung_load_times_out_and_wedges_nothing() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.link("hang_short", 1, "sigmoid")
        .settings("hang_short", "load-timeout-secs = 2\n")
        .link("hang_long", 1, "sigmoid")
        .link("other", 1, "mul_1");
    let mut d = TestDaemon::start_env(
        repo.path(),
        &[("RXD_TEST_LOAD_HANG", "hang")],
        "preload = [\"digits\"]\nload-timeout-secs = 600\nshutdown-grace-secs = 3\n",
        &["--socket-mode", "0666"],
    );
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    // A client's request starts the load that hangs; it is answered at the deadline.
    let socket = d.socket.clone();
    let waiter = std::thread::spawn(move || {
        let mut c = connect_as_nobody(&socket);
        c.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        c.handshake().unwrap();
        let t = Instant::now();
        let outcome = infer(&mut c, 1, "hang_short", vec![sigmoid_input()]);
        (outcome, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile other loads and unloads go through (at the latest once the deadline passed).
    let mut admin = admin(&d);
    let t = Instant::now();
    ok(ask(&mut admin, 1, Request::Load(model_ref("other"))));
    ok(ask(&mut admin, 2, Request::Unload(model_ref("other"))));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let (outcome, took) = waiter.join().unwrap();
    let e = refused(outcome, ErrorCode::LoadFailed);
    assert!(e.message.contains("timed out after 2 s"), "{e}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // The failed version is not retried on every request (nor does it hang one).
    let mut c = nobody(&d);
    let t = Instant::now();
    refused(
        infer(&mut c, 2, "hang_short", vec![sigmoid_input()]),
        ErrorCode::ModelNotReady,
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    drop((c, admin));
    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);

    // A stuck load with a long deadline does not hold up SIGTERM.
    let mut c = nobody(&d);
    c.send(&RequestFrame {
        id: 3,
        body: Request::Infer(InferRequest::new("hang_long", vec![sigmoid_input()])),
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let status = d.terminate();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "SIGTERM took {:?}:\n{}",
        t.elapsed(),
        d.log_text()
    );
    assert!(status.success(), "{status}");
}

/// Regression (issue 19, item 9): requests racing a reload that removed a model started
/// on-demand loads of the deleted file and marked the version `failed`; after the file was
/// put back and the repository reloaded, requests kept getting `model_not_ready … failed`.
#[test]
fn a_model_removed_and_put_back_serves_again() {
    let _serial = serial();
    let repo = repo_with(&["sigmoid"]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let dir = repo.path().join("sigmoid");
    let away = repo.path().join(".sigmoid-away");
    let mut control = admin(&d);
    ok(ask(&mut control, 1, Request::Unload(model_ref("sigmoid"))));
    let mut control_id = 1;
    let mut reload = || {
        control_id += 1;
        ok(ask(&mut control, control_id, Request::Reload));
    };
    let served = |c: &mut RawConn, id: u64| match infer(c, id, "sigmoid", vec![sigmoid_input()]) {
        Outcome::Ok(_) => {}
        other => panic!("sigmoid is not served again: {other:?}"),
    };

    // A request for a version whose file is gone starts no load and marks nothing failed.
    std::fs::rename(&dir, &away).unwrap();
    let mut c = nobody(&d);
    let e = match infer(&mut c, 1, "sigmoid", vec![sigmoid_input()]) {
        Outcome::Err(e) => e,
        Outcome::Ok(_) => panic!("served from a file that is gone"),
    };
    assert!(
        matches!(
            e.kind(),
            Some(ErrorCode::UnknownModel | ErrorCode::ModelNotReady)
        ),
        "{e}"
    );
    std::fs::rename(&away, &dir).unwrap();
    reload();
    served(&mut c, 2);

    // The race of the issue: requests while a reload removes the model.
    for round in 0..3u64 {
        std::fs::rename(&dir, &away).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racers: Vec<_> = (0..3)
            .map(|_| {
                let (socket, stop) = (d.socket.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut c = connect_as_nobody(&socket);
                    c.handshake().unwrap();
                    let mut id = 1;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = infer(&mut c, id, "sigmoid", vec![sigmoid_input()]);
                        id += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        reload();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in racers {
            r.join().unwrap();
        }
        std::fs::rename(&away, &dir).unwrap();
        reload();
        served(&mut c, 10 + round);
    }
    drop((c, control));

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}
