//! The shared-memory ring against the socket (issue 26), each ratio in one run with its
//! baselines:
//!
//! 1. `sigmoid`, one client: p50 of in-process ONNX Runtime, of a raw Unix-socket ping-pong
//!    with the same frame sizes, of rxd through the socket (a blocking raw client) and through
//!    the ring (`RingClient`, spinning before it sleeps, and not spinning); rxd's added p50 as
//!    a multiple of the raw round trip.
//! 2. 32 single-item closed-loop clients (every request a different input, large tensors
//!    through the arena) on `ppocr_cls`, `yolov8n`, `sigmoid` and Silero VAD (8 kHz chunks, each stream its own
//!    state, batched along the state), through the socket (`rxctl bench`'s
//!    load generator: the async client on 2 threads) and through the ring (a ring per client,
//!    2 threads each driving half of them and sleeping on all their completion tails at once
//!    when none has an answer), alternately: throughput as a share of in-process
//!    ONNX Runtime's best over batch sizes {1,4,8,16,32} and layouts {1 session × all
//!    threads, one 1-thread session per core} measured in the same run (rxd as a fresh install
//!    runs it: every core, load-time tuning on, model.toml holding only the input shapes),
//!    p99, and the daemon's CPU µs per request (its CPU time over the requests), and of that
//!    what is outside ORT's own run (less in-process ORT's thread CPU per row at the daemon's
//!    mean batch size, one intra-op thread: meaningful where ORT's run is small beside it, as
//!    for `sigmoid`; for heavy models ORT's CPU per row depends on its threads and batch), and
//!    the load generator's own CPU in cores (the in-process baseline pays none: on 2 cores it
//!    is what rxd's share cannot have).
//!
//! Run: `scripts/bench ring`. `RXD_BENCH_N` (20000) round trips for part 1, `RXD_BENCH_SECS`
//! (5) per load run, `RXD_BENCH_ROUNDS` (2), `RXD_BENCH_MODELS` (ppocr_cls,yolov8n,sigmoid,silero_vad; empty:
//! part 1 only), `RXD_BENCH_PATHS` (socket,ring: which paths part 2 drives; one alone, with
//! `RXD_BENCH_N=0` to skip part 1, is what to profile the daemon under), `RXD_BENCH_MODEL_TOML`
//! (lines added to every model's model.toml), `RXD_BENCH_TUNE` (1; 0 for an rxd from before
//! load-time tuning, which refuses the key: no `tune` line at all).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rxd_client::{RingClient, RingOptions, Tensor};

use rxd_e2e::*;
use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{InferRequest, Outcome, Request, RequestFrame, ResponseFrame};

fn p50_us(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn time_n(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 10 {
        f();
    }
    let mut s = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        s.push(t.elapsed());
    }
    p50_us(s)
}

fn infer_frame(id: u64, model: &str, x: Tensor) -> Vec<u8> {
    infer_frame_into(id, model, vec![x], None)
}

/// [`infer_frame`] with the outputs asked in `area` of the arena.
fn infer_frame_into(
    id: u64,
    model: &str,
    xs: Vec<Tensor>,
    area: Option<rxd_protocol::ArenaRef>,
) -> Vec<u8> {
    frame::encode(&RequestFrame {
        id,
        body: Request::Infer(InferRequest {
            output_area: area,
            ..InferRequest::new(model, xs)
        }),
    })
    .unwrap()
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    buf.resize(u32::from_le_bytes(h) as usize, 0);
    s.read_exact(buf).unwrap();
}

/// A model's input: its name and one item's shape after the batch dimension (sigmoid has
/// none: one request is one fixed [3, 4, 5] tensor).
fn input_of(model: &str) -> (&'static str, &'static [u64]) {
    match model {
        "sigmoid" => ("x", &[]),
        "ppocr_cls" => ("x", &[3, 48, 192]),
        "yolov8n" => ("images", &[3, 320, 320]),
        other => panic!("no input for {other}"),
    }
}

/// The model.toml a fresh install would have: the shapes requests have, for tuning; then
/// the lines of `RXD_BENCH_MODEL_TOML` (to compare explicit settings with tuning's).
fn settings_of(model: &str) -> Option<String> {
    let dims = match model {
        "ppocr_cls" => "warmup-dims = { x = [1, 3, 48, 192] }",
        "yolov8n" => "warmup-dims = { images = [1, 3, 320, 320] }",
        "silero_vad" => {
            // Its requests are 8 kHz ones (`sr` 8000): tuning measures that branch too
            // (by default it fills `sr` with the 16000 its graph compares it with).
            "warmup-dims = { input = [1, 256], state = [2, 1, 128] }\n\
             warmup-values = { sr = 8000 }\n\
             batch-axes = { state = 1, stateN = 1 }"
        }
        _ => "",
    };
    let extra = std::env::var("RXD_BENCH_MODEL_TOML").unwrap_or_default();
    let toml = format!("{dims}\n{extra}\n");
    (!toml.trim().is_empty()).then_some(toml)
}

/// `b` rows of a model's inputs. Silero VAD: 8 kHz chunks of 256 samples, each stream's
/// state along dimension 1 of `state` (model.toml's `batch-axes`), the rate shared.
fn rows_seeded(model: &str, b: u64, seed: u64) -> Vec<Tensor> {
    if model == "silero_vad" {
        let audio: Vec<f32> = random_f32(256 * b as usize, seed)
            .iter()
            .map(|v| v * 0.2 - 0.1)
            .collect();
        return vec![
            f32_tensor("input", &[b, 256], &audio),
            f32_tensor(
                "state",
                &[2, b, 128],
                &random_f32(256 * b as usize, seed + 1),
            ),
            Tensor::inline(
                "sr",
                rxd_protocol::DType::Int64,
                vec![],
                8000i64.to_le_bytes().to_vec(),
            ),
        ];
    }
    let (name, item) = input_of(model);
    if item.is_empty() {
        return vec![f32_tensor(name, &[3, 4, 5], &random_f32(60, seed))];
    }
    let mut shape = vec![b];
    shape.extend_from_slice(item);
    let n = shape.iter().product::<u64>() as usize;
    vec![f32_tensor(name, &shape, &random_f32(n, seed))]
}

fn item(model: &str, seed: u64) -> Vec<Tensor> {
    rows_seeded(model, 1, seed)
}

fn rows(model: &str, b: u64) -> Vec<Tensor> {
    rows_seeded(model, b, 1)
}

/// Items/s of `sessions` sessions of `threads` threads at batch `b`.
fn in_process(model: &str, threads: usize, sessions: usize, b: u64, secs: f64) -> f64 {
    let b = if model == "sigmoid" { 1 } else { b };
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..sessions)
            .map(|_| {
                s.spawn(move || {
                    let mut sess = bench_session(model, threads);
                    let xs = rows(model, b);
                    let mut run = || {
                        let values: Vec<(String, ort::value::DynValue)> =
                            xs.iter().map(|x| (x.name.clone(), to_ort(x))).collect();
                        std::hint::black_box(sess.run(values).unwrap());
                    };
                    run();
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed().as_secs_f64() < secs {
                        run();
                        n += 1;
                    }
                    (n * b) as f64 / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

fn best_in_process(model: &str, cores: usize, secs: f64) -> (f64, (usize, usize, u64)) {
    let mut best = (0.0, (1, 1, 1));
    let sizes: &[u64] = if model == "sigmoid" {
        &[1]
    } else {
        &[1, 4, 8, 16, 32]
    };
    for (threads, sessions) in [(cores, 1), (1, cores)] {
        for &b in sizes {
            let r = in_process(model, threads, sessions, b, secs);
            if r > best.0 {
                best = (r, (threads, sessions, b));
            }
        }
    }
    best
}

fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// In-process ORT's thread CPU µs per row at batch `b` (one intra-op thread).
fn ort_cpu_per_row(model: &str, b: u64) -> f64 {
    let mut r = Reference::new(&model_file(model));
    let xs = rows(model, b.max(1));
    let b = if model == "sigmoid" { 1 } else { b.max(1) };
    let runs = (2000 / b).max(20);
    for _ in 0..runs / 10 + 3 {
        std::hint::black_box(r.run(&xs));
    }
    let start = thread_cpu();
    for _ in 0..runs {
        std::hint::black_box(r.run(&xs));
    }
    (thread_cpu() - start).as_secs_f64() * 1e6 / (runs * b) as f64
}

struct LoadRun {
    /// The load generator's own CPU (this process, all its threads), in cores.
    gen_cores: f64,
    per_s: f64,
    p99_ms: f64,
    cpu_us: f64,
    mean_batch: f64,
}

/// The socket's best path: `rxctl bench`'s load generator (the async client, tensors through
/// the arena, every request a different input), `clients` closed-loop clients for `secs`.
fn load_socket(d: &TestDaemon, model: &str, clients: usize, secs: f64) -> LoadRun {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    let load = rxd_client::bench::Load {
        socket: d.socket.clone(),
        model: model.into(),
        inputs: item(model, 5),
        concurrency: clients,
        rate_phases: Vec::new(),
        duration: Duration::from_secs_f64(secs),
        requests: None,
        warmup: Duration::ZERO,
        arena: true,
        timeout_ms: None,
        same_input: false,
    };
    let cpu0 = process_cpu(d.pid());
    let gen0 = process_cpu(std::process::id() as i32);
    let start = Instant::now();
    let r = rt
        .block_on(rxd_client::bench::run(&load, |_, _| {}))
        .unwrap();
    let cpu = process_cpu(d.pid()) - cpu0;
    let gen_cpu = process_cpu(std::process::id() as i32) - gen0;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    LoadRun {
        gen_cores: gen_cpu.as_secs_f64() / start.elapsed().as_secs_f64(),
        per_s: r.throughput_per_s,
        p99_ms: r.latency_ms.p99,
        cpu_us: cpu.as_secs_f64() * 1e6 / (r.requests + r.warmup_requests) as f64,
        mean_batch: r.mean_batch_size,
    }
}

/// One connection's ring, written by hand: the load generator drives many from one thread.
struct Lane {
    conn: RawConn,
    mem: rxd_shm::ring::RingMem,
    geo: rxd_protocol::ring::Geometry,
    sq_tail: u32,
    cq_head: u32,
    xs: Vec<Tensor>,
    /// The input every request changes (the largest), so that none is coalesced.
    vary: usize,
    /// Whether it goes through the arena (inline otherwise).
    arena: bool,
    n: u64,
    client: u64,
    sent: Instant,
}

impl Lane {
    fn connect(socket: &std::path::Path, mut xs: Vec<Tensor>, client: u64) -> Lane {
        let mut conn = RawConn::connect(socket).unwrap();
        let (welcome, fd) = conn
            .handshake_ring(
                4 << 20,
                Some(rxd_protocol::RingAsk {
                    entries: 2,
                    slot_bytes: 4096,
                }),
            )
            .unwrap();
        let grant = welcome.ring.expect("a ring");
        let geo = rxd_protocol::ring::Geometry {
            entries: grant.entries,
            slot_bytes: grant.slot_bytes,
        };
        let map =
            rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), welcome.arena_bytes as usize)
                .unwrap();
        let mem = rxd_shm::ring::RingMem::new(Arc::new(map), grant.offset, geo.bytes()).unwrap();
        let size = |t: &Tensor| match &t.data {
            rxd_protocol::TensorData::Inline(b) => b.len(),
            _ => 0,
        };
        let vary = (0..xs.len()).max_by_key(|&i| size(&xs[i])).unwrap();
        let arena = size(&xs[vary]) >= 16 << 10;
        // A large input lies in the arena, where a client would make it: written once here,
        // and each request changes its first value in place (the in-process baseline, too,
        // times runs on inputs made beforehand; copying 110 KB twice a request cost the
        // generator 17 µs of the two cores' CPU per classifier request).
        if arena {
            let len = size(&xs[vary]) as u64;
            if let rxd_protocol::TensorData::Inline(b) = &xs[vary].data {
                mem.mapping().copy_in(0, b).unwrap();
            }
            xs[vary].data =
                rxd_protocol::TensorData::Arena(rxd_protocol::ArenaRef { offset: 0, len });
        }
        Lane {
            conn,
            mem,
            geo,
            sq_tail: 0,
            cq_head: 0,
            xs,
            vary,
            arena,
            n: 0,
            client,
            sent: Instant::now(),
        }
    }

    /// Sends the next request (its input differs from every other's).
    fn submit_model(&mut self, model: &str) {
        use rxd_protocol::ring as layout;
        self.n += 1;
        let v = (self.client * 1_000_000 + self.n) as f32 * 1e-7;
        match &mut self.xs[self.vary].data {
            rxd_protocol::TensorData::Inline(b) => b[..4].copy_from_slice(&v.to_le_bytes()),
            _ => self.mem.mapping().copy_in(0, &v.to_le_bytes()).unwrap(),
        }
        let xs = self.xs.clone();
        // Large inputs through the arena, and outputs into it as `rxctl bench` asks them.
        let area = self.arena.then_some(rxd_protocol::ArenaRef {
            offset: 2 << 20,
            len: 2 << 20,
        });
        let bytes = infer_frame_into(self.n, model, xs, area);
        self.mem
            .write(self.geo.sq_slot(self.sq_tail), &bytes)
            .unwrap();
        self.sq_tail = self.sq_tail.wrapping_add(1);
        let tail = self.mem.word(layout::SQ_TAIL);
        tail.store(self.sq_tail, Ordering::SeqCst);
        let wake = self.mem.word(layout::SQ_WAKE);
        if wake.load(Ordering::SeqCst) != 0 && wake.swap(0, Ordering::SeqCst) != 0 {
            rxd_shm::ring::wake(tail);
        }
        self.sent = Instant::now();
    }

    /// The answer, if it came: checked and consumed.
    fn poll(&mut self) -> Option<Duration> {
        use rxd_protocol::ring as layout;
        if self.mem.word(layout::CQ_TAIL).load(Ordering::Acquire) == self.cq_head {
            return None;
        }
        let took = self.sent.elapsed();
        let at = self.geo.cq_slot(self.cq_head);
        let mut len = [0u8; 4];
        self.mem.read(at, &mut len).unwrap();
        let len = u32::from_le_bytes(len);
        let mut body = vec![0u8; len.max(8) as usize];
        self.mem.read(at + 4, &mut body).unwrap();
        self.cq_head = self.cq_head.wrapping_add(1);
        self.mem
            .word(layout::CQ_HEAD)
            .store(self.cq_head, Ordering::Release);
        if len == 0 {
            // A redirect: the answer comes on the socket.
            body = self.conn.read_body().unwrap();
        }
        let r: ResponseFrame = frame::decode(&body).unwrap();
        assert_eq!(r.id, self.n);
        assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
        Some(took)
    }
}

/// The ring's load generator: `clients` connections with a ring each, driven by as many
/// threads as `rxctl bench` uses (each thread round-robins over its connections and sleeps
/// on all their completion tails at once when none has an answer), for `secs`.
fn load_ring(d: &TestDaemon, model: &str, clients: usize, secs: f64) -> LoadRun {
    use rxd_protocol::ring as layout;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let stop = Arc::new(AtomicBool::new(false));
    let before = d.summaries()[model].clone();
    let cpu0 = process_cpu(d.pid());
    let gen0 = process_cpu(std::process::id() as i32);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (socket, stop, model) = (d.socket.clone(), stop.clone(), model.to_string());
            std::thread::spawn(move || {
                let mut lanes: Vec<Lane> = (t..clients)
                    .step_by(threads)
                    .map(|c| Lane::connect(&socket, item(&model, 1000 + c as u64), c as u64))
                    .collect();
                let mut lat = Vec::new();
                for l in &mut lanes {
                    l.submit_model(&model);
                }
                while !stop.load(Ordering::Relaxed) {
                    let mut progressed = false;
                    for l in &mut lanes {
                        if let Some(took) = l.poll() {
                            lat.push(took);
                            l.submit_model(&model);
                            progressed = true;
                        }
                    }
                    if progressed {
                        continue;
                    }
                    for l in &lanes {
                        l.mem.word(layout::CQ_WAKE).store(1, Ordering::SeqCst);
                    }
                    let words: Vec<(&std::sync::atomic::AtomicU32, u32)> = lanes
                        .iter()
                        .map(|l| (l.mem.word(layout::CQ_TAIL), l.cq_head))
                        .collect();
                    rxd_shm::ring::wait_any(&words, Duration::from_millis(10)).unwrap();
                    for l in &lanes {
                        l.mem.word(layout::CQ_WAKE).store(0, Ordering::Relaxed);
                    }
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let took = start.elapsed().as_secs_f64();
    let cpu = process_cpu(d.pid()) - cpu0;
    let gen_cpu = process_cpu(std::process::id() as i32) - gen0;
    let after = d.summaries()[model].clone();
    let (batches, rows) = (after.batches - before.batches, after.rows - before.rows);
    let n = all.len();
    all.sort();
    LoadRun {
        gen_cores: gen_cpu.as_secs_f64() / took,
        per_s: n as f64 / took,
        p99_ms: all[(n - 1) * 99 / 100].as_secs_f64() * 1e3,
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        mean_batch: rows as f64 / batches.max(1) as f64,
    }
}

fn load(d: &TestDaemon, model: &str, clients: usize, secs: f64, ring: bool) -> LoadRun {
    if ring {
        load_ring(d, model, clients, secs)
    } else {
        load_socket(d, model, clients, secs)
    }
}

fn main() {
    let n: usize = bench_setting("RXD_BENCH_N", 20000);
    let secs: f64 = bench_setting("RXD_BENCH_SECS", 5.0);
    let rounds: usize = bench_setting("RXD_BENCH_ROUNDS", 2);
    let models = std::env::var("RXD_BENCH_MODELS")
        .unwrap_or_else(|_| "ppocr_cls,yolov8n,sigmoid,silero_vad".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let paths: Vec<bool> = std::env::var("RXD_BENCH_PATHS")
        .unwrap_or_else(|_| "socket,ring".into())
        .split(',')
        .map(|p| p == "ring")
        .collect();
    if n > 0 {
        one_client(n);
    }
    // 2. 32 clients.
    load_runs(&models, &paths, secs, rounds, cores);
}

/// 1. One client on sigmoid.
fn one_client(n: usize) {
    let x = item("sigmoid", 7).remove(0);
    let req = infer_frame(1, "sigmoid", x.clone());
    let mut reference = Reference::new(&model_file("sigmoid"));
    let ort = time_n(n, || {
        std::hint::black_box(reference.run(std::slice::from_ref(&x)));
    });
    let resp = {
        let outputs = reference.run(std::slice::from_ref(&x));
        frame::encode(&ResponseFrame {
            id: 1,
            outcome: Outcome::Ok(rxd_protocol::Reply::Infer(rxd_protocol::InferReply {
                model: "sigmoid".into(),
                version: 1,
                outputs,
            })),
        })
        .unwrap()
    };
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; HEADER_LEN];
            if b.read_exact(&mut h).is_err() {
                return;
            }
            buf.resize(u32::from_le_bytes(h) as usize, 0);
            b.read_exact(&mut buf).unwrap();
            b.write_all(&resp).unwrap();
        }
    });
    let mut buf = Vec::new();
    let raw = time_n(n, || {
        a.write_all(&req).unwrap();
        read_frame(&mut a, &mut buf);
    });
    drop(a);
    echo.join().unwrap();

    let repo = Repo::new();
    repo.link("sigmoid", 1, "sigmoid");
    let d = TestDaemon::start(repo.path(), &["--io-threads", "1"]);
    let mut conn = RawConn::connect(&d.socket).unwrap();
    conn.handshake().unwrap();
    let mut s = conn.stream;
    let socket = time_n(n, || {
        s.write_all(&req).unwrap();
        read_frame(&mut s, &mut buf);
    });
    let want = reference.run(std::slice::from_ref(&x));
    let mut ring_p50 = Vec::new();
    for spin_us in [100u64, 0] {
        let mut c = RingClient::connect(
            &d.socket,
            RingOptions {
                spin: Duration::from_micros(spin_us),
                ..RingOptions::default()
            },
        )
        .unwrap();
        assert!(c.has_ring());
        assert_eq!(c.infer("sigmoid", vec![x.clone()]).unwrap(), want);
        ring_p50.push((
            spin_us,
            time_n(n, || {
                std::hint::black_box(c.infer("sigmoid", vec![x.clone()]).unwrap());
            }),
        ));
    }
    // The library's blocking client, socket and ring (its reaper thread hands the answer over).
    let mut library = Vec::new();
    for entries in [0u32, 4] {
        let c = rxd_client::blocking::Client::connect_with(
            &d.socket,
            rxd_client::ClientOptions {
                ring_entries: entries,
                ..rxd_client::ClientOptions::default()
            },
        )
        .unwrap();
        assert_eq!(c.infer("sigmoid", vec![x.clone()]).unwrap(), want);
        let t = time_n(n / 2, || {
            std::hint::black_box(c.infer("sigmoid", vec![x.clone()]).unwrap());
        });
        assert_eq!(c.as_async().ring_requests().is_some(), entries > 0);
        library.push((entries, t));
    }
    drop(d);
    println!("### One client, sigmoid.onnx [3,4,5] f32, {n} round trips\n");
    println!("| path | p50 µs | p99 µs | added p50 over in-process / raw socket p50 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| in-process ORT `Session::run` | {:.1} | {:.1} | |",
        ort.0, ort.1
    );
    println!(
        "| raw Unix-socket ping-pong (same frame sizes) | {:.1} | {:.1} | |",
        raw.0, raw.1
    );
    println!(
        "| rxd through the socket (blocking raw client) | {:.1} | {:.1} | {:.2} |",
        socket.0,
        socket.1,
        (socket.0 - ort.0) / raw.0
    );
    for (entries, t) in &library {
        let path = if *entries == 0 {
            "the socket".to_string()
        } else {
            format!("the ring (`ring_entries: {entries}`, reaper spin 50 µs)")
        };
        println!(
            "| rxd, `blocking::Client::infer` through {path} | {:.1} | {:.1} | {:.2} |",
            t.0,
            t.1,
            (t.0 - ort.0) / raw.0
        );
    }
    for (spin, t) in &ring_p50 {
        println!(
            "| rxd through the ring (`RingClient`, spin {spin} µs) | {:.1} | {:.1} | {:.2} |",
            t.0,
            t.1,
            (t.0 - ort.0) / raw.0
        );
    }
    println!();
}

fn load_runs(models: &str, paths: &[bool], secs: f64, rounds: usize, cores: usize) {
    println!(
        "### 32 single-item clients (large tensors through the arena), socket and ring alternately, {secs} s each, {rounds} rounds\n"
    );
    println!(
        "| model | best in-process items/s (where) | path | req/s (per round) | share | p99 ms | mean batch | daemon CPU µs/req | of which outside ORT | load generator's CPU (cores) |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for model in models.split(',').filter(|m| !m.is_empty()) {
        let best = best_in_process(model, cores, secs / 2.0);
        let repo = Repo::new();
        repo.link(model, 1, model);
        // The shapes requests have, so that load-time tuning measures the model (as
        // benches/tune.rs does).
        if let Some(toml) = settings_of(model) {
            repo.settings(model, &toml);
        }
        let cache = tempfile::tempdir().unwrap();
        let d = TestDaemon::start_with(
            repo.path(),
            &["--intra-op-threads", "0", "--log-level", "info"],
            &format!(
                "{}cache-directory = '{}'\n",
                // An rxd from before load-time tuning refuses the key (TestDaemon leaves it out).
                if bench_setting("RXD_BENCH_TUNE", 1) != 0 {
                    "tune = true\n"
                } else {
                    ""
                },
                cache.path().display()
            ),
        );
        let mut runs: Vec<(bool, LoadRun, f64)> = Vec::new();
        for _ in 0..rounds {
            for &ring in paths {
                let r = load(&d, model, 32, secs, ring);
                let (t, s, b) = best.1;
                let base = in_process(model, t, s, b, secs / 2.0);
                runs.push((ring, r, base));
            }
        }
        drop(d);
        for ring in [false, true] {
            if !paths.contains(&ring) {
                continue;
            }
            let mine: Vec<&(bool, LoadRun, f64)> = runs.iter().filter(|r| r.0 == ring).collect();
            let per_round: Vec<String> = mine.iter().map(|r| format!("{:.0}", r.1.per_s)).collect();
            let share: f64 =
                mine.iter().map(|r| r.1.per_s / r.2).sum::<f64>() / mine.len() as f64 * 100.0;
            let mean = |f: &dyn Fn(&LoadRun) -> f64| {
                mine.iter().map(|r| f(&r.1)).sum::<f64>() / mine.len() as f64
            };
            let batch = mean(&|r| r.mean_batch);
            let ort_cpu = ort_cpu_per_row(model, batch.round() as u64);
            let (t, s, b) = best.1;
            // Per round too, to a tenth: a light model's few µs are what is compared.
            let outside: Vec<String> = mine
                .iter()
                .map(|r| format!("{:.1}", r.1.cpu_us - ort_cpu))
                .collect();
            println!(
                "| {model} | {:.0} (batch {b}, {s} × {t} thread(s)) | {} | {} | {share:.0} % | {:.2} | {batch:.1} | {:.1} | {:.1} ({}) | {:.2} |",
                best.0,
                if ring { "ring" } else { "socket" },
                per_round.join(" / "),
                mean(&|r| r.p99_ms),
                mean(&|r| r.cpu_us),
                mean(&|r| r.cpu_us) - ort_cpu,
                outside.join(" / "),
                mean(&|r| r.gen_cores),
            );
        }
    }
    println!();
}
