//! Issue 19: the soak. Many clients at once against the real daemon for a while — arena and
//! inline, pipelined, killed at random with requests in flight, deadlines and priorities,
//! coalescing and the result cache on — while an admin reloads the repository and a small
//! memory budget keeps evicting models. Every answer is checked by its request id against
//! ONNX Runtime run in-process on the same inputs: nothing lost, nothing answered twice,
//! nothing answered to the wrong request, nothing wrong.
//!
//! `RXD_SOAK_SECS` (default 60) and `RXD_SOAK_CLIENTS` (default 48) size it; the figures are
//! printed for BENCHMARKS.md.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::{
    ArenaRef, DType, ErrorCode, InferRequest, Outcome, Reply, Request, RequestFrame, Tensor,
    TensorData, frame,
};

/// One request the soak can send, with what in-process ORT answers to it.
struct Case {
    model: &'static str,
    inputs: Vec<Tensor>,
    want: Vec<Tensor>,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |model: &'static str, inputs: Vec<Tensor>| {
        let want = Reference::new(&model_file(model)).run(&inputs);
        out.push(Case {
            model,
            inputs,
            want,
        });
    };
    let digits = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&digits).unwrap();
    for i in 0..24usize {
        let rows = 1 + i % 4;
        let from = i * 4;
        let b = bytes[from * 256..(from + rows) * 256].to_vec();
        add(
            "digits",
            vec![Tensor::inline(
                "input",
                DType::Float32,
                vec![rows as u64, 64],
                b,
            )],
        );
    }
    for i in 0..12u64 {
        let rows = 1 + i % 6;
        let x: Vec<f32> = random_f32(rows as usize * 256, 100 + i)
            .iter()
            .map(|v| v * 2.0 - 1.0)
            .collect();
        add("relu", vec![f32_tensor("x", &[rows, 256], &x)]);
    }
    for i in 0..12u64 {
        let rows = 1 + i % 5;
        add(
            "slice_first",
            vec![f32_tensor(
                "x",
                &[rows, 64],
                &random_f32(rows as usize * 64, 200 + i),
            )],
        );
    }
    for i in 0..6u64 {
        add(
            "sigmoid",
            vec![f32_tensor("x", &[3, 4, 5], &random_f32(60, 300 + i))],
        );
        add(
            "mul_1",
            vec![f32_tensor("X", &[3, 2], &random_f32(6, 400 + i))],
        );
    }
    out
}

/// Equal to the reference: integer outputs exactly, float outputs within 1e-5 relative (a
/// batch of several requests may round differently from one run alone). Answers to another
/// request are far off: the inputs of every case differ.
fn matches(got: &[Tensor], want: &[Tensor]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.name == w.name
                && g.dtype == w.dtype
                && g.shape == w.shape
                && match g.dtype {
                    DType::Float32 => max_rel_diff(g, w) <= 1e-5,
                    _ => g.data == w.data,
                }
        })
}

#[derive(Debug, Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    deadline: AtomicU64,
    over_budget: AtomicU64,
    killed_in_flight: AtomicU64,
    kills: AtomicU64,
    connections: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    misrouted: AtomicU64,
    wrong: AtomicU64,
    unexpected: Mutex<Vec<String>>,
}

impl Tally {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a request in flight expects.
struct Outstanding {
    case: usize,
    deadline: bool,
    slot: Option<usize>,
}

/// The models in use move on every few seconds (three of the five at a time): the ones left
/// behind go idle and the memory budget evicts them for the ones coming in.
fn pick(cases: &[Case], start: Instant, rng: &mut Rng) -> usize {
    const MODELS: [&str; 5] = ["digits", "relu", "slice_first", "sigmoid", "mul_1"];
    let phase = (start.elapsed().as_secs() / 3) as usize;
    let window: Vec<&str> = (0..3).map(|i| MODELS[(phase + i) % MODELS.len()]).collect();
    loop {
        let i = rng.below(cases.len() as u64) as usize;
        if window.contains(&cases[i].model) {
            return i;
        }
    }
}

/// A small deterministic generator per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SLOTS: usize = 8;
const SLOT: u64 = 128 << 10;
const OUT_AT: u64 = 64 << 10;

/// One client session: a connection (arena or not), `n` requests pipelined `depth` deep,
/// killed after `kill_after` requests if set.
fn session(socket: &std::path::Path, cases: &[Case], start: Instant, rng: &mut Rng, tally: &Tally) {
    let arena = rng.below(2) == 0;
    let n = 20 + rng.below(120) as usize;
    let depth = 1 + rng.below(8) as usize;
    let kill_after = (rng.below(6) == 0).then(|| rng.below(n as u64) as usize);
    let Ok(mut conn) = RawConn::connect(socket) else {
        tally
            .unexpected
            .lock()
            .unwrap()
            .push("connect failed".into());
        return;
    };
    Tally::add(&tally.connections, 1);
    let map = if arena {
        match conn.handshake_arena(SLOTS as u64 * SLOT) {
            Ok((w, fd)) => Some(rxd_shm::Mapping::map(fd.as_fd(), w.arena_bytes as usize).unwrap()),
            Err(e) => {
                tally
                    .unexpected
                    .lock()
                    .unwrap()
                    .push(format!("handshake: {e}"));
                return;
            }
        }
    } else {
        if let Err(e) = conn.handshake() {
            tally
                .unexpected
                .lock()
                .unwrap()
                .push(format!("handshake: {e}"));
            return;
        }
        None
    };
    let mut outstanding: HashMap<u64, Outstanding> = HashMap::new();
    let mut answered: std::collections::HashSet<u64> = Default::default();
    let mut free_slots: Vec<usize> = (0..SLOTS).collect();
    let mut next_id = 1u64;
    let mut sent = 0usize;
    let depth = if map.is_some() {
        depth.min(SLOTS)
    } else {
        depth
    };
    loop {
        // Keep `depth` requests in flight.
        while sent < n && outstanding.len() < depth {
            if kill_after == Some(sent) {
                // Killed: the connection goes away with requests in flight.
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                Tally::add(&tally.kills, 1);
                Tally::add(&tally.killed_in_flight, outstanding.len() as u64);
                return;
            }
            let ci = pick(cases, start, rng);
            let case = &cases[ci];
            let mut req = InferRequest::new(case.model, case.inputs.clone());
            req.priority = Some(rng.below(16) as u8);
            let deadline = rng.below(5) == 0;
            if deadline {
                req.timeout_ms = Some(1 + rng.below(20));
            }
            let mut slot = None;
            if let Some(m) = &map
                && rng.below(3) != 0
            {
                let s = free_slots.pop().unwrap();
                let base = s as u64 * SLOT;
                let mut off = base;
                for t in &mut req.inputs {
                    let TensorData::Inline(b) = &t.data else {
                        unreachable!()
                    };
                    m.copy_in(off, b).unwrap();
                    let len = b.len() as u64;
                    t.data = TensorData::Arena(ArenaRef { offset: off, len });
                    off += len.div_ceil(64) * 64;
                }
                // Outputs come back in the arena half the time.
                if rng.below(2) == 0 {
                    req.output_area = Some(ArenaRef {
                        offset: base + OUT_AT,
                        len: SLOT - OUT_AT,
                    });
                }
                slot = Some(s);
            }
            let id = next_id;
            next_id += 1;
            let bytes = frame::encode(&RequestFrame {
                id,
                body: Request::Infer(req),
            })
            .unwrap();
            if conn.stream.write_all(&bytes).is_err() {
                tally.unexpected.lock().unwrap().push("write failed".into());
                return;
            }
            outstanding.insert(
                id,
                Outstanding {
                    case: ci,
                    deadline,
                    slot,
                },
            );
            sent += 1;
            Tally::add(&tally.sent, 1);
        }
        if outstanding.is_empty() {
            return;
        }
        let body = match conn.read_body() {
            Ok(b) => b,
            Err(e) => {
                tally.unexpected.lock().unwrap().push(format!(
                    "read failed with {} in flight: {e}",
                    outstanding.len()
                ));
                Tally::add(&tally.lost, outstanding.len() as u64);
                return;
            }
        };
        let resp: rxd_protocol::ResponseFrame = frame::decode(&body).unwrap();
        let Some(o) = outstanding.remove(&resp.id) else {
            if answered.contains(&resp.id) {
                Tally::add(&tally.duplicated, 1);
            } else {
                Tally::add(&tally.misrouted, 1);
            }
            continue;
        };
        answered.insert(resp.id);
        if let Some(s) = o.slot {
            free_slots.push(s);
        }
        match resp.outcome {
            Outcome::Ok(Reply::Infer(r)) => {
                let got: Vec<Tensor> = r
                    .outputs
                    .into_iter()
                    .map(|t| match t.data {
                        TensorData::Arena(a) => {
                            let mut b = vec![0u8; a.len as usize];
                            map.as_ref().unwrap().copy_out(a.offset, &mut b).unwrap();
                            Tensor::inline(t.name, t.dtype, t.shape, b)
                        }
                        _ => t,
                    })
                    .collect();
                if matches(&got, &cases[o.case].want) {
                    Tally::add(&tally.ok, 1);
                } else {
                    Tally::add(&tally.wrong, 1);
                }
            }
            Outcome::Err(e) if o.deadline && e.kind() == Some(ErrorCode::DeadlineExceeded) => {
                Tally::add(&tally.deadline, 1)
            }
            // A model coming in while the ones it would evict are still busy does not fit:
            // the documented answer (PROTOCOL.md), counted apart.
            Outcome::Err(e) if e.kind() == Some(ErrorCode::OverBudget) => {
                Tally::add(&tally.over_budget, 1)
            }
            Outcome::Err(e) => tally
                .unexpected
                .lock()
                .unwrap()
                .push(format!("{} ({}): {e}", cases[o.case].model, resp.id)),
            Outcome::Ok(other) => tally
                .unexpected
                .lock()
                .unwrap()
                .push(format!("not an infer reply: {other:?}")),
        }
    }
}

#[test]
fn soak_many_clients_with_kills_reloads_and_evictions_lose_nothing() {
    let secs: u64 = bench_setting("RXD_SOAK_SECS", 60);
    let clients: u64 = bench_setting("RXD_SOAK_CLIENTS", 48);
    let repo = Repo::new();
    // Each model file carries 16 MiB that ONNX Runtime drops at load: the footprints the
    // budget works with are then the files' sizes, not the few hundred KiB, varying from load
    // to load and machine to machine, that these tiny models measure (a budget sized on those
    // once held two of the three models in use, and the soak thrashed).
    for m in ["digits", "relu", "slice_first", "sigmoid", "mul_1"] {
        repo.link_padded(m, 1, m, 16 << 20);
    }
    repo.settings("digits", "cache-bytes = \"1MiB\"\n")
        .settings("relu", "max-batch-rows = 8\n");
    // A memory budget with room for four of the five models, whatever they measure here: the
    // three in use at a time fit, and the one coming in evicts one left behind.
    let d = TestDaemon::start(repo.path(), &[]);
    let sizes: Vec<u64> = d
        .summaries()
        .values()
        .map(|m| m.memory_bytes.expect("measured"))
        .collect();
    let budget = sizes.iter().sum::<u64>() - sizes.iter().min().unwrap() / 2;
    println!("soak: footprints {sizes:?}, memory budget {budget}");
    std::fs::write(
        d.dir.path().join("rxd.toml"),
        format!("memory-budget = {budget}\n"),
    )
    .unwrap();
    d.client_inline().reload().unwrap();
    let cases = Arc::new(cases());
    let fds_before = d.fd_targets().len();
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);

    let mut threads = Vec::new();
    for c in 0..clients {
        let (socket, cases, tally) = (d.socket.clone(), cases.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c + 1).wrapping_mul(0x1234_5678_9ABC));
            while Instant::now() < until {
                session(&socket, &cases, start, &mut rng, &tally);
            }
        }));
    }
    // An admin reloads the repository, clears a cache and flips coalescing settings now and then.
    let reloads = {
        let admin = d.client_inline();
        let mut n = 0u64;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1500));
            admin.reload().expect("reload");
            n += 1;
        }
        n
    };
    for t in threads {
        t.join().unwrap();
    }

    let metrics = d.client_inline().metrics().unwrap();
    let evictions: u64 = metrics.models.iter().map(|m| m.evictions).sum();
    let t = &tally;
    let get = Tally::get;
    let unexpected = t.unexpected.lock().unwrap().clone();
    println!(
        "soak: {secs} s, {clients} clients, {} connections, {} requests sent: {} ok, {} \
         deadline_exceeded (with a deadline), {} over_budget, {} in flight on {} killed connections; {} \
         reloads, {} evictions; lost {}, duplicated {}, misrouted {}, wrong {}, other errors {}",
        get(&t.connections),
        get(&t.sent),
        get(&t.ok),
        get(&t.deadline),
        get(&t.over_budget),
        get(&t.killed_in_flight),
        get(&t.kills),
        reloads,
        evictions,
        get(&t.lost),
        get(&t.duplicated),
        get(&t.misrouted),
        get(&t.wrong),
        unexpected.len()
    );
    assert!(
        unexpected.is_empty(),
        "unexpected: {:?}",
        &unexpected[..unexpected.len().min(20)]
    );
    assert_eq!(get(&t.lost), 0);
    assert_eq!(get(&t.duplicated), 0);
    assert_eq!(get(&t.misrouted), 0);
    assert_eq!(get(&t.wrong), 0);
    assert_eq!(
        get(&t.sent),
        get(&t.ok) + get(&t.deadline) + get(&t.over_budget) + get(&t.killed_in_flight),
        "every request sent on a live connection was answered"
    );
    assert!(
        get(&t.kills) > 0 && reloads > 0,
        "the soak killed and reloaded"
    );
    assert!(evictions > 0, "the budget evicted models during the soak");
    assert!(get(&t.ok) > 1000, "the soak ran: {} answers", get(&t.ok));
    assert!(
        get(&t.over_budget) * 20 < get(&t.sent),
        "over_budget is for the moments models change places, not the rule"
    );
    // Nothing held for the dead: the daemon's fds come back to what they were.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.fd_targets().len() > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.fd_targets().len() <= fds_before, "{:?}", d.fd_targets());
}
