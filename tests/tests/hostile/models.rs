//! What a request's shapes and the repository can do to the daemon: inputs that make ONNX
//! Runtime abort, shapes that grow its memory, model files that vanish and come back, loads
//! that hang, and the files a load writes.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rxd_client::{DType, Tensor};
use rxd_e2e::*;
use rxd_protocol::{
    ErrorCode, InferRequest, ModelRef, Outcome, Reply, Request, RequestFrame, TensorData, WireError,
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

fn zeros(name: &str, dtype: DType, shape: &[u64]) -> Tensor {
    let n: u64 = shape.iter().product();
    let size = if dtype == DType::Int64 { 8 } else { 4 };
    Tensor::inline(name, dtype, shape.to_vec(), vec![0; (n * size) as usize])
}

fn silero(input: &[u64], state: &[u64]) -> Vec<Tensor> {
    vec![
        zeros("input", DType::Float32, input),
        zeros("state", DType::Float32, state),
        Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
    ]
}

fn sigmoid_input() -> Tensor {
    f32_tensor("x", &[3, 4, 5], &random_f32(60, 3))
}

/// Regression (issue 19, item 1): Silero VAD with a zero-size batch passed validation and
/// ONNX Runtime's LSTM called `std::terminate`, killing the daemon with every client's
/// requests. Inputs with a zero-sized dimension are refused before any session sees them,
/// unless the model opts in; dimensions beyond ONNX Runtime's int64 are refused too.
#[test]
fn inputs_that_abort_onnx_runtime_never_reach_a_session() {
    let _serial = serial();
    let repo = repo_with(&["silero_vad"]);
    repo.link("digits_empty_ok", 1, "digits")
        .settings("digits_empty_ok", "allow-empty-inputs = true\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    let mut c = nobody(&d);
    let e = refused(
        infer(&mut c, 1, "silero_vad", silero(&[0, 512], &[2, 0, 128])),
        ErrorCode::ShapeMismatch,
    );
    assert!(
        e.message.contains("'input'") && e.message.contains("dimension 0"),
        "the refusal names the input and the dimension: {e}"
    );
    // One empty input is enough to be refused.
    refused(
        infer(&mut c, 2, "silero_vad", silero(&[1, 512], &[2, 0, 128])),
        ErrorCode::ShapeMismatch,
    );
    // Dimensions ONNX Runtime cannot represent (above i64::MAX; zero elements in all).
    refused(
        infer(&mut c, 3, "silero_vad", silero(&[1 << 63, 0], &[2, 1, 128])),
        ErrorCode::TensorTooLarge,
    );
    // The model still serves well-formed requests.
    match infer(&mut c, 4, "silero_vad", silero(&[1, 512], &[2, 1, 128])) {
        Outcome::Ok(Reply::Infer(r)) => assert_eq!(r.outputs[0].shape, vec![1, 1]),
        other => panic!("{other:?}"),
    }
    // A model that opts in gets empty inputs through validation (ONNX Runtime then refuses
    // this one with an error of its own, which is fine: it does not abort).
    let answer = infer(
        &mut c,
        5,
        "digits_empty_ok",
        vec![zeros("input", DType::Float32, &[0, 64])],
    );
    if let Outcome::Err(e) = answer {
        assert_ne!(e.kind(), Some(ErrorCode::ShapeMismatch), "{e}");
    }
    drop(c);

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// Issue 19, item 10: dynamic dimensions have per-model limits (model.toml `max-dims`, by
/// default derived from the warmup shapes with a floor), shown by `model_info`, and a request
/// over them is refused naming the limit.
#[test]
fn request_shapes_are_bounded_per_model() {
    let _serial = serial();
    let repo = repo_with(&["ppocr_det"]);
    repo.link("det_small", 1, "ppocr_det")
        .settings("det_small", "max-dims = { x = [4, 3, 640, 640] }\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    let info = d.client_inline().model_info("ppocr_det", None).unwrap();
    assert_eq!(
        info.inputs[0].max_dims,
        vec![2048, 3, 2048, 2048],
        "{info:?}"
    );
    let info = d.client_inline().model_info("det_small", None).unwrap();
    assert_eq!(info.inputs[0].max_dims, vec![4, 3, 640, 640]);
    let info = d.client_inline().model_info("digits", None).unwrap();
    assert_eq!(info.inputs[0].max_dims, vec![2048, 64]);

    let mut c = nobody(&d);
    let e = refused(
        infer(
            &mut c,
            1,
            "ppocr_det",
            vec![zeros("x", DType::Float32, &[1, 3, 32, 4096])],
        ),
        ErrorCode::TensorTooLarge,
    );
    assert!(
        e.message.contains("dimension 3")
            && e.message.contains("2048")
            && e.message.contains("max-dims"),
        "the refusal names the dimension, the limit and how to raise it: {e}"
    );
    refused(
        infer(
            &mut c,
            2,
            "det_small",
            vec![zeros("x", DType::Float32, &[1, 3, 672, 64])],
        ),
        ErrorCode::TensorTooLarge,
    );
    refused(
        infer(
            &mut c,
            3,
            "digits",
            vec![zeros("input", DType::Float32, &[4096, 64])],
        ),
        ErrorCode::TensorTooLarge,
    );
    match infer(
        &mut c,
        4,
        "det_small",
        vec![zeros("x", DType::Float32, &[1, 3, 640, 64])],
    ) {
        Outcome::Ok(_) => {}
        other => panic!("{other:?}"),
    }
    drop(c);

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// Regression (issue 19, item 10): one detector request with a large image grew ONNX
/// Runtime's arena by hundreds of MiB and the daemon kept it, unaccounted. Memory a run needs
/// beyond what the warmup shapes needed is given back once the model's worker is idle.
#[test]
fn a_limit_sized_request_gives_its_memory_back() {
    let _serial = serial();
    let repo = repo_with(&["ppocr_det"]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let mut c = nobody(&d);
    // A request of an ordinary size first, so what is measured is what the large one adds.
    match infer(
        &mut c,
        1,
        "ppocr_det",
        vec![zeros("x", DType::Float32, &[1, 3, 320, 320])],
    ) {
        Outcome::Ok(_) => {}
        other => panic!("{other:?}"),
    }
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    let side = 2048;
    let x = f32_tensor(
        "x",
        &[1, 3, side, side],
        &random_f32(3 * (side * side) as usize, 11),
    );
    let started = Instant::now();
    match infer(&mut c, 2, "ppocr_det", vec![x]) {
        Outcome::Ok(Reply::Infer(r)) => assert_eq!(r.outputs[0].shape, vec![1, 1, side, side]),
        other => panic!("{other:?}"),
    }
    eprintln!(
        "{side}x{side} detector request: {:?}, RSS {} MiB before, {} MiB after",
        started.elapsed(),
        before.rss >> 20,
        rss(d.pid()) >> 20
    );
    drop(c);
    // Given back after a second of idleness (`runtime::ARENA_IDLE`); the bystander goes on.
    std::thread::sleep(Duration::from_secs(2));

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 64 << 20);
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
    repo.link(&linked, 1, "sigmoid")
        .link(&piped, 1, "mul_1")
        .write("broken", 1, b"not a model");
    // The shared temporary directory is where the daemon would write, as it did.
    let mut d = TestDaemon::start_env(
        repo.path(),
        &[("TMPDIR", &tmp.display().to_string())],
        "preload = [\"digits\"]\n",
        &["--socket-mode", "0666"],
    );
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
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
    refused(
        ask(&mut admin, 3, Request::Load(model_ref("broken"))),
        ErrorCode::LoadFailed,
    );

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

    // Its own directory: private while it runs, gone once it stops.
    let log = d.log_text();
    let private = log
        .lines()
        .find(|l| l.contains("private directory"))
        .and_then(|l| l.split("dir=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(PathBuf::from)
        .expect("the daemon logs its private directory");
    assert!(private.starts_with(&tmp), "{}", private.display());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&private).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "{}", private.display());
    let kept: Vec<_> = std::fs::read_dir(&private)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(kept.is_empty(), "profiles are removed once read: {kept:?}");
    assert!(d.terminate().success());
    assert!(!private.exists(), "{} is left behind", private.display());
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
    // The request that waited for the stuck load is answered, not dropped with its
    // connection.
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = c.read_response();
    assert_eq!(r.id, 3);
    let e = refused(r.outcome, ErrorCode::ShuttingDown);
    assert!(e.message.contains("shutting down"), "{e}");
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

/// An index input in the arena that the peer rewrites while ONNX Runtime runs on it. ORT's
/// `Gather` checks every index, then reads them again to copy: read straight from the arena,
/// an index made huge between the two reads was used unchecked, reading far outside the
/// table (the daemon crashed, or answered with bytes of its own memory). Integer inputs are
/// copied out of the arena before a run: every answer is the table's values for indices the
/// run saw, or the error for an index out of range.
#[test]
fn an_index_rewritten_in_the_arena_during_the_run_is_never_used_unchecked() {
    use rxd_protocol::ArenaRef;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _serial = serial();
    let repo = repo_with(&[]);
    // Large enough not to be copied for coalescing's key (16 KiB), so it runs from the arena.
    const N: u64 = 1 << 16;
    repo.write("gather", 1, &gather_model())
        .settings("gather", &format!("max-dims = {{ index = [{N}] }}\n"));
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);

    let mut c = connect_as_nobody(&d.socket);
    let (_, fd) = c.handshake_arena(N * 8).unwrap();
    let map =
        Arc::new(rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), (N * 8) as usize).unwrap());
    let bytes = |v: i64| -> Vec<u8> {
        (0..N)
            .flat_map(|i| ((i as i64 + v) % 4 + v * 1_000_000_000_000).to_le_bytes())
            .collect()
    };
    let (valid, huge) = (bytes(0), bytes(1 << 20));
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (map, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                map.copy_in(0, &valid).unwrap();
                map.copy_in(0, &huge).unwrap();
            }
            map.copy_in(0, &valid).unwrap();
        })
    };
    let index = Tensor {
        name: "index".into(),
        dtype: DType::Int64,
        shape: vec![N],
        data: TensorData::Arena(ArenaRef {
            offset: 0,
            len: N * 8,
        }),
    };
    let (mut answered, mut refused_runs) = (0, 0);
    for id in 1..=300 {
        match infer(&mut c, id, "gather", vec![index.clone()]) {
            Outcome::Ok(Reply::Infer(r)) => {
                let TensorData::Inline(b) = &r.outputs[0].data else {
                    panic!("an inline answer: {:?}", r.outputs[0].shape)
                };
                assert_eq!(b.len() as u64, N * 4);
                for v in b.chunks_exact(4) {
                    let v = f32::from_le_bytes(v.try_into().unwrap());
                    assert!(
                        [10.0, 20.0, 30.0, 40.0].contains(&v),
                        "a value from outside the table: {v}"
                    );
                }
                answered += 1;
            }
            Outcome::Err(e) => {
                assert_eq!(e.kind(), Some(ErrorCode::InferenceFailed), "{e}");
                refused_runs += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    // Both kinds happen, or the flipper never raced the runs.
    assert!(
        answered > 0 && refused_runs > 0,
        "{answered} answered, {refused_runs} refused"
    );
    drop(c);

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// Integer division of a request's values: ONNX Runtime's `Div`/`Mod` kernels trap on the
/// type's minimum divided by −1 (SIGFPE: the daemon died with every client's requests). Each
/// such node is guarded at load; the pair answers what two's complement makes of it (the
/// minimum for `Div`, 0 for `Mod`), in the main graph and inside an `If` branch alike, and
/// a zero divisor stays ORT's error. `STFT` divides by its frame length unchecked: a request's
/// 0 there is answered ORT's zero-divisor error too.
#[test]
fn integer_division_by_minus_one_is_answered_not_fatal() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let models = [
        ("div32", division_model("Div", 6, None, false, 17)),
        ("mod64", division_model("Mod", 7, None, false, 17)),
        ("branch64", division_model("Div", 7, None, true, 17)),
        ("stft", stft_model(7)),
    ];
    for (name, bytes) in &models {
        repo.write(name, 1, bytes);
    }
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let mut c = nobody(&d);
    let cases = [
        (
            "div32",
            DType::Int32,
            i64::from(i32::MIN),
            i64::from(i32::MIN),
        ),
        ("mod64", DType::Int64, i64::MIN, 0),
        ("branch64", DType::Int64, i64::MIN, i64::MIN),
    ];
    let mut id = 0;
    for (model, dtype, a, want) in cases {
        let inputs = |b: i64| {
            let mut v = vec![
                int_tensor("a", dtype, &[3], &[a, 7, -9]),
                int_tensor("b", dtype, &[3], &[b, -1, 2]),
            ];
            if model.starts_with("branch") {
                v.push(Tensor::inline("c", DType::Bool, vec![1], vec![1]));
            }
            v
        };
        id += 1;
        let Reply::Infer(r) = ok(infer(&mut c, id, model, inputs(-1))) else {
            panic!("an inference answer")
        };
        assert!(matches!(r.outputs[0].data, TensorData::Inline(_)));
        let got = int_values(&r.outputs[0]);
        let rest = if model.starts_with("mod") {
            [0, 1]
        } else {
            [-7, -4]
        };
        assert_eq!(got, vec![want, rest[0], rest[1]], "{model}");
        id += 1;
        let e = refused(
            infer(&mut c, id, model, inputs(0)),
            ErrorCode::InferenceFailed,
        );
        assert!(e.message.contains("by zero"), "{model}: {e}");
    }
    let stft = |length: i64| {
        vec![
            f32_tensor("x", &[1, 16, 1], &random_f32(16, 8)),
            int_tensor("step", DType::Int64, &[], &[3]),
            int_tensor("length", DType::Int64, &[], &[length]),
        ]
    };
    let e = refused(
        infer(&mut c, 100, "stft", stft(0)),
        ErrorCode::InferenceFailed,
    );
    assert!(e.message.contains("by zero"), "{e}");
    let Reply::Infer(r) = ok(infer(&mut c, 101, "stft", stft(4))) else {
        panic!("an inference answer")
    };
    assert_eq!(
        r.outputs,
        Reference::from_bytes(&stft_model(7)).run(&stft(4))
    );
    drop(c);
    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// A request's values, not its size, can set what a run costs: here a `Loop`'s trip count. A
/// few bytes asking for 10^15 iterations held a worker for good (the scheduler expects by
/// size), until the watchdog had systemd restart the daemon with every user's requests. Runs
/// holding a non-admin's request are now stopped at half of `watchdog-stuck-secs` (2 s here):
/// the request is answered `inference_failed` saying so; requests batched with it are answered
/// as if it had not been there; another user on the same model waits at most about one limit
/// per stopped run ahead of it; each of a user's stops halves its own limit (not another
/// user's); an admin's run is not limited; the daemon goes on.
#[test]
fn a_run_made_endless_by_a_requests_values_is_stopped_at_the_run_limit() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.write("spin", 1, &loop_model());
    repo.write("idle", 1, &empty_loop_model());
    let limit = Duration::from_secs(2);
    let mut d = shared_daemon(repo.path(), "watchdog-stuck-secs = 4\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let spin = |x: &[f32], steps: &[i64]| {
        let n = x.len() as u64;
        vec![
            f32_tensor("x", &[n], x),
            int_tensor("steps", DType::Int64, &[n], steps),
        ]
    };
    let mut reference = Reference::from_bytes(&loop_model());
    // Another user of the same model (an admin: the test's uid), sending honest requests all
    // along, each checked against ONNX Runtime in-process.
    let victim_inputs = spin(&[1.5, -2.0, 0.25], &[3, 3, 3]);
    let victim_want = reference.run(&victim_inputs);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victim = {
        let (socket, stop) = (d.socket.clone(), stop.clone());
        let (inputs, want) = (victim_inputs.clone(), victim_want.clone());
        std::thread::spawn(move || {
            let c = rxd_client::blocking::Client::connect_with(
                &socket,
                rxd_client::ClientOptions::inline_only(),
            )
            .unwrap();
            let (mut served, mut worst) = (0u32, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let out = c
                    .infer("spin", inputs.clone())
                    .expect("the victim is served");
                worst = worst.max(t.elapsed());
                assert_eq!(out, want, "the victim's answer");
                served += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (served, worst)
        })
    };
    let mut c = nobody(&d);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let endless = |x: f32| spin(&[x], &[1_000_000_000_000_000]);
    // Alone: stopped at the limit, with a message saying why.
    let t = Instant::now();
    let e = refused(
        infer(&mut c, 1, "spin", endless(1.0)),
        ErrorCode::InferenceFailed,
    );
    let took = t.elapsed();
    assert!(e.message.contains("stopped after"), "{e}");
    assert!(
        took >= limit - Duration::from_millis(100) && took < limit * 3,
        "stopped after {took:?} (limit {limit:?})"
    );
    // A loop whose body runs no node (where ORT never looked at the flag; the worker stayed
    // stuck for good): stopped alike, the model's other requests answered.
    let t = Instant::now();
    let e = refused(
        infer(&mut c, 2, "idle", endless(1.0)),
        ErrorCode::InferenceFailed,
    );
    assert_eq!(stopped_after(&e), limit, "{e}");
    assert!(t.elapsed() < limit * 3, "stopped after {:?}", t.elapsed());
    let x = spin(&[1.5, -2.0], &[7, 7]);
    let Reply::Infer(r) = ok(infer(&mut c, 3, "idle", x.clone())) else {
        panic!("an inference answer")
    };
    assert_eq!(
        r.outputs,
        Reference::from_bytes(&empty_loop_model()).run(&x)
    );
    // Pipelined among honest requests of the same user (they batch along `n`, and a stopped
    // batch's requests run again alone): each honest one answered exactly, each endless one
    // stopped, all within a batch's bound.
    let honest = spin(&[4.0], &[3]);
    let honest_want = reference.run(&honest);
    let t = Instant::now();
    for id in 10..16u64 {
        let inputs = if id.is_multiple_of(2) {
            endless(id as f32)
        } else {
            honest.clone()
        };
        c.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new("spin", inputs)),
        });
    }
    let mut answered = std::collections::BTreeSet::new();
    for _ in 10..16 {
        let r = c.read_response();
        assert!(answered.insert(r.id), "a second answer to {}", r.id);
        if r.id.is_multiple_of(2) {
            let e = refused(r.outcome, ErrorCode::InferenceFailed);
            assert!(e.message.contains("stopped after"), "{e}");
        } else {
            let Reply::Infer(a) = ok(r.outcome) else {
                panic!("an inference answer")
            };
            assert_eq!(
                a.outputs, honest_want,
                "an honest request beside endless ones"
            );
        }
    }
    // Three endless runs: each batch stopped at a limit, and its requests run alone.
    assert!(t.elapsed() < limit * 9, "took {:?}", t.elapsed());
    // Its stops (two at least by now) shorten its own limit...
    let e = refused(
        infer(&mut c, 20, "spin", endless(2.0)),
        ErrorCode::InferenceFailed,
    );
    assert!(stopped_after(&e) <= limit / 2, "{e}");
    // ...not another user's. Its honest request that takes longer than a share of anything
    // is batched with its endless ones (behind an admin's run that keeps the worker busy
    // while they arrive) and answered: each runs alone with its own limit.
    let mut a = admin(&d);
    a.stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let t = Instant::now();
    ok(infer(&mut a, 1, "spin", spin(&[0.0], &[200_000])));
    let per_step = t.elapsed().as_secs_f64() / 200_000.0;
    let steps_for = |part: f64| (limit.as_secs_f64() * part / per_step) as i64;
    let (stream, _helper) = connect_as_with(&d.socket, NOBODY - 1, NOBODY - 1, &[], None);
    let mut other = RawConn { stream };
    other.handshake().unwrap();
    let frame = |id: u64, inputs: Vec<Tensor>| RequestFrame {
        id,
        body: Request::Infer(InferRequest::new("spin", inputs)),
    };
    a.send(&frame(2, spin(&[0.0], &[steps_for(0.5)])));
    std::thread::sleep(Duration::from_millis(50));
    other.send(&frame(1, spin(&[0.0], &[steps_for(0.6)])));
    other.send(&frame(2, endless(3.0)));
    other.send(&frame(3, endless(4.0)));
    ok(a.read_response().outcome);
    let mut limits = Vec::new();
    for _ in 0..3 {
        let r = other.read_response();
        match r.id {
            // x = 0: zeros after any number of doublings, as ORT in-process says of 3.
            1 => {
                let Reply::Infer(r) = ok(r.outcome) else {
                    panic!("an inference answer")
                };
                assert_eq!(r.outputs, reference.run(&spin(&[0.0], &[3])));
            }
            _ => limits.push(stopped_after(&refused(
                r.outcome,
                ErrorCode::InferenceFailed,
            ))),
        }
    }
    limits.sort();
    assert_eq!(limits, [limit / 2, limit], "the other user's stops");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, worst) = victim.join().unwrap();
    assert!(served > 0, "the victim was never served");
    // Behind each stopped batch at most: its limit, and its requests alone (a user's endless
    // ones about two limits in all, each of its stops halving its limit).
    assert!(
        worst < limit * 4 + Duration::from_secs(2),
        "the other user waited {worst:?}"
    );
    // An admin's run is not limited: one that takes 1.75 limits is answered (the
    // watchdog would call it stuck at two).
    let t = Instant::now();
    let Reply::Infer(r) = ok(infer(&mut a, 3, "spin", spin(&[0.0], &[steps_for(1.75)]))) else {
        panic!("an inference answer")
    };
    assert!(
        t.elapsed() > limit,
        "the admin's run took {:?}",
        t.elapsed()
    );
    assert_eq!(r.outputs, reference.run(&spin(&[0.0], &[3])));
    drop((c, other, a));
    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, limit, 64 << 20);
}

/// One operator sized by a request's values runs to its end whatever the run limit (ONNX
/// Runtime looks at the stop flag between operators), so its stop comes late. A user whose
/// run ended a whole limit or more past its limit is barred from the model's workers for
/// ten minutes: its requests there are answered at once, unrun, saying why — while its
/// requests to other models, and other users' to this one, are served. Before, each of its
/// requests held a worker for as long as its one `MatMul` took (25.9 s against a 2 s limit).
#[test]
fn a_user_whose_run_overran_its_limit_in_one_operator_is_barred_from_the_model() {
    let _serial = serial();
    let repo = repo_with(&["sigmoid"]);
    repo.write("matmul", 1, &matmul_model());
    let limit = Duration::from_secs(1);
    let d = shared_daemon(repo.path(), "watchdog-stuck-secs = 2\n", &[]);
    let shape = |k: i64| vec![int_tensor("shape", DType::Int64, &[2], &[k, k])];
    let mut reference = Reference::from_bytes(&matmul_model());
    let small = shape(64);
    let small_want = reference.run(&small);
    let mut c = nobody(&d);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // Each stop halves the user's limit, so within three the operator (~1.3 s on two cores
    // of a fast machine, k = 6000) outlasts two limits, wherever the test runs.
    let mut barred = None;
    for (i, id) in (1..=3u64).enumerate() {
        let e = refused(
            infer(&mut c, id * 2, "matmul", shape(8000)),
            ErrorCode::InferenceFailed,
        );
        let at = stopped_after(&e);
        let took = took_before_stop(&e);
        assert!(at <= limit / (1 << i), "stop {id}: {e}");
        let next = infer(&mut c, id * 2 + 1, "matmul", small.clone());
        if took >= at * 2 {
            let e = refused(next, ErrorCode::InferenceFailed);
            assert!(e.message.contains("refused unrun"), "{e}");
            assert!(
                e.message
                    .contains(&format!("ran {:.1} s", took.as_secs_f64())),
                "the bar names the run: {e}"
            );
            barred = Some(id);
            break;
        }
        // Stopped less than a limit late: the user is not barred.
        let Reply::Infer(r) = ok(next) else {
            panic!("an inference answer")
        };
        assert_eq!(r.outputs, small_want);
    }
    assert!(barred.is_some(), "never barred");
    // Barred again and again, at once, for as long as the bar lasts.
    let t = Instant::now();
    for id in 100..110u64 {
        let e = refused(
            infer(&mut c, id, "matmul", shape(8000)),
            ErrorCode::InferenceFailed,
        );
        assert!(e.message.contains("refused unrun"), "{e}");
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The user's other models are served; so is another user on this one (an admin here).
    let x = vec![sigmoid_input()];
    let Reply::Infer(r) = ok(infer(&mut c, 200, "sigmoid", x.clone())) else {
        panic!("an inference answer")
    };
    assert_eq!(r.outputs, Reference::new(&model_file("sigmoid")).run(&x));
    let mut a = admin(&d);
    let Reply::Infer(r) = ok(infer(&mut a, 1, "matmul", small.clone())) else {
        panic!("an inference answer")
    };
    assert_eq!(r.outputs, small_want);
}

/// A barred user's requests already queued do not each hold the worker: batched together and
/// stopped, they run again alone, and the first of those runs that comes late bars the user —
/// the rest are refused unrun (they each ran for the whole operator before: 23.6 s of the
/// worker for six requests in a red-team run). The bar outlives the model's unloading.
#[test]
fn a_barred_users_queued_requests_do_not_each_hold_the_worker() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.write("bmm", 1, &batched_matmul_model());
    let d = shared_daemon(repo.path(), "watchdog-stuck-secs = 2\n", &[]);
    let pair = |x: f32, k: i64| {
        vec![
            f32_tensor("x", &[1], &[x]),
            int_tensor("k", DType::Int64, &[1], &[k]),
        ]
    };
    let mut a = admin(&d);
    a.stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let y = |r: Reply| match r {
        Reply::Infer(r) => r.outputs[0].clone(),
        other => panic!("an inference answer, got {other:?}"),
    };
    assert_eq!(
        y(ok(infer(&mut a, 1, "bmm", pair(2.5, 8)))),
        f32_tensor("y", &[1], &[2.5])
    );
    let mut c = nobody(&d);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // An admin's run (not limited) keeps the worker busy while the user's requests queue.
    let rows = 2048u64;
    let mut k = vec![0i64; rows as usize];
    k[0] = 5000;
    a.send(&RequestFrame {
        id: 2,
        body: Request::Infer(InferRequest::new(
            "bmm",
            vec![
                f32_tensor("x", &[rows], &vec![0.5; rows as usize]),
                int_tensor("k", DType::Int64, &[rows], &k),
            ],
        )),
    });
    std::thread::sleep(Duration::from_millis(200));
    for id in 1..=6u64 {
        c.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new("bmm", pair(id as f32, 6500))),
        });
    }
    assert_eq!(
        y(ok(a.read_response().outcome)),
        f32_tensor("y", &[rows], &vec![0.5; rows as usize])
    );
    let (mut stopped, mut barred) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 1..=6 {
        let r = c.read_response();
        assert!(answered.insert(r.id), "a second answer to {}", r.id);
        let e = refused(r.outcome, ErrorCode::InferenceFailed);
        if e.message.starts_with("stopped after") {
            stopped += 1;
        } else {
            assert!(e.message.contains("refused unrun"), "{e}");
            barred += 1;
        }
    }
    // Each stop halves the user's limit: by the second run alone, at the latest, one came a
    // whole limit late.
    assert!(
        stopped <= 2 && barred >= 4,
        "{stopped} stopped, {barred} refused"
    );
    // Unloaded and loaded again: still barred; an admin is served.
    let model = ModelRef {
        model: "bmm".into(),
        version: None,
    };
    ok(ask(&mut a, 3, Request::Unload(model.clone())));
    ok(ask(&mut a, 4, Request::Load(model)));
    let e = refused(
        infer(&mut c, 10, "bmm", pair(1.0, 8)),
        ErrorCode::InferenceFailed,
    );
    assert!(e.message.contains("refused unrun"), "{e}");
    assert_eq!(
        y(ok(infer(&mut a, 5, "bmm", pair(1.0, 8)))),
        f32_tensor("y", &[1], &[1.0])
    );
}

/// What a stopped run took, from its error ("stopped after 6.2 s at the run limit of ...").
#[track_caller]
fn took_before_stop(e: &WireError) -> Duration {
    let secs = e
        .message
        .strip_prefix("stopped after ")
        .and_then(|m| m.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("not a stopped run: {e}"));
    Duration::from_millis((secs * 1000.0).round() as u64)
}

/// The limit a run was stopped at, from its error ("stopped after 2.0 s at the run limit of
/// 2.0 s: ...").
#[track_caller]
fn stopped_after(e: &WireError) -> Duration {
    let secs = e
        .message
        .strip_prefix("stopped after ")
        .and_then(|m| m.split_once("at the run limit of "))
        .and_then(|(_, m)| m.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("not a stopped run: {e}"));
    // Tenths of a second, as the message gives them.
    Duration::from_millis((secs * 1000.0).round() as u64)
}

/// A control request read while the connection's control slots are all taken (four loads
/// waiting for a load that hangs) waits for a slot with its id in flight. When the daemon
/// stops meanwhile, it is answered `shutting_down` like the loads — it was once dropped
/// unanswered with the read loop; and the load that started the hung one (carried out by its
/// request itself) and a non-admin's `model_info` that started another were not answered
/// before the load timed out.
#[test]
fn a_control_request_waiting_for_a_slot_is_answered_at_shutdown() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.link("hang", 1, "sigmoid")
        .link("hang_info", 1, "sigmoid");
    let mut d = shared_daemon_env(
        repo.path(),
        &[("RXD_TEST_LOAD_HANG", "hang")],
        "preload = [\"digits\"]\nload-timeout-secs = 600\nshutdown-grace-secs = 3\n",
        &[],
    );
    let mut admin = admin(&d);
    for id in 1..=4 {
        admin.send(&RequestFrame {
            id,
            body: Request::Load(model_ref("hang")),
        });
    }
    admin.send(&RequestFrame {
        id: 5,
        body: Request::Status,
    });
    let mut stranger = nobody(&d);
    stranger.send(&RequestFrame {
        id: 1,
        body: Request::ModelInfo(model_ref("hang_info")),
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = d.terminate();
    assert!(status.success(), "{status}");
    stranger
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = stranger.read_response();
    assert_eq!(r.id, 1);
    refused(r.outcome, ErrorCode::ShuttingDown);
    let answers = read_all(&mut admin, Duration::from_secs(5));
    let mut ids: Vec<u64> = answers.iter().map(|a| a.id).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3, 4, 5], "{answers:?}");
    for a in answers {
        refused(a.outcome, ErrorCode::ShuttingDown);
    }
}

/// A user asking for model after model, with room for one, made every load evict the model
/// another party was using (idle between its requests, so evictable), and that party's
/// every request paid a reload. A load a non-admin's request starts now spares the versions
/// used in the last 10 s: it is refused `over_budget` (or `busy`, at the user's load rate)
/// and the other party's model stays resident.
#[test]
fn a_user_cannot_evict_a_model_another_is_using() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.link("x", 1, "digits")
        .link("a", 1, "digits")
        .link("b", 1, "digits");
    // What one of them holds, measured alone.
    let one = {
        let d = TestDaemon::start_with(repo.path(), &[], "preload = ['x']\n");
        d.summaries()["x"].memory_bytes.expect("measured")
    };
    // Room for one of them, not two.
    let budget = one * 11 / 10;
    let mut d = shared_daemon(
        repo.path(),
        &format!("preload = ['x']\nmemory-budget = {budget}\n"),
        &[],
    );
    let before = before(&d);
    let (input, _) = digits_case(1);
    let x = move || vec![input.clone()];
    let victim = {
        let x = x.clone();
        let c = d.client_inline();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut slowest = Duration::ZERO;
            while start.elapsed() < Duration::from_secs(6) {
                let t = Instant::now();
                c.infer("x", x()).unwrap();
                slowest = slowest.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            slowest
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut attacker = nobody(&d);
    let (mut id, mut refused_b) = (1, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        for m in ["a", "b"] {
            match infer(&mut attacker, id, m, x()) {
                Outcome::Err(e) => {
                    assert!(
                        matches!(e.kind(), Some(ErrorCode::OverBudget | ErrorCode::Busy)),
                        "{e}"
                    );
                    refused_b += 1;
                }
                Outcome::Ok(_) => {}
            }
            id += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let slowest = victim.join().unwrap();
    let s = d.summaries();
    eprintln!(
        "one {one}, budget {budget}; x evictions {}, b refused {refused_b}, the victim's \
         slowest {slowest:?}; {:?}",
        s["x"].evictions,
        s.iter()
            .map(|(n, m)| (n, m.state, m.memory_bytes, m.evictions))
            .collect::<Vec<_>>()
    );
    assert_eq!(s["x"].evictions, 0, "{:?}", s["x"]);
    assert!(refused_b > 0);
    drop(attacker);
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}
