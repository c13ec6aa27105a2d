//! One client connection: the handshake, then framed requests read in order and answered as
//! they complete (pipelining, out-of-order responses).
//!
//! Invariants: every request frame that was read completely gets exactly one response frame
//! (a success, or an error under its id — id 0 when the frame is too broken to carry one);
//! at most `max_in_flight` requests run at once per connection — beyond that the connection is
//! simply not read (backpressure); on shutdown the connection stops reading, answers what it
//! accepted, then closes. A peer that vanishes only ends its own connection.
//! Answers are written by whoever finishes the request: the request task for control requests,
//! and the model worker thread itself for inferences (through [`Sink`], without a hop back
//! through the async runtime). A frame is written whole before the next one starts.
//! Boundary: decoding and dispatch only; shared-memory fds are passed at the handshake and
//! nowhere else (PROTOCOL.md), so plain reads are safe after it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::frame::{self, FrameError, HEADER_LEN};
use rxd_protocol::{
    ErrorCode, HandshakeError, HandshakeReply, Hello, Outcome, PROTOCOL_VERSION, RequestFrame,
    ResponseFrame, Welcome, WireError, limits,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};
use tracing::Instrument;

use crate::SharedRef;
use crate::dispatch::{self, Handled, MakeCompletion};
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::runtime::{Completion, OutputTensor, RuntimeError};

/// Why reading a frame stopped.
enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    Frame(FrameError),
    Io(std::io::Error),
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: u64) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    // Distinguish a clean close (no byte of a new frame) from a truncated frame.
    let n = rd.read(&mut header).await.map_err(ReadError::Io)?;
    if n == 0 {
        return Err(ReadError::Eof);
    }
    rd.read_exact(&mut header[n..])
        .await
        .map_err(ReadError::Io)?;
    let len = frame::body_len(header, max).map_err(ReadError::Frame)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.map_err(ReadError::Io)?;
    Ok(body)
}

fn encode_response(id: u64, outcome: Outcome) -> Vec<u8> {
    let frame = ResponseFrame { id, outcome };
    frame::encode(&frame).unwrap_or_else(|e| {
        // Only an output too large for a u32 frame can get here; answer with the error.
        let err = WireError::new(ErrorCode::Internal, format!("cannot encode response: {e}"));
        frame::encode(&ResponseFrame {
            id,
            outcome: Outcome::Err(err),
        })
        .expect("an error frame always encodes")
    })
}

/// The connection's write side, shared by its request tasks and the model workers.
///
/// Invariant: bytes are written only while holding `state`, and only when the backlog is
/// empty or by the drain task from the backlog's front, so frames never interleave. A writer
/// that finds the socket full queues the rest and wakes the drain task: a slow client never
/// blocks a model worker.
struct Sink {
    wr: OwnedWriteHalf,
    state: Mutex<SinkState>,
    wake: Notify,
    broken: AtomicBool,
}

#[derive(Default)]
struct SinkState {
    /// Frames waiting, with how much of the first one is already written.
    backlog: VecDeque<(Vec<u8>, usize)>,
    finished: bool,
}

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a whole frame now if the socket takes it, else queues it. Never blocks.
    fn send(&self, frame: Vec<u8>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut st = self.lock();
        let mut off = 0;
        if st.backlog.is_empty() {
            while off < frame.len() {
                match self.wr.try_write(&frame[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.broken.store(true, Ordering::Relaxed);
                        st.backlog.clear();
                        drop(st);
                        self.wake.notify_one();
                        return;
                    }
                }
            }
            if off == frame.len() {
                return;
            }
        }
        st.backlog.push_back((frame, off));
        drop(st);
        self.wake.notify_one();
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.wake.notify_one();
    }
}

/// Writes queued frames whenever the socket can take them; ends when the connection is
/// finished and the backlog is empty, or the peer is gone.
async fn drain_sink(sink: &Sink) {
    loop {
        let (pending, finished) = {
            let st = sink.lock();
            (!st.backlog.is_empty(), st.finished)
        };
        if sink.broken.load(Ordering::Relaxed) || (!pending && finished) {
            return;
        }
        if !pending {
            sink.wake.notified().await;
            continue;
        }
        if sink.wr.writable().await.is_err() {
            sink.broken.store(true, Ordering::Relaxed);
            return;
        }
        let mut st = sink.lock();
        while let Some((buf, off)) = st.backlog.front_mut() {
            match sink.wr.try_write(&buf[*off..]) {
                Ok(n) => {
                    *off += n;
                    if *off == buf.len() {
                        st.backlog.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    sink.broken.store(true, Ordering::Relaxed);
                    st.backlog.clear();
                    return;
                }
            }
        }
    }
}

/// What every request of one connection shares.
struct Conn {
    /// The connection's arena; requests in flight hold their own reference to the mapping,
    /// so it is unmapped only when the last of them is done.
    arena: Option<ArenaGrant>,
    shared: SharedRef,
    sink: Sink,
    in_flight_ids: Mutex<HashSet<u64>>,
}

impl Conn {
    /// Answers request `id`: frees the id first (the client may reuse it the moment it reads
    /// the answer), then writes.
    fn respond(&self, id: u64, outcome: Outcome) {
        if id != 0 {
            self.in_flight_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            Metrics::dec(&self.shared.metrics.in_flight);
        }
        self.sink.send(encode_response(id, outcome));
    }

    fn fail(&self, id: u64, e: &RequestError) {
        tracing::debug!(id, code = e.code().as_u16(), "{e}");
        self.shared
            .metrics
            .record_error(e.code().as_u16(), e.to_string());
        self.respond(id, Outcome::Err(e.to_wire()));
    }
}

/// The completion of one inference: answers the client from the worker thread.
struct InferCompletion {
    conn: Arc<Conn>,
    id: u64,
    model: String,
    version: u64,
    metrics: Arc<crate::metrics::ModelMetrics>,
    answered: bool,
    _permit: Option<OwnedSemaphorePermit>,
    _token: TaskTrackerToken,
}

impl Completion for InferCompletion {
    fn is_abandoned(&self) -> bool {
        self.conn.sink.broken.load(Ordering::Relaxed)
    }

    fn complete(mut self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>) {
        self.answered = true;
        tracing::debug!(id = self.id, model = %self.model, version = self.version, ok = result.is_ok(), "infer done");
        self.metrics.record_outcome(match &result {
            Ok(_) => None,
            Err(RuntimeError::QueueFull { .. }) => Some(ErrorCode::Busy.as_u16()),
            Err(e) => Some(RequestError::from(e.clone()).code().as_u16()),
        });
        match result {
            Ok(outputs) => self.conn.respond(
                self.id,
                Outcome::Ok(dispatch::infer_reply(&self.model, self.version, outputs)),
            ),
            Err(e) => {
                let e = match e {
                    RuntimeError::QueueFull { .. } => {
                        RequestError::Wire(rxd_protocol::WireError::new(
                            ErrorCode::Busy,
                            format!("model '{}': {e}", self.model),
                        ))
                    }
                    other => RequestError::from(other),
                };
                self.conn.fail(self.id, &e)
            }
        }
    }
}

impl Drop for InferCompletion {
    /// A job dropped without completing still gets its one answer.
    fn drop(&mut self) {
        if !self.answered {
            self.conn.fail(
                self.id,
                &RequestError::Internal("the request was dropped unanswered".into()),
            );
        }
    }
}

/// Builds an [`InferCompletion`] once dispatch knows the model version.
struct Maker {
    conn: Arc<Conn>,
    id: u64,
    permit: Option<OwnedSemaphorePermit>,
    token: TaskTrackerToken,
}

impl MakeCompletion for Maker {
    fn make(self, model: &crate::registry::LoadedModel) -> Box<dyn Completion> {
        Box::new(InferCompletion {
            conn: self.conn,
            id: self.id,
            model: model.name.clone(),
            version: model.version,
            metrics: model.metrics.clone(),
            answered: false,
            _permit: self.permit,
            _token: self.token,
        })
    }
}

/// Serves one connection until the peer closes it or the daemon shuts down.
pub async fn run(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let span = tracing::info_span!("conn", uid = peer.uid, pid = peer.pid.unwrap_or(0));
    serve(stream, shared, peer, shutdown).instrument(span).await;
}

async fn serve(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);

    // Handshake.
    let hello = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = read_frame(&mut rd, limits::MAX_HANDSHAKE_FRAME) => r,
    };
    let hello: Hello = match hello {
        Ok(body) => match frame::decode(&body) {
            Ok(h) => h,
            Err(_) if frame::decode::<RequestFrame>(&body).is_ok() => {
                let err = WireError::new(
                    ErrorCode::HandshakeRequired,
                    "the first frame must be a Hello (see PROTOCOL.md)",
                );
                return refuse(&mut wr, err).await;
            }
            Err(e) => return refuse(&mut wr, e.to_wire()).await,
        },
        Err(ReadError::Frame(e)) => return refuse(&mut wr, e.to_wire()).await,
        Err(_) => return,
    };
    if hello.protocol != PROTOCOL_VERSION {
        let err = WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
        );
        return refuse(&mut wr, err).await;
    }
    let arena = if hello.arena_bytes > 0 {
        match ArenaGrant::new(&shared, hello.arena_bytes) {
            Ok(a) => Some(a),
            Err(e) => return refuse(&mut wr, e).await,
        }
    } else {
        None
    };
    let max_in_flight = shared.config.max_in_flight;
    let welcome = HandshakeReply::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        server: crate::SERVER_NAME.into(),
        max_frame_bytes: shared.config.max_frame_bytes,
        max_in_flight,
        arena_bytes: arena.as_ref().map_or(0, |a| a.map.len() as u64),
    });
    let Ok(bytes) = frame::encode(&welcome) else {
        return;
    };
    let sent = match &arena {
        // The one frame that carries an fd: the welcome, with the arena's memfd attached.
        Some(a) => match send_with_fd(&wr, &bytes, a.fd.as_ref().expect("fresh grant")).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("cannot pass the arena fd: {e}");
                return;
            }
        },
        None => 0,
    };
    if wr.write_all(&bytes[sent..]).await.is_err() {
        return;
    }
    // The client has its own fd now; ours is no longer needed (the mapping stays).
    let arena = arena.map(|mut a| {
        a.fd = None;
        a
    });
    tracing::debug!(client = %hello.client, arena = welcome_arena(&arena), "handshake done");

    let conn = Arc::new(Conn {
        arena,
        shared: shared.clone(),
        sink: Sink {
            wr,
            state: Mutex::default(),
            wake: Notify::new(),
            broken: AtomicBool::new(false),
        },
        in_flight_ids: Mutex::default(),
    });
    let drainer = tokio::spawn(drain_conn(conn.clone()));
    let permits = Arc::new(Semaphore::new(max_in_flight as usize));
    let tasks = TaskTracker::new();

    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let body = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = read_frame(&mut rd, shared.config.max_frame_bytes) => r,
        };
        let body = match body {
            Ok(b) => b,
            Err(ReadError::Eof) => break,
            Err(ReadError::Io(e)) => {
                tracing::debug!("read failed: {e}");
                break;
            }
            Err(ReadError::Frame(e)) => {
                // The stream cannot be resynchronised: answer, then close.
                let w = e.to_wire();
                shared.metrics.record_error(w.code, e.to_string());
                conn.respond(0, Outcome::Err(w));
                break;
            }
        };
        Metrics::inc(&shared.metrics.requests_total);
        let request: RequestFrame = match frame::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                let id = frame::salvage_id(&body).unwrap_or(0);
                let fresh = id != 0 && conn.in_flight_ids.lock().expect("ids").insert(id);
                if fresh {
                    Metrics::inc(&shared.metrics.in_flight);
                }
                let w = e.to_wire();
                shared.metrics.record_error(w.code, e.to_string());
                conn.respond(if fresh { id } else { 0 }, Outcome::Err(w));
                continue;
            }
        };
        drop(body);
        let id = request.id;
        let fresh = id != 0 && conn.in_flight_ids.lock().expect("ids").insert(id);
        if !fresh {
            let err = WireError::new(
                ErrorCode::BadRequestId,
                format!("request id {id} is 0 or already in flight on this connection"),
            );
            shared.metrics.record_error(err.code, err.message.clone());
            // Not registered as in flight: answer without touching the id set.
            conn.sink.send(encode_response(id, Outcome::Err(err)));
            continue;
        }
        Metrics::inc(&shared.metrics.in_flight);
        let maker = Maker {
            conn: conn.clone(),
            id,
            permit: Some(permit),
            token: tasks.token(),
        };
        if let rxd_protocol::Request::Infer(infer) = request.body {
            // The hot path: validate and queue right here; the worker answers.
            let map = conn.arena.as_ref().map(|a| &a.map);
            match dispatch::infer(&shared, infer, map, &peer, maker) {
                Ok(dispatch::Queued::Done) => {}
                Ok(dispatch::Queued::Cold(cold)) => {
                    // The model is loading: wait for it off the read loop.
                    let (shared, conn, map) = (shared.clone(), conn.clone(), map.cloned());
                    tasks.spawn(async move {
                        if let Err(e) = cold.run(shared, map).await {
                            conn.fail(id, &e);
                        }
                    });
                }
                Err(e) => conn.fail(id, &e),
            }
            continue;
        }
        let (shared, peer, conn) = (shared.clone(), peer.clone(), conn.clone());
        let span = tracing::debug_span!("req", id, op = request.body.op());
        tasks.spawn(
            async move {
                match dispatch::handle(&shared, &peer, request.body, maker).await {
                    Ok(Handled::Reply(reply)) => conn.respond(id, Outcome::Ok(reply)),
                    Ok(Handled::Deferred) => {}
                    Err(e) => conn.fail(id, &e),
                }
            }
            .instrument(span),
        );
    }

    // Answer everything accepted, then let the writer drain and close.
    tasks.close();
    tasks.wait().await;
    conn.sink.finish();
    let _ = drainer.await;
}

async fn drain_conn(conn: Arc<Conn>) {
    // Borrowing the sink through the connection keeps one Arc for both.
    let sink: &Sink = &conn.sink;
    drain_sink(sink).await;
}

/// A connection's arena: the sealed memfd (until passed to the client), its mapping, and its
/// share of the daemon-wide arena budget (returned on drop).
struct ArenaGrant {
    fd: Option<std::os::fd::OwnedFd>,
    map: Arc<rxd_shm::Mapping>,
    shared: SharedRef,
    reserved: u64,
}

impl ArenaGrant {
    fn new(shared: &SharedRef, asked: u64) -> Result<ArenaGrant, WireError> {
        let unavailable = |m: String| WireError::new(ErrorCode::ArenaUnavailable, m);
        let cfg = &shared.config;
        let size = asked.div_ceil(4096).saturating_mul(4096);
        if size > cfg.max_arena_bytes {
            return Err(unavailable(format!(
                "an arena of {asked} bytes exceeds max-arena-bytes ({})",
                cfg.max_arena_bytes
            )));
        }
        let total = &shared.metrics.arena_bytes;
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size)
                    .filter(|&t| t <= cfg.arena_total_bytes)
            })
            .map_err(|used| {
                unavailable(format!(
                    "the daemon's arena budget is used up ({used} of {} bytes)",
                    cfg.arena_total_bytes
                ))
            })?;
        let grant = |shared: &SharedRef| -> std::io::Result<ArenaGrant> {
            let fd = rxd_shm::create_sealed("rxd-arena", size as usize)?;
            let map = rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), size as usize)?;
            Ok(ArenaGrant {
                fd: Some(fd),
                map: Arc::new(map),
                shared: shared.clone(),
                reserved: size,
            })
        };
        grant(shared).map_err(|e| {
            total.fetch_sub(size, Ordering::AcqRel);
            unavailable(format!("cannot create an arena of {size} bytes: {e}"))
        })
    }
}

impl Drop for ArenaGrant {
    fn drop(&mut self) {
        self.shared
            .metrics
            .arena_bytes
            .fetch_sub(self.reserved, Ordering::AcqRel);
    }
}

fn welcome_arena(a: &Option<ArenaGrant>) -> u64 {
    a.as_ref().map_or(0, |a| a.map.len() as u64)
}

/// Sends the first bytes of `frame` with `fd` attached; returns how many bytes went.
async fn send_with_fd(
    wr: &OwnedWriteHalf,
    frame: &[u8],
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<usize> {
    use std::os::fd::{AsFd, AsRawFd};
    let stream: &UnixStream = wr.as_ref();
    loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            rxd_shm::send_with_fd(stream.as_raw_fd(), frame, fd.as_fd())
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn refuse(wr: &mut OwnedWriteHalf, error: WireError) {
    tracing::debug!(code = error.code, "handshake refused: {}", error.message);
    let reply = HandshakeReply::Error(HandshakeError {
        error,
        supported: vec![PROTOCOL_VERSION],
    });
    if let Ok(bytes) = frame::encode(&reply) {
        let _ = wr.write_all(&bytes).await;
    }
    let _ = wr.shutdown().await;
}
