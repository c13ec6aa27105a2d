//! Per-request overhead of rxd on a tiny model (ONNX Runtime's `sigmoid.onnx`), measured in one
//! run next to its baselines: in-process ONNX Runtime on the same input, and a raw Unix-socket
//! ping-pong of the same frame sizes. Also daemon RSS (idle, one model), time from exec to
//! serving, what a hop to a worker process would add (a memfd handed over with the request),
//! and what giving ONNX Runtime's arena back costs on the PP-OCR detector (in-process and
//! through rxd). Prints a Markdown section for BENCHMARKS.md.
//!
//! Run: `scripts/bench overhead` (builds the release binaries first), or
//! `cargo build --release --bins && cargo bench -p rxd-e2e --bench overhead`.
//! `RXD_BENCH_N` sets the number of timed round trips (default 20000).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{InferRequest, Outcome, Request, RequestFrame, ResponseFrame};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6;
    Stats {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        mean,
    }
}

fn time_n(n: usize, warm: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warm {
        f();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    stats(v)
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    buf.resize(u32::from_le_bytes(h) as usize, 0);
    s.read_exact(buf).unwrap();
}

fn rss_kib(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmRSS") / 1024
}

fn main() {
    let n: usize = bench_setting("RXD_BENCH_N", 20000);
    let input = f32_tensor("x", &[3, 4, 5], &random_f32(60, 7));
    let request = RequestFrame {
        id: 1,
        body: Request::Infer(InferRequest {
            model: "sigmoid".into(),
            version: None,
            inputs: vec![input.clone()],
            outputs: vec![],
            output_regions: Vec::new(),
            output_area: None,
            priority: None,
            timeout_ms: None,
            inline_overflow: false,
        }),
    };
    let req_bytes = frame::encode(&request).unwrap();

    // 1. In-process ONNX Runtime, same input.
    let mut reference = Reference::new(&model_file("sigmoid"));
    let ort = time_n(n, 1000, || {
        std::hint::black_box(reference.run(std::slice::from_ref(&input)));
    });

    // 2. Raw Unix-socket ping-pong: request-sized frame out, response-sized frame back, echo
    // thread on the other end (the kernel may run it on the other core, like the daemon).
    let resp_bytes = {
        let r = reference.run(std::slice::from_ref(&input));
        let reply = ResponseFrame {
            id: 1,
            outcome: Outcome::Ok(rxd_protocol::Reply::Infer(rxd_protocol::InferReply {
                model: "sigmoid".into(),
                version: 1,
                outputs: r,
            })),
        };
        frame::encode(&reply).unwrap()
    };
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let resp_copy = resp_bytes.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; HEADER_LEN];
            if b.read_exact(&mut h).is_err() {
                return;
            }
            buf.resize(u32::from_le_bytes(h) as usize, 0);
            b.read_exact(&mut buf).unwrap();
            b.write_all(&resp_copy).unwrap();
        }
    });
    let mut buf = Vec::new();
    let raw = time_n(n, 1000, || {
        a.write_all(&req_bytes).unwrap();
        read_frame(&mut a, &mut buf);
    });
    drop(a);
    echo.join().unwrap();

    // 3. rxd: time from exec to serving, RSS idle, then with sigmoid loaded.
    let empty = Repo::new();
    let t0 = Instant::now();
    let idle = TestDaemon::start(empty.path(), &[]);
    let exec_to_serving_empty = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_kib(idle.pid());
    drop(idle);

    let repo = Repo::new();
    repo.link("sigmoid", 1, "sigmoid");
    let io = std::env::var("RXD_BENCH_IO_THREADS").unwrap_or_else(|_| "1".into());
    let t0 = Instant::now();
    let d = TestDaemon::start(repo.path(), &["--io-threads", &io]);
    let exec_to_serving = t0.elapsed();
    let mut conn = RawConn::connect(&d.socket).unwrap();
    conn.handshake().unwrap();
    let mut s = conn.stream;
    // Sanity: the answer is a success and equals in-process ORT.
    s.write_all(&req_bytes).unwrap();
    read_frame(&mut s, &mut buf);
    let resp: ResponseFrame = frame::decode(&buf).unwrap();
    match resp.outcome {
        Outcome::Ok(rxd_protocol::Reply::Infer(r)) => {
            assert_eq!(r.outputs, reference.run(std::slice::from_ref(&input)))
        }
        other => panic!("{other:?}"),
    }
    let rxd_raw = time_n(n, 1000, || {
        s.write_all(&req_bytes).unwrap();
        read_frame(&mut s, &mut buf);
    });
    // RSS now: one model loaded, one inline client (before any client arena is mapped).
    let rss_model = rss_kib(d.pid());
    // The same through the async client library, driven by a blocking wrapper.
    let client = d.client();
    let lib = time_n(n / 2, 500, || {
        std::hint::black_box(client.infer("sigmoid", vec![input.clone()]).unwrap());
    });

    drop(client);
    drop(s);
    drop(d);
    let hop = memfd_hop(n / 4, &req_bytes, &resp_bytes);
    let hop_mib = memfd_hop(n / 40, &vec![7u8; 1 << 20], &resp_bytes);
    let arena = arena_costs();

    let added_p50 = rxd_raw.p50 - ort.p50;
    let added_p99 = rxd_raw.p99 - ort.p99;
    println!("### Per-request overhead, sigmoid.onnx [3,4,5] f32, one client, {n} round trips\n");
    println!("| path | p50 µs | p99 µs | mean µs |");
    println!("|---|---:|---:|---:|");
    for (name, s) in [
        ("in-process ORT `Session::run`", &ort),
        ("raw Unix-socket ping-pong (same frame sizes)", &raw),
        ("rxd, raw protocol client (blocking socket)", &rxd_raw),
        ("rxd, `rxd_client::blocking::Client::infer`", &lib),
    ] {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", s.p50, s.p99, s.mean);
    }
    println!();
    println!(
        "- rxd added (rxd raw client − in-process ORT): p50 {added_p50:.1} µs, p99 {added_p99:.1} µs"
    );
    println!(
        "- added p50 / raw socket p50 = {:.2} (target ≤ 2.0)",
        added_p50 / raw.p50
    );
    println!(
        "- daemon RSS: idle (no models) {} KiB, with sigmoid loaded {} KiB",
        rss_idle, rss_model
    );
    println!(
        "- exec → serving (handshake answered): empty repository {:.0} ms, with sigmoid {:.0} ms",
        exec_to_serving_empty.as_secs_f64() * 1e3,
        exec_to_serving.as_secs_f64() * 1e3
    );
    println!();
    println!("### What a hop to a worker process would add per request\n");
    println!("| path | p50 µs | p99 µs | mean µs |");
    println!("|---|---:|---:|---:|");
    for (name, s) in [
        ("raw Unix-socket ping-pong (same frame sizes)", &raw),
        (
            "request in a fresh sealed memfd, fd passed, mapped, read, answered",
            &hop,
        ),
        ("the same with a 1 MiB request", &hop_mib),
    ] {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", s.p50, s.p99, s.mean);
    }
    println!();
    println!(
        "- a worker process holds its own ONNX Runtime set-up: daemon RSS idle {rss_idle} KiB"
    );
    println!();
    println!("### ONNX Runtime's arena given back: `ppocr_det` [1, 3, 640, 640], one thread\n");
    println!("| setting | median ms | RSS after a 2048×2048 request |");
    println!("|---|---:|---:|");
    for (name, ms, rss) in arena {
        let rss = rss.map_or("—".to_string(), |kib| format!("{} MiB", kib >> 10));
        println!("| {name} | {ms:.1} | {rss} |");
    }
}

/// A request handed to a peer in a fresh sealed memfd (create, size, seal, write, pass the fd
/// with SCM_RIGHTS; the peer maps it, copies the request out and answers `resp` on the
/// socket): what a per-model worker process would add to each request that is not already in
/// a shared arena. The peer is a thread: the kernel work (fd passing, mmap, page faults) is
/// the same for a process.
fn memfd_hop(n: usize, req: &[u8], resp: &[u8]) -> Stats {
    let (a, mut b) = UnixStream::pair().unwrap();
    let resp = resp.to_vec();
    let peer = std::thread::spawn(move || {
        let mut one = [0u8; 8];
        loop {
            let (got, fd) = match rxd_shm::recv_with_fd(rxd_shm::raw(&b), &mut one) {
                Ok((0, _)) | Err(_) => return,
                Ok(x) => x,
            };
            let len = u64::from_le_bytes(one) as usize;
            assert_eq!(got, 8);
            let map = rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd.unwrap()), len).unwrap();
            let mut copy = vec![0u8; len];
            map.copy_out(0, &mut copy).unwrap();
            std::hint::black_box(&copy);
            b.write_all(&resp).unwrap();
        }
    });
    let mut a = a;
    let mut buf = Vec::new();
    let stats = time_n(n, n / 10, || {
        let fd = rxd_shm::create_sealed("rxd-hop", req.len()).unwrap();
        let map = rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), req.len()).unwrap();
        map.copy_in(0, req).unwrap();
        let len = (req.len() as u64).to_le_bytes();
        rxd_shm::send_with_fd(rxd_shm::raw(&a), &len, std::os::fd::AsFd::as_fd(&fd)).unwrap();
        read_frame(&mut a, &mut buf);
    });
    drop(a);
    peer.join().unwrap();
    stats
}

/// The detector at 640×640 with ORT's arena kept (the default), shrunk after every run,
/// and off, in-process; then through rxd with the warmup at its automatic shapes (every
/// 640×640 request is larger than the warmup's, so rxd gives the arena growth back after it)
/// and with `warmup-dims` at 640×640 (kept and accounted). RSS: rxd's 1.5 s after one
/// 2048×2048 request.
fn arena_costs() -> Vec<(String, f64, Option<u64>)> {
    let runs: usize = bench_setting("RXD_BENCH_ARENA_RUNS", 30);
    let model = model_file("ppocr_det");
    let x = f32_tensor("x", &[1, 3, 640, 640], &random_f32(3 * 640 * 640, 5));
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = Vec::new();
    for (name, arena, shrink) in [
        ("in-process, arena kept (ORT's default)", true, false),
        ("in-process, arena shrunk after every run", true, true),
        ("in-process, arena off", false, false),
    ] {
        let mut session = ort::session::Session::builder(reference_env())
            .unwrap()
            .with_intra_threads(1)
            .unwrap()
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(arena).build()])
            .unwrap()
            .commit_from_file(&model)
            .unwrap();
        let mut options = ort::session::RunOptions::new().unwrap();
        if shrink {
            options
                .set("memory.enable_memory_arena_shrinkage", "cpu:0")
                .unwrap();
        }
        let bytes = rxd_client::tensor::bytes(&x).unwrap();
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let input = ort::value::Tensor::from_array(([1usize, 3, 640, 640], values)).unwrap();
        let mut times = Vec::new();
        for i in 0..runs + 3 {
            let t = Instant::now();
            session
                .run_with_options(ort::inputs!["x" => input.view()], &options)
                .unwrap();
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        out.push((name.to_string(), median(times), None));
    }
    let big = f32_tensor("x", &[1, 3, 2048, 2048], &random_f32(3 * 2048 * 2048, 9));
    for (name, toml) in [
        ("rxd, warmup at automatic shapes (32×32)", ""),
        (
            "rxd, `warmup-dims = { x = [1, 3, 640, 640] }`, `max-batch-rows = 1`",
            "warmup-dims = { x = [1, 3, 640, 640] }\nmax-batch-rows = 1\n",
        ),
    ] {
        let repo = Repo::new();
        repo.link("det", 1, "ppocr_det").settings("det", toml);
        let d = TestDaemon::start(repo.path(), &[]);
        let c = d.client_inline();
        let mut times = Vec::new();
        for i in 0..runs + 3 {
            let t = Instant::now();
            c.infer("det", vec![x.clone()]).unwrap();
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        c.infer("det", vec![big.clone()]).unwrap();
        // rxd gives a large run's arena growth back after a second of idleness.
        std::thread::sleep(Duration::from_millis(1500));
        out.push((name.to_string(), median(times), Some(rss_kib(d.pid()))));
    }
    out
}
