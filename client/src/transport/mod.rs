//! The connection to the daemon: handshake, request ids, and a reader task that routes each
//! response to the request waiting for it (responses may come in any order).
//! Invariant: a request's pending entry is removed exactly once — by its response, by the
//! connection closing, or by the caller dropping the request future.
//!
//! # Layout
//! - this file: the shared connection state (`Inner`, the pending table), `Client`, and
//!   sending one request (`send`), with the guard that gives up a dropped request's buffers.
//! - `connect`: connecting, the handshake (the welcome read with `recvmsg` for the arena fd)
//!   and the reader task.
//! - `infer`: inference — inputs placed in the arena, output areas sized from the signature.
//! - `ops`: the control requests (models, status, health, admin operations).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::frame;
use rxd_protocol::{ModelInfo, Outcome, Reply, Request, RequestFrame, Welcome};
use rxd_shm::socket::WriteSide;
use tokio::sync::oneshot;

use crate::ClientError;
use crate::arena::{Arena, ArenaBuf};

mod connect;
pub(crate) use connect::map_arena;
mod infer;
mod ops;
mod ring;
#[cfg(test)]
mod tests;

type Waiter = oneshot::Sender<Result<Outcome, ClientError>>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Output buffers of requests whose futures were dropped before the answer: the daemon
    /// may write them until it answers; they are freed when the answer comes.
    lent: HashMap<u64, Vec<rxd_shm::Lent>>,
    /// Set once the connection is gone; new requests fail at once with this reason.
    closed: Option<String>,
}

impl Drop for Pending {
    /// The connection is gone without the answers: those ranges are never reused.
    fn drop(&mut self) {
        for (_, lent) in self.lent.drain() {
            lent.into_iter().for_each(rxd_shm::Lent::leak);
        }
    }
}

struct Inner {
    /// The connection's ring, when asked for and granted (inferences that fit go on it).
    ring: Option<Arc<ring::ClientRing>>,
    writer: tokio::sync::Mutex<WriteSide>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    welcome: Welcome,
    reader: tokio::task::JoinHandle<()>,
    arena: Option<Arena>,
    inline_threshold: u64,
    /// Output bytes each model (and version asked for) needed last time, to size output
    /// areas when its signature does not tell.
    output_sizes: Mutex<HashMap<(String, Option<u64>), u64>>,
    /// Signatures of the models (and versions asked for) this client ran, for output areas.
    signatures: Mutex<HashMap<(String, Option<u64>), SignatureCell>>,
}

type SignatureCell = Arc<tokio::sync::OnceCell<Option<Arc<ModelInfo>>>>;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shared-memory arena to ask for, in bytes (0 = none).
    pub arena_bytes: u64,
    /// Tensors of at least this many bytes go through the arena (when there is one).
    pub inline_threshold: u64,
    /// Name sent in the handshake.
    pub client_name: String,
    /// If the daemon refuses the arena (`arena_unavailable`: over its limits), connect again
    /// without one instead of failing. Default true.
    pub arena_fallback: bool,
    /// Entries of a shared-memory submission/completion ring to ask for (0 = none, the
    /// default; PROTOCOL.md, "The ring"): inferences whose frame fits a slot then travel
    /// through shared memory, answered through it by a reaper thread of the client. Needs an
    /// arena (the ring lies at its end); a daemon that grants none leaves the socket.
    pub ring_entries: u32,
    /// Bytes per ring slot (a request frame must fit one to take the ring).
    pub ring_slot_bytes: u32,
    /// How long the reaper spins on the ring before it sleeps (it costs a core meanwhile).
    pub ring_spin: std::time::Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            arena_bytes: 16 << 20,
            inline_threshold: 64 << 10,
            client_name: concat!("rxd-client ", env!("CARGO_PKG_VERSION")).into(),
            arena_fallback: true,
            ring_entries: std::env::var("RXD_CLIENT_RING")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            ring_slot_bytes: 16 << 10,
            ring_spin: std::time::Duration::from_micros(50),
        }
    }
}

impl ClientOptions {
    /// No shared memory: every tensor travels inline, every request on the socket.
    pub fn inline_only() -> ClientOptions {
        ClientOptions {
            arena_bytes: 0,
            ring_entries: 0,
            ..ClientOptions::default()
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(ring) = &self.ring {
            ring.stop();
        }
    }
}

/// An async connection to rxd. Cheap to clone; clones share the connection, and any number of
/// requests may be in flight at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.welcome.server)
            .finish()
    }
}

/// Removes a request's waiter if its future is dropped before the answer, and then takes
/// the output buffers lent to it out of their owners' hands (the daemon may still write
/// them): they are freed when the answer comes, or never if the connection is gone.
struct PendingGuard<'a, 'b> {
    inner: &'a Inner,
    id: u64,
    lent: Vec<&'b mut ArenaBuf>,
    /// The daemon's answer reached this request.
    answered: bool,
}

impl Drop for PendingGuard<'_, '_> {
    fn drop(&mut self) {
        let mut p = lock(&self.inner.pending);
        let outstanding = p.waiters.remove(&self.id).is_some();
        // The daemon answered (delivered to a future that was dropped before it looked, if
        // the waiter is gone while the connection is open): it is done with the buffers.
        if self.answered || (!outstanding && p.closed.is_none()) {
            return;
        }
        let lent: Vec<rxd_shm::Lent> = self.lent.iter_mut().filter_map(|b| b.give_up()).collect();
        if p.closed.is_some() {
            lent.into_iter().for_each(rxd_shm::Lent::leak);
        } else if !lent.is_empty() {
            p.lent.insert(self.id, lent);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// The connection's shared-memory arena, if the daemon granted one.
    pub fn arena(&self) -> Option<&Arena> {
        self.inner.arena.as_ref()
    }

    /// Requests sent through the connection's ring so far; `None` when it has no ring
    /// ([`ClientOptions::ring_entries`]).
    pub fn ring_requests(&self) -> Option<u64> {
        self.inner.ring.as_ref().map(|r| r.submitted())
    }

    /// What the daemon said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// Sends one request and waits for its answer. An inference that names output places in
    /// the arena is refused here: the daemon writes them while the request is in flight, so
    /// they must be buffers lent to it ([`Client::infer_into`]).
    pub async fn request(&self, body: Request) -> Result<Reply, ClientError> {
        if let Request::Infer(r) = &body
            && (r.output_area.is_some() || !r.output_regions.is_empty())
        {
            return Err(ClientError::Tensor(
                "output places in the arena are named with Client::infer_into (OutputBufs)".into(),
            ));
        }
        self.send(body, Vec::new()).await
    }

    /// Sends one request with `lent` output buffers and waits for its answer.
    async fn send(&self, body: Request, lent: Vec<&mut ArenaBuf>) -> Result<Reply, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let is_infer = matches!(body, Request::Infer(_));
        let bytes = frame::encode(&RequestFrame { id, body })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.inner.pending);
            if let Some(reason) = &p.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            p.waiters.insert(id, tx);
        }
        let mut guard = PendingGuard {
            inner: &self.inner,
            id,
            lent,
            answered: false,
        };
        let on_ring = is_infer
            && self
                .inner
                .ring
                .as_ref()
                .is_some_and(|ring| ring.try_submit(&bytes));
        if !on_ring {
            self.inner.writer.lock().await.write_all(&bytes).await?;
        }
        let outcome = rx.await;
        guard.answered = matches!(outcome, Ok(Ok(_)));
        match outcome {
            Ok(Ok(Outcome::Ok(reply))) => Ok(reply),
            Ok(Ok(Outcome::Err(e))) => Err(ClientError::Server(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed("connection closed".into())),
        }
    }
}
