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
        let mut conn = connect_as_nobody(socket);
        let (welcome, fd) = conn
            .handshake_ring(
                0,
                Some(RingAsk {
                    entries,
                    slot_bytes: 1024,
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
        let bytes = frame::encode(&RequestFrame {
            id,
            body: Request::Infer(InferRequest {
                model: "digits".into(),
                version: None,
                inputs: vec![input.clone()],
                outputs: vec![],
                output_regions: Vec::new(),
                output_area: None,
                priority: None,
                timeout_ms: None,
                inline_overflow: false,
            }),
        })
        .unwrap();
        self.submit_bytes(&bytes);
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
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 64 << 20);
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
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 64 << 20);
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
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 64 << 20);
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
