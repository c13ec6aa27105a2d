//! Issue 3: the shared-memory arena, against the real daemon.

use std::os::fd::AsFd;
use std::time::Duration;

use rxd_client::{
    ClientError, ClientOptions, DType, ErrorCode, OutputBufs, Tensor, blocking::Client,
};
use rxd_e2e::*;
use rxd_protocol::{ArenaRef, InferRequest, Outcome, Reply, Request, RequestFrame, TensorData};

fn code_of(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

fn arena_client(d: &TestDaemon, bytes: u64) -> Client {
    let c = Client::connect_with(
        &d.socket,
        ClientOptions {
            arena_bytes: bytes,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        c.arena().expect("arena granted").size(),
        bytes.next_multiple_of(4096)
    );
    c
}

/// Puts an inline tensor's bytes into a fresh arena buffer; returns the buffer and the reference.
fn to_arena(c: &Client, t: &Tensor) -> (rxd_client::ArenaBuf, Tensor) {
    let bytes = rxd_client::tensor::bytes(t).unwrap();
    let mut buf = c.arena().unwrap().alloc(bytes.len() as u64).unwrap();
    buf.bytes_mut().copy_from_slice(bytes);
    let r = buf.tensor(&t.name, t.dtype, t.shape.clone()).unwrap();
    (buf, r)
}

#[test]
fn arena_results_equal_in_process_ort_for_several_dtypes() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("silero_vad", 1, "silero_vad")
        .link("yolov8n", 1, "yolov8n");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = arena_client(&d, 16 << 20);

    // f32 + f32 + i64 inputs all by reference; outputs packed into an output area.
    let audio: Vec<f32> = random_f32(512, 5).iter().map(|x| x * 2.0 - 1.0).collect();
    let inputs = vec![
        f32_tensor("input", &[1, 512], &audio),
        f32_tensor("state", &[2, 1, 128], &random_f32(256, 6)),
        Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
    ];
    let want = Reference::new(&model_file("silero_vad")).run(&inputs);
    let held: Vec<_> = inputs.iter().map(|t| to_arena(&c, t)).collect();
    let mut area = c.arena().unwrap().alloc(1 << 16).unwrap();
    let req = InferRequest::new("silero_vad", held.iter().map(|(_, t)| t.clone()).collect());
    let reply = c.infer_into(req, OutputBufs::area(&mut area)).unwrap();
    assert_eq!(reply.outputs.len(), want.len());
    for (g, w) in reply.outputs.iter().zip(&want) {
        assert!(
            matches!(g.data, TensorData::Arena(_)),
            "output {} should be in the arena",
            g.name
        );
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape));
        assert_eq!(
            area.output_bytes(g).unwrap(),
            rxd_client::tensor::bytes(w).unwrap(),
            "{}",
            g.name
        );
    }

    // Outputs of two dtypes (i64 labels, f32 probabilities) into named regions, read as typed
    // views without copying.
    let x = example_npy("digits_test_x.npy", "input");
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&x));
    let (_xbuf, xref) = to_arena(&c, &x);
    let rows = x.shape[0] as usize;
    let mut labels = c.arena().unwrap().alloc(rows as u64 * 8).unwrap();
    let mut probs = c.arena().unwrap().alloc(rows as u64 * 40).unwrap();
    let req = InferRequest::new("digits", vec![xref]);
    let outputs = OutputBufs::default()
        .region("label", &mut labels)
        .region("probabilities", &mut probs);
    let reply = c.infer_into(req, outputs).unwrap();
    let got_labels = labels.view::<i64>(&reply.outputs[0]).unwrap();
    let want_labels = rxd_client::tensor::to_array::<i64>(&want[0]).unwrap();
    assert_eq!(got_labels, want_labels.view());
    let got_probs = probs.view::<f32>(&reply.outputs[1]).unwrap();
    assert_eq!(
        got_probs,
        rxd_client::tensor::to_array::<f32>(&want[1])
            .unwrap()
            .view()
    );

    // The automatic path of `infer`: a 1.2 MB image goes through the arena, twice (the second
    // call also puts the outputs there), results bit-identical to in-process ORT.
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 8));
    let want = Reference::new(&model_file("yolov8n")).run(std::slice::from_ref(&image));
    let free = c.arena().unwrap().free_bytes();
    for _ in 0..2 {
        assert_eq!(c.infer("yolov8n", vec![image.clone()]).unwrap(), want);
    }
    assert_eq!(
        c.arena().unwrap().free_bytes(),
        free,
        "infer freed its buffers"
    );
}

#[test]
fn a_sealed_arena_cannot_be_truncated_and_bad_references_get_their_codes() {
    let repo = Repo::new();
    repo.link("slice_first", 1, "slice_first")
        .link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let mut raw = RawConn::connect(&d.socket).unwrap();
    let (welcome, fd) = raw.handshake_arena(65536).unwrap();
    assert_eq!(welcome.arena_bytes, 65536);
    // The client cannot resize the daemon's memory under it.
    assert_eq!(
        nix::unistd::ftruncate(&fd, 0).unwrap_err(),
        nix::errno::Errno::EPERM
    );
    assert_eq!(
        nix::unistd::ftruncate(&fd, 1 << 30).unwrap_err(),
        nix::errno::Errno::EPERM
    );
    let size = 65536u64;
    let map = rxd_shm::Mapping::map(fd.as_fd(), size as usize).unwrap();
    map.copy_in(0, &1.0f32.to_le_bytes()).unwrap();

    let mut id = 0;
    let mut ask = |raw: &mut RawConn, shape: Vec<u64>, r: ArenaRef| {
        id += 1;
        raw.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new(
                "slice_first",
                vec![Tensor {
                    name: "x".into(),
                    dtype: DType::Float32,
                    shape,
                    data: TensorData::Arena(r),
                }],
            )),
        });
        raw.read_response().outcome
    };
    let code = |o: Outcome| match o {
        Outcome::Err(e) => e.kind().unwrap(),
        other => panic!("expected an error, got {other:?}"),
    };
    // Past the end, overlapping the end by one byte, overflowing, wrong length, misaligned.
    assert_eq!(
        code(ask(
            &mut raw,
            vec![1, 4],
            ArenaRef {
                offset: size,
                len: 16
            }
        )),
        ErrorCode::ArenaOutOfRange
    );
    assert_eq!(
        code(ask(
            &mut raw,
            vec![1, 4],
            ArenaRef {
                offset: size - 15,
                len: 16
            }
        )),
        ErrorCode::ArenaOutOfRange
    );
    assert_eq!(
        code(ask(
            &mut raw,
            vec![1, 4],
            ArenaRef {
                offset: u64::MAX - 7,
                len: 16
            }
        )),
        ErrorCode::ArenaOutOfRange
    );
    assert_eq!(
        code(ask(&mut raw, vec![1, 4], ArenaRef { offset: 0, len: 12 })),
        ErrorCode::DataLengthMismatch
    );
    assert_eq!(
        code(ask(&mut raw, vec![1, 4], ArenaRef { offset: 2, len: 16 })),
        ErrorCode::ArenaMisaligned
    );
    // Exactly at the end is fine, and a good reference works on the same connection.
    match ask(
        &mut raw,
        vec![1, 4],
        ArenaRef {
            offset: size - 16,
            len: 16,
        },
    ) {
        Outcome::Ok(Reply::Infer(_)) => {}
        other => panic!("{other:?}"),
    }
    match ask(&mut raw, vec![1, 4], ArenaRef { offset: 0, len: 16 }) {
        Outcome::Ok(Reply::Infer(r)) => assert_eq!(
            rxd_client::tensor::bytes(&r.outputs[0]).unwrap(),
            1.0f32.to_le_bytes()
        ),
        other => panic!("{other:?}"),
    }

    // An output area too small: the error says how much is needed and nothing is written.
    map.copy_in(4096, &[0xAB; 64]).unwrap();
    id += 1;
    let mut req = InferRequest::new(
        "digits",
        vec![Tensor {
            name: "input".into(),
            dtype: DType::Float32,
            shape: vec![2, 64],
            data: TensorData::Arena(ArenaRef {
                offset: 8192,
                len: 512,
            }),
        }],
    );
    req.output_area = Some(ArenaRef {
        offset: 4096,
        len: 32,
    });
    raw.send(&RequestFrame {
        id,
        body: Request::Infer(req),
    });
    match raw.read_response().outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind(), Some(ErrorCode::OutputRegionTooSmall));
            // label: 16 bytes at 0, probabilities: 80 bytes at 64 → 144 needed.
            assert_eq!(e.needed_bytes, Some(144), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let mut after = [0u8; 64];
    map.copy_out(4096, &mut after).unwrap();
    assert_eq!(after, [0xAB; 64], "no partial write");

    // An arena reference on a connection without an arena.
    let c = d.client_inline();
    let err = c
        .infer_request(InferRequest::new(
            "slice_first",
            vec![Tensor {
                name: "x".into(),
                dtype: DType::Float32,
                shape: vec![1, 1],
                data: TensorData::Arena(ArenaRef { offset: 0, len: 4 }),
            }],
        ))
        .unwrap_err();
    assert_eq!(code_of(err), ErrorCode::ArenaUnavailable);

    // Arenas over the configured size are refused at the handshake, clearly.
    let mut raw2 = RawConn::connect(&d.socket).unwrap();
    let err = raw2.handshake_arena(1 << 40).unwrap_err();
    assert!(
        err.contains("arena_unavailable") && err.contains("max-arena-bytes"),
        "{err}"
    );
}

#[test]
fn a_client_cannot_reach_another_clients_arena() {
    let repo = Repo::new();
    repo.link("slice_first", 1, "slice_first");
    let d = TestDaemon::start(repo.path(), &[]);
    let a = arena_client(&d, 1 << 20);
    let b = arena_client(&d, 1 << 20);
    let mut secret = a.arena().unwrap().alloc(64).unwrap();
    secret.view_mut::<f32>(&[1, 16]).unwrap().fill(42.0);
    let mut mine = b.arena().unwrap().alloc(64).unwrap();
    mine.view_mut::<f32>(&[1, 16]).unwrap().fill(7.0);
    assert_eq!(
        secret.offset(),
        mine.offset(),
        "same offsets in both arenas"
    );
    let t = mine.tensor("x", DType::Float32, vec![1, 16]).unwrap();
    let out = b
        .infer_request(InferRequest::new("slice_first", vec![t]))
        .unwrap();
    // B's reference reads B's arena: 7, never A's 42.
    assert_eq!(
        rxd_client::tensor::to_array::<f32>(&out.outputs[0]).unwrap()[[0, 0]],
        7.0
    );
    let t = secret.tensor("x", DType::Float32, vec![1, 16]).unwrap();
    let out = a
        .infer_request(InferRequest::new("slice_first", vec![t]))
        .unwrap();
    assert_eq!(
        rxd_client::tensor::to_array::<f32>(&out.outputs[0]).unwrap()[[0, 0]],
        42.0
    );
}

#[test]
fn dying_clients_leak_no_fd_and_no_mapping() {
    let repo = Repo::new();
    repo.link("yolov8n", 1, "yolov8n")
        .link("slice_first", 1, "slice_first");
    let d = TestDaemon::start(repo.path(), &[]);
    let fds = d.fd_targets().len();
    let maps = d.arena_mappings();
    assert_eq!(maps, 0);

    // Clients that close with requests in flight on their arena.
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 2));
    for _ in 0..10 {
        let mut raw = RawConn::connect(&d.socket).unwrap();
        let (_, fd) = raw.handshake_arena(2 << 20).unwrap();
        let map = rxd_shm::Mapping::map(fd.as_fd(), 2 << 20).unwrap();
        map.copy_in(0, rxd_client::tensor::bytes(&image).unwrap())
            .unwrap();
        for id in 1..=4 {
            raw.send(&RequestFrame {
                id,
                body: Request::Infer(InferRequest::new(
                    "yolov8n",
                    vec![Tensor {
                        name: "images".into(),
                        dtype: DType::Float32,
                        shape: image.shape.clone(),
                        data: TensorData::Arena(ArenaRef {
                            offset: 0,
                            len: image.shape.iter().product::<u64>() * 4,
                        }),
                    }],
                )),
            });
        }
    }
    // Processes killed mid-request (rxctl with a large input goes through the arena).
    let npy_path = d.dir.path().join("image.npy");
    rxd_client::npy::write(&image, std::fs::File::create(&npy_path).unwrap()).unwrap();
    for i in 0..6 {
        let mut child = std::process::Command::new(bin("rxctl"))
            .env_clear()
            .env("RXD_SOCKET", &d.socket)
            .args([
                "infer",
                "yolov8n",
                "--input",
                &format!("images={}", npy_path.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + 15 * i));
        let _ = child.kill();
        let _ = child.wait();
    }
    // The daemon serves on.
    let c = arena_client(&d, 1 << 20);
    let x = f32_tensor("x", &[1, 1024], &random_f32(1024, 1));
    let (_buf, r) = to_arena(&c, &x);
    c.infer_request(InferRequest::new("slice_first", vec![r]))
        .unwrap();
    assert!(
        d.arena_mappings() >= 1,
        "a live client's arena is mapped in the daemon"
    );
    drop(_buf);
    drop(c);
    let start = std::time::Instant::now();
    loop {
        let (f, m) = (d.fd_targets().len(), d.arena_mappings());
        if f <= fds && m == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fds {f} (baseline {fds}), arena mappings {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
