//! Issue 2: the serving core, against the real rxd binary, real ONNX Runtime, real models.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use rxd_client::{ClientError, DType, ErrorCode, Tensor, npy};
use rxd_e2e::*;
use rxd_protocol::{Hello, InferRequest, ModelState, Outcome, Reply, Request, RequestFrame, frame};

fn digits_inputs(rows: usize) -> Tensor {
    let all = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&all).unwrap()[..rows * 64 * 4].to_vec();
    Tensor::inline("input", DType::Float32, vec![rows as u64, 64], bytes)
}

fn code_of(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

#[test]
fn outputs_equal_in_process_ort_bit_for_bit() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("yolov8n", 1, "yolov8n")
        .link("silero_vad", 1, "silero_vad")
        .link("ppocr_cls", 1, "ppocr_cls");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();

    let audio: Vec<f32> = random_f32(512, 3).iter().map(|x| x * 2.0 - 1.0).collect();
    let cases: Vec<(&str, Vec<Tensor>)> = vec![
        ("digits", vec![digits_inputs(32)]),
        (
            "yolov8n",
            vec![f32_tensor(
                "images",
                &[1, 3, 320, 320],
                &random_f32(3 * 320 * 320, 1),
            )],
        ),
        (
            // Several inputs of different dtypes: f32 audio, f32 state, i64 sample rate.
            "silero_vad",
            vec![
                f32_tensor("input", &[1, 512], &audio),
                f32_tensor("state", &[2, 1, 128], &[0.0; 256]),
                Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
            ],
        ),
        (
            "ppocr_cls",
            vec![f32_tensor(
                "x",
                &[2, 3, 48, 192],
                &random_f32(2 * 3 * 48 * 192, 2),
            )],
        ),
    ];
    for (model, inputs) in cases {
        let got = c.infer(model, inputs.clone()).unwrap();
        let want = Reference::new(&model_file(model)).run(&inputs);
        assert_eq!(got.len(), want.len(), "{model}: output count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.name, w.name, "{model}");
            assert_eq!(g.dtype, w.dtype, "{model}/{}", g.name);
            assert_eq!(g.shape, w.shape, "{model}/{}", g.name);
            assert!(
                g.data == w.data,
                "{model}/{}: bytes differ from in-process ORT",
                g.name
            );
        }
    }
    // The digits model really classifies: labels agree with the test split's labels mostly.
    let out = c.infer("digits", vec![digits_inputs(32)]).unwrap();
    let labels = rxd_client::tensor::to_array::<i64>(&out[0]).unwrap();
    let truth = example_npy("digits_test_y.npy", "y");
    let truth = rxd_client::tensor::to_array::<i64>(&truth).unwrap();
    let right = labels
        .iter()
        .zip(truth.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert!(right >= 29, "only {right}/32 digits right");
}

#[test]
fn many_clients_with_pipelined_requests_each_get_their_own_answer() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .settings("digits", "instances = 2\n");
    let d = TestDaemon::start(repo.path(), &[]);
    // Expected answer for each of 64 distinct single-row inputs.
    let all = digits_inputs(64);
    let bytes = rxd_client::tensor::bytes(&all).unwrap().to_vec();
    let row = |i: usize| {
        Tensor::inline(
            "input",
            DType::Float32,
            vec![1, 64],
            bytes[i * 256..(i + 1) * 256].to_vec(),
        )
    };
    let mut reference = Reference::new(&model_file("digits"));
    let expected: Vec<Vec<Tensor>> = (0..64).map(|i| reference.run(&[row(i)])).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = d.socket.clone();
    let results = rt.block_on(async move {
        let mut clients = Vec::new();
        for client_no in 0..16usize {
            let socket = socket.clone();
            let rows: Vec<(usize, Tensor)> = (0..48)
                .map(|k| {
                    let i = (client_no * 7 + k * 5) % 64;
                    (i, row(i))
                })
                .collect();
            clients.push(tokio::spawn(async move {
                let c = rxd_client::Client::connect(&socket).await.unwrap();
                // All 48 requests of this client in flight at once on one connection.
                let futs = rows.into_iter().map(|(i, t)| {
                    let c = c.clone();
                    async move { (i, c.infer("digits", vec![t]).await) }
                });
                futures_join(futs.collect()).await
            }));
        }
        let mut all = Vec::new();
        for h in clients {
            all.extend(h.await.unwrap());
        }
        all
    });
    assert_eq!(results.len(), 16 * 48);
    for (i, r) in results {
        let got = r.unwrap();
        assert_eq!(got, expected[i], "answer for input {i} mixed up");
    }
    let s = d.client().status().unwrap();
    assert!(s.requests_total >= 16 * 48, "{s:?}");
    assert_eq!(s.requests_failed, 0);
}

/// Awaits all futures concurrently (no extra dependency).
async fn futures_join<F: std::future::Future + Send + 'static>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn bad_input_gets_its_error_code_and_the_daemon_keeps_serving() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("silero_vad", 1, "silero_vad");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let good = digits_inputs(1);

    assert_eq!(
        code_of(c.infer("nope", vec![good.clone()]).unwrap_err()),
        ErrorCode::UnknownModel
    );
    let wrong_dtype = Tensor::inline("input", DType::Float64, vec![1, 64], vec![0; 512]);
    assert_eq!(
        code_of(c.infer("digits", vec![wrong_dtype]).unwrap_err()),
        ErrorCode::DtypeMismatch
    );
    let wrong_rank = Tensor::inline("input", DType::Float32, vec![64], vec![0; 256]);
    assert_eq!(
        code_of(c.infer("digits", vec![wrong_rank]).unwrap_err()),
        ErrorCode::ShapeMismatch
    );
    let wrong_dim = Tensor::inline("input", DType::Float32, vec![1, 63], vec![0; 252]);
    assert_eq!(
        code_of(c.infer("digits", vec![wrong_dim]).unwrap_err()),
        ErrorCode::ShapeMismatch
    );
    let short = Tensor::inline("input", DType::Float32, vec![1, 64], vec![0; 255]);
    assert_eq!(
        code_of(c.infer("digits", vec![short]).unwrap_err()),
        ErrorCode::DataLengthMismatch
    );
    assert_eq!(
        code_of(c.infer("digits", vec![]).unwrap_err()),
        ErrorCode::MissingInput
    );
    let extra = Tensor::inline("bogus", DType::Float32, vec![1], vec![0; 4]);
    assert_eq!(
        code_of(c.infer("digits", vec![good.clone(), extra]).unwrap_err()),
        ErrorCode::UnknownInput
    );
    // Missing one of several inputs of a multi-input model.
    let only_audio = f32_tensor("input", &[1, 512], &[0.0; 512]);
    assert_eq!(
        code_of(c.infer("silero_vad", vec![only_audio]).unwrap_err()),
        ErrorCode::MissingInput
    );
    // A shape whose element count overflows.
    let huge = Tensor::inline("input", DType::Float32, vec![u64::MAX, 64], vec![]);
    assert_eq!(
        code_of(c.infer("digits", vec![huge]).unwrap_err()),
        ErrorCode::TensorTooLarge
    );
    // The same connection still works.
    assert_eq!(c.infer("digits", vec![good.clone()]).unwrap().len(), 2);

    // Garbage body in a well-formed frame: error, connection stays usable.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    let garbage = b"\xc1\xc1\xc1 not msgpack";
    let mut f = (garbage.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(garbage);
    raw.send_raw(&f).unwrap();
    let r = raw.read_response();
    assert_eq!(r.id, 0);
    assert!(
        matches!(r.outcome, Outcome::Err(ref e) if e.kind() == Some(ErrorCode::MalformedMessage))
    );
    // A decodable id with a bad body is answered under its id.
    #[derive(serde::Serialize)]
    struct Bad {
        id: u64,
        body: &'static str,
    }
    raw.send(&Bad {
        id: 77,
        body: "infer please",
    });
    let r = raw.read_response();
    assert_eq!(r.id, 77);
    assert!(
        matches!(r.outcome, Outcome::Err(ref e) if e.kind() == Some(ErrorCode::MalformedMessage))
    );
    // Request id 0 is reserved.
    raw.send(&RequestFrame {
        id: 0,
        body: Request::Status,
    });
    let r = raw.read_response();
    assert!(matches!(r.outcome, Outcome::Err(ref e) if e.kind() == Some(ErrorCode::BadRequestId)));
    raw.send(&RequestFrame {
        id: 5,
        body: Request::Status,
    });
    assert!(matches!(
        raw.read_response().outcome,
        Outcome::Ok(Reply::Status(_))
    ));

    // Oversize frame: error under id 0, then the daemon closes this connection.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    raw.send_raw(&u32::MAX.to_le_bytes()).unwrap();
    let r = raw.read_response();
    assert_eq!(r.id, 0);
    assert!(matches!(r.outcome, Outcome::Err(ref e) if e.kind() == Some(ErrorCode::FrameTooLarge)));
    assert!(
        raw.read_body().is_err(),
        "connection should be closed after an oversize frame"
    );

    // Wrong protocol version in the handshake.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.send(&Hello {
        protocol: 99,
        client: "old".into(),
        arena_bytes: 0,
        ring: None,
    });
    let reply: rxd_protocol::HandshakeReply = frame::decode(&raw.read_body().unwrap()).unwrap();
    match reply {
        rxd_protocol::HandshakeReply::Error(e) => {
            assert_eq!(e.error.kind(), Some(ErrorCode::UnsupportedVersion));
            assert_eq!(e.supported, vec![1]);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Garbage instead of a handshake.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.send_raw(b"\x05\x00\x00\x00hello").unwrap();
    let reply: rxd_protocol::HandshakeReply = frame::decode(&raw.read_body().unwrap()).unwrap();
    assert!(
        matches!(reply, rxd_protocol::HandshakeReply::Error(ref e) if e.error.kind() == Some(ErrorCode::MalformedMessage))
    );

    // A request before the handshake.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.send(&RequestFrame {
        id: 1,
        body: Request::Status,
    });
    let reply: rxd_protocol::HandshakeReply = frame::decode(&raw.read_body().unwrap()).unwrap();
    assert!(
        matches!(reply, rxd_protocol::HandshakeReply::Error(ref e) if e.error.kind() == Some(ErrorCode::HandshakeRequired))
    );

    // After all that, a fresh client is served.
    let c2 = d.client();
    assert_eq!(c2.infer("digits", vec![good]).unwrap().len(), 2);
}

#[test]
fn clients_that_vanish_mid_request_leave_the_daemon_serving_and_leak_nothing() {
    let repo = Repo::new();
    repo.link("yolov8n", 1, "yolov8n")
        .link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let baseline = d.fd_targets().len();
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 9));
    for round in 0..5 {
        let mut raw = RawConn::connect(&d.socket).unwrap();
        raw.handshake().unwrap();
        for i in 0..10u64 {
            raw.send(&RequestFrame {
                id: i + 1,
                body: Request::Infer(InferRequest {
                    model: "yolov8n".into(),
                    version: None,
                    inputs: vec![image.clone()],
                    outputs: vec![],
                    output_regions: Vec::new(),
                    output_area: None,
                    priority: None,
                    timeout_ms: None,
                    inline_overflow: false,
                }),
            });
        }
        if round % 2 == 0 {
            // Half-written frame, then gone.
            raw.send_raw(&[200, 0, 0, 0, 1, 2]).unwrap();
        }
        drop(raw);
    }
    // Still serving.
    let c = d.client();
    assert_eq!(c.infer("digits", vec![digits_inputs(1)]).unwrap().len(), 2);
    drop(c);
    // Abandoned work drains; descriptors return to the baseline.
    let start = std::time::Instant::now();
    loop {
        let now = d.fd_targets().len();
        if now <= baseline {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fds {now} > baseline {baseline}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn admin_operations_need_admin_rights() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &["--socket-mode", "0666"]);
    // rxctl as an unprivileged user: a copy in a world-readable dir (the build dir may not be).
    let dir = tempfile::Builder::new()
        .prefix("rxctl-nobody")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rxctl = dir.path().join("rxctl");
    std::fs::copy(bin("rxctl"), &rxctl).unwrap();
    let as_nobody = |args: &[&str]| {
        // A fork in another test thread can briefly hold the fresh copy open for writing
        // (ETXTBSY on exec): retry.
        for _ in 0..50 {
            match std::process::Command::new(&rxctl)
                .env_clear()
                .env("RXD_SOCKET", &d.socket)
                .args(args)
                .uid(65534)
                .gid(65534)
                .output()
            {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
        panic!("rxctl copy stayed busy");
    };
    let out = as_nobody(&["unload", "digits"]);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission_denied"),
        "{out:?}"
    );
    let out = as_nobody(&["load", "digits"]);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    for args in [
        &["configure", "digits", "--max-batch-rows", "2"][..],
        &["pin", "digits"][..],
        &["unpin", "digits"][..],
    ] {
        let out = as_nobody(args);
        assert_eq!(out.status.code(), Some(77), "{args:?}: {out:?}");
    }
    // Reads are open to everyone who can connect.
    let out = as_nobody(&["models"]);
    assert!(out.status.success(), "{out:?}");
    // The model is still there; root (admin) can unload and load it.
    assert!(d.rxctl(&["unload", "digits"]).status.success());
    let c = d.client();
    let state = |c: &rxd_client::blocking::Client| {
        c.list_models()
            .unwrap()
            .into_iter()
            .find(|m| m.name == "digits")
            .unwrap()
            .state
    };
    assert_eq!(state(&c), ModelState::Available);
    // Unloaded is not gone: a request loads it again on demand (load-on-demand = true).
    c.infer("digits", vec![digits_inputs(1)]).unwrap();
    assert_eq!(state(&c), ModelState::Ready);
    // A model added to the repository after start can be loaded.
    repo.link("digits2", 1, "digits");
    let out = d.rxctl(&["load", "digits2"]);
    assert!(out.status.success(), "{out:?}");
    let out = d.rxctl(&["load", "digits"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        c.infer("digits2", vec![digits_inputs(1)]).unwrap(),
        c.infer("digits", vec![digits_inputs(1)]).unwrap()
    );
}

#[test]
fn a_corrupt_model_fails_alone_and_says_why() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .write("broken", 1, b"this is not an onnx model");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let models = c.list_models().unwrap();
    let broken = models.iter().find(|m| m.name == "broken").unwrap();
    assert_eq!(broken.state, ModelState::Failed);
    assert!(
        broken.error.as_deref().unwrap_or("").contains("model.onnx"),
        "{broken:?}"
    );
    assert_eq!(c.infer("digits", vec![digits_inputs(1)]).unwrap().len(), 2);
    assert_eq!(
        code_of(c.infer("broken", vec![digits_inputs(1)]).unwrap_err()),
        ErrorCode::ModelNotReady
    );
    let out = d.rxctl(&["models"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("broken") && text.contains("failed"), "{text}");
    let out = d.rxctl(&["health", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["state"], "degraded");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.rxctl(&["health", "--strict"]).status.code(), Some(2));
}

#[test]
fn sigterm_answers_every_accepted_request_then_exits_zero() {
    let repo = Repo::new();
    repo.link("yolov8n", 1, "yolov8n");
    let mut d = TestDaemon::start(repo.path(), &[]);
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 4));
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    let n = 20u64;
    let mut frames = Vec::new();
    for id in 1..=n {
        frame::encode_into(
            &RequestFrame {
                id,
                body: Request::Infer(InferRequest {
                    model: "yolov8n".into(),
                    version: None,
                    inputs: vec![image.clone()],
                    outputs: vec![],
                    output_regions: Vec::new(),
                    output_area: None,
                    priority: None,
                    timeout_ms: None,
                    inline_overflow: false,
                }),
            },
            &mut frames,
        )
        .unwrap();
    }
    raw.send_raw(&frames).unwrap();
    // Wait for the first answer: by then the daemon has read every frame written before it.
    let first = raw.read_response();
    std::thread::sleep(Duration::from_millis(100));
    let pid = d.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut ids = HashSet::from([first.id]);
    assert!(matches!(first.outcome, Outcome::Ok(Reply::Infer(_))));
    for _ in 1..n {
        let r = raw.read_response();
        assert!(
            matches!(r.outcome, Outcome::Ok(Reply::Infer(_))),
            "request {} failed: {:?}",
            r.id,
            r.outcome
        );
        ids.insert(r.id);
    }
    assert_eq!(ids.len() as u64, n);
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{}", d.log_text());
    assert!(!d.socket.exists(), "socket file removed on exit");
}

#[test]
fn check_config_names_the_bad_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rxd.toml");
    let run = |args: &[&str]| {
        std::process::Command::new(bin("rxd"))
            .env_clear()
            .arg("check-config")
            .arg("--config")
            .arg(&cfg)
            .arg("--ort-library")
            .arg(ort_library())
            .arg("--model-repository")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    std::fs::write(&cfg, "sokcet = '/tmp/x.sock'\n").unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sokcet"),
        "{out:?}"
    );
    std::fs::write(&cfg, "max-connections = 0\nsocket-mode = 'x'\n").unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max-connections") && err.contains("socket-mode"),
        "{err}"
    );
    std::fs::write(&cfg, "max-in-flight = 16\n").unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Serving with a bad config also exits 78, before binding anything.
    std::fs::write(&cfg, "sokcet = 1\n").unwrap();
    let sock = dir.path().join("s.sock");
    let out = std::process::Command::new(bin("rxd"))
        .env_clear()
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(!sock.exists());
    // Without any ORT library the error is clear, not a panic.
    std::fs::write(&cfg, "").unwrap();
    let out = std::process::Command::new(bin("rxd"))
        .env_clear()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .arg("--model-repository")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ORT_DYLIB_PATH"),
        "{out:?}"
    );
}

/// Socket inodes listed in one of /proc/net/{tcp,udp,...}.
fn inet_inodes() -> HashSet<String> {
    let mut set = HashSet::new();
    for f in [
        "tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6",
    ] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9) {
                set.insert(inode.to_string());
            }
        }
    }
    set
}

#[test]
fn the_daemon_opens_no_network_socket() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("yolov8n", 1, "yolov8n");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    for _ in 0..5 {
        c.infer("digits", vec![digits_inputs(4)]).unwrap();
    }
    let inet = inet_inodes();
    let sockets: Vec<String> = d
        .fd_targets()
        .into_iter()
        .filter_map(|t| {
            t.strip_prefix("socket:[")
                .map(|s| s.trim_end_matches(']').to_string())
        })
        .collect();
    assert!(
        !sockets.is_empty(),
        "the daemon has at least its listening socket"
    );
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    for s in sockets {
        assert!(!inet.contains(&s), "socket {s} is an internet socket");
        assert!(
            unix.lines()
                .any(|l| l.split_whitespace().nth(6) == Some(s.as_str())),
            "socket {s} is not a Unix socket"
        );
    }
    // And nothing under HOME: the daemon ran with no HOME and telemetry off.
    let environ = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ
            .split('\0')
            .any(|kv| kv == "ORT_DISABLE_TELEMETRY=1")
    );
}

#[test]
fn rxctl_infer_writes_npy_outputs_equal_to_in_process_ort() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let out_dir = d.dir.path().join("out");
    let input = repo_root().join("examples/data/digit.npy");
    let out = d.rxctl(&[
        "infer",
        "digits",
        "--input",
        &format!("input={}", input.display()),
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let input_t = npy::read("input", std::fs::File::open(&input).unwrap()).unwrap();
    let want = Reference::new(&model_file("digits")).run(&[input_t]);
    for w in want {
        let got = npy::read(
            &w.name,
            std::fs::File::open(out_dir.join(format!("{}.npy", w.name))).unwrap(),
        )
        .unwrap();
        assert_eq!(got, w);
    }
    let out = d.rxctl(&[
        "--json",
        "infer",
        "digits",
        "--input",
        &format!("input={}", input.display()),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["name"], "label");
    assert_eq!(v["outputs"][0]["values"][0], 7);
    // Exit codes scripts rely on.
    assert_eq!(d.rxctl(&["infer", "nope"]).status.code(), Some(1));
    assert_eq!(
        d.rxctl(&["infer", "digits", "--input", "input=/nonexistent.npy"])
            .status
            .code(),
        Some(65)
    );
    let gone = std::process::Command::new(bin("rxctl"))
        .args(["--socket", "/nonexistent/rxd.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(69));
    // Generated inputs when none are given.
    let out = d.rxctl(&["infer", "digits"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("probabilities float32 [1, 10]"));
}
