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

mod arena;
mod handshake;
mod reader;
mod sink;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::frame;
use rxd_protocol::{ErrorCode, Outcome, RequestFrame, WireError};
use tokio::io::BufReader;
use tokio::net::UnixStream;
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
use arena::ArenaGrant;
use reader::{ReadError, read_frame};
use sink::{Sink, drain_sink, encode_response};

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

    let Some(arena) = handshake::handshake(&mut rd, &mut wr, &shared, &shutdown).await else {
        return;
    };
    let max_in_flight = shared.config.max_in_flight;

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
            match dispatch::infer(&shared, infer, map, maker) {
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
