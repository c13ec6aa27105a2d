//! A blocking client that sends its inferences through the connection's shared-memory ring
//! (PROTOCOL.md, "The ring") instead of the socket: the request frame is written into a
//! submission slot, the answer read from a completion slot, and the socket or a futex only
//! wakes a side that sleeps. It waits for an answer by spinning for a moment first
//! ([`RingOptions::spin`]), so a light model's answer usually arrives without the client
//! going to sleep at all. Requests that do not fit a slot, and every request if the daemon
//! granted no ring, go on the socket; answers too large for a slot come on the socket, the
//! ring saying so.
//!
//! One request at a time (`&mut self`); open one `RingClient` per thread. Input tensors of
//! at least [`RingOptions::inline_threshold`] bytes are copied into the arena before the
//! ring (the frame then only names them, and fits a small slot); smaller ones travel inline
//! in the frame. Because only one request is in flight, the arena's inputs start at offset 0
//! for every request: the daemon is done reading them once it has answered.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::ring::{self as layout, Geometry};
use rxd_protocol::{
    ArenaRef, HandshakeReply, Hello, InferRequest, Outcome, PROTOCOL_VERSION, Reply, Request,
    RequestFrame, ResponseFrame, RingAsk, Tensor, TensorData, Welcome, limits,
};
use rxd_shm::ring::{self as futex, RingMem};

use crate::ClientError;

/// How to connect.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// Slots each way (the daemon rounds down to a power of two within its `max_in_flight`).
    pub entries: u32,
    /// Bytes per slot: a request frame must fit one to go on the ring.
    pub slot_bytes: u32,
    /// How long to spin on the completion queue before sleeping on it, while answers come
    /// within that time (a client whose answers lately took longer does not spin). Spinning
    /// costs a core while it lasts: with more busy clients than cores, 0 is better.
    pub spin: Duration,
    /// Arena bytes for input tensors (0 = every tensor inline).
    pub arena_bytes: u64,
    /// Inputs of at least this many bytes go through the arena (when they fit it).
    pub inline_threshold: u64,
    pub client_name: String,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            entries: 4,
            slot_bytes: 64 << 10,
            spin: Duration::from_micros(100),
            arena_bytes: 4 << 20,
            inline_threshold: 16 << 10,
            client_name: concat!("rxd-client ring ", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// The client's half of a ring's memory, shared by [`RingClient`] and the library's
/// [`crate::Client`]: submitting a frame into a slot, and taking the completion at the head.
/// The counts (`sq_tail`, `cq_head`) are the caller's own.
pub(crate) struct Slots {
    pub(crate) mem: RingMem,
    pub(crate) geo: Geometry,
}

/// What a completion slot held.
pub(crate) enum Completion {
    /// An answer frame, whose body is now in the caller's buffer.
    Frame,
    /// The answer to this request id comes on the socket.
    Redirect(u64),
}

impl Slots {
    /// The ring the welcome granted, in `map` (the connection's arena), after checking that
    /// its geometry is one the protocol allows.
    pub(crate) fn new(
        map: Arc<rxd_shm::Mapping>,
        grant: rxd_protocol::RingGrant,
    ) -> Result<Slots, ClientError> {
        let geo = Geometry {
            entries: grant.entries,
            slot_bytes: grant.slot_bytes,
        };
        if !geo.is_valid() {
            return Err(ClientError::Protocol(format!(
                "the daemon granted a ring the protocol does not allow: {geo:?}"
            )));
        }
        let mem = RingMem::new(map, grant.offset, geo.bytes()).map_err(protocol)?;
        Ok(Slots { mem, geo })
    }

    /// Writes `frame` (header and body) into submission slot `tail` and publishes `tail + 1`,
    /// waking the daemon if it sleeps; `false` (nothing written) when the queue is full or the
    /// frame does not fit a slot.
    pub(crate) fn submit(&self, tail: u32, frame: &[u8]) -> bool {
        let head = self.mem.word(layout::SQ_HEAD).load(Ordering::Acquire);
        let room = self
            .geo
            .queued(head, tail)
            .is_some_and(|n| n < self.geo.entries);
        if !room || self.mem.write(self.geo.sq_slot(tail), frame).is_err() {
            return false;
        }
        let word = self.mem.word(layout::SQ_TAIL);
        word.store(tail.wrapping_add(1), Ordering::SeqCst);
        // One wake per sleep of the poller: the first submission to see the flag clears it.
        let wake = self.mem.word(layout::SQ_WAKE);
        if wake.load(Ordering::SeqCst) != 0 && wake.swap(0, Ordering::SeqCst) != 0 {
            futex::wake(word);
        }
        true
    }

    /// Reads the completion in slot `head` (an answer's body into `body`), then gives the slot
    /// back to the daemon by publishing `head + 1` — also when what it held is unusable.
    pub(crate) fn take(&self, head: u32, body: &mut Vec<u8>) -> Result<Completion, ClientError> {
        let read = self.read(head, body);
        self.mem
            .word(layout::CQ_HEAD)
            .store(head.wrapping_add(1), Ordering::Release);
        read
    }

    fn read(&self, head: u32, body: &mut Vec<u8>) -> Result<Completion, ClientError> {
        let at = self.geo.cq_slot(head);
        let mut len = [0u8; 4];
        self.mem.read(at, &mut len).map_err(protocol)?;
        let len = u32::from_le_bytes(len);
        if len == 0 {
            let mut id = [0u8; 8];
            self.mem
                .read(at + layout::SLOT_PREFIX, &mut id)
                .map_err(protocol)?;
            return Ok(Completion::Redirect(u64::from_le_bytes(id)));
        }
        if !self.geo.body_fits(len) {
            return Err(ClientError::Protocol(format!(
                "a completion of {len} bytes does not fit the ring's slots"
            )));
        }
        body.resize(len as usize, 0);
        self.mem
            .read(at + layout::SLOT_PREFIX, body)
            .map_err(protocol)?;
        Ok(Completion::Frame)
    }
}

/// The ring this client writes: its slots and the client's own counts.
struct Ring {
    slots: Slots,
    /// Bytes of the arena before the ring: where inputs go.
    inputs: u64,
    sq_tail: u32,
    cq_head: u32,
}

/// A blocking connection to rxd whose inferences travel through the shared-memory ring.
pub struct RingClient {
    stream: UnixStream,
    welcome: Welcome,
    ring: Option<Ring>,
    next_id: u64,
    spin: Duration,
    /// How long answers took lately (a moving average): a client whose answers take longer
    /// than `spin` does not spin, it would only burn the core before sleeping anyway.
    recent: Duration,
    inline_threshold: u64,
    body: Vec<u8>,
}

impl std::fmt::Debug for RingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingClient")
            .field("server", &self.welcome.server)
            .field("ring", &self.ring.as_ref().map(|r| r.slots.geo))
            .finish()
    }
}

/// Reads one frame body from the socket.
fn read_frame(stream: &mut UnixStream, max: u64, body: &mut Vec<u8>) -> Result<(), ClientError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = frame::body_len(header, max).map_err(|e| ClientError::Protocol(e.to_string()))?;
    body.resize(len, 0);
    stream.read_exact(body)?;
    Ok(())
}

impl RingClient {
    /// Connects and asks for a ring. If the daemon grants none (it serves as many as it
    /// can), the client works over the socket alone ([`RingClient::has_ring`]).
    pub fn connect(
        path: impl AsRef<Path>,
        options: RingOptions,
    ) -> Result<RingClient, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        RingClient::handshake(stream, options)
    }

    /// Performs the handshake on an already-connected stream.
    pub fn handshake(
        mut stream: UnixStream,
        options: RingOptions,
    ) -> Result<RingClient, ClientError> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client: options.client_name.clone(),
            arena_bytes: options.arena_bytes,
            ring: Some(RingAsk {
                entries: options.entries,
                slot_bytes: options.slot_bytes,
            }),
        };
        let bytes = frame::encode(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&bytes)?;
        // The welcome, read with recvmsg for the arena's fd.
        let mut header = [0u8; HEADER_LEN];
        let (n, fd) = rxd_shm::recv_with_fd(stream.as_raw_fd(), &mut header)?;
        if n == 0 {
            return Err(ClientError::Closed(
                "the daemon closed the connection in the handshake".into(),
            ));
        }
        stream.read_exact(&mut header[n..])?;
        let len = frame::body_len(header, limits::MAX_HANDSHAKE_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        let welcome = match frame::decode::<HandshakeReply>(&body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            HandshakeReply::Welcome(w) => w,
            HandshakeReply::Error(e) => return Err(ClientError::Handshake(e.error)),
        };
        let ring = match (welcome.ring, fd) {
            (None, _) => None,
            (Some(grant), Some(fd)) => Some(Ring::map(fd, welcome.arena_bytes, grant)?),
            (Some(_), None) => {
                return Err(ClientError::Protocol(
                    "a ring was granted but no fd came".into(),
                ));
            }
        };
        Ok(RingClient {
            stream,
            welcome,
            ring,
            next_id: 1,
            spin: options.spin,
            recent: Duration::ZERO,
            inline_threshold: options.inline_threshold,
            body: Vec::new(),
        })
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Whether the daemon granted a ring (else every request goes on the socket).
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Runs `model` on `inputs` (inline tensors) and returns its outputs.
    pub fn infer(
        &mut self,
        model: &str,
        mut inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, ClientError> {
        // Large inputs into the arena, one after another from its start (64-byte aligned).
        if let Some(ring) = &self.ring {
            let mut at = 0u64;
            for t in &mut inputs {
                let TensorData::Inline(bytes) = &t.data else {
                    continue;
                };
                let len = bytes.len() as u64;
                if len < self.inline_threshold || at + len > ring.inputs {
                    continue;
                }
                ring.slots
                    .mem
                    .mapping()
                    .copy_in(at, bytes)
                    .map_err(protocol)?;
                t.data = TensorData::Arena(ArenaRef { offset: at, len });
                at = (at + len).div_ceil(64) * 64;
            }
        }
        match self.request(Request::Infer(InferRequest::new(model, inputs)))? {
            Reply::Infer(r) => Ok(r.outputs),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply to infer: {other:?}"
            ))),
        }
    }

    /// Sends one request and waits for its answer: an inference on the ring when its frame
    /// fits a slot, anything else on the socket.
    pub fn request(&mut self, body: Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let is_infer = matches!(body, Request::Infer(_));
        let bytes = frame::encode(&RequestFrame { id, body })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let on_ring = match &mut self.ring {
            Some(ring)
                if is_infer && bytes.len() as u64 <= u64::from(ring.slots.geo.slot_bytes) =>
            {
                ring.submit(&bytes)?;
                true
            }
            _ => false,
        };
        let outcome = if on_ring {
            self.ring_answer(id)?
        } else {
            self.stream.write_all(&bytes)?;
            self.socket_answer(id)?
        };
        match outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Err(e) => Err(ClientError::Server(e)),
        }
    }

    /// Reads socket frames until the answer to `id` (an id-0 error: the daemon is closing).
    fn socket_answer(&mut self, id: u64) -> Result<Outcome, ClientError> {
        let max = self.welcome.max_frame_bytes.max(limits::DEFAULT_MAX_FRAME);
        loop {
            read_frame(&mut self.stream, max, &mut self.body).map_err(|e| match e {
                ClientError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    ClientError::Closed("the daemon closed the connection".into())
                }
                e => e,
            })?;
            let resp: ResponseFrame =
                frame::decode(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if resp.id == id {
                return Ok(resp.outcome);
            }
            if resp.id == 0
                && let Outcome::Err(e) = resp.outcome
            {
                return Err(ClientError::Closed(format!("the daemon reported: {e}")));
            }
        }
    }

    /// Waits for the next completion, which answers `id` (one request at a time).
    fn ring_answer(&mut self, id: u64) -> Result<Outcome, ClientError> {
        let spin = if self.recent <= self.spin {
            self.spin
        } else {
            Duration::ZERO
        };
        let ring = self.ring.as_mut().expect("a request went on the ring");
        let mut slept = Duration::ZERO;
        let start = Instant::now();
        let cq_tail = ring.slots.mem.word(layout::CQ_TAIL);
        loop {
            if cq_tail.load(Ordering::Acquire) != ring.cq_head {
                break;
            }
            if start.elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            // Ask to be woken, look once more, sleep.
            let wake = ring.slots.mem.word(layout::CQ_WAKE);
            wake.store(1, Ordering::SeqCst);
            if cq_tail.load(Ordering::SeqCst) == ring.cq_head {
                let nap = Duration::from_millis(50);
                futex::wait(cq_tail, ring.cq_head, nap);
                slept += nap;
            }
            wake.store(0, Ordering::Relaxed);
            // A daemon gone (or closing the connection with an error) says so on the socket.
            if slept >= Duration::from_millis(200) {
                slept = Duration::ZERO;
                if let Some(why) = closed(&self.stream) {
                    return Err(ClientError::Closed(why));
                }
            }
        }
        self.recent = (self.recent * 7 + start.elapsed()) / 8;
        let tail = cq_tail.load(Ordering::Acquire);
        if ring.slots.geo.queued(ring.cq_head, tail).is_none() {
            return Err(ClientError::Protocol(format!(
                "the ring's completion tail {tail} is not within {} of its head {}",
                ring.slots.geo.entries, ring.cq_head
            )));
        }
        let taken = ring.slots.take(ring.cq_head, &mut self.body);
        ring.cq_head = ring.cq_head.wrapping_add(1);
        let outcome = match taken? {
            Completion::Redirect(to) if to == id => return self.socket_answer(id),
            Completion::Redirect(to) => {
                return Err(ClientError::Protocol(format!(
                    "the ring redirected the answer to {to}, not {id}"
                )));
            }
            Completion::Frame => {
                let resp: ResponseFrame =
                    frame::decode(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if resp.id != id {
                    return Err(ClientError::Protocol(format!(
                        "the ring answered request {}, not {id}",
                        resp.id
                    )));
                }
                resp.outcome
            }
        };
        Ok(outcome)
    }
}

fn protocol(e: rxd_shm::RangeError) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// Whether the daemon closed the socket (or wrote on it, which a ring client only hears when
/// the daemon ends the connection): a peek that does not wait.
fn closed(stream: &UnixStream) -> Option<String> {
    match rxd_shm::peek(stream.as_fd()) {
        Ok(0) => Some("the daemon closed the connection".into()),
        Ok(_) => Some("the daemon wrote on the socket: it is closing the connection".into()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => Some(e.to_string()),
    }
}

impl Ring {
    /// Maps the arena fd the daemon passed (after checking its seals and size) and finds the
    /// ring at the offset the welcome names.
    fn map(fd: OwnedFd, size: u64, grant: rxd_protocol::RingGrant) -> Result<Ring, ClientError> {
        let map = crate::transport::map_arena(fd, size)?;
        Ok(Ring {
            slots: Slots::new(map, grant)?,
            inputs: grant.offset,
            sq_tail: 0,
            cq_head: 0,
        })
    }

    /// Writes a request frame into the next submission slot and publishes it, waking the
    /// daemon if it sleeps.
    fn submit(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        if !self.slots.submit(self.sq_tail, frame) {
            return Err(ClientError::Protocol(
                "the ring's submission queue is full".into(),
            ));
        }
        self.sq_tail = self.sq_tail.wrapping_add(1);
        Ok(())
    }
}
