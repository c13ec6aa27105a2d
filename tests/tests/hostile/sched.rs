//! Scheduling and coalescing under hostile clients: priorities a peer may use, the IO thread
//! with large keyed requests, and identical requests with different terms.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rxd_client::{DType, Tensor};
use rxd_e2e::*;
use rxd_protocol::{ArenaRef, ErrorCode, InferRequest, Outcome, Request, RequestFrame, TensorData};

use crate::common::*;

/// A digits request of `rows` rows whose bytes differ from every other call's (so that
/// identical-request coalescing does not merge a flood into one run).
fn distinct_digits(rows: usize, seed: u64) -> Tensor {
    let mut values = random_f32(rows * 64, seed);
    values[0] = seed as f32;
    f32_tensor("input", &[rows as u64, 64], &values)
}

/// `n` distinct digits inputs of `rows` rows, made once (a flood must outpace the model, not
/// spend its time making inputs).
fn flood_inputs(n: u64, rows: usize) -> Vec<Tensor> {
    (0..n).map(|i| distinct_digits(rows, 10_000 + i)).collect()
}

fn infer_frame(id: u64, req: InferRequest) -> RequestFrame {
    RequestFrame {
        id,
        body: Request::Infer(req),
    }
}

/// Keeps `depth` requests from `make` in flight on `conn` until `stop`; returns how many were
/// answered ok, and the error codes of the others.
fn flood(
    mut conn: RawConn,
    depth: u64,
    stop: Arc<AtomicBool>,
    mut make: impl FnMut(u64) -> InferRequest,
) -> (u64, Vec<ErrorCode>) {
    let mut next = 1;
    for _ in 0..depth {
        conn.send(&infer_frame(next, make(next)));
        next += 1;
    }
    let (mut ok, mut errors) = (0, Vec::new());
    let mut in_flight = depth;
    while in_flight > 0 {
        match conn.read_response().outcome {
            Outcome::Ok(_) => ok += 1,
            Outcome::Err(e) => errors.push(e.kind().unwrap_or(ErrorCode::Internal)),
        }
        in_flight -= 1;
        if !stop.load(Ordering::Relaxed) {
            conn.send(&infer_frame(next, make(next)));
            next += 1;
            in_flight += 1;
        }
    }
    (ok, errors)
}

/// Regression (issue 19, item 6): any peer could queue requests at priority 255, and one
/// client doing so held back another's default-priority requests for ~26 s each (255 levels
/// of aging). Peers other than admins may now use 0..=`max-peer-priority` (default 15); at its
/// highest level a stream holds a default-priority request back by at most
/// `priority-aging-ms` × 15 plus the queue ahead of it.
#[test]
fn a_peers_priorities_cannot_starve_default_priority_requests() {
    let _serial = serial();
    let repo = repo_with(&[]);
    // 20 ms aging: 255 levels would be 5.1 s, the 15 a peer may use 0.3 s.
    repo.settings("digits", "priority-aging-ms = 20\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    // The peer floods at `level`, keeping the model's queue full of 1024-row requests (each
    // runs alone: more than max-batch-rows), while the bystander asks at the default priority
    // (0). The bound: 15 levels × 20 ms, plus the queue ahead (64 requests, tens of ms) and
    // the bystander's own connection set-up on a loaded 2-core machine.
    let bound = Duration::from_millis(15 * 20 + 700);
    let inputs = Arc::new(flood_inputs(64, 1024));
    let attack = |level: u8| {
        let bystander = Bystander::start(&d.socket);
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = connect_as_nobody(&d.socket);
        conn.handshake().unwrap();
        let (flag, inputs) = (stop.clone(), inputs.clone());
        let attacker = std::thread::spawn(move || {
            flood(conn, 64, flag, |i| {
                let x = inputs[(i % 64) as usize].clone();
                let mut r = InferRequest::new("digits", vec![x]);
                r.priority = Some(level);
                r
            })
        });
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        let (ok, errors) = attacker.join().unwrap();
        let seen = bystander.stop();
        eprintln!(
            "flood at {level}: {ok} ok, {} refused; bystander {seen:?}",
            errors.len()
        );
        (ok, errors, seen)
    };

    // At 255, as reported: refused (before the fix it ran ahead of everyone, and the
    // bystander waited 255 × 20 ms per request).
    let (ok, errors, seen) = attack(255);
    assert!(
        seen.max_latency <= bound,
        "the bystander waited {:?}",
        seen.max_latency
    );
    assert_eq!(ok, 0, "the peer's priority-255 requests ran");
    assert!(errors.iter().all(|&e| e == ErrorCode::PermissionDenied));

    // At the highest level a peer may use: it runs, and the bystander is served within the
    // bound all along.
    let (ok, errors, seen) = attack(15);
    assert!(ok > 200, "the flood ran: {ok}");
    assert!(errors.is_empty(), "{errors:?}");
    assert_unharmed(&mut d, &before, &seen, bound, 128 << 20);

    // The refusal says what a peer may use; an admin (this test's uid) may use any level.
    let mut probe = connect_as_nobody(&d.socket);
    probe.handshake().unwrap();
    let mut req = InferRequest::new("digits", vec![distinct_digits(1, 1)]);
    req.priority = Some(16);
    probe.send(&infer_frame(1, req.clone()));
    match probe.read_response().outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind(), Some(ErrorCode::PermissionDenied), "{e}");
            assert!(e.message.contains("0..=15"), "{e}");
        }
        Outcome::Ok(_) => panic!("a peer ran a request at priority 16"),
    }
    req.priority = Some(255);
    d.client_inline().infer_request(req).unwrap();
}

/// Regression (issue 19, item 7): with `cache-bytes` set, every request was keyed (arena
/// inputs copied and hashed) on the connection's read loop, however large: 8 requests naming
/// 256 MiB arena inputs froze every other client for seconds. Requests over 64 KiB are now
/// keyed on a small pool of threads, and what they hold is bounded by `arena-total-bytes`.
#[test]
fn large_keyed_requests_do_not_stall_other_clients() {
    let _serial = serial();
    let repo = repo_with(&["slice_first"]);
    // slice_first reads one element per row: the work is all in keying the 256 MiB input.
    repo.settings(
        "slice_first",
        "cache-bytes = 1048576\nmax-dims = { x = [1, 67108864] }\n",
    );
    let mut d = shared_daemon(
        repo.path(),
        // (A user may hold half of arena-total-bytes: eight 256 MiB arenas need 4 GiB.)
        "max-arena-bytes = \"256MiB\"\narena-total-bytes = \"4GiB\"\n",
        &[],
    );
    let before = before(&d);
    const ARENA: u64 = 256 << 20;
    let bystander = Bystander::start(&d.socket);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..8u8)
        .map(|n| {
            let mut conn = connect_as_nobody(&d.socket);
            let (welcome, fd) = conn.handshake_arena(ARENA).unwrap();
            assert_eq!(welcome.arena_bytes, ARENA);
            let map = rxd_shm::Mapping::map(fd.as_fd(), ARENA as usize).unwrap();
            // Inputs differ between connections (one page each), the rest is zeros.
            map.copy_in(0, &[n + 1; 4096]).unwrap();
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let _map = map;
                let (ok, errors) = flood(conn, 1, stop, |_| {
                    InferRequest::new(
                        "slice_first",
                        vec![Tensor {
                            name: "x".into(),
                            dtype: DType::Float32,
                            shape: vec![1, ARENA / 4],
                            data: TensorData::Arena(ArenaRef {
                                offset: 0,
                                len: ARENA,
                            }),
                        }],
                    )
                });
                assert!(errors.is_empty(), "{errors:?}");
                answered.fetch_add(ok, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    let seen = bystander.stop();
    let answered = answered.load(Ordering::Relaxed);
    eprintln!("{answered} large requests answered; bystander {seen:?}");
    assert!(answered >= 8, "the large requests were served: {answered}");
    assert_unharmed(
        &mut d,
        &before,
        &seen,
        Duration::from_millis(1000),
        128 << 20,
    );
}

/// Regression (issue 19, item 8): a request without a deadline that was coalesced into an
/// identical one with `timeout_ms: 30` got `deadline_exceeded` when the other's deadline
/// passed (5–11 of 14k in a mixed run). It now joins only a group whose deadline is no
/// earlier and whose priority is no lower than its own; otherwise it runs on its own terms.
#[test]
fn a_request_never_fails_because_of_a_strangers_deadline() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.settings(
        "digits",
        "max-batch-rows = 1\nmax-dims = { input = [20000, 64] }\n",
    );
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let big = distinct_digits(20_000, 7);
    // The stranger keeps the model busy (its own backlog: the fair share puts its hurried
    // request behind it).
    let mut busy = connect_as_nobody(&d.socket);
    busy.handshake().unwrap();
    let mut stranger = connect_as_nobody(&d.socket);
    stranger.handshake().unwrap();
    let mut patient = RawConn::connect(&d.socket).unwrap();
    patient.handshake().unwrap();
    let mut expired = 0;
    // Rounds until the stranger's deadline has passed in four of them (timing decides which).
    for round in 0..40u64 {
        if expired >= 4 {
            break;
        }
        // The model is busy with twenty large requests (a few ms each on a fast machine)...
        for id in 1..=20 {
            busy.send(&infer_frame(
                round * 100 + id,
                InferRequest::new("digits", vec![big.clone()]),
            ));
        }
        // ...when a stranger asks with a 10 ms deadline, and the patient client (no
        // deadline) asks the same thing a moment later.
        let x = distinct_digits(1, 1000 + round);
        let mut hurried = InferRequest::new("digits", vec![x.clone()]);
        hurried.timeout_ms = Some(10);
        stranger.send(&infer_frame(1, hurried));
        std::thread::sleep(Duration::from_millis(2));
        patient.send(&infer_frame(1, InferRequest::new("digits", vec![x])));
        match patient.read_response().outcome {
            Outcome::Ok(_) => {}
            Outcome::Err(e) => panic!("round {round}: the patient request failed: {e}"),
        }
        match stranger.read_response().outcome {
            Outcome::Err(e) if e.kind() == Some(ErrorCode::DeadlineExceeded) => expired += 1,
            Outcome::Err(e) => panic!("{e}"),
            Outcome::Ok(_) => {}
        }
        for _ in 1..=20 {
            assert!(matches!(busy.read_response().outcome, Outcome::Ok(_)));
        }
    }
    // The scenario happened: the stranger's deadline passed while the model was busy.
    assert!(
        expired >= 4,
        "the 10 ms deadline passed in only {expired} of 40 rounds"
    );
    drop((busy, stranger, patient));
    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 128 << 20);
}

/// The fair share within a level, end to end: one peer's backlog of equal-priority requests
/// runs in turn with another client's requests instead of ahead of them.
#[test]
fn a_peers_backlog_at_one_level_does_not_hold_back_others_at_that_level() {
    let _serial = serial();
    let repo = repo_with(&[]);
    // One flood request per batch (2000 rows), so that the backlog takes long to drain.
    repo.settings("digits", "max-batch-rows = 2000\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = connect_as_nobody(&d.socket);
    conn.handshake().unwrap();
    let flag = stop.clone();
    let inputs = flood_inputs(64, 2000);
    let t = Instant::now();
    let attacker = std::thread::spawn(move || {
        flood(conn, 64, flag, |i| {
            InferRequest::new("digits", vec![inputs[(i % 64) as usize].clone()])
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let bystander = Bystander::start(&d.socket);
    // A client at the same (default) level, one request at a time on one connection.
    let (x, want) = digits_case(4);
    let c = d.client_inline();
    let mut latencies = Vec::new();
    while t.elapsed() < Duration::from_secs(3) {
        let start = Instant::now();
        assert_eq!(c.infer("digits", vec![x.clone()]).unwrap(), want);
        latencies.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    drop(c);
    let seen = bystander.stop();
    let (ok, errors) = attacker.join().unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    // Behind the whole backlog (64 requests) a request would wait about 64 of the flood's
    // requests each time.
    let backlog = t.elapsed() / (ok.max(1) as u32) * 64;
    eprintln!("flood: {ok} ok, backlog {backlog:?}; median {median:?}; bystander {seen:?}");
    assert!(
        median < backlog / 4,
        "the median request waited {median:?}; the backlog drains in {backlog:?}"
    );
    assert_unharmed(
        &mut d,
        &before,
        &seen,
        backlog + Duration::from_secs(1),
        64 << 20,
    );
}

/// A peer's backlog of requests far larger than others' — within `max-dims`, one row each —
/// took its turns by rows: each turn the cost of a small request, so the whole backlog ran
/// ahead of another user's request (a 20 ms request waited 87 s behind 2560² images). Turns
/// now count input elements, and a batch gathers at most ~0.5 s of work: the other user waits
/// about one of the large requests. And a request expected to keep a worker longer than a
/// quarter of `watchdog-stuck-secs` is refused to non-admins (`tensor_too_large`) instead of
/// holding the model up (and, past the watchdog's limit, having the daemon restarted).
#[test]
fn a_peers_large_requests_take_turns_by_their_size_and_the_largest_are_refused() {
    let _serial = serial();
    let repo = repo_with(&["yolov8n"]);
    let mut d = shared_daemon(repo.path(), "watchdog-stuck-secs = 2\n", &[]);
    let before = before(&d);
    let image = |side: u64, seed: u64| {
        let n = (3 * side * side) as usize;
        f32_tensor("images", &[1, 3, side, side], &random_f32(n, seed))
    };
    // The other user's requests (320², the warmup's size) teach the model what they cost.
    let c = d.client_inline();
    let small = image(320, 1);
    for _ in 0..5 {
        c.infer("yolov8n", vec![small.clone()]).unwrap();
    }
    let mut conn = connect_as_nobody(&d.socket);
    conn.handshake().unwrap();
    // 9 times the pixels: allowed, each a few hundred ms.
    let large: Vec<Tensor> = (0..8).map(|i| image(960, 100 + i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let attacker = std::thread::spawn(move || {
        flood(conn, 8, flag, |i| {
            InferRequest::new("yolov8n", vec![large[(i % 8) as usize].clone()])
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    let mut latencies = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        let start = Instant::now();
        c.infer("yolov8n", vec![small.clone()]).unwrap();
        latencies.push(start.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = attacker.join().unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let one_large = t.elapsed() / (ok.max(1) as u32);
    latencies.sort();
    eprintln!(
        "large requests: {ok} answered, ~{one_large:?} each; the small ones' median {:?}, \
         worst {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    // Behind the backlog (8 in flight) a small request waited for all 8 large ones and the
    // batch running (a median of 1.26 s before turns went by size); by size, for the batch
    // running — its head and at most 0.5 s of expected work more (the policy's
    // MAX_BATCH_COMPUTE), several large ones where a machine batches them well — and its turn.
    let median = latencies[latencies.len() / 2];
    assert!(
        median < one_large * 4 + Duration::from_millis(500),
        "a small request waited {median:?} (median); one large request takes ~{one_large:?}"
    );
    // 41 times the pixels is within max-dims, but expected to take more than 0.5 s (a
    // quarter of watchdog-stuck-secs = 2): refused to a non-admin, at once.
    let mut conn = connect_as_nobody(&d.socket);
    conn.handshake().unwrap();
    conn.send(&infer_frame(
        1,
        InferRequest::new("yolov8n", vec![image(2048, 7)]),
    ));
    let start = Instant::now();
    match conn.read_response().outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind(), Some(ErrorCode::TensorTooLarge), "{e}");
            assert!(e.message.contains("watchdog-stuck-secs"), "{e}");
        }
        Outcome::Ok(_) => panic!("a 2048² request ran"),
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    drop((c, conn));
    assert_unharmed(
        &mut d,
        &before,
        &Seen::no_bystander(),
        Duration::from_secs(2),
        256 << 20,
    );
}

/// A peer keeping a model's queue full (`queue-capacity` 16, 64 slow requests in flight)
/// had every other user's request refused `busy` at admission, before fair ordering could
/// do anything. A request of another user now takes the place of the flood's latest, which
/// is refused in its stead: the other user is served, every time.
#[test]
fn a_peer_filling_a_models_queue_does_not_get_others_refused() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.settings("digits", "max-batch-rows = 2000\n");
    let mut d = shared_daemon(repo.path(), "queue-capacity = 16\n", &[]);
    let before = before(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = connect_as_nobody(&d.socket);
    conn.handshake().unwrap();
    let flag = stop.clone();
    let inputs = flood_inputs(64, 2000);
    let attacker = std::thread::spawn(move || {
        flood(conn, 64, flag, |i| {
            InferRequest::new("digits", vec![inputs[(i % 64) as usize].clone()])
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let (x, want) = digits_case(4);
    let c = d.client_inline();
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(3) {
        match c.infer("digits", vec![x.clone()]) {
            Ok(out) => assert_eq!(out, want),
            Err(e) => panic!("the other user was refused after {served} served: {e}"),
        }
        served += 1;
    }
    stop.store(true, Ordering::Relaxed);
    drop(c);
    let (ok, errors) = attacker.join().unwrap();
    eprintln!(
        "flood: {ok} ok, {} refused; the other user: {served} served",
        errors.len()
    );
    assert!(errors.iter().all(|&e| e == ErrorCode::Busy), "{errors:?}");
    assert!(!errors.is_empty(), "the flood never filled the queue");
    assert!(served >= 5, "{served} served in 3 s");
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}

/// Results are never shared between users: another user's identical request is neither
/// answered from the cache nor joined to a group of the first user's, so a peer cannot learn
/// from an answer's timing or from the counts it may read whether someone else sent an input.
/// A user's own repeat still hits.
#[test]
fn another_users_identical_request_is_not_answered_from_the_cache() {
    let _serial = serial();
    let repo = repo_with(&[]);
    repo.settings("digits", "cache-bytes = \"1MiB\"\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let (x, want) = digits_case(3);
    let hits = |d: &TestDaemon| d.summaries()["digits"].cache_hits;
    assert_eq!(
        d.client_inline().infer("digits", vec![x.clone()]).unwrap(),
        want
    );
    assert_eq!(
        d.client_inline().infer("digits", vec![x.clone()]).unwrap(),
        want
    );
    assert_eq!(hits(&d), 1, "the same user's repeat hits");
    let mut stranger = connect_as_nobody(&d.socket);
    stranger.handshake().unwrap();
    for id in 1..=2 {
        stranger.send(&infer_frame(
            id,
            InferRequest::new("digits", vec![x.clone()]),
        ));
        match stranger.read_response().outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(r)) => assert_eq!(r.outputs, want),
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(hits(&d), 2, "the stranger missed, then hit its own");
    drop(stranger);
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}
