//! Connecting: the handshake (the welcome read with `recvmsg`, so the arena fd it carries is
//! not lost; the arena mapped only after its seals are checked) and the reader task that routes
//! each response to its waiter.
//!
//! Nothing here sends requests; a connection that ends tells every waiter why.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{HandshakeReply, Hello, Outcome, PROTOCOL_VERSION, ResponseFrame, limits};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Client, ClientOptions, Inner, Pending, lock};
use crate::ClientError;
use crate::arena::Arena;

/// Maps the arena fd the daemon passed, after checking its size and seals (a ring included).
pub(crate) fn map_arena(fd: OwnedFd, size: u64) -> Result<Arc<rxd_shm::Mapping>, ClientError> {
    use std::os::fd::AsFd;
    let seals = rxd_shm::seals(fd.as_fd())?;
    if seals & rxd_shm::ARENA_SEALS != rxd_shm::ARENA_SEALS {
        return Err(ClientError::Protocol("the arena fd is not sealed".into()));
    }
    Ok(Arc::new(rxd_shm::Mapping::map(fd.as_fd(), size as usize)?))
}

/// Reads the welcome frame with `recvmsg`, so that an fd passed with it is not lost.
async fn read_welcome(stream: &UnixStream) -> Result<(Vec<u8>, Option<OwnedFd>), ClientError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut fd = None;
    let mut body: Vec<u8> = Vec::new();
    let mut need = HEADER_LEN;
    loop {
        stream.readable().await?;
        let buf: &mut [u8] = if got < HEADER_LEN {
            &mut header[got..]
        } else {
            &mut body[got - HEADER_LEN..]
        };
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            rxd_shm::recv_with_fd(stream.as_raw_fd(), buf)
        });
        let (n, passed) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(ClientError::Closed(
                "the daemon closed the connection in the handshake".into(),
            ));
        }
        if passed.is_some() {
            fd = passed;
        }
        got += n;
        if got == HEADER_LEN && need == HEADER_LEN {
            let len = frame::body_len(header, limits::MAX_HANDSHAKE_FRAME)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            body = vec![0; len];
            need = HEADER_LEN + len;
        }
        if got == need && need > HEADER_LEN {
            return Ok((body, fd));
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: u64) -> Result<Vec<u8>, ClientError> {
    let mut header = [0u8; HEADER_LEN];
    rd.read_exact(&mut header).await?;
    let len = frame::body_len(header, max).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(body)
}

impl Client {
    /// Connects with default options (a 16 MiB arena, tensors from 64 KiB through it; no arena
    /// if the daemon refuses one).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default()).await
    }

    /// Connects and performs the handshake.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let open = || async {
            UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                })
        };
        match Client::handshake(open().await?, options.clone()).await {
            Err(ClientError::Handshake(e))
                if options.arena_fallback
                    && options.arena_bytes > 0
                    && e.kind() == Some(rxd_protocol::ErrorCode::ArenaUnavailable) =>
            {
                let inline = ClientOptions {
                    arena_bytes: 0,
                    ..options
                };
                Client::handshake(open().await?, inline).await
            }
            other => other,
        }
    }

    /// Performs the handshake on an already-connected stream.
    pub async fn handshake(
        mut stream: UnixStream,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client: options.client_name.clone(),
            arena_bytes: options.arena_bytes,
            ring: (options.ring_entries > 0).then_some(rxd_protocol::RingAsk {
                entries: options.ring_entries,
                slot_bytes: options.ring_slot_bytes,
            }),
        };
        let bytes = frame::encode(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&bytes).await?;
        let (body, fd) = read_welcome(&stream).await?;
        let welcome = match frame::decode::<HandshakeReply>(&body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            HandshakeReply::Welcome(w) => w,
            HandshakeReply::Error(e) => return Err(ClientError::Handshake(e.error)),
        };
        let map = match (welcome.arena_bytes, fd) {
            (0, _) => None,
            (n, Some(fd)) => Some(map_arena(fd, n)?),
            (_, None) => {
                return Err(ClientError::Protocol(
                    "an arena was granted but no fd came".into(),
                ));
            }
        };
        // Each direction watched by itself: see `rxd_shm::socket` (a stream watched for
        // writability woke the runtime every time the daemon read a request).
        let (rd, wr) = rxd_shm::socket::split(stream)?;
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let max_frame = welcome.max_frame_bytes.max(limits::DEFAULT_MAX_FRAME);
        // Tensors go before the ring, if there is one (none when that part is empty).
        let tensors = welcome.ring.map_or(welcome.arena_bytes, |r| r.offset);
        let arena = map
            .clone()
            .filter(|_| tensors > 0)
            .map(|m| Arena::within(m, tensors.min(welcome.arena_bytes)));
        let ring = match (welcome.ring, map) {
            (Some(grant), Some(map)) => Some(Arc::new(super::ring::ClientRing::new(
                map,
                grant,
                options.ring_spin,
            )?)),
            _ => None,
        };
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            // The ring's reaper; without one the ring is not used.
            let ring = ring.filter(|ring| {
                let (ring, weak) = (ring.clone(), weak.clone());
                std::thread::Builder::new()
                    .name("rxd-client-ring".into())
                    .spawn(move || ring.reap(&weak))
                    .is_ok()
            });
            let weak = weak.clone();
            let reader = tokio::spawn(async move {
                let reason = read_loop(&mut rd, &weak, max_frame).await;
                if let Some(inner) = weak.upgrade() {
                    let mut p = lock(&inner.pending);
                    p.closed = Some(reason.clone());
                    for (_, w) in p.waiters.drain() {
                        let _ = w.send(Err(ClientError::Closed(reason.clone())));
                    }
                    for (_, lent) in p.lent.drain() {
                        lent.into_iter().for_each(rxd_shm::Lent::leak);
                    }
                }
            });
            Inner {
                ring,
                writer: tokio::sync::Mutex::new(wr),
                pending: Mutex::new(Pending::default()),
                next_id: AtomicU64::new(1),
                welcome,
                reader,
                arena,
                inline_threshold: options.inline_threshold,
                output_sizes: Mutex::new(HashMap::new()),
                signatures: Mutex::new(HashMap::new()),
            }
        });
        Ok(Client { inner })
    }
}

/// Reads responses until the connection ends; returns why it ended.
async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    inner: &std::sync::Weak<Inner>,
    max_frame: u64,
) -> String {
    loop {
        let body = match read_frame(rd, max_frame).await {
            Ok(b) => b,
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the daemon closed the connection".into();
            }
            Err(e) => return e.to_string(),
        };
        let resp: ResponseFrame = match frame::decode(&body) {
            Ok(r) => r,
            Err(e) => return format!("undecodable response: {e}"),
        };
        let Some(inner) = inner.upgrade() else {
            return "client dropped".into();
        };
        if resp.id == 0 {
            // An error about the connection itself; the daemon closes after it.
            if let Outcome::Err(e) = resp.outcome {
                return format!("the daemon reported: {e}");
            }
            continue;
        }
        deliver(&inner, resp);
    }
}

/// Hands an answer to the request waiting for it (from the socket's reader or the ring's
/// reaper).
pub(super) fn deliver(inner: &Inner, resp: ResponseFrame) {
    let (waiter, lent) = {
        let mut p = lock(&inner.pending);
        let waiter = p.waiters.remove(&resp.id);
        let lent = if waiter.is_none() {
            p.lent.remove(&resp.id)
        } else {
            None
        };
        (waiter, lent)
    };
    if let Some(w) = waiter {
        let _ = w.send(Ok(resp.outcome));
    }
    // Answered: the daemon is done with the buffers of a request given up.
    drop(lent);
}
