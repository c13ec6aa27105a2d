//! The handshake: the first frame must be a Hello; the answer is a Welcome (with the arena's
//! memfd attached when one was asked for and granted) or a handshake error, then close.

use rxd_protocol::frame;
use rxd_protocol::{
    ErrorCode, HandshakeError, HandshakeReply, Hello, PROTOCOL_VERSION, RequestFrame, Welcome,
    WireError, limits,
};
use tokio_util::sync::CancellationToken;

use super::arena::{ArenaGrant, send_with_fd};
use super::reader::{FrameReader, ReadError, read_frame};
use super::ring::{RingSlot, Rings};
use crate::SharedRef;
use crate::peer::Peer;
use rxd_protocol::RingGrant;
use rxd_protocol::ring::Geometry;
use rxd_shm::socket::WriteSide;

/// What the handshake granted: the arena (its fd passed and dropped here, the mapping
/// stays), and the ring at its end.
pub(super) struct Granted {
    pub(super) arena: Option<ArenaGrant>,
    pub(super) ring: Option<(u64, Geometry, RingSlot)>,
}

/// Runs the handshake. `Some` when the connection is established; `None` when the connection
/// is to close (refused, gone, shutting down).
pub(super) async fn handshake(
    rd: &mut FrameReader,
    wr: &mut WriteSide,
    shared: &SharedRef,
    peer: &Peer,
    shutdown: &CancellationToken,
) -> Option<Granted> {
    let hello = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = read_frame(rd, limits::MAX_HANDSHAKE_FRAME) => r,
    };
    let hello: Hello = match hello {
        Ok(body) => match frame::decode_bounded(&body, limits::MAX_FRAME_VALUES) {
            Ok(h) => h,
            Err(_) if frame::decode::<RequestFrame>(&body).is_ok() => {
                let err = WireError::new(
                    ErrorCode::HandshakeRequired,
                    "the first frame must be a Hello (see PROTOCOL.md)",
                );
                return refuse(wr, err).await;
            }
            Err(e) => return refuse(wr, e.to_wire()).await,
        },
        Err(ReadError::Frame(e)) => return refuse(wr, e.to_wire()).await,
        Err(ReadError::Fd) => {
            let err = WireError::new(
                ErrorCode::UnexpectedFd,
                "file descriptors may be passed only with the welcome; they were closed",
            );
            return refuse(wr, err).await;
        }
        Err(_) => return None,
    };
    if hello.protocol != PROTOCOL_VERSION {
        let err = WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
        );
        return refuse(wr, err).await;
    }
    // A ring, if asked for and the daemon has one to give, lies in the arena after the
    // tensors' part (page-aligned), which it makes larger.
    // An arena too large to hold the ring after it (its size would not fit a u64) gets no
    // ring, and is then refused like any arena over max-arena-bytes.
    let ring = hello.ring.and_then(|ask| {
        let geo = Geometry::granted(ask.entries, ask.slot_bytes, shared.config.max_in_flight)?;
        let offset = hello.arena_bytes.checked_next_multiple_of(4096)?;
        offset.checked_add(geo.bytes())?;
        let slot = Rings::grant(shared, peer)?;
        Some((offset, geo, slot))
    });
    let arena_bytes = match &ring {
        Some((offset, geo, _)) => offset.saturating_add(geo.bytes()),
        None => hello.arena_bytes,
    };
    let arena = if arena_bytes > 0 {
        match ArenaGrant::new(shared, peer, arena_bytes, ring.as_ref().map(|r| r.0)) {
            Ok(a) => Some(a),
            Err(e) => return refuse(wr, e).await,
        }
    } else {
        None
    };
    let welcome = HandshakeReply::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        server: crate::SERVER_NAME.into(),
        max_frame_bytes: shared.config.max_frame_bytes,
        max_in_flight: shared.config.max_in_flight,
        arena_bytes: arena.as_ref().map_or(0, |a| a.map.len() as u64),
        ring: ring.as_ref().map(|(offset, geo, _)| RingGrant {
            offset: *offset,
            entries: geo.entries,
            slot_bytes: geo.slot_bytes,
        }),
    });
    let Ok(bytes) = frame::encode(&welcome) else {
        return None;
    };
    let sent = match &arena {
        // The one frame that carries an fd: the welcome, with the arena's memfd attached.
        Some(ArenaGrant { fd: Some(fd), .. }) => match send_with_fd(wr, &bytes, fd).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("cannot pass the arena fd: {e}");
                return None;
            }
        },
        _ => 0,
    };
    if wr.write_all(&bytes[sent..]).await.is_err() {
        return None;
    }
    // The client has its own fd now; ours is no longer needed (the mapping stays).
    let arena = arena.map(|mut a| {
        a.fd = None;
        a
    });
    tracing::debug!(
        client = %hello.client,
        arena = arena.as_ref().map_or(0, |a| a.map.len() as u64),
        "handshake done"
    );
    Some(Granted { arena, ring })
}

/// Answers a failed handshake with its error, then closes the write side.
pub(super) async fn refuse<T>(wr: &mut WriteSide, error: WireError) -> Option<T> {
    tracing::debug!(code = error.code, "handshake refused: {}", error.message);
    let reply = HandshakeReply::Error(HandshakeError {
        error,
        supported: vec![PROTOCOL_VERSION],
    });
    if let Ok(bytes) = frame::encode(&reply) {
        let _ = wr.write_all(&bytes).await;
    }
    wr.shutdown();
    None
}
