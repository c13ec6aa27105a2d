//! Issue 26: a client of the shared-memory ring (PROTOCOL.md, "The ring") can write every
//! byte of it at any time. Lying counts or lengths end only the liar's connection; a client
//! that stops consuming stalls only its own ring (and is closed as idle); a client that dies
//! with its ring full leaves nothing behind; a flood of futex wakes does not slow anyone;
//! one user cannot take every ring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rxd_protocol::ring::{self as layout, Geometry};
use rxd_protocol::{
    ErrorCode, InferRequest, Outcome, Request, RequestFrame, ResponseFrame, RingAsk, frame,
};
use rxd_shm::ring::{RingMem, wake};

use super::common::*;
use rxd_e2e::*;

/// A ring client that writes the ring by hand.
struct RawRing {
    conn: RawConn,
    mem: RingMem,
    geo: Geometry,
    sq_tail: u32,
    cq_head: u32,
}

impl RawRing {
    /// Connects as `nobody` and asks for a ring of `entries` slots of 1 KiB.
    fn connect(socket: &std::path::Path, entries: u32) -> RawRing {
        RawRing::connect_slots(socket, entries, 1024)
    }

    /// Connects as `nobody` and asks for a ring of `entries` slots of `slot_bytes`.
    fn connect_slots(socket: &std::path::Path, entries: u32, slot_bytes: u32) -> RawRing {
        let mut conn = connect_as_nobody(socket);
        let (welcome, fd) = conn
            .handshake_ring(
                0,
                Some(RingAsk {
                    entries,
                    slot_bytes,
                }),
            )
            .unwrap();
        let grant = welcome.ring.expect("a ring");
        let geo = Geometry {
            entries: grant.entries,
            slot_bytes: grant.slot_bytes,
        };
        let map =
            rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), welcome.arena_bytes as usize)
                .unwrap();
        let mem = RingMem::new(Arc::new(map), grant.offset, geo.bytes()).unwrap();
        RawRing {
            conn,
            mem,
            geo,
            sq_tail: 0,
            cq_head: 0,
        }
    }

    fn word(&self, w: u64) -> &std::sync::atomic::AtomicU32 {
        self.mem.word(w)
    }

    /// Writes `bytes` (a slot's content: length prefix and body) as the next submission and
    /// publishes it.
    fn submit_bytes(&mut self, bytes: &[u8]) {
        self.mem
            .write(self.geo.sq_slot(self.sq_tail), bytes)
            .unwrap();
        self.sq_tail = self.sq_tail.wrapping_add(1);
        self.publish_tail(self.sq_tail);
    }

    fn publish_tail(&self, tail: u32) {
        self.word(layout::SQ_TAIL).store(tail, Ordering::SeqCst);
        wake(self.word(layout::SQ_TAIL));
    }

    fn submit_digits(&mut self, id: u64, input: &rxd_client::Tensor) {
        self.submit_bytes(&digits_frame(id, input));
    }

    /// Completions published and not consumed.
    fn completed(&self) -> u32 {
        self.word(layout::CQ_TAIL)
            .load(Ordering::Acquire)
            .wrapping_sub(self.cq_head)
    }

    fn wait_completed(&self, n: u32, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while self.completed() < n {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Reads and consumes the next completion.
    fn consume(&mut self) -> ResponseFrame {
        let at = self.geo.cq_slot(self.cq_head);
        let mut len = [0u8; 4];
        self.mem.read(at, &mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.mem.read(at + 4, &mut body).unwrap();
        self.cq_head = self.cq_head.wrapping_add(1);
        self.word(layout::CQ_HEAD)
            .store(self.cq_head, Ordering::Release);
        frame::decode(&body).unwrap()
    }

    /// The connection's last words on the socket, read until it closes.
    fn closing_words(&mut self) -> Vec<ResponseFrame> {
        read_all(&mut self.conn, Duration::from_secs(10))
    }
}

/// The end of a ring attack: the daemon unharmed ([`assert_unharmed`]: the bystander served
/// within 5 s, fds back, memory within 64 MiB); `seen` is `None` where the test runs no
/// bystander of its own.
fn assert_ring_unharmed(d: &mut TestDaemon, before: &Before, seen: Option<Seen>) {
    let seen = seen.unwrap_or(Seen::no_bystander());
    assert_unharmed(d, before, &seen, Duration::from_secs(5), 64 << 20);
}

/// The daemon ended the liar's connection with `malformed_message` under id 0, naming the
/// ring, and closed it.
fn assert_closed_for_lying(r: &mut RawRing, what: &str) {
    let start = Instant::now();
    let words = r.closing_words();
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{what}: the connection stayed open"
    );
    let last = words
        .last()
        .unwrap_or_else(|| panic!("{what}: nothing said"));
    assert_eq!(last.id, 0, "{what}: {words:?}");
    assert_eq!(
        err_code(&last.outcome),
        Some(ErrorCode::MalformedMessage),
        "{what}: {words:?}"
    );
    let Outcome::Err(e) = &last.outcome else {
        unreachable!()
    };
    assert!(e.message.contains("ring"), "{what}: {}", e.message);
}

#[test]
fn lying_counts_and_lengths_end_only_the_liars_connection() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(3);

    // An honest turn first: the ring works for this user.
    let mut honest = RawRing::connect(&d.socket, 4);
    honest.submit_digits(1, &input);
    assert!(honest.wait_completed(1, Duration::from_secs(10)));
    match honest.consume().outcome {
        Outcome::Ok(rxd_protocol::Reply::Infer(r)) => assert_eq!(r.outputs, want),
        other => panic!("{other:?}"),
    }

    // A submission tail more than `entries` past the daemon's head.
    let mut r = RawRing::connect(&d.socket, 4);
    r.publish_tail(5);
    assert_closed_for_lying(&mut r, "tail past the head");
    // A tail behind the head (a count going backwards).
    let mut r = RawRing::connect(&d.socket, 4);
    r.submit_digits(1, &input);
    assert!(r.wait_completed(1, Duration::from_secs(10)));
    r.publish_tail(u32::MAX);
    assert_closed_for_lying(&mut r, "tail behind the head");
    // A completion head ahead of the daemon's tail, then a submission.
    let mut r = RawRing::connect(&d.socket, 4);
    r.word(layout::CQ_HEAD).store(1000, Ordering::SeqCst);
    r.submit_digits(1, &input);
    assert_closed_for_lying(&mut r, "completion head ahead");
    // Slot lengths: longer than a slot, 0, u32::MAX.
    for len in [1024u32 - 3, 0, u32::MAX] {
        let mut r = RawRing::connect(&d.socket, 4);
        r.submit_bytes(&len.to_le_bytes());
        assert_closed_for_lying(&mut r, &format!("length {len}"));
    }
    // Garbage that is not MessagePack, and a control request: one completion each, the
    // connection goes on and serves the next request.
    let mut r = RawRing::connect(&d.socket, 4);
    let mut junk = vec![0u8; 100];
    junk[..4].copy_from_slice(&96u32.to_le_bytes());
    junk[4..].fill(0xc1);
    r.submit_bytes(&junk);
    r.submit_bytes(
        &frame::encode(&RequestFrame {
            id: 7,
            body: Request::Status,
        })
        .unwrap(),
    );
    r.submit_digits(8, &input);
    assert!(r.wait_completed(3, Duration::from_secs(10)));
    let answers: Vec<ResponseFrame> = (0..3).map(|_| r.consume()).collect();
    assert_eq!(answers[0].id, 0);
    assert_eq!(
        err_code(&answers[0].outcome),
        Some(ErrorCode::MalformedMessage)
    );
    assert_eq!(answers[1].id, 7);
    assert_eq!(
        err_code(&answers[1].outcome),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(answers[2].id, 8);
    assert!(matches!(answers[2].outcome, Outcome::Ok(_)));

    let seen = bystander.stop();
    drop((honest, r));
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

#[test]
fn a_client_that_stops_consuming_stalls_only_its_own_ring_and_is_closed_as_idle() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "idle-timeout-secs = 3\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(2);

    let mut r = RawRing::connect(&d.socket, 2);
    r.submit_digits(1, &input);
    r.submit_digits(2, &input);
    assert!(r.wait_completed(2, Duration::from_secs(10)));
    // Two more, with no completion slot free: the daemon does not take them.
    r.submit_digits(3, &input);
    r.submit_digits(4, &input);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.word(layout::SQ_HEAD).load(Ordering::Acquire), 2);
    assert_eq!(r.completed(), 2);
    // Consumed late: the stalled ones are taken and answered.
    for id in [1, 2] {
        assert_eq!(r.consume().id, id);
    }
    wake(r.word(layout::SQ_TAIL));
    assert!(r.wait_completed(2, Duration::from_secs(10)));
    for id in [3, 4] {
        let a = r.consume();
        assert_eq!(a.id, id);
        match a.outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
            other => panic!("{other:?}"),
        }
    }
    // Now it never consumes again: the ring fills, then the connection is idle and closed.
    r.submit_digits(5, &input);
    r.submit_digits(6, &input);
    assert!(r.wait_completed(2, Duration::from_secs(10)));
    let start = Instant::now();
    let words = r.closing_words();
    assert!(
        start.elapsed() < Duration::from_secs(9),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        words.last().and_then(|w| err_code(&w.outcome)),
        Some(ErrorCode::ConnectionTimeout),
        "{words:?}"
    );

    let seen = bystander.stop();
    drop(r);
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

#[test]
fn clients_that_die_with_a_full_ring_or_flood_it_with_wakes_leave_nothing_behind() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "max-connections-per-uid = 40\n", &[]);
    let before = before(&d);
    let mappings = d.arena_mappings();
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(8);

    // Twenty clients each fill their ring and vanish without reading an answer.
    for _ in 0..20 {
        let mut r = RawRing::connect(&d.socket, 8);
        for id in 1..=8 {
            r.submit_digits(id, &input);
        }
        drop(r);
    }
    // One floods the daemon with futex wakes on its ring for two seconds.
    let r = RawRing::connect(&d.socket, 4);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                wake(r.word(layout::SQ_TAIL));
                n += 1;
            }
            (r, n)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (r, wakes) = flood.join().unwrap();
    assert!(wakes > 1000, "{wakes}");
    drop(r);

    // One user gets at most 32 rings; beyond them it is served over the socket.
    let rings: Vec<rxd_client::RingClient> = (0..33)
        .map(|_| {
            let conn = connect_as_nobody(&d.socket);
            rxd_client::RingClient::handshake(conn.stream, rxd_client::RingOptions::default())
                .unwrap()
        })
        .collect();
    let granted = rings.iter().filter(|c| c.has_ring()).count();
    assert_eq!(granted, 32);
    for mut c in rings.into_iter().rev().take(2) {
        assert_eq!(c.infer("digits", vec![input.clone()]).unwrap(), want);
    }

    let seen = bystander.stop();
    assert_ring_unharmed(&mut d, &before, Some(seen));
    // Every ring's arena is unmapped once its connection and requests are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.arena_mappings() > mappings {
        assert!(
            Instant::now() < deadline,
            "{} arenas still mapped",
            d.arena_mappings()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------

/// A digits request frame (length prefix and body), as a submission slot holds it.
fn digits_frame(id: u64, input: &rxd_client::Tensor) -> Vec<u8> {
    frame::encode(&RequestFrame {
        id,
        body: Request::Infer(InferRequest::new("digits", vec![input.clone()])),
    })
    .unwrap()
}

/// Sends a Hello with `arena_bytes` and `ring`, and reads the answer: the welcome and the fd
/// passed with it (if any), or the handshake error's text. A connection that ends without a
/// word is an error starting with "no answer".
fn hello_raw(
    conn: &mut RawConn,
    arena_bytes: u64,
    ring: Option<RingAsk>,
) -> Result<(rxd_protocol::Welcome, Option<std::os::fd::OwnedFd>), String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    conn.send(&rxd_protocol::Hello {
        protocol: rxd_protocol::PROTOCOL_VERSION,
        client: "ringattack".into(),
        arena_bytes,
        ring,
    });
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut header = [0u8; 4];
    let (n, fd) = rxd_shm::recv_with_fd(conn.stream.as_raw_fd(), &mut header)
        .map_err(|e| format!("no answer: {e}"))?;
    if n == 0 {
        return Err("no answer: the connection closed".into());
    }
    conn.stream
        .read_exact(&mut header[n..])
        .map_err(|e| format!("no answer: {e}"))?;
    let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
    conn.stream
        .read_exact(&mut body)
        .map_err(|e| format!("no answer: {e}"))?;
    match frame::decode::<rxd_protocol::HandshakeReply>(&body).map_err(|e| e.to_string())? {
        rxd_protocol::HandshakeReply::Welcome(w) => Ok((w, fd)),
        rxd_protocol::HandshakeReply::Error(e) => Err(e.error.to_string()),
    }
}

/// Absurd geometry in the Hello: every ask gets a welcome whose ring obeys the rules, or a
/// clear `arena_unavailable` — never a silent close or a ring outside the arena; and the
/// arena budget and ring counts are whole again afterwards (nobody gets its full share of
/// arena, and its 32 rings).
#[test]
fn absurd_ring_geometry_gets_a_clear_answer_and_the_budgets_come_back() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "max-arena-bytes = \"16MiB\"\narena-total-bytes = \"32MiB\"\n",
        &[],
    );
    let before = before(&d);
    let mappings = d.arena_mappings();
    let bystander = Bystander::start(&d.socket);

    let ask = |entries, slot_bytes| {
        Some(RingAsk {
            entries,
            slot_bytes,
        })
    };
    let cases: Vec<(u64, Option<RingAsk>)> = vec![
        (0, ask(0, 1024)),
        (0, ask(1, 0)),
        (0, ask(u32::MAX, 1)),
        (0, ask(3, u32::MAX)),
        (0, ask(u32::MAX, u32::MAX)),
        (4096, ask(7, 300)),
        (1, ask(1, 256)),
        (16 << 20, ask(1, 256)),
        ((16 << 20) - 4096, ask(1, 256)),
        (u64::MAX, ask(4, 1024)),
        (u64::MAX - 4095, ask(16, 1024)),
        (u64::MAX - 4095, ask(1, 256)),
        (u64::MAX - 100_000, ask(256, 4096)),
        (1 << 63, ask(2, 1024)),
    ];
    let mut problems = Vec::new();
    for (arena_bytes, ring) in cases {
        let mut conn = connect_as_nobody(&d.socket);
        match hello_raw(&mut conn, arena_bytes, ring) {
            Ok((w, fd)) => {
                let tensor_part = arena_bytes.div_ceil(4096).wrapping_mul(4096);
                if let Some(g) = w.ring {
                    let geo = Geometry {
                        entries: g.entries,
                        slot_bytes: g.slot_bytes,
                    };
                    let ok = geo.is_valid()
                        && g.offset == tensor_part
                        && g.offset.checked_add(geo.bytes()) <= Some(w.arena_bytes)
                        && w.arena_bytes <= 16 << 20
                        && fd.is_some();
                    if !ok {
                        problems.push(format!("{arena_bytes} {ring:?}: bad grant {w:?}"));
                    }
                    if !ok {
                        continue;
                    }
                    // The ring works.
                    let map = rxd_shm::Mapping::map(
                        std::os::fd::AsFd::as_fd(fd.as_ref().unwrap()),
                        w.arena_bytes as usize,
                    )
                    .unwrap();
                    let mem = RingMem::new(Arc::new(map), g.offset, geo.bytes()).unwrap();
                    let mut r = RawRing {
                        conn,
                        mem,
                        geo,
                        sq_tail: 0,
                        cq_head: 0,
                    };
                    let (input, _) = digits_case(1);
                    let f = digits_frame(1, &input);
                    if geo.body_fits(f.len() as u32 - 4) {
                        r.submit_bytes(&f);
                        if !r.wait_completed(1, Duration::from_secs(10)) {
                            problems.push(format!("{arena_bytes} {ring:?}: no completion"));
                        } else {
                            assert_eq!(r.consume().id, 1);
                        }
                    }
                } else if ring.is_some_and(|a| a.entries > 0 && a.slot_bytes > 0) {
                    problems.push(format!("{arena_bytes} {ring:?}: no ring: {w:?}"));
                }
            }
            Err(e) if e.contains("arena_unavailable") => {}
            Err(e) => problems.push(format!("arena {arena_bytes} ring {ring:?}: {e}")),
        }
    }
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died:\n{}",
        d.log_text()
    );

    // The budgets are whole again: the full share of arena, then 32 rings, for nobody.
    std::thread::sleep(Duration::from_millis(500));
    let mut conn = connect_as_nobody(&d.socket);
    let share = conn.handshake_arena(16 << 20);
    assert!(share.is_ok(), "the arena budget leaked: {share:?}");
    drop((conn, share));
    std::thread::sleep(Duration::from_millis(300));
    let rings: Vec<rxd_client::RingClient> = (0..32)
        .map(|_| {
            let conn = connect_as_nobody(&d.socket);
            rxd_client::RingClient::handshake(
                conn.stream,
                rxd_client::RingOptions {
                    entries: 1,
                    slot_bytes: 256,
                    arena_bytes: 0,
                    ..Default::default()
                },
            )
            .unwrap()
        })
        .collect();
    let granted = rings.iter().filter(|c| c.has_ring()).count();
    drop(rings);

    let seen = bystander.stop();
    assert!(
        !d.log_text().contains("panicked"),
        "a connection panicked:\n{}",
        d.log_text()
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(granted, 32, "ring counts leaked");
    assert_ring_unharmed(&mut d, &before, Some(seen));
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.arena_mappings() > mappings {
        assert!(Instant::now() < deadline, "arenas still mapped");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that talks only through its ring, and keeps doing so, is not idle: with
/// `idle-timeout-secs = 2` it is served for 7 s (fast, then one request every 1.5 s), and its
/// socket stays open and silent.
#[test]
fn an_active_ring_only_client_is_not_closed_as_idle() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "idle-timeout-secs = 2\n", &[]);
    let before = before(&d);
    let (input, want) = digits_case(2);
    let mut r = RawRing::connect(&d.socket, 4);
    let start = Instant::now();
    let mut id = 0u64;
    while start.elapsed() < Duration::from_secs(7) {
        id += 1;
        r.submit_digits(id, &input);
        assert!(
            r.wait_completed(1, Duration::from_secs(10)),
            "request {id} at {:?} got no completion: {:?}",
            start.elapsed(),
            read_all(&mut r.conn, Duration::from_millis(100))
        );
        let a = r.consume();
        assert_eq!(a.id, id);
        match a.outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
            other => panic!("request {id} at {:?}: {other:?}", start.elapsed()),
        }
        let pause = if start.elapsed() < Duration::from_secs(3) {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(1500)
        };
        std::thread::sleep(pause);
    }
    // The socket said nothing and is open.
    r.conn.stream.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let peek = std::io::Read::read(&mut r.conn.stream, &mut b);
    assert!(
        matches!(&peek, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the socket said something or closed: {peek:?}"
    );
    r.conn.stream.set_nonblocking(false).unwrap();
    // Then idle: closed as such.
    let words = r.closing_words();
    assert_eq!(
        words.last().and_then(|w| err_code(&w.outcome)),
        Some(ErrorCode::ConnectionTimeout),
        "{words:?}"
    );
    drop(r);
    assert_ring_unharmed(&mut d, &before, None);
}

/// A client that scribbles on the daemon's words (`sq_head`, `sq_wake`, `cq_tail`) while its
/// requests are taken and answered garbles only its own view: the daemon keeps its own
/// counts, republishes them with the next completion, and every request gets exactly one
/// right answer.
#[test]
fn scribbling_on_the_daemons_words_garbles_only_the_clients_view() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(2);
    let mut r = RawRing::connect(&d.socket, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let (stop, mem) = (stop.clone(), r.mem.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9u32;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                mem.word(layout::SQ_HEAD).store(x, Ordering::Relaxed);
                mem.word(layout::SQ_WAKE).store(x & 1, Ordering::Relaxed);
                mem.word(layout::CQ_TAIL)
                    .store(x.rotate_left(7), Ordering::Relaxed);
            }
        })
    };
    for id in 1..=7 {
        r.submit_digits(id, &input);
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    r.submit_digits(8, &input);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.word(layout::CQ_TAIL).load(Ordering::Acquire) != 8 {
        assert!(
            Instant::now() < deadline,
            "cq_tail {} (8 expected)",
            r.word(layout::CQ_TAIL).load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r.word(layout::SQ_HEAD).load(Ordering::Acquire), 8);
    let mut ids: Vec<u64> = (0..8)
        .map(|_| {
            let a = r.consume();
            match &a.outcome {
                Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
                other => panic!("{}: {other:?}", a.id),
            }
            a.id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.completed(), 0, "a second completion");
    let seen = bystander.stop();
    drop(r);
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

/// A slot rewritten while the daemon copies it (two valid frames of different sizes, and
/// junk, swapped as fast as a thread can) is a garbled frame at worst: every submission gets
/// exactly one completion, under an id the client used or id 0, and the connection goes on.
#[test]
fn a_slot_rewritten_while_the_daemon_copies_it_gets_exactly_one_completion() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    // Slots of 4 KiB: every length prefix below is under 1024, so even a torn read of one
    // names a body that fits (a length past the slot would end the connection, rightly).
    let mut r = RawRing::connect_slots(&d.socket, 2, 4096);
    let (small, _) = digits_case(1);
    let (large, _) = digits_case(3);
    let a = digits_frame(11, &small);
    let b = digits_frame(22, &large);
    let mut junk = vec![0xc1u8; 200];
    junk[..4].copy_from_slice(&196u32.to_le_bytes());
    for slot in 0..r.geo.entries {
        r.mem.write(r.geo.sq_slot(slot), &a).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let (stop, mem, geo) = (stop.clone(), r.mem.clone(), r.geo);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for slot in 0..geo.entries {
                    let f = match n % 3 {
                        0 => &a,
                        1 => &b,
                        _ => &junk,
                    };
                    mem.write(geo.sq_slot(slot), f).unwrap();
                    n += 1;
                }
            }
            n
        })
    };
    let start = Instant::now();
    let mut submitted = 0u32;
    let mut by_id = std::collections::BTreeMap::<u64, u32>::new();
    while start.elapsed() < Duration::from_secs(3) {
        r.sq_tail = r.sq_tail.wrapping_add(1);
        r.publish_tail(r.sq_tail);
        submitted += 1;
        assert!(
            r.wait_completed(1, Duration::from_secs(10)),
            "submission {submitted} got no completion: {:?}",
            read_all(&mut r.conn, Duration::from_millis(100))
        );
        let c = r.consume();
        assert!([0, 11, 22].contains(&c.id), "{c:?}");
        *by_id.entry(c.id).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = scribbler.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.completed(), 0, "a second completion");
    assert_eq!(r.word(layout::SQ_HEAD).load(Ordering::Acquire), r.sq_tail);
    eprintln!("{submitted} submissions, {writes} slot writes: {by_id:?}");
    assert!(submitted > 20, "{submitted}");
    let seen = bystander.stop();
    drop(r);
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

/// Thousands of tiny submissions a second through a one-entry ring (control requests, refused
/// at once, and tiny inferences): each gets exactly one completion, in order, and the
/// bystander is not slowed.
/// PROTOCOL.md, "One wake per sleep": a client asleep on its completion tail is woken by the
/// completion, and finds its wake word cleared — the completions that follow while it is
/// awake make no system call (a client that sleeps pays one wake, not one per answer).
#[test]
fn a_sleeping_client_is_woken_once_and_its_wake_word_cleared() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let d = shared_daemon(repo.path(), "", &[]);
    let mut r = RawRing::connect(&d.socket, 4);
    let (input, want) = digits_case(2);
    // The model loaded, and one answer through the ring.
    r.submit_digits(1, &input);
    assert!(r.wait_completed(1, Duration::from_secs(30)));
    r.consume();
    for id in 2..6u64 {
        // Written, not yet published: the client falls asleep first.
        let tail = r.word(layout::CQ_TAIL).load(Ordering::SeqCst);
        r.mem
            .write(r.geo.sq_slot(r.sq_tail), &digits_frame(id, &input))
            .unwrap();
        r.sq_tail = r.sq_tail.wrapping_add(1);
        r.word(layout::CQ_WAKE).store(1, Ordering::SeqCst);
        let slept = std::thread::scope(|s| {
            let sleeper = s.spawn(|| {
                let start = Instant::now();
                while r.word(layout::CQ_TAIL).load(Ordering::SeqCst) == tail
                    && start.elapsed() < Duration::from_secs(20)
                {
                    rxd_shm::ring::wait(r.word(layout::CQ_TAIL), tail, Duration::from_secs(20));
                }
                start.elapsed()
            });
            std::thread::sleep(Duration::from_millis(50));
            r.publish_tail(r.sq_tail);
            sleeper.join().unwrap()
        });
        assert!(
            slept < Duration::from_secs(10),
            "request {id}: the sleeper was not woken"
        );
        assert_eq!(
            r.word(layout::CQ_WAKE).load(Ordering::SeqCst),
            0,
            "request {id}: the wake word is left set after the wake"
        );
        let c = r.consume();
        assert_eq!(c.id, id);
        match c.outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(reply)) => assert_eq!(reply.outputs, want),
            other => panic!("request {id}: {other:?}"),
        }
    }
}

#[test]
fn a_flood_through_a_tiny_ring_gets_one_completion_each() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let mut r = RawRing::connect_slots(&d.socket, 1, 512);
    assert_eq!(r.geo.entries, 1);
    let (input, want) = digits_case(1);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        n += 1;
        if n.is_multiple_of(4) {
            r.submit_digits(n, &input);
        } else {
            r.submit_bytes(
                &frame::encode(&RequestFrame {
                    id: n,
                    body: Request::Status,
                })
                .unwrap(),
            );
        }
        let end = Instant::now() + Duration::from_secs(10);
        while r.completed() == 0 {
            assert!(Instant::now() < end, "submission {n}: no completion");
            std::hint::spin_loop();
        }
        let c = r.consume();
        assert_eq!(c.id, n);
        if n.is_multiple_of(4) {
            match c.outcome {
                Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
                other => panic!("{n}: {other:?}"),
            }
        } else {
            assert_eq!(err_code(&c.outcome), Some(ErrorCode::InvalidRequest));
        }
    }
    eprintln!("{n} submissions in 3 s");
    assert!(n > 300, "{n}");
    let seen = bystander.stop();
    drop(r);
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

/// A client closes its socket with requests in flight but keeps its mapping, and goes on
/// publishing valid submissions and waking the daemon: the daemon takes nothing more, unmaps
/// its side of the arena, and gives the fds back.
#[test]
fn a_client_that_hangs_up_but_keeps_writing_its_ring_is_ignored() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let mappings = d.arena_mappings();
    let bystander = Bystander::start(&d.socket);
    let (input, _) = digits_case(2);
    let mut r = RawRing::connect(&d.socket, 8);
    for id in 1..=8 {
        r.submit_digits(id, &input);
    }
    let RawRing { conn, mem, geo, .. } = r;
    conn.stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mem) = (stop.clone(), mem.clone());
        std::thread::spawn(move || {
            let f = digits_frame(99, &input);
            while !stop.load(Ordering::Relaxed) {
                // Keep one valid submission always waiting past the daemon's head, consume
                // every completion.
                let head = mem.word(layout::SQ_HEAD).load(Ordering::Acquire);
                mem.write(geo.sq_slot(head), &f).unwrap();
                let cq = mem.word(layout::CQ_TAIL).load(Ordering::Acquire);
                mem.word(layout::CQ_HEAD).store(cq, Ordering::Release);
                mem.word(layout::SQ_TAIL)
                    .store(head.wrapping_add(1), Ordering::SeqCst);
                wake(mem.word(layout::SQ_TAIL));
            }
        })
    };
    // Looked at within 1.5 s of the hang-up: 2 s after its connection ended the daemon frees
    // the arena's pages (PROTOCOL.md), and the ring's words then read 0.
    std::thread::sleep(Duration::from_millis(500));
    let head = mem.word(layout::SQ_HEAD).load(Ordering::Acquire);
    std::thread::sleep(Duration::from_secs(1));
    let later = mem.word(layout::SQ_HEAD).load(Ordering::Acquire);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(
        head, later,
        "the daemon still takes submissions of a closed connection"
    );
    let seen = bystander.stop();
    assert_ring_unharmed(&mut d, &before, Some(seen));
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.arena_mappings() > mappings {
        assert!(
            Instant::now() < deadline,
            "the daemon keeps the arena mapped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(mem);
}

/// One id in flight on the socket and the ring at once: each side's frame gets exactly one
/// answer, the second of the two under id 0 (`bad_request_id`) or after the first's answer.
#[test]
fn one_id_on_the_socket_and_the_ring_at_once_gets_one_answer_each() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let (input, want) = digits_case(2);
    let mut r = RawRing::connect(&d.socket, 4);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..200 {
        let req = RequestFrame {
            id: 5,
            body: Request::Infer(InferRequest::new("digits", vec![input.clone()])),
        };
        if i % 2 == 0 {
            r.submit_digits(5, &input);
            r.conn.send(&req);
        } else {
            r.conn.send(&req);
            r.submit_digits(5, &input);
        }
        let s = r.conn.read_response();
        assert!(
            r.wait_completed(1, Duration::from_secs(10)),
            "{i}: no completion"
        );
        let c = r.consume();
        for (side, a) in [("socket", &s), ("ring", &c)] {
            let what = match &a.outcome {
                Outcome::Ok(rxd_protocol::Reply::Infer(x)) => {
                    assert_eq!(x.outputs, want);
                    assert_eq!(a.id, 5);
                    "ok".to_string()
                }
                Outcome::Err(e) => {
                    assert_eq!(a.id, 0, "{side} {i}: {e:?}");
                    assert_eq!(e.kind(), Some(ErrorCode::BadRequestId), "{e:?}");
                    "bad_request_id".to_string()
                }
                other => panic!("{other:?}"),
            };
            *outcomes.entry(format!("{side} {what}")).or_default() += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.completed(), 0, "a second completion");
    r.conn.stream.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let extra = std::io::Read::read(&mut r.conn.stream, &mut b);
    assert!(
        matches!(&extra, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a second answer on the socket: {extra:?}"
    );
    eprintln!("{outcomes:?}");
    drop(r);
    assert_ring_unharmed(&mut d, &before, None);
}

/// Rings come and go all the time (the poller's set changes under it; some leave with
/// requests in flight) while a ring client of the test's own user keeps asking: it is
/// always answered, without waiting for the poller's one-second timeout.
#[test]
fn rings_coming_and_going_do_not_delay_a_ring_bystander() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "preload = [\"digits\"]\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(2);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, socket, input) = (stop.clone(), d.socket.clone(), input.clone());
        std::thread::spawn(move || {
            let mut c = rxd_client::RingClient::connect(
                &socket,
                rxd_client::RingOptions {
                    spin: Duration::ZERO,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(c.has_ring());
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let out = c.infer("digits", vec![input.clone()]).unwrap();
                worst = worst.max(t.elapsed());
                assert_eq!(out, want);
                n += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            (worst, n)
        })
    };
    let churners: Vec<_> = (0..2)
        .map(|k| {
            let (stop, socket, input) = (stop.clone(), d.socket.clone(), input.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut r = RawRing::connect_slots(&socket, 4, 1024);
                    let k = (n + k) % 3;
                    for id in 0..k {
                        r.submit_digits(id + 1, &input);
                    }
                    if k == 2 {
                        r.wait_completed(2, Duration::from_secs(10));
                    }
                    drop(r);
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let churned: u64 = churners.into_iter().map(|t| t.join().unwrap()).sum();
    let (worst, n) = watcher.join().unwrap();
    eprintln!("{churned} rings came and went; the ring bystander: {n} requests, worst {worst:?}");
    assert!(churned > 20, "{churned}");
    assert!(
        worst < Duration::from_millis(800),
        "the ring bystander waited {worst:?}"
    );
    let seen = bystander.stop();
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

/// Ring requests for a model that must load first (load on demand), then the client vanishes
/// at once: the loads finish, the answers go nowhere, nothing is left behind, and the next
/// ring client is served.
#[test]
fn a_ring_client_that_dies_while_its_model_loads_leaves_nothing_behind() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let mappings = d.arena_mappings();
    let (input, want) = digits_case(2);
    for _ in 0..5 {
        let mut r = RawRing::connect(&d.socket, 8);
        for id in 1..=8 {
            r.submit_digits(id, &input);
        }
        drop(r);
    }
    let mut r = RawRing::connect(&d.socket, 4);
    r.submit_digits(1, &input);
    assert!(r.wait_completed(1, Duration::from_secs(30)));
    match r.consume().outcome {
        Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
        other => panic!("{other:?}"),
    }
    drop(r);
    assert_ring_unharmed(&mut d, &before, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.arena_mappings() > mappings {
        assert!(Instant::now() < deadline, "arenas still mapped");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One user fills every ring it may have with submissions that are costly to decode (the
/// most values a frame may hold: thousands of tiny tensors) and refills them as fast as they
/// are answered: the single poller decodes them all in turn, and another user's ring client
/// must still be answered within the bystander bound.
#[test]
fn one_users_rings_full_of_costly_frames_do_not_starve_another_users_ring() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "preload = [\"digits\"]\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, want) = digits_case(2);
    let tiny = rxd_client::Tensor::inline("x", rxd_client::DType::Float32, vec![1], vec![0u8; 4]);
    let costly = frame::encode(&RequestFrame {
        id: 1,
        body: Request::Infer(InferRequest::new("digits", vec![tiny; 10_000])),
    })
    .unwrap();
    let slot = (costly.len() as u32 + 4).next_multiple_of(4096);
    // As many rings as nobody may have (32, or what its arena share holds).
    let mut rings = Vec::new();
    for _ in 0..32 {
        let mut conn = connect_as_nobody(&d.socket);
        let Ok((w, Some(fd))) = hello_raw(
            &mut conn,
            0,
            Some(RingAsk {
                entries: 16,
                slot_bytes: slot,
            }),
        ) else {
            break;
        };
        let Some(g) = w.ring else { break };
        let geo = Geometry {
            entries: g.entries,
            slot_bytes: g.slot_bytes,
        };
        let map =
            rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), w.arena_bytes as usize).unwrap();
        let mem = RingMem::new(Arc::new(map), g.offset, geo.bytes()).unwrap();
        for i in 0..geo.entries {
            mem.write(geo.sq_slot(i), &costly).unwrap();
        }
        rings.push(RawRing {
            conn,
            mem,
            geo,
            sq_tail: 0,
            cq_head: 0,
        });
    }
    eprintln!("{} rings of {slot}-byte slots", rings.len());
    assert!(rings.len() >= 8, "{}", rings.len());
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for r in rings.iter_mut() {
                    // Consume without reading (the id is 1 each time: in flight twice is a
                    // bad_request_id answer, as costly to reach).
                    let tail = r.word(layout::CQ_TAIL).load(Ordering::Acquire);
                    answered += u64::from(tail.wrapping_sub(r.cq_head));
                    r.cq_head = tail;
                    r.word(layout::CQ_HEAD).store(tail, Ordering::Release);
                    let room = r.geo.entries - r.sq_tail.wrapping_sub(r.cq_head);
                    if room > 0 {
                        r.sq_tail = r.sq_tail.wrapping_add(room);
                        r.publish_tail(r.sq_tail);
                    }
                }
                std::thread::yield_now();
            }
            (rings, answered)
        })
    };
    // Another user's ring client (the test's own) asks one at a time.
    let mut c = rxd_client::RingClient::connect(
        &d.socket,
        rxd_client::RingOptions {
            spin: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.has_ring());
    let start = Instant::now();
    let (mut worst, mut n) = (Duration::ZERO, 0u64);
    while start.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        let out = c.infer("digits", vec![input.clone()]).unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(out, want);
        n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let (rings, answered) = attacker.join().unwrap();
    eprintln!(
        "the attacker's {} rings had {answered} costly submissions answered; the other \
         user's ring client: {n} requests, worst {worst:?}",
        rings.len()
    );
    drop(rings);
    drop(c);
    let seen = bystander.stop();
    eprintln!("socket bystander: {seen:?}");
    assert!(
        worst < Duration::from_secs(1),
        "another user's ring client waited {worst:?} ({n} requests)"
    );
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 256 << 20);
}

/// The daemon is told to stop while ring clients keep submitting and flooding it with wakes
/// (one of them never consuming, its ring full): every request taken is answered on the
/// ring, and the daemon exits cleanly well within its grace period.
#[test]
fn the_daemon_stops_promptly_while_rings_keep_submitting() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "shutdown-grace-secs = 20\n", &[]);
    let (input, _) = digits_case(2);
    // A full ring that never consumes.
    let mut full = RawRing::connect(&d.socket, 4);
    for id in 1..=4 {
        full.submit_digits(id, &input);
    }
    assert!(full.wait_completed(4, Duration::from_secs(10)));
    for id in 5..=8 {
        full.submit_digits(id, &input);
    }
    // Busy ones: submit, consume, flood wakes.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let (stop, socket, input) = (stop.clone(), d.socket.clone(), input.clone());
            std::thread::spawn(move || {
                let mut r = RawRing::connect(&socket, 4);
                let mut id = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    while r.completed() > 0 {
                        r.consume();
                    }
                    if r.sq_tail.wrapping_sub(r.cq_head) < r.geo.entries {
                        id += 1;
                        r.submit_digits(id, &input);
                    } else {
                        wake(r.word(layout::SQ_TAIL));
                    }
                }
                // Everything taken was answered on the ring (whatever was not taken stays).
                let head = r.word(layout::SQ_HEAD).load(Ordering::Acquire);
                let end = Instant::now() + Duration::from_secs(5);
                while r.word(layout::CQ_TAIL).load(Ordering::Acquire) != head
                    && Instant::now() < end
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                (head, r.word(layout::CQ_TAIL).load(Ordering::Acquire))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    let status = d.terminate();
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        let (head, cq_tail) = t.join().unwrap();
        assert_eq!(head, cq_tail, "requests taken and not answered on the ring");
    }
    assert!(status.success(), "{status:?}\n{}", d.log_text());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    drop(full);
}

/// A client that submits one more request than its ring has room for (tolerated: the ring
/// stalls until an answer is consumed) races the poller's room check against the workers'
/// answers, thousands of times: every request taken still gets its completion on the ring,
/// never an answer on the socket with no completion.
#[test]
fn submitting_past_the_room_never_loses_a_completion() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "preload = [\"digits\"]\n", &[]);
    let before = before(&d);
    let (input, _) = digits_case(1);
    let mut r = RawRing::connect(&d.socket, 1);
    assert_eq!(r.geo.entries, 1);
    r.conn.stream.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let mut id = 0u64;
    let mut rounds = 0u32;
    while start.elapsed() < Duration::from_secs(6) {
        rounds += 1;
        id += 1;
        r.submit_digits(id, &input);
        // Taken: publish the next at once, while the first runs.
        let end = Instant::now() + Duration::from_secs(10);
        while r.word(layout::SQ_HEAD).load(Ordering::Acquire) != r.sq_tail {
            assert!(Instant::now() < end, "not taken");
            std::hint::spin_loop();
        }
        id += 1;
        r.submit_digits(id, &input);
        for want in [id - 1, id] {
            let end = Instant::now() + Duration::from_secs(10);
            while r.completed() == 0 {
                let mut b = [0u8; 1];
                let said = std::io::Read::read(&mut r.conn.stream, &mut b);
                assert!(
                    matches!(&said, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                    "round {rounds}: request {want} got no completion; the socket: {said:?}"
                );
                assert!(
                    Instant::now() < end,
                    "round {rounds}: request {want}: nothing"
                );
                std::hint::spin_loop();
            }
            assert_eq!(r.consume().id, want);
            // A stalled ring is looked at again on a wake.
            wake(r.word(layout::SQ_TAIL));
        }
    }
    eprintln!("{rounds} rounds");
    assert!(rounds > 100, "{rounds}");
    r.conn.stream.set_nonblocking(false).unwrap();
    drop(r);
    assert_ring_unharmed(&mut d, &before, None);
}

/// A ring client whose answers do not fit its slots (so each comes on the socket, the ring
/// saying so) consumes the ring's redirects at full speed and never reads the socket. On the
/// socket the daemon would stop reading it once `max-unsent-bytes` wait unread; the ring must
/// stop taking too: the answers it keeps producing (each dropped for an `unread_answers`
/// error that is queued, and counted beyond the user's share) must neither grow without
/// bound nor take request memory from another user.
#[test]
fn a_ring_client_that_never_reads_its_redirected_answers_is_held_back() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "preload = [\"digits\"]\nmax-frame-bytes = \"1MiB\"\nrequest-memory-bytes = \"4MiB\"\n\
         max-unsent-bytes = 65536\n",
        &[],
    );
    let (victim_input, want) = digits_case(2);
    let rows = 64u64;
    let (input, _) = digits_case(rows as usize);
    let in_bytes = rxd_client::tensor::bytes(&input).unwrap().to_vec();

    let mut conn = connect_as_nobody(&d.socket);
    let (w, fd) = hello_raw(
        &mut conn,
        64 << 10,
        Some(RingAsk {
            entries: 16,
            slot_bytes: 256,
        }),
    )
    .unwrap();
    let g = w.ring.expect("a ring");
    let geo = Geometry {
        entries: g.entries,
        slot_bytes: g.slot_bytes,
    };
    let map = Arc::new(
        rxd_shm::Mapping::map(
            std::os::fd::AsFd::as_fd(fd.as_ref().unwrap()),
            w.arena_bytes as usize,
        )
        .unwrap(),
    );
    map.copy_in(0, &in_bytes).unwrap();
    let mem = RingMem::new(map, g.offset, geo.bytes()).unwrap();
    let mut r = RawRing {
        conn,
        mem,
        geo,
        sq_tail: 0,
        cq_head: 0,
    };
    let request = |id: u64| {
        frame::encode(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new(
                "digits",
                vec![rxd_protocol::Tensor {
                    name: "input".into(),
                    dtype: rxd_protocol::DType::Float32,
                    shape: vec![rows, 64],
                    data: rxd_protocol::TensorData::Arena(rxd_protocol::ArenaRef {
                        offset: 0,
                        len: in_bytes.len() as u64,
                    }),
                }],
            )),
        })
        .unwrap()
    };

    // Another (non-admin) user on the socket, one request after another.
    let stop = Arc::new(AtomicBool::new(false));
    let victim = {
        let (stop, socket) = (stop.clone(), d.socket.clone());
        std::thread::spawn(move || {
            let (stream, _helper) = connect_as_with(&socket, 65533, 65533, &[], None);
            let mut c = RawConn { stream };
            c.stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            c.handshake().unwrap();
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                c.send(&RequestFrame {
                    id: n,
                    body: Request::Infer(InferRequest::new("digits", vec![victim_input.clone()])),
                });
                let Ok(body) = c.read_body() else {
                    return (Duration::MAX, n);
                };
                worst = worst.max(t.elapsed());
                let a: ResponseFrame = frame::decode(&body).unwrap();
                match a.outcome {
                    Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
                    other => panic!("victim: {other:?}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (worst, n)
        })
    };

    // The attack: keep the ring full, consume every redirect, never read the socket.
    let start = Instant::now();
    let mut redirects = 0u64;
    let mut id = 0u64;
    while start.elapsed() < Duration::from_secs(8) {
        while r.completed() > 0 {
            let at = r.geo.cq_slot(r.cq_head);
            let mut len = [0u8; 4];
            r.mem.read(at, &mut len).unwrap();
            if u32::from_le_bytes(len) == 0 {
                redirects += 1;
            }
            r.cq_head = r.cq_head.wrapping_add(1);
            r.word(layout::CQ_HEAD).store(r.cq_head, Ordering::Release);
        }
        if r.sq_tail.wrapping_sub(r.cq_head) < r.geo.entries {
            id += 1;
            r.submit_bytes(&request(id));
        } else {
            std::thread::yield_now();
        }
    }
    let taken = r.word(layout::SQ_HEAD).load(Ordering::Acquire);
    stop.store(true, Ordering::Relaxed);
    let (worst, n) = victim.join().unwrap();
    // What the socket holds for the attacker.
    let words = read_all(&mut r.conn, Duration::from_secs(2));
    let dropped = words
        .iter()
        .filter(
            |w| matches!(&w.outcome, Outcome::Err(e) if e.kind() == Some(ErrorCode::UnreadAnswers)),
        )
        .count();
    eprintln!(
        "taken {taken}, redirects {redirects}, on the socket {} ({dropped} unread_answers); \
         the victim: {n} requests, worst {worst:?}",
        words.len()
    );
    drop(r);
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died:\n{}",
        d.log_text()
    );
    assert!(
        worst < Duration::from_secs(5),
        "another user's request waited {worst:?} ({n} requests)"
    );
    assert!(
        dropped <= 64,
        "the ring kept taking requests whose answers could only be dropped: {dropped} \
         unread_answers queued ({taken} taken)"
    );
}

/// A submission tail flipped back and forth as fast as a thread can (between a published
/// submission and the one before it): the daemon takes the submission at most once, answers
/// what it took on the ring, then finds the tail behind its head and ends the connection with
/// `malformed_message`.
#[test]
fn a_tail_flipped_back_and_forth_ends_the_connection_cleanly() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let (input, _) = digits_case(1);
    for round in 0..5 {
        let mut r = RawRing::connect(&d.socket, 4);
        r.mem
            .write(r.geo.sq_slot(0), &digits_frame(1, &input))
            .unwrap();
        r.mem
            .write(r.geo.sq_slot(1), &digits_frame(2, &input))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (stop, mem) = (stop.clone(), r.mem.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // 0, 2, 1, 2, 0, ...: forwards and back.
                    let t = [0, 2, 1, 2][(n % 4) as usize];
                    mem.word(layout::SQ_TAIL).store(t, Ordering::SeqCst);
                    wake(mem.word(layout::SQ_TAIL));
                    n = n.wrapping_add(1);
                }
            })
        };
        let start = Instant::now();
        let words = read_all(&mut r.conn, Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(9),
            "round {round}: the connection stayed open"
        );
        let last = words.last().expect("a last word");
        assert_eq!(last.id, 0, "{words:?}");
        assert_eq!(
            err_code(&last.outcome),
            Some(ErrorCode::MalformedMessage),
            "{words:?}"
        );
        // Whatever was taken was answered on the ring, once.
        let head = r.word(layout::SQ_HEAD).load(Ordering::Acquire);
        let end = Instant::now() + Duration::from_secs(5);
        while r.word(layout::CQ_TAIL).load(Ordering::Acquire) != head {
            assert!(
                Instant::now() < end,
                "round {round}: {head} taken, {} answered",
                r.word(layout::CQ_TAIL).load(Ordering::Acquire)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(head <= 2, "round {round}: {head} taken");
        let mut ids: Vec<u64> = (0..head).map(|_| r.consume().id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len() as u32, head, "round {round}: {ids:?}");
    }
    let seen = bystander.stop();
    assert_ring_unharmed(&mut d, &before, Some(seen));
}

/// An admin may take every ring the daemon has (127): a non-admin user then gets none and is
/// served over the socket; once the admin lets them go, the non-admin gets a ring again.
#[test]
fn an_admin_holding_every_ring_leaves_others_the_socket_and_gives_them_back() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "preload = [\"digits\"]\n", &[]);
    let before = before(&d);
    let (input, want) = digits_case(2);
    let small = || rxd_client::RingOptions {
        entries: 1,
        slot_bytes: 256,
        arena_bytes: 0,
        ..Default::default()
    };
    let admin: Vec<rxd_client::RingClient> = (0..130)
        .map(|_| rxd_client::RingClient::connect(&d.socket, small()).unwrap())
        .collect();
    let granted = admin.iter().filter(|c| c.has_ring()).count();
    assert_eq!(granted, 127, "rings the admin got");
    let conn = connect_as_nobody(&d.socket);
    let mut c = rxd_client::RingClient::handshake(conn.stream, small()).unwrap();
    assert!(!c.has_ring());
    assert_eq!(c.infer("digits", vec![input.clone()]).unwrap(), want);
    drop(c);
    drop(admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = connect_as_nobody(&d.socket);
        let mut c = rxd_client::RingClient::handshake(conn.stream, small()).unwrap();
        if c.has_ring() {
            assert_eq!(c.infer("digits", vec![input.clone()]).unwrap(), want);
            break;
        }
        assert!(Instant::now() < deadline, "the rings were not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ring_unharmed(&mut d, &before, None);
}

/// The ring lies in the arena, after the tensor part: a request that names ring bytes as an
/// input or as where its outputs go is refused (`arena_out_of_range`) — the daemon never
/// writes outputs over the words it reads as atomics, nor hands the ring to a model — and
/// the ring goes on serving.
#[test]
fn references_into_the_ring_are_refused() {
    use rxd_protocol::{ArenaRef, OutputRegion, TensorData};
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let (input, want) = digits_case(2);
    // No tensor part: the ring starts at offset 0 and fills the arena.
    let mut r = RawRing::connect(&d.socket, 8);
    let in_ring = rxd_client::Tensor {
        data: TensorData::Arena(ArenaRef {
            offset: 0,
            len: 2 * 64 * 4,
        }),
        ..input.clone()
    };
    let requests = [
        InferRequest::new("digits", vec![in_ring]),
        InferRequest {
            output_area: Some(ArenaRef {
                offset: 0,
                len: 4096,
            }),
            ..InferRequest::new("digits", vec![input.clone()])
        },
        InferRequest {
            output_regions: vec![OutputRegion {
                name: want[0].name.clone(),
                offset: 256,
                len: 1024,
            }],
            ..InferRequest::new("digits", vec![input.clone()])
        },
    ];
    for (i, req) in requests.into_iter().enumerate() {
        let id = i as u64 + 1;
        r.submit_bytes(
            &frame::encode(&RequestFrame {
                id,
                body: Request::Infer(req),
            })
            .unwrap(),
        );
        assert!(r.wait_completed(1, Duration::from_secs(10)), "request {id}");
        let a = r.consume();
        assert_eq!(a.id, id);
        assert_eq!(
            err_code(&a.outcome),
            Some(ErrorCode::ArenaOutOfRange),
            "request {id}: {:?}",
            a.outcome
        );
    }
    r.submit_digits(9, &input);
    assert!(r.wait_completed(1, Duration::from_secs(10)));
    match r.consume().outcome {
        Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
        other => panic!("{other:?}"),
    }
    drop(r);
    assert_ring_unharmed(&mut d, &before, None);
}

/// A client whose ring is stalled (its completions unconsumed) and that keeps moving its
/// submission tail within bounds, waking the poller each time, made the poller look again at
/// once every time: a core of the daemon's for the client's one. After 64 such rounds in a row
/// the poller pauses 100 µs before each wait: the daemon spends a fraction of a core, and
/// other ring clients are still served.
#[test]
fn a_stalled_ring_whose_tail_keeps_moving_does_not_spin_the_poller() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let (input, want) = digits_case(1);
    let mut r = RawRing::connect(&d.socket, 4);
    for id in 1..=4 {
        r.submit_digits(id, &input);
    }
    assert!(r.wait_completed(4, Duration::from_secs(10)), "stalled");
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (stop, mem) = (stop.clone(), r.mem.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // 5, 6, 5, 6, ...: one or two more submissions, never more than the ring.
                mem.word(layout::SQ_TAIL).store(5 + n % 2, Ordering::SeqCst);
                wake(mem.word(layout::SQ_TAIL));
                n = n.wrapping_add(1);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = process_cpu(d.pid());
    let t0 = Instant::now();
    // Another client's ring is served meanwhile.
    let mut other = RawRing::connect(&d.socket, 4);
    let mut served = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        other.submit_digits(served + 1, &input);
        assert!(
            other.wait_completed(1, Duration::from_secs(2)),
            "{served} served"
        );
        match other.consume().outcome {
            Outcome::Ok(rxd_protocol::Reply::Infer(x)) => assert_eq!(x.outputs, want),
            o => panic!("{o:?}"),
        }
        served += 1;
    }
    let cores = (process_cpu(d.pid()) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    mover.join().unwrap();
    eprintln!("daemon: {cores:.2} cores; the other ring: {served} served");
    assert!(cores < 0.5, "the daemon used {cores:.2} cores");
    assert!(served > 20, "{served} served");
    drop((r, other));
    assert_ring_unharmed(&mut d, &before, None);
}
