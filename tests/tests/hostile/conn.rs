//! Attacks on the connection layer: answers nobody reads, idle and silent connections, frames
//! held open, file descriptors after the handshake, other peers' errors, duplicate ids.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rxd_e2e::*;
use rxd_protocol::{
    ArenaRef, DType, ErrorCode, HandshakeReply, Hello, InferRequest, Outcome, PROTOCOL_VERSION,
    Reply, Request, RequestFrame, Tensor, TensorData, frame,
};

use crate::common::*;

const MIB: u64 = 1 << 20;

fn infer_frame(id: u64, req: InferRequest) -> Vec<u8> {
    frame_of(&RequestFrame {
        id,
        body: Request::Infer(req),
    })
}

/// Regression (issue 19, item 4): the in-flight permit was released when an answer was queued,
/// not written, and the backlog had no bound: 24 requests for 64 MiB inline answers that the
/// client never read grew the daemon by 1.6 GiB.
#[test]
fn answers_nobody_reads_cost_bounded_memory() {
    let _serial = serial();
    let repo = repo_with(&["relu"]);
    repo.settings(
        "relu",
        "max-batch-rows = 1\nmax-dims = { x = [4096, 4096] }\n",
    );
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());

    let mut attacker = connect_as_nobody(&d.socket);
    let (_, _arena_fd) = attacker.handshake_arena(64 * MIB).unwrap();
    let input = Tensor {
        name: "x".into(),
        dtype: DType::Float32,
        shape: vec![4096, 4096],
        data: TensorData::Arena(ArenaRef {
            offset: 0,
            len: 64 * MIB,
        }),
    };
    let mut frames = Vec::new();
    for id in 1..=24 {
        frames.extend(infer_frame(
            id,
            InferRequest::new("relu", vec![input.clone()]),
        ));
    }
    attacker.send_raw(&frames).unwrap();
    // The daemon runs them all (64 MiB each) while nothing is read.
    std::thread::sleep(Duration::from_secs(8));
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    let seen = bystander.stop();

    // Every request still gets exactly one answer: some whole, the rest `unread_answers`.
    let answers = read_all(&mut attacker, Duration::from_secs(5));
    let mut ids: Vec<u64> = answers.iter().map(|a| a.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=24).collect::<Vec<_>>(), "one answer per request");
    let whole = answers
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Ok(_)))
        .count();
    let dropped = answers
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Err(ref e) if e.kind() == Some(ErrorCode::UnreadAnswers)))
        .count();
    assert!(
        whole >= 1 && whole + dropped == 24,
        "{whole} whole, {dropped} dropped"
    );
    assert!(
        peak <= 512 * MIB,
        "the daemon grew by {} MiB for answers nobody read",
        peak / MIB
    );
    drop(attacker);
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 256 * MIB);
}

/// Regression (issue 19, item 4): 20k unread `metrics` requests cost 80 MiB — the connection
/// kept reading while its answers piled up.
#[test]
fn a_flood_of_requests_whose_answers_are_not_read_stops_being_read() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());

    let mut attacker = connect_as_nobody(&d.socket);
    attacker.handshake().unwrap();
    const N: u64 = 20_000;
    let mut writer = attacker.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        for id in 1..=N {
            let f = frame_of(&RequestFrame {
                id,
                body: Request::Metrics,
            });
            if writer.write_all(&f).is_err() {
                return id;
            }
        }
        N + 1
    });
    std::thread::sleep(Duration::from_secs(4));
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    assert!(!flood.is_finished(), "the daemon stopped reading the flood");
    assert!(
        peak <= 24 * MIB,
        "unread answers grew the daemon by {} MiB",
        peak / MIB
    );
    // Reading now lets the flood through; every request is answered once.
    attacker
        .stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen_ids = vec![false; N as usize + 1];
    for _ in 0..N {
        let r = attacker.read_response();
        assert!(
            matches!(r.outcome, Outcome::Ok(Reply::Metrics(_))),
            "{:?}",
            r.id
        );
        assert!(
            !std::mem::replace(&mut seen_ids[r.id as usize], true),
            "two answers for {}",
            r.id
        );
    }
    assert_eq!(flood.join().unwrap(), N + 1);
    let seen = bystander.stop();
    drop(attacker);
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// Regression (issue 19, item 5): 256 idle connections (no handshake, or handshaken and silent)
/// from one user locked every other client out indefinitely.
#[test]
fn idle_and_silent_connections_of_one_user_lock_nobody_out() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "max-connections = 48\nmax-connections-per-uid = 12\nhandshake-timeout-secs = 1\n\
         idle-timeout-secs = 2\n",
        &[],
    );
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);

    // Every slot the daemon has, asked for by one user: half never say hello, half go silent.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..48 {
        let mut c = connect_as_nobody(&d.socket);
        if i % 2 == 0 {
            // A connection over the share may be refused and closed before the hello is sent.
            let _ = c.send_raw(&frame_of(&Hello {
                protocol: PROTOCOL_VERSION,
                client: "silent".into(),
                arena_bytes: 0,
                ring: None,
            }));
            c.stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let reply: HandshakeReply = frame::decode(&c.read_body().unwrap()).unwrap();
            match reply {
                HandshakeReply::Welcome(_) => {}
                HandshakeReply::Error(e) => {
                    assert_eq!(
                        e.error.kind(),
                        Some(ErrorCode::ConnectionLimit),
                        "{}",
                        e.error
                    );
                    refused += 1;
                }
            }
        }
        held.push(c);
    }
    assert!(
        refused >= 12,
        "one user got more than its share: {refused} refused"
    );
    // Another unprivileged user still gets in while the first holds its share.
    let (stream, helper) = connect_as_with(&d.socket, 4242, 4242, &[], None);
    drop(helper);
    RawConn { stream }.handshake().unwrap();

    // The daemon closes what it holds for them: no hello in 1 s, idle for 2 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds(d.pid()) > b.fds + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = bystander.stop();
    let mut timeouts = 0;
    for c in &mut held {
        for r in read_all(c, Duration::from_millis(200)) {
            if err_code(&r.outcome) == Some(ErrorCode::ConnectionTimeout) {
                timeouts += 1;
            }
        }
    }
    assert!(
        timeouts >= 12,
        "idle connections were told why they were closed: {timeouts}"
    );
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
    drop(held);
}

/// Regression (issue 19, item 10): eight connections each one byte short of an 80 MiB frame
/// pinned 640 MiB (the defaults allowed 20 GiB).
#[test]
fn frames_held_one_byte_short_cost_bounded_memory() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "request-memory-bytes = \"320MiB\"\nframe-timeout-secs = 3\n",
        &[],
    );
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    reset_peak(d.pid());

    let len = 80 * MIB as usize;
    let mut writers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut c = connect_as_nobody(&d.socket);
        c.handshake().unwrap();
        let mut w = c.stream.try_clone().unwrap();
        w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        writers.push(std::thread::spawn(move || {
            let mut bytes = (len as u32).to_le_bytes().to_vec();
            bytes.resize(4 + len - 1, 7);
            let _ = w.write_all(&bytes);
        }));
        conns.push(c);
    }
    // The first frame to get memory times out (3 s) and its connection is told so; then the
    // next gets the memory. Meanwhile the daemon holds at most one such frame for this user.
    let mut timeouts = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while timeouts == 0 && Instant::now() < deadline {
        for c in &mut conns {
            for r in read_all(c, Duration::from_millis(50)) {
                if err_code(&r.outcome) == Some(ErrorCode::ConnectionTimeout) {
                    timeouts += 1;
                }
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let peak = peak_rss(d.pid()).saturating_sub(b.rss);
    let seen = bystander.stop();
    assert!(
        peak <= 140 * MIB,
        "frames held open grew the daemon by {} MiB",
        peak / MIB
    );
    assert!(timeouts >= 1, "no frame timed out");
    for c in &conns {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    drop(conns);
    for w in writers {
        w.join().unwrap();
    }
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 140 * MIB);
}

/// Regression (issue 19, item 11): a frame sent in two `sendmsg` calls that carry fds left the
/// daemon not reading the rest until another frame arrived. Run with the kernel's refusal
/// of passed fds off (`RXD_TEST_PASS_FDS`), as on a kernel before 6.16, so that they reach
/// the daemon.
#[test]
fn fds_after_the_handshake_are_closed_and_end_the_connection() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon_env(repo.path(), &[("RXD_TEST_PASS_FDS", "1")], "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let null = std::fs::File::open("/dev/null").unwrap();
    let status = frame_of(&RequestFrame {
        id: 1,
        body: Request::Status,
    });
    for round in 0..50 {
        let mut c = connect_as_nobody(&d.socket);
        c.handshake().unwrap();
        let (first, rest) = status.split_at(status.len() / 2);
        rxd_shm::send_with_fd(rxd_shm::raw(&c.stream), first, null.as_fd()).unwrap();
        if round % 2 == 0 {
            // The daemon may have closed the connection already (then this fails).
            let _ = rxd_shm::send_with_fd(rxd_shm::raw(&c.stream), rest, null.as_fd());
        }
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let r = c.read_response();
        assert_eq!(r.id, 0);
        assert_eq!(err_code(&r.outcome), Some(ErrorCode::UnexpectedFd));
        assert!(c.read_body().is_err(), "the connection ends");
    }
    let seen = bystander.stop();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// Regression (issue 19, item 12): `health` showed any peer the last error of any other peer,
/// input names included.
#[test]
fn health_shows_other_peers_only_the_code_of_the_last_error() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let secret = Tensor::inline("the-secret-input-name", DType::Float32, vec![1], vec![0; 4]);
    let (good, _) = digits_case(1);
    let e = d
        .client_inline()
        .infer("digits", vec![good, secret])
        .unwrap_err();
    assert!(e.to_string().contains("the-secret-input-name"));

    let health = |conn: &mut RawConn| {
        conn.handshake().unwrap();
        conn.send(&RequestFrame {
            id: 1,
            body: Request::Health,
        });
        match conn.read_response().outcome {
            Outcome::Ok(Reply::Health(h)) => h.last_error.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    };
    let theirs = health(&mut connect_as_nobody(&d.socket));
    assert!(theirs.contains("unknown_input"), "{theirs}");
    assert!(
        !theirs.contains("secret"),
        "another peer's input name leaked: {theirs}"
    );
    let admins = health(&mut RawConn::connect(&d.socket).unwrap());
    assert!(admins.contains("the-secret-input-name"), "{admins}");
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// Regression (issue 19, item 13): the `bad_request_id` refusal was sent under the id of the
/// request still in flight, so the client saw two answers for one id; a second Hello got
/// `malformed_message` instead of `handshake_required`.
#[test]
fn a_duplicate_id_never_gets_a_second_answer() {
    let _serial = serial();
    let repo = repo_with(&["relu"]);
    repo.settings("relu", "max-dims = { x = [2048, 4096] }\n");
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    // A slow request (a 32 MiB inline input), then the same id again at once.
    let big = Tensor::inline("x", DType::Float32, vec![2048, 4096], vec![0; 32 << 20]);
    let small = Tensor::inline("x", DType::Float32, vec![1, 4], vec![0; 16]);
    let mut frames = infer_frame(7, InferRequest::new("relu", vec![big]));
    frames.extend(infer_frame(
        7,
        InferRequest::new("relu", vec![small.clone()]),
    ));
    frames.extend(frame_of(&Hello {
        protocol: PROTOCOL_VERSION,
        client: "again".into(),
        arena_bytes: 0,
        ring: None,
    }));
    frames.extend(infer_frame(8, InferRequest::new("relu", vec![small])));
    c.send_raw(&frames).unwrap();
    let answers: Vec<_> = (0..4).map(|_| c.read_response()).collect();
    let of = |id| answers.iter().filter(|a| a.id == id).collect::<Vec<_>>();
    assert_eq!(of(7).len(), 1, "one answer for id 7: {answers:?}");
    assert!(matches!(of(7)[0].outcome, Outcome::Ok(_)));
    assert!(
        matches!(of(8)[0].outcome, Outcome::Ok(_)),
        "the connection goes on"
    );
    let mut zero: Vec<_> = of(0).iter().map(|a| err_code(&a.outcome)).collect();
    zero.sort_by_key(|c| c.map(|c| c.as_u16()));
    assert_eq!(
        zero,
        vec![
            Some(ErrorCode::HandshakeRequired),
            Some(ErrorCode::BadRequestId)
        ]
    );
    drop(c);
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 256 * MIB);
}

/// A TCP socket that blocks the thread that closes its last reference for `secs`: connected
/// over the loopback to a peer that never reads, its send buffer full, set to linger.
fn lingering_socket(secs: i32) -> (std::net::TcpStream, std::net::TcpStream) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (unread, _) = listener.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 1 << 16];
    while s.write(&chunk).is_ok() {}
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: secs,
        },
    )
    .unwrap();
    (s, unread)
}

/// Closing the last reference to a file can block the closing thread as long as the file's
/// owner likes (here a TCP socket lingering 30 s on unsent data; a FUSE file would do too).
/// A peer that sends such fds with its frames — received, or left queued on its connection
/// when the daemon closes it — delays no one: the daemon answers `unexpected_fd` at once,
/// its other clients are served within 2 s, the sockets it received are aborted rather than
/// waited for, and while the closes of its connections hang (on the sockets left queued),
/// another user's connections still open and close. Kernel refusal off
/// (`RXD_TEST_PASS_FDS`), as before Linux 6.16.
#[test]
fn fds_whose_close_blocks_delay_no_one() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon_env(repo.path(), &[("RXD_TEST_PASS_FDS", "1")], "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let status = frame_of(&RequestFrame {
        id: 1,
        body: Request::Status,
    });
    let mut keep = Vec::new();
    // As many hung closes as one user may hold closer threads (PER_USER_THREADS).
    for _ in 0..2 {
        let mut c = connect_as_nobody(&d.socket);
        c.handshake().unwrap();
        let (received, unread_1) = lingering_socket(30);
        let (queued, unread_2) = lingering_socket(30);
        // The second message stays queued on the connection the daemon closes.
        rxd_shm::send_with_fd(rxd_shm::raw(&c.stream), &status, received.as_fd()).unwrap();
        let _ = rxd_shm::send_with_fd(rxd_shm::raw(&c.stream), &status, queued.as_fd());
        drop((received, queued));
        let start = Instant::now();
        c.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let r = c.read_response();
        assert_eq!(err_code(&r.outcome), Some(ErrorCode::UnexpectedFd));
        assert!(c.read_body().is_err(), "the connection ends");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "answered after {:?}",
            start.elapsed()
        );
        keep.push((unread_1, unread_2));
    }
    // Another user's connections come and go meanwhile: closed at once (their fds are gone
    // from the daemon within assert_unharmed's 10 s, while the hung closes last 30 s).
    for _ in 0..20 {
        let mut c = RawConn::connect(&d.socket).unwrap();
        c.handshake().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let seen = bystander.stop();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
    drop(keep);
}

/// While a user's closes hang (two: as many as it may have under way), the fds it goes on
/// sending waited in the daemon's fd table without bound — 12 connections × 253 fds, ~3 000
/// more, when systemd's default soft limit is 1024 and `accept` then failed for everyone.
/// Now at most `PER_USER_BACKLOG` (512) of its fds wait: its connections are not read
/// meanwhile (what it sends stays in the kernel's queues, on its own account) and are read
/// once the closes end. Kernel refusal off (`RXD_TEST_PASS_FDS`), as before Linux 6.16;
/// the hang is the daemon's test hook (`RXD_TEST_CLOSE_DELAY_MS`: making a close hang for
/// real races the sender's own close of the file, see `fds_whose_close_blocks_delay_no_one`).
#[test]
fn a_user_whose_closes_hang_cannot_fill_the_daemons_fd_table() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let env = [
        ("RXD_TEST_PASS_FDS", "1"),
        ("RXD_TEST_CLOSE_DELAY_MS", "5000"),
    ];
    let mut d = shared_daemon_env(repo.path(), &env, "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let fds = || d.fd_targets().len();
    let start = (Instant::now(), fds());
    let null = std::fs::File::open("/dev/null").unwrap();
    let many: Vec<std::os::fd::RawFd> = (0..253).map(|_| rxd_shm::raw(&null)).collect();
    let status = frame_of(&RequestFrame {
        id: 1,
        body: Request::Status,
    });
    // Sent as each connection's first bytes: a connection the daemon does not read cannot
    // complete a handshake.
    let mut conns = Vec::new();
    for _ in 0..12 {
        let c = connect_as_nobody(&d.socket);
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&many)];
        nix::sys::socket::sendmsg::<()>(
            rxd_shm::raw(&c.stream),
            &[std::io::IoSlice::new(&status)],
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .unwrap();
        conns.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    let grew = fds().saturating_sub(start.1);
    eprintln!("the daemon's fds grew by {grew} while nobody's closes hung");
    assert!(
        start.0.elapsed() < Duration::from_secs(4),
        "measured after the closes ended: {:?}",
        start.0.elapsed()
    );
    assert!(grew > 253, "the first of them were taken: {grew}");
    // The backlog, and each connection's socket (two fds, one more queued to close).
    assert!(grew < 512 + 4 * 12 + 32, "grew by {grew} fds");
    // The closes end: the waiting connections are read, their fds closed.
    drop(conns);
    std::thread::sleep(Duration::from_secs(5));
    let seen = bystander.stop();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// Where the kernel can (`SO_PASSRIGHTS`, Linux 6.16), it refuses fds sent to the daemon
/// after accepting the connection: the sender's `sendmsg` fails, nothing reaches the daemon,
/// and the connection goes on. Elsewhere they reach it and end the connection as above.
#[test]
fn the_kernel_refuses_fds_sent_to_the_daemon_where_it_can() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let null = std::fs::File::open("/dev/null").unwrap();
    let status = frame_of(&RequestFrame {
        id: 1,
        body: Request::Status,
    });
    // Sent before the daemon accepted the connection (no handshake yet): refused too, the
    // listening socket's setting being carried over to the connection.
    let kernel_can = {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        rxd_shm::fd::refuse_passed_fds(a.as_fd()).unwrap()
    };
    let early = connect_as_nobody(&d.socket);
    match rxd_shm::send_with_fd(rxd_shm::raw(&early.stream), b"x", null.as_fd()) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EPERM), "{e}"),
        Ok(_) => assert!(!kernel_can, "the kernel could refuse it, and did not"),
    }
    drop(early);
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match rxd_shm::send_with_fd(rxd_shm::raw(&c.stream), &status, null.as_fd()) {
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(nix::libc::EPERM), "{e}");
            c.send_raw(&status).unwrap();
            let r = c.read_response();
            assert_eq!(r.id, 1);
            assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
        }
        Ok(_) => {
            assert!(!kernel_can, "the kernel could refuse it, and did not");
            let r = c.read_response();
            assert_eq!(err_code(&r.outcome), Some(ErrorCode::UnexpectedFd));
        }
    }
    drop(c);
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
}

/// A peer that keeps its arena's memfd after its connection ends keeps the arena's pages:
/// those the daemon touched first (the outputs it wrote) were charged to the daemon for as
/// long as the peer liked, out of reach of the daemon's own limits, and a peer could pile
/// them up connection after connection. The daemon frees the arena's pages when it is done
/// with it: the memfd the peer kept holds none.
#[test]
fn an_arena_kept_after_its_connection_holds_no_pages() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let blocks = |fd: &std::os::fd::OwnedFd| nix::sys::stat::fstat(fd).unwrap().st_blocks;
    let mut kept = Vec::new();
    for round in 0..4 {
        let mut c = connect_as_nobody(&d.socket);
        let (_, fd) = c.handshake_arena(16 * MIB).unwrap();
        assert_eq!(blocks(&fd), 0, "a new arena holds no pages");
        // Outputs the daemon writes into ranges nobody touched before.
        let (input, _) = digits_case(2);
        let frames: Vec<u8> = (0..8u64)
            .flat_map(|i| {
                infer_frame(
                    i + 1,
                    InferRequest {
                        output_area: Some(ArenaRef {
                            offset: (i + 1) * MIB,
                            len: MIB,
                        }),
                        ..InferRequest::new("digits", vec![input.clone()])
                    },
                )
            })
            .collect();
        c.send_raw(&frames).unwrap();
        for _ in 0..8 {
            let r = c.read_response();
            assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
        }
        assert!(blocks(&fd) > 0, "round {round}: the daemon wrote no page");
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while blocks(&fd) > 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the arena kept {} blocks after its connection",
                blocks(&fd)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        kept.push(fd);
    }
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 * MIB);
    drop(kept);
}

/// The reports any peer may ask for (status, health, models, devices, metrics) cost real CPU
/// (every model's state; on a GPU host the driver's queries, under the registry's locks): a
/// flood of them from one user, 16 connections keeping 64 each in flight, is built one at a
/// time off the IO threads. Every one is answered once, and another client's inferences are
/// served meanwhile within a second.
#[test]
fn a_flood_of_reports_is_answered_without_holding_up_inferences() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let b = before(&d);
    let bystander = Bystander::start(&d.socket);
    let kinds = [
        Request::Health,
        Request::Devices,
        Request::Status,
        Request::ListModels,
        Request::Metrics,
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floods: Vec<_> = (0..16)
        .map(|_| {
            let mut c = connect_as_nobody(&d.socket);
            c.handshake().unwrap();
            c.stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let (kinds, stop) = (kinds.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut next = 1u64;
                let send = |c: &mut RawConn, id: u64| {
                    c.send(&RequestFrame {
                        id,
                        body: kinds[id as usize % kinds.len()].clone(),
                    })
                };
                for _ in 0..64 {
                    send(&mut c, next);
                    next += 1;
                }
                let (mut answered, mut in_flight) = (0u64, 64u64);
                while in_flight > 0 {
                    let r = c.read_response();
                    assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
                    answered += 1;
                    in_flight -= 1;
                    if !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        send(&mut c, next);
                        next += 1;
                        in_flight += 1;
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: u64 = floods.into_iter().map(|f| f.join().unwrap()).sum();
    eprintln!("reports answered: {answered}");
    assert!(answered >= 16 * 64, "{answered}");
    let seen = bystander.stop();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(1), 64 * MIB);
}
