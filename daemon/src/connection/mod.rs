//! One client connection: the handshake, then framed requests read in order and answered as
//! they complete (pipelining, out-of-order responses).
//!
//! Invariants: every request frame that was read completely gets exactly one response frame:
//! a success or an error under its id, or — for a frame that cannot be tied to a request in
//! flight (undecodable without an id, id 0, an id already in flight, a second Hello) — an
//! error under id 0, after which the connection goes on. Errors that leave the stream
//! unusable (a bad frame length, an fd, a timeout) are answered under id 0, then the
//! connection stops reading, answers what it accepted, and closes. At most
//! `max-in-flight` requests per connection are accepted and not yet answered *on the socket*
//! (a request's permit is released when its answer is written, not when it is queued), the
//! client's unread answers stay within `max-unsent-bytes` ([`sink`]), and every request's bytes
//! are held from the user's share of `request-memory-bytes` from its header until its answer
//! ([`crate::quota`]); beyond any of these the connection is simply not read (backpressure).
//! A connection that does not complete its handshake, or a frame, in time, or that sits idle
//! with nothing in flight, is closed with a `connection_timeout` error. On shutdown the
//! connection stops reading, answers what it accepted, then closes. A peer that vanishes only
//! ends its own connection.
//! Inferences are validated and queued inline by the read loop, with no task per request (a
//! request for a model that must load first waits in a task of its own, so the read loop
//! never waits for a load); control requests run in tracked tasks, at most
//! `CONTROL_AT_ONCE` per connection, beyond which the connection is not read.
//! Answers are written by whoever finishes the request: the request task for control requests,
//! and the model worker thread itself for inferences (through [`Sink`], without a hop back
//! through the async runtime). A frame is written whole before the next one starts.
//! Boundary: decoding and dispatch only. Shared-memory fds are passed with the welcome and
//! nowhere else (PROTOCOL.md); every read is a `recvmsg`, and an fd that arrives after the
//! handshake is closed and ends the connection ([`reader`]).

mod arena;
mod handshake;
mod reader;
mod ring;
mod sink;

pub use ring::Rings;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rxd_protocol::frame;
use rxd_protocol::{ErrorCode, Hello, Outcome, RequestFrame, WireError, limits};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};
use tracing::Instrument;

use crate::SharedRef;
use crate::dispatch::{self, Handled, MakeCompletion};
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::quota::Held;
use crate::runtime::{Completion, OutputTensor, RuntimeError};
use arena::ArenaGrant;
use reader::{FrameReader, ReadError};
use sink::{Sent, Sink, encode_response};

/// What every request of one connection shares.
struct Conn {
    /// The connection's arena; requests in flight hold their own reference to the mapping,
    /// so it is unmapped only when the last of them is done.
    arena: Option<ArenaGrant>,
    shared: SharedRef,
    sink: Sink,
    in_flight_ids: Mutex<HashSet<u64>>,
    /// Control requests running at once ([`CONTROL_AT_ONCE`]).
    control: Arc<Semaphore>,
    /// The connection's submission/completion ring, if one was granted.
    ring: Option<Arc<ring::Ring>>,
}

/// Where a request came from, and so where its answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Socket,
    /// The ring: every submission gets exactly one completion.
    Ring,
}

/// Control requests one connection may have running at once.
const CONTROL_AT_ONCE: usize = 4;

impl Conn {
    /// Answers request `id`: frees the id first (the client may reuse it the moment it reads
    /// the answer), then writes; `permit` is released once the answer is on the socket.
    fn respond(&self, id: u64, outcome: Outcome, permit: Option<OwnedSemaphorePermit>) {
        self.respond_sized(Via::Socket, id, outcome, permit, 0);
    }

    /// [`Conn::respond`] by way of `via`, with the answer encoded into a buffer of `capacity`
    /// bytes.
    fn respond_sized(
        &self,
        via: Via,
        id: u64,
        outcome: Outcome,
        permit: Option<OwnedSemaphorePermit>,
        capacity: usize,
    ) {
        if id != 0 {
            self.in_flight_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            Metrics::dec(&self.shared.metrics.in_flight);
        }
        let mut frame = encode_response(id, outcome, capacity);
        if let (Via::Ring, Some(ring)) = (via, &self.ring) {
            // On the ring, unless it does not fit a slot (or the client's counts lie): then
            // on the socket, the ring saying so.
            match ring.post(id, frame) {
                Some(spilled) => frame = spilled,
                None => return,
            }
        }
        if let Sent::Dropped(bytes) = self.sink.send(id, frame, permit) {
            tracing::debug!(
                id,
                bytes,
                "answer dropped: the client leaves its answers unread"
            );
            self.shared.metrics.record_error(
                ErrorCode::UnreadAnswers.as_u16(),
                format!("answer to request {id} dropped: the client leaves its answers unread"),
                None,
            );
        }
    }

    /// Answers `id` with an error. `model` names the model the request reached, if any.
    fn fail(
        &self,
        id: u64,
        e: &RequestError,
        model: Option<&str>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        self.fail_via(Via::Socket, id, e, model, permit);
    }

    /// [`Conn::fail`] by way of `via`.
    fn fail_via(
        &self,
        via: Via,
        id: u64,
        e: &RequestError,
        model: Option<&str>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        tracing::debug!(id, code = e.code().as_u16(), "{e}");
        self.shared
            .metrics
            .record_error(e.code().as_u16(), e.to_string(), model);
        self.respond_sized(via, id, Outcome::Err(e.to_wire()), permit, 0);
    }

    /// Answers a frame that cannot be tied to a request in flight, under id 0.
    fn refuse(&self, via: Via, err: WireError, permit: Option<OwnedSemaphorePermit>) {
        tracing::debug!(code = err.code, "{}", err.message);
        self.shared
            .metrics
            .record_error(err.code, err.message.clone(), None);
        self.respond_sized(via, 0, Outcome::Err(err), permit, 0);
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.in_flight_ids.lock().unwrap_or_else(|e| e.into_inner())
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
    via: Via,
    permit: Option<OwnedSemaphorePermit>,
    /// The request's bytes; given back before the answer is queued (which holds its own).
    held: Option<Held>,
    _token: TaskTrackerToken,
}

impl Completion for InferCompletion {
    fn is_abandoned(&self) -> bool {
        self.conn.sink.is_broken()
    }

    fn complete(mut self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>) {
        self.answered = true;
        drop(self.held.take());
        tracing::debug!(id = self.id, model = %self.model, version = self.version, ok = result.is_ok(), "infer done");
        // An answer larger than the frame limit could not be read by the client anyway:
        // refused before it is encoded (large outputs belong in the arena).
        // (Bytes inline plus, per output, an upper bound on what MessagePack adds around them.)
        let inline: usize = match &result {
            Ok(outputs) => outputs
                .iter()
                .map(|o| {
                    let framing = 64 + o.name.len() + 9 * o.shape.len();
                    framing
                        + match &o.data {
                            crate::runtime::OutputData::Inline(b) => b.len(),
                            _ => 16,
                        }
                })
                .sum::<usize>()
                .saturating_add(64 + self.model.len()),
            Err(_) => 0,
        };
        let limit = self.conn.shared.config.max_frame_bytes;
        if inline as u64 > limit {
            let e = RequestError::Wire(WireError::new(
                ErrorCode::TensorTooLarge,
                format!(
                    "the answer would be {inline} bytes, more than max-frame-bytes ({limit}); \
                     ask for large outputs in the arena (output_area or output_regions)"
                ),
            ));
            self.metrics
                .record_outcome(Some(ErrorCode::TensorTooLarge.as_u16()));
            let permit = self.permit.take();
            return self
                .conn
                .fail_via(self.via, self.id, &e, Some(&self.model), permit);
        }
        self.metrics.record_outcome(match &result {
            Ok(_) => None,
            Err(RuntimeError::QueueFull { .. }) => Some(ErrorCode::Busy.as_u16()),
            Err(e) => Some(RequestError::from(e.clone()).code().as_u16()),
        });
        let permit = self.permit.take();
        match result {
            // `inline` estimates the frame's size (plus its header and some slack).
            Ok(outputs) => self.conn.respond_sized(
                self.via,
                self.id,
                Outcome::Ok(dispatch::infer_reply(&self.model, self.version, outputs)),
                permit,
                inline + rxd_protocol::frame::HEADER_LEN + 64,
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
                self.conn
                    .fail_via(self.via, self.id, &e, Some(&self.model), permit)
            }
        }
    }
}

impl Drop for InferCompletion {
    /// A job dropped without completing still gets its one answer.
    fn drop(&mut self) {
        if !self.answered {
            drop(self.held.take());
            let permit = self.permit.take();
            self.conn.fail_via(
                self.via,
                self.id,
                &RequestError::Internal("the request was dropped unanswered".into()),
                Some(&self.model),
                permit,
            );
        }
    }
}

/// Builds an [`InferCompletion`] once dispatch knows the model version.
struct Maker {
    conn: Arc<Conn>,
    id: u64,
    via: Via,
    permit: Option<OwnedSemaphorePermit>,
    held: Option<Held>,
    token: TaskTrackerToken,
}

impl MakeCompletion for Maker {
    fn make(self, model: &crate::model::LoadedModel) -> Box<dyn Completion> {
        Box::new(InferCompletion {
            conn: self.conn,
            id: self.id,
            model: model.name.clone(),
            version: model.version,
            metrics: model.metrics.clone(),
            answered: false,
            via: self.via,
            permit: self.permit,
            held: self.held,
            _token: self.token,
        })
    }
}

/// Serves one connection until the peer closes it or the daemon shuts down. A user over its
/// share of connections is refused with `connection_limit` before the handshake.
pub async fn run(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let span = tracing::info_span!("conn", uid = peer.uid, pid = peer.pid.unwrap_or(0));
    async move {
        let slot = match shared.quotas.connect(peer.uid, peer.admin) {
            Ok(slot) => slot,
            Err((held, limit)) => {
                let err = WireError::new(
                    ErrorCode::ConnectionLimit,
                    format!(
                        "uid {} already has {held} connections, the most one user may have \
                         (max-connections-per-uid = {limit}); close some, or ask an admin to \
                         raise the limit",
                        peer.uid
                    ),
                );
                tracing::debug!("{}", err.message);
                shared
                    .metrics
                    .record_error(err.code, err.message.clone(), None);
                let Ok((_, mut wr)) = split(stream, &peer) else {
                    return;
                };
                let refusal = handshake::refuse::<()>(&mut wr, err);
                let _ = tokio::time::timeout(Duration::from_secs(1), refusal).await;
                return;
            }
        };
        serve(stream, shared, peer, shutdown).await;
        drop(slot);
    }
    .instrument(span)
    .await;
}

/// A connection's socket split in two, closed by [`crate::closer`] when both sides are gone
/// (its queue may still hold fds the peer sent).
fn split(
    stream: UnixStream,
    peer: &Peer,
) -> std::io::Result<(rxd_shm::socket::ReadSide, rxd_shm::socket::WriteSide)> {
    rxd_shm::socket::split_disposing(stream, Some(crate::closer::disposer(peer.uid)))
}

/// Why the read loop stopped.
enum Stop {
    /// Peer gone, end of stream, or shutdown: nothing to say.
    Quietly,
    /// A protocol violation or timeout: answered under id 0 before closing.
    Answer(WireError),
}

impl From<ReadError> for Stop {
    fn from(e: ReadError) -> Stop {
        match e {
            ReadError::Eof => Stop::Quietly,
            ReadError::Io(e) => {
                tracing::debug!("read failed: {e}");
                Stop::Quietly
            }
            // The stream cannot be resynchronised.
            ReadError::Frame(e) => Stop::Answer(e.to_wire()),
            ReadError::Fd => Stop::Answer(WireError::new(
                ErrorCode::UnexpectedFd,
                "file descriptors may be passed only with the welcome (PROTOCOL.md); they \
                 were closed",
            )),
        }
    }
}

fn frame_timeout(len: usize, limit: Duration) -> Stop {
    Stop::Answer(WireError::new(
        ErrorCode::ConnectionTimeout,
        format!("a frame of {len} bytes did not arrive whole within {limit:?}"),
    ))
}

async fn serve(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let cfg = &shared.config;
    let (rd, mut wr) = match split(stream, &peer) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::debug!("cannot set up the connection's socket: {e}");
            return;
        }
    };
    let mut rd = FrameReader::new(rd, peer.uid);

    let handshake = handshake::handshake(&mut rd, &mut wr, &shared, &peer, &shutdown);
    let granted = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
        Ok(Some(granted)) => granted,
        Ok(None) => return,
        Err(_) => {
            let err = WireError::new(
                ErrorCode::ConnectionTimeout,
                format!("no handshake within {:?}", cfg.handshake_timeout),
            );
            let _ = handshake::refuse::<()>(&mut wr, err).await;
            return;
        }
    };
    let max_in_flight = cfg.max_in_flight as usize;
    let handshake::Granted { arena, ring } = granted;
    let (ring, _ring_slot) = match (ring, &arena) {
        (Some((offset, geo, slot)), Some(a)) => match ring::Ring::new(a.map.clone(), offset, geo) {
            Ok(r) => (Some(Arc::new(r)), Some(slot)),
            Err(e) => {
                tracing::error!("the ring granted is outside the arena: {e}");
                return;
            }
        },
        _ => (None, None),
    };
    let conn = Arc::new(Conn {
        arena,
        ring,
        shared: shared.clone(),
        sink: Sink::new(
            wr,
            cfg.max_unsent_bytes,
            Some(sink::Owner {
                quotas: shared.quotas.clone(),
                uid: peer.uid,
                admin: peer.admin,
            }),
        ),
        in_flight_ids: Mutex::default(),
        control: Arc::new(Semaphore::new(CONTROL_AT_ONCE)),
    });
    let drainer = tokio::spawn({
        let (conn, stall) = (conn.clone(), cfg.idle_timeout);
        async move { conn.sink.drain(stall).await }
    });
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let tasks = TaskTracker::new();
    let ring_failed = match &conn.ring {
        Some(r) => {
            Rings::serve(
                &shared,
                r.clone(),
                conn.clone(),
                peer.clone(),
                tasks.clone(),
            );
            r.failed().clone()
        }
        None => CancellationToken::new(),
    };

    let stop = tokio::select! {
        biased;
        _ = shutdown.cancelled() => Stop::Quietly,
        _ = ring_failed.cancelled() => {
            Stop::Answer(conn.ring.as_ref().map(|r| r.take_failure()).unwrap_or_else(|| {
                WireError::new(ErrorCode::MalformedMessage, "the ring broke its rules")
            }))
        }
        stop = read_loop(&mut rd, &conn, &peer, &permits, &tasks) => stop,
    };
    // The ring takes no more requests; those taken are answered below.
    if let Some(r) = &conn.ring {
        r.close();
        shared.rings.wake();
    }
    if let Stop::Answer(err) = stop {
        tracing::debug!(code = err.code, "closing the connection: {}", err.message);
        shared
            .metrics
            .record_error(err.code, err.message.clone(), None);
        conn.respond(0, Outcome::Err(err), None);
    }

    // Answer everything accepted, then let the writer drain and close.
    tasks.close();
    tasks.wait().await;
    conn.sink.finish();
    let _ = drainer.await;
}

/// Reads, checks and dispatches requests until the peer stops or breaks the protocol.
async fn read_loop(
    rd: &mut FrameReader,
    conn: &Arc<Conn>,
    peer: &Peer,
    permits: &Arc<Semaphore>,
    tasks: &TaskTracker,
) -> Stop {
    let shared = &conn.shared;
    let cfg = &shared.config;
    let max_unsent = usize::try_from(cfg.max_unsent_bytes).unwrap_or(usize::MAX);
    loop {
        // Backpressure: a free request slot, and a client that reads its answers.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Stop::Quietly;
        };
        conn.sink.wait_unsent_at_most(max_unsent).await;
        if conn.sink.is_broken() {
            return Stop::Quietly;
        }
        // The next frame's first byte; an idle connection with nothing in flight closes.
        if let Err(stop) = next_byte(rd, conn, permits, cfg.idle_timeout).await {
            return stop;
        }
        let started = Instant::now();
        let len =
            match tokio::time::timeout(cfg.frame_timeout, rd.header(cfg.max_frame_bytes)).await {
                Ok(Ok(len)) => len,
                Ok(Err(e)) => return e.into(),
                Err(_) => return frame_timeout(0, cfg.frame_timeout),
            };
        let header_took = started.elapsed();
        // The request's bytes come out of the user's share of request memory before they are
        // read, one frame of a user at a time, in line with other users' frames; waiting
        // stops the frame's clock.
        // A frame already here whole just takes its memory (the common case: no wait); one
        // that must wait — for memory, or for its bytes — first becomes its user's one frame
        // being read (always in that order: the mark, then the memory).
        let quick = rd.buffered() >= len;
        let fast = shared
            .quotas
            .try_hold(peer.uid, peer.admin, len as u64)
            .filter(|_| quick);
        let (held, reading) = match fast {
            Some(h) => (h, None),
            None => {
                let r = shared.quotas.begin_frame(peer.uid, peer.admin).await;
                let h = match shared.quotas.try_hold(peer.uid, peer.admin, len as u64) {
                    Some(h) => h,
                    None => shared.quotas.hold(peer.uid, peer.admin, len as u64).await,
                };
                (h, Some(r))
            }
        };
        let deadline = Instant::now() + cfg.frame_timeout.saturating_sub(header_took);
        let body = match tokio::time::timeout_at(deadline.into(), rd.body(len)).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => return e.into(),
            Err(_) => return frame_timeout(len, cfg.frame_timeout),
        };
        drop(reading);
        let (request, permit) = match decode_request(conn, &body, Via::Socket, Some(permit)) {
            Ok(taken) => taken,
            Err(()) => continue,
        };
        drop(body);
        let id = request.id;
        if let rxd_protocol::Request::Infer(infer) = request.body {
            let origin = Origin { conn, peer, tasks };
            queue_infer(origin, id, infer, Via::Socket, permit, held);
            continue;
        }
        // Control requests answer from a task of their own, a few at a time per connection:
        // they run on the IO threads, so one connection's flood of them must not fill those
        // threads' queues. The maker (for an infer sent through `handle`) gets no permit: the
        // task keeps it until its answer is written.
        // The id is in flight from here: if the connection ends while this waits (shutdown,
        // a ring that broke the rules), the request is answered all the same.
        let waiting = Unanswered { conn, id, permit };
        let Ok(control) = conn.control.clone().acquire_owned().await else {
            return Stop::Quietly;
        };
        let permit = waiting.taken();
        let maker = Maker {
            conn: conn.clone(),
            id,
            via: Via::Socket,
            permit: None,
            held: None,
            token: tasks.token(),
        };
        let (shared, peer, conn) = (shared.clone(), peer.clone(), conn.clone());
        let arena = conn.arena.as_ref().map(|a| a.map.clone());
        let span = tracing::debug_span!("req", id, op = request.body.op());
        tasks.spawn(
            async move {
                let _held = (held, control);
                match dispatch::handle(&shared, &peer, request.body, arena, maker).await {
                    Ok(Handled::Reply(reply)) => conn.respond(id, Outcome::Ok(reply), permit),
                    Ok(Handled::Deferred) => {}
                    Err(e) => conn.fail(id, &e, None, permit),
                }
            }
            .instrument(span),
        );
    }
}

/// A control request read and in flight but not yet handed to its task: answered
/// `shutting_down` if dropped so (the read loop's future dropped as the connection ends).
struct Unanswered<'a> {
    conn: &'a Conn,
    id: u64,
    permit: Option<OwnedSemaphorePermit>,
}

impl Unanswered<'_> {
    /// Its task takes it (and answers it).
    fn taken(mut self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permit.take();
        self.id = 0;
        permit
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.id != 0 {
            let e = WireError::new(
                ErrorCode::ShuttingDown,
                "the connection is closing; the request was not run",
            );
            self.conn
                .respond(self.id, Outcome::Err(e), self.permit.take());
        }
    }
}

/// Decodes a request frame's body and takes its id: `Err` when the frame was answered here
/// instead (undecodable, a second Hello, id 0 or already in flight), with `permit` released
/// once that answer is written.
fn decode_request(
    conn: &Conn,
    body: &[u8],
    via: Via,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(RequestFrame, Option<OwnedSemaphorePermit>), ()> {
    let shared = &conn.shared;
    Metrics::inc(&shared.metrics.requests_total);
    // The structure first (bounded values and depth, no allocation): what decoding then
    // allocates is bounded by the frame's bytes.
    if let Err(e) = frame::check_structure(body, limits::MAX_FRAME_VALUES) {
        conn.refuse(via, e.to_wire(), permit);
        return Err(());
    }
    let request: RequestFrame = match frame::decode(body) {
        Ok(r) => r,
        Err(_) if frame::decode::<Hello>(body).is_ok() => {
            conn.refuse(
                via,
                WireError::new(
                    ErrorCode::HandshakeRequired,
                    "a second Hello: the handshake is done once, first (PROTOCOL.md)",
                ),
                permit,
            );
            return Err(());
        }
        Err(e) => {
            // Answered under the request's id if it can be read and is not in flight,
            // else under id 0 (never a second answer to a request in flight).
            let w = e.to_wire();
            let id = frame::salvage_id(body).unwrap_or(0);
            if id == 0 || !conn.ids().insert(id) {
                conn.refuse(via, w, permit);
                return Err(());
            }
            Metrics::inc(&shared.metrics.in_flight);
            shared.metrics.record_error(w.code, e.to_string(), None);
            conn.respond_sized(via, id, Outcome::Err(w), permit, 0);
            return Err(());
        }
    };
    let id = request.id;
    if id == 0 || !conn.ids().insert(id) {
        // Answered under id 0: under its id it would give the request in flight a second
        // answer.
        conn.refuse(
            via,
            WireError::new(
                ErrorCode::BadRequestId,
                format!("request id {id} is 0 or already in flight on this connection"),
            ),
            permit,
        );
        return Err(());
    }
    Metrics::inc(&shared.metrics.in_flight);
    Ok((request, permit))
}

/// Where a request came from: its connection, peer, and the tracker of its connection's tasks.
#[derive(Clone, Copy)]
struct Origin<'a> {
    conn: &'a Arc<Conn>,
    peer: &'a Peer,
    tasks: &'a TaskTracker,
}

/// The hot path: validates and queues an inference right here; the worker answers (a request
/// for a model that must load first waits in a task of its own).
fn queue_infer(
    Origin { conn, peer, tasks }: Origin<'_>,
    id: u64,
    infer: rxd_protocol::InferRequest,
    via: Via,
    permit: Option<OwnedSemaphorePermit>,
    held: Held,
) {
    let shared = &conn.shared;
    let maker = Maker {
        conn: conn.clone(),
        id,
        via,
        permit,
        held: Some(held),
        token: tasks.token(),
    };
    let map = conn.arena.as_ref().map(|a| &a.map);
    match dispatch::infer(shared, infer, map, peer, maker) {
        Ok(dispatch::Queued::Done) => {}
        Ok(dispatch::Queued::Cold(cold)) => {
            // The model is loading: wait for it off the read loop.
            let (shared, conn, map) = (shared.clone(), conn.clone(), map.cloned());
            tasks.spawn(async move {
                if let Err(e) = cold.run(shared, map).await {
                    conn.fail_via(via, id, &e, None, None);
                }
            });
        }
        Err(e) => conn.fail_via(via, id, &e, None, None),
    }
}

/// Waits for the first byte of the next frame. With an idle timeout, a connection that has
/// nothing in flight (only the loop's own permit taken, no answer unsent) and receives nothing
/// for that long is stopped with `connection_timeout`.
async fn next_byte(
    rd: &mut FrameReader,
    conn: &Conn,
    permits: &Semaphore,
    idle: Option<Duration>,
) -> Result<(), Stop> {
    let Some(idle) = idle else {
        return rd.fill().await.map_err(Stop::from);
    };
    let all = conn.shared.config.max_in_flight as usize;
    // The ring's requests count as traffic: one taken since the last look, or one running,
    // keeps the connection open.
    let ring = || conn.ring.as_ref().map(|r| r.activity());
    let mut seen = ring();
    loop {
        match tokio::time::timeout(idle, rd.fill()).await {
            Ok(r) => return r.map_err(Stop::from),
            Err(_)
                if permits.available_permits() + 1 >= all
                    && conn.sink.unsent() == 0
                    && ring().is_none_or(|(taken, running)| {
                        !running && seen.is_some_and(|(before, _)| before == taken)
                    }) =>
            {
                return Err(Stop::Answer(WireError::new(
                    ErrorCode::ConnectionTimeout,
                    format!("idle for {idle:?} with nothing in flight"),
                )));
            }
            Err(_) => seen = ring(),
        }
    }
}
