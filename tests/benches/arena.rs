//! Added round-trip time of rxd over in-process ONNX Runtime, by input size, through the
//! shared-memory arena and inline, next to a raw Unix-socket round trip of the same sizes —
//! all in one run. The model (`tests/models/slice_first`) reads one element per row, so its
//! compute does not grow with the input: what grows is transport.
//!
//! Run: `scripts/bench arena`. `RXD_BENCH_SCALE` scales the iteration counts (default 1.0).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{
    ArenaRef, DType, InferRequest, Outcome, Request, RequestFrame, ResponseFrame, Tensor,
    TensorData,
};

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    buf.resize(u32::from_le_bytes(h) as usize, 0);
    s.read_exact(buf).unwrap();
}

fn time(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n.div_ceil(10).max(2) {
        f();
    }
    p50((0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect())
}

fn main() {
    let scale: f64 = bench_setting("RXD_BENCH_SCALE", 1.0);
    let sizes: [(&str, usize); 4] = [
        ("4 KiB", 4 << 10),
        ("1 MiB", 1 << 20),
        ("16 MiB", 16 << 20),
        ("64 MiB", 64 << 20),
    ];
    let repo = Repo::new();
    repo.link("slice_first", 1, "slice_first");
    let d = TestDaemon::start(repo.path(), &[]);

    let ort_env_model = model_file("slice_first");
    let mut session = ort::session::Session::builder(reference_env())
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(&ort_env_model)
        .unwrap();

    // One arena connection big enough for the largest input.
    let arena_size = (64u64 << 20) + 4096;
    let mut arena_conn = RawConn::connect(&d.socket).unwrap();
    let (_, fd) = arena_conn.handshake_arena(arena_size).unwrap();
    let map = rxd_shm::Mapping::map(fd.as_fd(), arena_size as usize).unwrap();
    let mut arena_sock = arena_conn.stream;
    let mut inline_conn = RawConn::connect(&d.socket).unwrap();
    inline_conn.handshake().unwrap();
    let mut inline_sock = inline_conn.stream;

    let mut rows = Vec::new();
    let mut buf = Vec::new();
    for (label, bytes) in sizes {
        let n = ((200e6 / bytes as f64).clamp(15.0, 3000.0) * scale).max(5.0) as usize;
        let elems = bytes / 4;
        let data = random_f32(elems, 11);
        let shape = vec![1u64, elems as u64];

        // In-process ORT over a buffer it does not copy.
        let arr = ndarray::Array2::from_shape_vec((1, elems), data.clone()).unwrap();
        let ort = time(n, || {
            let t = ort::value::TensorRef::from_array_view(arr.view()).unwrap();
            std::hint::black_box(session.run(ort::inputs![t]).unwrap());
        });

        // Raw socket: a frame of the inline request's size out, a small frame back.
        let inline_frame = frame::encode(&RequestFrame {
            id: 1,
            body: Request::Infer(InferRequest::new(
                "slice_first",
                vec![f32_tensor("x", &shape, &data)],
            )),
        })
        .unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let echo = std::thread::spawn(move || {
            let mut body = Vec::new();
            let reply = [8u8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            while let Ok(()) = (|| -> std::io::Result<()> {
                let mut h = [0u8; HEADER_LEN];
                b.read_exact(&mut h)?;
                body.resize(u32::from_le_bytes(h) as usize, 0);
                b.read_exact(&mut body)?;
                b.write_all(&reply)
            })() {}
        });
        let raw = time(n, || {
            a.write_all(&inline_frame).unwrap();
            read_frame(&mut a, &mut buf);
        });
        drop(a);
        echo.join().unwrap();

        // rxd inline.
        let check = |s: &mut UnixStream, buf: &mut Vec<u8>| {
            read_frame(s, buf);
            let r: ResponseFrame = frame::decode(buf).unwrap();
            assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
        };
        let inline = time(n, || {
            inline_sock.write_all(&inline_frame).unwrap();
            check(&mut inline_sock, &mut buf);
        });

        // rxd through the arena: the bytes are in shared memory already; the frame is tiny.
        let le: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        map.copy_in(0, &le).unwrap();
        let arena_frame = frame::encode(&RequestFrame {
            id: 1,
            body: Request::Infer(InferRequest::new(
                "slice_first",
                vec![Tensor {
                    name: "x".into(),
                    dtype: DType::Float32,
                    shape: shape.clone(),
                    data: TensorData::Arena(ArenaRef {
                        offset: 0,
                        len: bytes as u64,
                    }),
                }],
            )),
        })
        .unwrap();
        let arena = time(n, || {
            arena_sock.write_all(&arena_frame).unwrap();
            check(&mut arena_sock, &mut buf);
        });
        rows.push((label, n, ort, raw, inline, arena));
    }

    println!("### Added round-trip time by input size (slice_first, p50 µs)\n");
    println!(
        "| input | runs | in-process ORT | raw socket RTT | rxd inline | rxd arena | added inline | added arena |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for &(label, n, ort, raw, inline, arena) in &rows {
        println!(
            "| {label} | {n} | {ort:.1} | {raw:.1} | {inline:.1} | {arena:.1} | {:.1} | {:.1} |",
            inline - ort,
            arena - ort
        );
    }
    let added = |i: usize, arena: bool| {
        let r = rows[i];
        if arena { r.5 - r.2 } else { r.4 - r.2 }
    };
    println!();
    println!(
        "- arena: added at 64 MiB / added at 4 KiB = {:.2} (target ≤ 1.2)",
        added(3, true) / added(0, true)
    );
    println!(
        "- at 64 MiB: added inline / added arena = {:.0}× (target ≥ 10×)",
        added(3, false) / added(3, true)
    );
}
