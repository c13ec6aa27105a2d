//! The client's side of a request's lifetime against a fake daemon (a socket pair).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{
    HandshakeReply, InferReply, InferRequest, Outcome, PROTOCOL_VERSION, Reply, Request,
    RequestFrame, ResponseFrame, Welcome,
};
use tokio::net::UnixStream;

use super::{Client, ClientOptions};
use crate::ClientError;
use crate::arena::OutputBufs;

fn read_std_frame(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
    s.read_exact(&mut body).unwrap();
    body
}

/// A client connected to a fake daemon (the other end of a socket pair, returned with the
/// daemon's view of the 64 KiB arena it granted).
async fn fake_daemon() -> (Client, std::os::unix::net::UnixStream, rxd_shm::Mapping) {
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let daemon = std::thread::spawn(move || {
        read_std_frame(&mut theirs);
        let fd = rxd_shm::create_sealed("rxd-client-test", 1 << 16).unwrap();
        let map = rxd_shm::Mapping::map(fd.as_fd(), 1 << 16).unwrap();
        let welcome = HandshakeReply::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            server: "fake".into(),
            max_frame_bytes: 1 << 20,
            max_in_flight: 16,
            arena_bytes: 1 << 16,
            ring: None,
        });
        let bytes = frame::encode(&welcome).unwrap();
        let sent = rxd_shm::send_with_fd(rxd_shm::raw(&theirs), &bytes, fd.as_fd()).unwrap();
        theirs.write_all(&bytes[sent..]).unwrap();
        (theirs, map)
    });
    ours.set_nonblocking(true).unwrap();
    let stream = UnixStream::from_std(ours).unwrap();
    let options = ClientOptions {
        arena_bytes: 1 << 16,
        ..ClientOptions::default()
    };
    let client = Client::handshake(stream, options).await.unwrap();
    let (theirs, map) = daemon.join().unwrap();
    (client, theirs, map)
}

/// The daemon writes an output buffer until it answers: a request holds its buffers until
/// then, and a request dropped before the answer gives them up (emptied) rather than
/// letting their owner read memory being written; their range is reused only once the
/// answer has come.
#[tokio::test]
async fn output_buffers_stay_lent_until_the_daemon_answers() {
    let (client, mut daemon, map) = fake_daemon().await;
    let arena = client.arena().unwrap().clone();
    let mut area = arena.alloc(4096).unwrap();
    let offset = area.offset();
    let free = arena.free_bytes();

    // Naming output places by hand is refused: only lent buffers may be written.
    let mut raw = InferRequest::new("m", Vec::new());
    raw.output_area = Some(area.as_ref());
    assert!(matches!(
        client.infer_request(raw).await,
        Err(ClientError::Tensor(_))
    ));

    // The request's future is dropped before the daemon answers.
    let req = InferRequest::new("m", Vec::new());
    let call = client.infer_into(req, OutputBufs::area(&mut area));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err()
    );
    assert!(area.is_empty(), "given up: {area:?}");
    assert!(area.bytes().is_empty());
    assert_eq!(arena.free_bytes(), free, "still allocated");
    drop(area);
    assert_eq!(
        arena.free_bytes(),
        free,
        "still allocated after its owner let go"
    );

    // The daemon writes the area, then answers: only now is the range free again.
    let body = read_std_frame(&mut daemon);
    let req: RequestFrame = frame::decode(&body).unwrap();
    assert!(matches!(&req.body, Request::Infer(r) if r.output_area.is_some()));
    map.copy_in(offset, &[7; 4096]).unwrap();
    let reply = ResponseFrame {
        id: req.id,
        outcome: Outcome::Ok(Reply::Infer(InferReply {
            model: "m".into(),
            version: 1,
            outputs: Vec::new(),
        })),
    };
    daemon.write_all(&frame::encode(&reply).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while arena.free_bytes() != free + 4096 {
        assert!(std::time::Instant::now() < deadline, "never freed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A request answered in time keeps its buffer, with what the daemon wrote.
    let mut area = arena.alloc(64).unwrap();
    let offset = area.offset();
    let call = client.infer_into(
        InferRequest::new("m", Vec::new()),
        OutputBufs::area(&mut area),
    );
    let answer = async {
        let mut daemon = daemon.try_clone().unwrap();
        tokio::task::spawn_blocking(move || {
            let req: RequestFrame = frame::decode(&read_std_frame(&mut daemon)).unwrap();
            map.copy_in(offset, &[9; 64]).unwrap();
            let reply = ResponseFrame {
                id: req.id,
                outcome: Outcome::Ok(Reply::Infer(InferReply {
                    model: "m".into(),
                    version: 1,
                    outputs: Vec::new(),
                })),
            };
            daemon.write_all(&frame::encode(&reply).unwrap()).unwrap();
        })
        .await
        .unwrap()
    };
    let (result, ()) = tokio::join!(call, answer);
    result.unwrap();
    assert_eq!(area.bytes(), &[9; 64][..]);
}
