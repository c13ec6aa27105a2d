//! Attacks found by trying the hardened daemon as a hostile client would (a red-team pass after
//! the first fixes of issue 19): decoding amplification, repeated outputs, several users
//! keeping request memory, arenas held by one user, unread answers over many connections, and
//! loading versions the policy does not serve.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::{
    ArenaRef, DType, ErrorCode, InferRequest, ModelRef, Outcome, Request, RequestFrame, Tensor,
    TensorData,
};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A frame of `n` one-byte values inside an infer request's `outputs` (or, with `args_first`,
/// `args` before `op`, which a decoder must buffer whole before it knows the variant).
fn tiny_values_frame(n: u32, args_first: bool) -> Vec<u8> {
    let mut args = vec![0x83];
    args.extend_from_slice(&[0xa5, b'm', b'o', b'd', b'e', b'l', 0xa6]);
    args.extend_from_slice(b"digits");
    args.extend_from_slice(&[0xa6, b'i', b'n', b'p', b'u', b't', b's', 0x90]);
    args.extend_from_slice(&[0xa7, b'o', b'u', b't', b'p', b'u', b't', b's', 0xdd]);
    args.extend_from_slice(&n.to_be_bytes());
    args.extend(std::iter::repeat_n(0xa0, n as usize));
    let op = [0xa2, b'o', b'p', 0xa5, b'i', b'n', b'f', b'e', b'r'];
    let mut body = vec![
        0x82, 0xa2, b'i', b'd', 0x01, 0xa4, b'b', b'o', b'd', b'y', 0x82,
    ];
    let args_key = [0xa4, b'a', b'r', b'g', b's'];
    if args_first {
        body.extend_from_slice(&args_key);
        body.extend_from_slice(&args);
        body.extend_from_slice(&op);
    } else {
        body.extend_from_slice(&op);
        body.extend_from_slice(&args_key);
        body.extend_from_slice(&args);
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Red team 1: a 40 MiB frame of one-byte strings decoded into 24-byte `String`s (or buffered
/// `Content`) on the IO thread: 2–4.5 GiB and seconds of stall per frame.
#[test]
fn frames_of_millions_of_tiny_values_are_refused_before_decoding() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());
    for args_first in [false, true] {
        let mut c = connect_as_nobody(&d.socket);
        c.handshake().unwrap();
        c.send_raw(&tiny_values_frame(40 << 20, args_first))
            .unwrap();
        let r = c.read_response();
        assert_eq!(r.id, 0);
        assert_eq!(err_code(&r.outcome), Some(ErrorCode::MalformedMessage));
    }
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    let seen = bystander.stop();
    // The frames themselves (40 MiB each, read one at a time), nothing more.
    assert!(
        peak <= 96 * MIB,
        "decoding grew the daemon by {} MiB",
        peak / MIB
    );
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 96 * MIB);
}

/// Red team 3: an output named 1024 times was computed once and copied and encoded 1024 times
/// (one 20 MB request: 5.9 GiB), and one answer could exceed the frame limit.
#[test]
fn an_output_asked_for_many_times_is_refused_and_no_answer_exceeds_the_frame_limit() {
    let _serial = serial();
    let repo = repo_with(&["relu"]);
    let mut d = shared_daemon(repo.path(), "max-frame-bytes = \"4MiB\"\n", &[]);
    let b = before(&d);
    let mut c = connect_as_nobody(&d.socket);
    let (_, fd) = c.handshake_arena(8 * MIB).unwrap();
    let small = Tensor::inline("x", DType::Float32, vec![1, 4], vec![0; 16]);
    let mut req = InferRequest::new("relu", vec![small]);
    req.outputs = vec!["y".to_string(); 1024];
    c.send(&RequestFrame {
        id: 1,
        body: Request::Infer(req),
    });
    assert_eq!(
        err_code(&c.read_response().outcome),
        Some(ErrorCode::InvalidRequest)
    );
    // A 4 MiB input in the arena whose 4 MiB output is asked for inline: over the frame limit.
    let big = Tensor {
        name: "x".into(),
        dtype: DType::Float32,
        shape: vec![1024, 1024],
        data: TensorData::Arena(ArenaRef {
            offset: 0,
            len: 4 * MIB,
        }),
    };
    c.send(&RequestFrame {
        id: 2,
        body: Request::Infer(InferRequest::new("relu", vec![big])),
    });
    let r = c.read_response();
    assert_eq!(r.id, 2);
    assert_eq!(
        err_code(&r.outcome),
        Some(ErrorCode::TensorTooLarge),
        "{r:?}"
    );
    drop((c, fd));
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 64 * MIB);
}

/// A request frame of about `len` bytes that decodes (a `status` with padding under a key the
/// daemon ignores).
fn padded_status(id: u64, len: usize) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Padded {
        id: u64,
        body: Request,
        #[serde(with = "serde_bytes")]
        pad: Vec<u8>,
    }
    frame_of(&Padded {
        id,
        body: Request::Status,
        pad: vec![7; len - 64],
    })
}

/// Red team 4: users that keep frames "being read" kept request memory from everyone else —
/// two users held all of it, and a user that gave memory back and asked again at once always
/// won it back. Now a user holds at most a quarter, non-admins three quarters, and a user's
/// next frame queues behind the frames already waiting.
#[test]
fn users_keeping_request_memory_cannot_starve_another_user_or_an_admin() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "max-frame-bytes = \"8MiB\"\nrequest-memory-bytes = \"32MiB\"\nframe-timeout-secs = 10\n",
        &[],
    );
    let b = before(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    // Three users with two connections each keep 8 MiB frames one byte short, completing each
    // after 0.3 s and starting the next at once.
    for uid in [65534, 65533, 65532] {
        for _ in 0..2 {
            let (stream, helper) = connect_as_with(&d.socket, uid, uid, &[], None);
            drop(helper);
            let mut conn = RawConn { stream };
            conn.handshake().unwrap();
            let mut reader = conn.stream.try_clone().unwrap();
            let stop = stop.clone();
            attackers.push(std::thread::spawn(move || {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1 << 16];
                    while std::io::Read::read(&mut reader, &mut buf).unwrap_or(0) > 0 {}
                });
                let mut id = 1;
                let mut held = padded_status(id, 8 * MIB as usize);
                let _ = conn.stream.write_all(&held[..held.len() - 1]);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(300));
                    id += 1;
                    let next = padded_status(id, 8 * MIB as usize);
                    let mut bytes = vec![*held.last().unwrap()];
                    bytes.extend_from_slice(&next[..next.len() - 1]);
                    if conn.stream.write_all(&bytes).is_err() {
                        return;
                    }
                    held = next;
                }
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // Another unprivileged user, and an admin, are served all along.
    let (stream, helper) = connect_as_with(&d.socket, 4242, 4242, &[], None);
    drop(helper);
    let mut victim = RawConn { stream };
    victim.handshake().unwrap();
    let mut admin = RawConn::connect(&d.socket).unwrap();
    admin.handshake().unwrap();
    let (input, want) = digits_case(2);
    let (mut worst_user, mut worst_admin, mut n) = (Duration::ZERO, Duration::ZERO, 0);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        n += 1;
        let t = Instant::now();
        victim.send(&RequestFrame {
            id: n,
            body: Request::Infer(InferRequest::new("digits", vec![input.clone()])),
        });
        match victim.read_response().outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(r)) => assert_eq!(r.outputs, want),
            other => panic!("{other:?}"),
        }
        worst_user = worst_user.max(t.elapsed());
        let t = Instant::now();
        admin.send(&RequestFrame {
            id: n,
            body: Request::Status,
        });
        assert!(matches!(admin.read_response().outcome, Outcome::Ok(_)));
        worst_admin = worst_admin.max(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    // The bound: the users' frames complete every 0.3 s, and the victim's frame is first in
    // line when one does (the admin has a quarter of its own).
    assert!(
        worst_user <= Duration::from_secs(2),
        "another user waited {worst_user:?}"
    );
    assert!(
        worst_admin <= Duration::from_secs(1),
        "an admin waited {worst_admin:?}"
    );
    assert!(n >= 5, "{n} requests in 6 s");
    drop((victim, admin));
    let seen = Seen {
        ok: n,
        max_latency: worst_user,
        ..Seen::default()
    };
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 96 * MIB);
}

/// Red team 6: one user took the whole arena budget (four 256 MiB arenas), so every other
/// client, root included, was refused an arena.
#[test]
fn one_user_cannot_take_every_arena() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let mut c = connect_as_nobody(&d.socket);
        match c.handshake_arena(256 * MIB) {
            Ok(x) => held.push((c, x)),
            Err(e) => {
                assert!(e.contains("arena_unavailable"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(held.len(), 2, "a user holds half of arena-total-bytes");
    assert_eq!(refused, 2);
    // Another user and an admin still get theirs.
    let (stream, helper) = connect_as_with(&d.socket, 4242, 4242, &[], None);
    drop(helper);
    RawConn { stream }.handshake_arena(64 * MIB).unwrap();
    RawConn::connect(&d.socket)
        .unwrap()
        .handshake_arena(256 * MIB)
        .unwrap();
    drop(held);
    let seen = bystander.stop();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// Red team 7: `max-unsent-bytes` bounded one connection; 24 connections of one user that
/// never read their 16 MiB answers pinned 1.9 GiB. Now queued answers are held from the
/// user's share of request memory.
#[test]
fn unread_answers_over_many_connections_stay_within_the_users_share() {
    let _serial = serial();
    let repo = repo_with(&["relu"]);
    repo.settings(
        "relu",
        "max-dims = { x = [2048, 2048] }\nmax-batch-rows = 1\n",
    );
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());
    let input = Tensor::inline("x", DType::Float32, vec![2048, 2048], vec![0; 16 << 20]);
    let frame = frame_of(&RequestFrame {
        id: 1,
        body: Request::Infer(InferRequest::new("relu", vec![input])),
    });
    let second = frame_of(&RequestFrame {
        id: 2,
        body: Request::Infer(InferRequest::new(
            "relu",
            vec![Tensor::inline(
                "x",
                DType::Float32,
                vec![2048, 2048],
                vec![0; 16 << 20],
            )],
        )),
    });
    let mut conns = Vec::new();
    for _ in 0..24 {
        let mut c = connect_as_nobody(&d.socket);
        c.handshake().unwrap();
        // Two requests per connection, never read. While the user's share is full the daemon
        // reads none of its connections (writes may stall: bounded here).
        c.stream
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = c.send_raw(&frame).and_then(|()| c.send_raw(&second));
        conns.push(c);
    }
    std::thread::sleep(Duration::from_secs(8));
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    let seen = bystander.stop();
    // A quarter of request-memory-bytes (128 MiB) for unread answers and requests, plus what
    // is being computed and encoded at a time.
    eprintln!("peak growth {} MiB", peak / MIB);
    assert!(
        peak <= 384 * MIB,
        "unread answers over 24 connections grew the daemon by {} MiB",
        peak / MIB
    );
    let mut answers = 0;
    for c in &mut conns {
        answers += read_all(c, Duration::from_millis(300)).len();
    }
    assert!(answers > 0);
    drop(conns);
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 256 * MIB);
}

/// Red team 5: `model_info` loaded any version on disk for anyone (the admin path), after
/// which any peer could run a version the policy does not serve.
#[test]
fn model_info_loads_only_versions_the_policy_serves_for_non_admins() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.link("two", 1, "digits").link("two", 2, "digits");
    let mut d = shared_daemon(repo.path(), "preload = ['digits']\n", &[]);
    let b = before(&d);
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    let info = |c: &mut RawConn, id: u64, version: u64| {
        c.send(&RequestFrame {
            id,
            body: Request::ModelInfo(ModelRef {
                model: "two".into(),
                version: Some(version),
            }),
        });
        c.read_response().outcome
    };
    assert_eq!(
        err_code(&info(&mut c, 1, 1)),
        Some(ErrorCode::ModelNotReady),
        "version 1 is not served (the default policy serves the latest)"
    );
    assert!(
        matches!(info(&mut c, 2, 2), Outcome::Ok(_)),
        "the served one loads"
    );
    let (input, _) = digits_case(1);
    let mut req = InferRequest::new("two", vec![input]);
    req.version = Some(1);
    c.send(&RequestFrame {
        id: 3,
        body: Request::Infer(req),
    });
    assert_eq!(
        err_code(&c.read_response().outcome),
        Some(ErrorCode::ModelNotReady)
    );
    // An admin may (as with `load`).
    let mut admin = RawConn::connect(&d.socket).unwrap();
    admin.handshake().unwrap();
    assert!(matches!(info(&mut admin, 1, 1), Outcome::Ok(_)));
    drop((c, admin));
    let seen = Seen::no_bystander();
    // (Two versions loaded since `before`.)
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 64 * MIB);
}

/// Red team 2: `max-dims` let the PP-OCRv4 recogniser (made for 48-pixel-high crops) take a
/// 2048 × 2048 image, and ONNX Runtime grew the daemon to 8.5 GiB for it. Every session now
/// allocates from one CPU arena capped at `run-memory-bytes`: such a run fails, the daemon does
/// not grow past the cap, and everything else is served.
#[test]
fn a_request_shaped_to_need_gigabytes_fails_within_run_memory() {
    let _serial = serial();
    let repo = repo_with(&["ppocr_rec"]);
    let mut d = shared_daemon(repo.path(), "run-memory-bytes = \"256MiB\"\n", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    let huge = f32_tensor("x", &[1, 3, 1024, 1024], &random_f32(3 * 1024 * 1024, 5));
    c.send(&RequestFrame {
        id: 1,
        body: Request::Infer(InferRequest::new("ppocr_rec", vec![huge])),
    });
    let r = c.read_response();
    assert_eq!(
        err_code(&r.outcome),
        Some(ErrorCode::InferenceFailed),
        "{r:?}"
    );
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    eprintln!("peak growth {} MiB", peak / MIB);
    assert!(
        peak <= 400 * MIB,
        "one request grew the daemon by {} MiB",
        peak / MIB
    );
    // A crop of the size the model is made for still runs, and equals in-process ORT.
    let crop = f32_tensor("x", &[1, 3, 48, 320], &random_f32(3 * 48 * 320, 6));
    let want = Reference::new(&model_file("ppocr_rec")).run(std::slice::from_ref(&crop));
    c.send(&RequestFrame {
        id: 2,
        body: Request::Infer(InferRequest::new("ppocr_rec", vec![crop])),
    });
    match c.read_response().outcome {
        Outcome::Ok(rxd_protocol::Reply::Infer(r)) => {
            assert!(max_rel_diff(&r.outputs[0], &want[0]) <= 1e-5)
        }
        other => panic!("{other:?}"),
    }
    let seen = bystander.stop();
    drop(c);
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 400 * MIB);
}

/// Red team 5 (second half): a client alternating between two models under a budget that holds
/// one of them made the daemon load and evict 150 times in 28 s. A user's requests now start
/// loads at a bounded rate (a burst of 4, then one per 2 s) and are answered `busy` beyond it.
#[test]
fn a_user_cannot_make_the_daemon_load_and_evict_without_pause() {
    let _serial = serial();
    let repo = repo_with(&["sigmoid", "mul_1"]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    // Room for digits and one of the other two.
    let sizes = d.summaries();
    let size = |m: &str| sizes[m].memory_bytes.expect("measured");
    let budget = size("digits") + size("sigmoid").max(size("mul_1")) + 64 * 1024;
    std::fs::write(
        d.dir.path().join("rxd.toml"),
        format!("memory-budget = {budget}\n"),
    )
    .unwrap();
    d.client_inline().reload().unwrap();
    let loads = |d: &TestDaemon| d.summaries().values().map(|m| m.loads).sum::<u64>();
    let before_loads = loads(&d);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    let inputs = [
        ("sigmoid", f32_tensor("x", &[3, 4, 5], &random_f32(60, 1))),
        ("mul_1", f32_tensor("X", &[3, 2], &random_f32(6, 2))),
    ];
    let (mut busy, mut ok, mut id) = (0, 0, 0u64);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (model, x) = &inputs[(id % 2) as usize];
        id += 1;
        c.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new(*model, vec![x.clone()])),
        });
        match c.read_response().outcome {
            Outcome::Ok(_) => ok += 1,
            Outcome::Err(e) if e.kind() == Some(ErrorCode::Busy) => busy += 1,
            Outcome::Err(e) if e.kind() == Some(ErrorCode::OverBudget) => {}
            Outcome::Err(e) => panic!("{e}"),
        }
    }
    let seen = bystander.stop();
    let started = loads(&d) - before_loads;
    // The attacker's burst and one per 2 s over 6 s (7), and whatever the bystander's own
    // model needed to come back.
    assert!(
        started <= 12,
        "{started} loads in 6 s ({ok} ok, {busy} busy)"
    );
    assert!(busy > 0, "the attacker was never told to slow down");
    drop(c);
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 64 * MIB);
}
