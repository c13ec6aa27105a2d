//! The shared-memory submission/completion ring of a connection (PROTOCOL.md, "The ring"):
//! requests read from the ring's submission slots, answers written to its completion slots,
//! the socket or a futex only to wake a side that sleeps.
//!
//! One poller thread serves every ring of the daemon: it takes what each ring holds (at most
//! [`PER_ROUND`] submissions per ring, and [`USER_ROUND_BYTES`] of frames per user (each at
//! least [`FRAME_ROUND_BYTES`]), per round
//! — with the arena bytes this thread copied to key a user's small requests,
//! so one busy ring, or one user's many rings, cannot starve the others),
//! and when a round finds nothing it asks every client to wake it (`sq_wake`), looks once
//! more, and sleeps on all the rings' submission tails at once (`futex_waitv`; hence at most
//! [`MAX_RINGS`] rings, and [`MAX_RINGS_PER_UID`] per non-admin user — beyond them the
//! welcome grants no ring and the client uses the socket). A busy daemon thus takes many
//! requests per wake-up, across connections. Answers are posted by whoever finishes the
//! request (the model worker), under a per-ring lock.
//!
//! Trust: the client can write every byte of the ring at any time. The daemon keeps its own
//! counts (`sq_head`, `cq_tail`) and only publishes them, never reads them back; it reads the
//! client's counts once per use and checks them ([`Geometry::queued`]): a count that no
//! honest client can produce ends the connection with `malformed_message`, as a bad frame
//! length does on the socket. Slot bytes are copied out before they are checked. A request
//! is taken only while every request taken has a completion slot of its own (requests
//! running plus answers not yet consumed < entries), so a client that stops consuming stalls
//! only its own ring; the memory its requests hold comes from its user's share like a
//! socket frame's, and the wait for it is a 1 ms poll. Every submission taken gets exactly
//! one completion (an answer, an error, or a redirect to the socket for an answer too large
//! for a slot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rxd_protocol::ring::{self as layout, Geometry};
use rxd_protocol::{ErrorCode, Request, WireError};
use rxd_shm::ring::{self as futex, RingMem};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Conn, Origin, Via, decode_request, queue_infer};
use crate::error::RequestError;
use crate::peer::Peer;
use crate::{Shared, SharedRef};

/// Rings the daemon serves at once (the poller waits on all of them and its own word).
pub(crate) const MAX_RINGS: usize = futex::WAIT_ANY_MAX - 1;
/// Rings one non-admin user may have at once.
pub(crate) const MAX_RINGS_PER_UID: usize = 32;
/// Submissions taken from one ring per round of the poller.
const PER_ROUND: u32 = 16;
/// Frame bytes taken from all the rings of one user per round of the poller (at least one
/// submission each round): decoding is the poller's work, and it is proportional to the
/// bytes, so a user's many rings full of large frames delay another user's ring by about one
/// such budget per round, not by all of its rings' slots.
const USER_ROUND_BYTES: u64 = 256 << 10;
/// What a frame counts against [`USER_ROUND_BYTES`] at least, whatever its size: each costs
/// the poller its decoding and queueing, so a user's many rings of tiny frames (32 × 16 a
/// round) delay another user's ring by at most 64 of them per round.
const FRAME_ROUND_BYTES: u64 = 4 << 10;
/// The longest the poller sleeps between looks while a ring waits for memory.
const MEMORY_POLL: Duration = Duration::from_millis(1);

/// Rounds in a row that a wake-up (or work seen) started but took nothing, after which the
/// poller pauses [`SPIN_PAUSE`] before each wait: a client rewriting its words (a tail moved
/// within bounds while its ring is stalled, wakes without submissions) would otherwise keep
/// it looking, a core's worth. Honest wake-ups take something, or come once.
const SPIN_ROUNDS: u32 = 64;
/// See [`SPIN_ROUNDS`]: what such a client costs the others' latency at most, per wake.
const SPIN_PAUSE: Duration = Duration::from_micros(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's ring.
pub(super) struct Ring {
    mem: RingMem,
    geo: Geometry,
    /// The daemon's own counts: submissions taken (the poller's), completions posted.
    sq_head: AtomicU32,
    cq_tail: Mutex<u32>,
    /// Requests taken and not yet answered.
    running: AtomicU32,
    /// Requests taken since the ring began (for the idle timeout).
    taken: AtomicU64,
    /// The poller could not take what the ring holds (no completion slot, or no memory).
    stalled: AtomicBool,
    /// The client's completion head when the ring stalled: once it moved, there may be room.
    stalled_cq_head: AtomicU32,
    closed: AtomicBool,
    /// Held by the poller for a round of this ring, and by `close`: once `close` returns, no
    /// round takes anything more (a request taken after the connection stopped waiting for
    /// its requests could be answered on a socket nobody writes any more).
    rounds: Mutex<()>,
    failed: CancellationToken,
    failure: Mutex<Option<WireError>>,
}

impl Ring {
    /// The ring of `geo` at `offset` of `map` (the arena, which ends with it).
    pub(super) fn new(
        map: Arc<rxd_shm::Mapping>,
        offset: u64,
        geo: Geometry,
    ) -> Result<Ring, rxd_shm::RangeError> {
        Ok(Ring {
            mem: RingMem::new(map, offset, geo.bytes())?,
            geo,
            sq_head: AtomicU32::new(0),
            cq_tail: Mutex::new(0),
            running: AtomicU32::new(0),
            taken: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            stalled_cq_head: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            rounds: Mutex::new(()),
            failed: CancellationToken::new(),
            failure: Mutex::new(None),
        })
    }

    /// Cancelled when the client broke the ring's rules ([`Ring::take_failure`] says how).
    pub(super) fn failed(&self) -> &CancellationToken {
        &self.failed
    }

    pub(super) fn take_failure(&self) -> WireError {
        lock(&self.failure).take().unwrap_or_else(|| {
            WireError::new(ErrorCode::MalformedMessage, "the ring broke its rules")
        })
    }

    /// Requests taken so far, and whether any is unanswered (for the idle timeout).
    pub(super) fn activity(&self) -> (u64, bool) {
        (
            self.taken.load(Ordering::Acquire),
            self.running.load(Ordering::Acquire) > 0,
        )
    }

    /// The connection is ending: the ring takes no more requests once a round of it under way,
    /// if any, ends; the poller lets it go.
    pub(super) fn close(&self) {
        let _round = lock(&self.rounds);
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the ring for breaking its rules; called by the poller in a round of it (which
    /// holds `rounds`, so the closing is done here, not by [`Ring::close`]).
    fn fail(&self, why: String) {
        tracing::debug!("ring: {why}");
        *lock(&self.failure) = Some(WireError::new(
            ErrorCode::MalformedMessage,
            format!("{why}; the connection is closed (PROTOCOL.md, \"The ring\")"),
        ));
        self.closed.store(true, Ordering::Release);
        self.failed.cancel();
    }

    /// Posts the answer `frame` (a whole frame, as on the socket) to request `id` as the
    /// next completion, and wakes the client if it sleeps. Returns the frame when it must
    /// go on the socket instead: it does not fit a slot (the completion then redirects to the
    /// socket), or the client's completion head is where no honest client puts it (then the
    /// ring gets no completion for it).
    pub(super) fn post(&self, id: u64, frame: Vec<u8>) -> Option<Vec<u8>> {
        let cq_tail = self.mem.word(layout::CQ_TAIL);
        let mut tail = lock(&self.cq_tail);
        // No longer running before it is published: the poller's room check (running plus
        // unconsumed) must never count one answer twice, or an honest client that consumed
        // it and submitted again at once would find its ring stalled.
        self.running.fetch_sub(1, Ordering::AcqRel);
        let head = self.cq_head();
        let room = self
            .geo
            .queued(head, *tail)
            .is_some_and(|n| n < self.geo.entries);
        if !room {
            return Some(frame);
        }
        let at = self.geo.cq_slot(*tail);
        let spill = if frame.len() as u64 <= u64::from(self.geo.slot_bytes) {
            self.write(at, &frame);
            None
        } else {
            let mut redirect = [0u8; layout::REDIRECT_BYTES as usize];
            redirect[layout::SLOT_PREFIX as usize..].copy_from_slice(&id.to_le_bytes());
            self.write(at, &redirect);
            Some(frame)
        };
        *tail = tail.wrapping_add(1);
        cq_tail.store(*tail, Ordering::SeqCst);
        drop(tail);
        // Woken once per sleep: the wake word is cleared by the post that wakes, so the
        // completions that follow before the client sleeps again make no system call. Out
        // of the lock: the poller and other workers do not wait behind the wake-up.
        let wake = self.mem.word(layout::CQ_WAKE);
        if wake.load(Ordering::SeqCst) != 0 && wake.swap(0, Ordering::SeqCst) != 0 {
            futex::wake(cq_tail);
        }
        spill
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        // Slots lie inside the ring by construction (protocol::ring's property tests).
        if let Err(e) = self.mem.write(at, bytes) {
            tracing::error!("ring slot outside the ring: {e}");
        }
    }

    /// What the submission tail should still hold for the poller to sleep: its own head
    /// (wake on the next submission), or, while stalled, the tail it saw (wake on a further
    /// one, not at once).
    fn sleep_on(&self) -> (&AtomicU32, u32) {
        let tail = self.mem.word(layout::SQ_TAIL);
        if self.stalled.load(Ordering::Relaxed) {
            (tail, tail.load(Ordering::Acquire))
        } else {
            (tail, self.sq_head.load(Ordering::Relaxed))
        }
    }

    /// Whether the poller must look at the ring again before it sleeps: a submission not
    /// taken, or, while stalled, completions consumed since the stall. The client's wake for
    /// those may come before the poller sleeps, and be lost: the poller sleeps on a tail that
    /// did not change (it was seen when a light batch, run by the poller itself, had just
    /// filled the ring's one completion slot, and the client consumed it at once).
    fn has_work(&self) -> bool {
        if self.stalled.load(Ordering::Relaxed) {
            return self.mem.word(layout::CQ_HEAD).load(Ordering::SeqCst)
                != self.stalled_cq_head.load(Ordering::Relaxed);
        }
        self.mem.word(layout::SQ_TAIL).load(Ordering::SeqCst)
            != self.sq_head.load(Ordering::Relaxed)
    }

    /// The client's completion head, as the client wrote it (checked where it is used).
    fn cq_head(&self) -> u32 {
        self.mem.word(layout::CQ_HEAD).load(Ordering::Acquire)
    }

    /// Marks the ring stalled, noting the client's completion head as the stall saw it.
    fn stall(&self, cq_head: u32) {
        self.stalled_cq_head.store(cq_head, Ordering::Relaxed);
        self.stalled.store(true, Ordering::Relaxed);
    }
}

/// A ring the poller serves, with what its requests need.
struct Served {
    ring: Arc<Ring>,
    conn: Arc<Conn>,
    peer: Peer,
    tasks: TaskTracker,
}

/// What one look at a ring found.
#[derive(Default)]
struct Round {
    took: bool,
    waits_for_memory: bool,
    /// The user's bytes for this round were spent before the ring was empty.
    more: bool,
}

impl Served {
    /// Takes up to [`PER_ROUND`] submissions, and while the user's bytes taken this round
    /// (`used`, shared by all its rings) stay within [`USER_ROUND_BYTES`].
    fn round(&self, body: &mut Vec<u8>, used: &mut HashMap<u32, u64>) -> Round {
        let (ring, geo) = (&*self.ring, self.ring.geo);
        let mut round = Round::default();
        // Nothing submitted since the last look, and not stalled (a stalled ring is looked at
        // for completions consumed): nothing to do, and no lock taken — a round looks at every
        // ring, and the locks are the ones the ring's answers are posted under.
        if !ring.stalled.load(Ordering::Relaxed)
            && ring.mem.word(layout::SQ_TAIL).load(Ordering::Acquire)
                == ring.sq_head.load(Ordering::Relaxed)
        {
            return round;
        }
        let _round = lock(&ring.rounds);
        if ring.is_closed() {
            return round;
        }
        // Backpressure, as on the socket: while the client leaves more than max-unsent-bytes
        // of answers unread on the socket (answers too large for a slot), nothing more is
        // taken — each would only be dropped for an `unread_answers` error queued behind
        // them. Looked at again every millisecond, as a ring waiting for memory.
        let max_unsent =
            usize::try_from(self.conn.shared.config.max_unsent_bytes).unwrap_or(usize::MAX);
        if self.conn.sink.unsent() > max_unsent {
            ring.stall(ring.cq_head());
            round.waits_for_memory = true;
            return round;
        }
        let mut head = ring.sq_head.load(Ordering::Relaxed);
        let tail = ring.mem.word(layout::SQ_TAIL).load(Ordering::Acquire);
        let Some(queued) = geo.queued(head, tail) else {
            ring.fail(format!(
                "the ring's submission tail {tail} is more than {} entries past the daemon's \
                 head {head}",
                geo.entries
            ));
            return round;
        };
        let quotas = &self.conn.shared.quotas;
        for _ in 0..queued.min(PER_ROUND) {
            // Room: every request taken has a completion slot of its own.
            // The tail and the running count together, under the lock `post` changes both
            // under: read apart, an answer posted in between would be counted neither as
            // running nor as published, and one request too many taken (its answer would
            // then find no completion slot and go on the socket with no completion).
            // The client's head first: read after the tail, it may already have consumed
            // answers posted since, and an honest head would look past the tail.
            let cq_head = ring.cq_head();
            let (cq_tail, running) = {
                let tail = lock(&ring.cq_tail);
                (*tail, ring.running.load(Ordering::Acquire))
            };
            let Some(unconsumed) = geo.queued(cq_head, cq_tail) else {
                ring.fail(format!(
                    "the ring's completion head {cq_head} is not within {} entries behind the \
                     daemon's tail {cq_tail}",
                    geo.entries
                ));
                return round;
            };
            if running + unconsumed >= geo.entries {
                ring.stall(cq_head);
                return round;
            }
            let at = geo.sq_slot(head);
            let mut len = [0u8; 4];
            if ring.mem.read(at, &mut len).is_err() {
                return round;
            }
            let len = u32::from_le_bytes(len);
            if !geo.body_fits(len) {
                ring.fail(format!(
                    "submission {head} says its frame is {len} bytes; a slot holds 1 to {}",
                    geo.max_body()
                ));
                return round;
            }
            // The user's share of this round is spent: the rest waits for the next round
            // (which comes at once: something was taken). Not stalled.
            let user = used.entry(self.peer.uid).or_default();
            let cost = u64::from(len).max(FRAME_ROUND_BYTES);
            if *user > 0 && *user + cost > USER_ROUND_BYTES {
                ring.stalled.store(false, Ordering::Relaxed);
                round.more = true;
                return round;
            }
            let Some(held) = quotas.try_hold(self.peer.uid, self.peer.admin, u64::from(len)) else {
                ring.stall(ring.cq_head());
                round.waits_for_memory = true;
                return round;
            };
            body.resize(len as usize, 0);
            if ring.mem.read(at + layout::SLOT_PREFIX, body).is_err() {
                return round;
            }
            // The slot is copied: the client may reuse it.
            head = head.wrapping_add(1);
            ring.sq_head.store(head, Ordering::Relaxed);
            ring.mem
                .word(layout::SQ_HEAD)
                .store(head, Ordering::Release);
            ring.running.fetch_add(1, Ordering::AcqRel);
            ring.taken.fetch_add(1, Ordering::AcqRel);
            round.took = true;
            crate::coalesce::copied_here();
            self.take(body, held);
            let copied = crate::coalesce::copied_here();
            *used.entry(self.peer.uid).or_default() +=
                u64::from(len).max(FRAME_ROUND_BYTES) + copied;
        }
        ring.stalled.store(false, Ordering::Relaxed);
        round
    }

    /// One submission's frame body: decoded and queued, or answered with its error.
    fn take(&self, body: &[u8], held: crate::quota::Held) {
        let Ok((request, _)) = decode_request(&self.conn, body, Via::Ring, None) else {
            return;
        };
        let id = request.id;
        match request.body {
            Request::Infer(infer) => queue_infer(
                Origin {
                    conn: &self.conn,
                    peer: &self.peer,
                    tasks: &self.tasks,
                },
                id,
                infer,
                Via::Ring,
                None,
                held,
            ),
            other => {
                let e = RequestError::Wire(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "'{}' requests go on the socket: the ring carries infer requests only",
                        other.op()
                    ),
                ));
                self.conn.fail_via(Via::Ring, id, &e, None, None);
            }
        }
    }
}

/// The rings the daemon serves, and its poller thread.
#[derive(Default)]
pub struct Rings {
    state: Mutex<RingsState>,
    /// The poller also sleeps on this word: changed and woken when a ring comes or goes.
    control: AtomicU32,
}

#[derive(Default)]
struct RingsState {
    served: Vec<Arc<Served>>,
    /// Rings granted (and not yet given back), all users and per user.
    granted: usize,
    per_uid: HashMap<u32, usize>,
    poller: bool,
}

/// A ring granted to a connection, given back on drop.
pub(super) struct RingSlot {
    shared: Weak<Shared>,
    uid: u32,
}

impl Drop for RingSlot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let rings = &shared.rings;
            let mut st = lock(&rings.state);
            st.granted -= 1;
            if let Some(n) = st.per_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    st.per_uid.remove(&self.uid);
                }
            }
            drop(st);
            rings.wake();
        }
    }
}

impl Rings {
    /// A ring for `peer` if the daemon has one to give (none: the client uses the socket).
    pub(super) fn grant(shared: &SharedRef, peer: &Peer) -> Option<RingSlot> {
        static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let works = *WORKS.get_or_init(|| {
            let works = futex::wait_any_works();
            if !works {
                tracing::warn!(
                    "futex_waitv is not available (Linux 5.16 or later, not filtered): no \
                     client gets a shared-memory ring, all requests use the socket"
                );
            }
            works
        });
        if !works {
            return None;
        }
        let mut st = lock(&shared.rings.state);
        let mine = st.per_uid.get(&peer.uid).copied().unwrap_or(0);
        if st.granted >= MAX_RINGS || (!peer.admin && mine >= MAX_RINGS_PER_UID) {
            tracing::debug!(
                uid = peer.uid,
                "no ring: the daemon serves as many as it can"
            );
            return None;
        }
        st.granted += 1;
        *st.per_uid.entry(peer.uid).or_default() += 1;
        Some(RingSlot {
            shared: Arc::downgrade(shared),
            uid: peer.uid,
        })
    }

    /// Starts serving a connection's ring (and the poller, the first time).
    pub(super) fn serve(
        shared: &SharedRef,
        ring: Arc<Ring>,
        conn: Arc<Conn>,
        peer: Peer,
        tasks: TaskTracker,
    ) {
        let rings = &shared.rings;
        let mut st = lock(&rings.state);
        st.served.push(Arc::new(Served {
            ring,
            conn,
            peer,
            tasks,
        }));
        if !st.poller {
            let weak = Arc::downgrade(shared);
            let handle = tokio::runtime::Handle::current();
            let started = std::thread::Builder::new()
                .name("rxd-ring".into())
                .spawn(move || poll(weak, handle));
            match started {
                Ok(_) => st.poller = true,
                Err(e) => tracing::error!("cannot start the ring poller: {e}"),
            }
        }
        drop(st);
        rings.wake();
    }

    /// Wakes the poller to look at the set of rings again.
    pub(super) fn wake(&self) {
        self.control.fetch_add(1, Ordering::SeqCst);
        futex::wake(&self.control);
    }
}

/// The poller: rounds over every ring until none holds anything, then sleeps on all of them.
fn poll(weak: Weak<Shared>, handle: tokio::runtime::Handle) {
    // Requests for a model that must load first wait in a task on the runtime.
    let _runtime = handle.enter();
    let mut body = Vec::new();
    // The rings served, looked up again only when the control word says the set changed.
    let mut served: Vec<Arc<Served>> = Vec::new();
    let mut seen = None;
    // Bytes taken per user this round, and where the round starts (it turns, so that no ring
    // of a user is always the last to find the user's share spent).
    let mut used: HashMap<u32, u64> = HashMap::new();
    let mut turn = 0usize;
    // Rounds in a row that took nothing after an early wake-up ([`SPIN_ROUNDS`]).
    let (mut fruitless, mut early) = (0u32, false);
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let rings = &shared.rings;
        let control = rings.control.load(Ordering::SeqCst);
        if seen != Some(control) {
            let mut st = lock(&rings.state);
            st.served.retain(|s| !s.ring.is_closed());
            served.clone_from(&st.served);
            seen = Some(control);
        }
        let mut took = false;
        let mut waits_for_memory = false;
        used.clear();
        turn = turn.wrapping_add(1);
        let first = turn % served.len().max(1);
        // The round's requests reach their schedulers together, when it ends; a light
        // model's batch runs here then, rather than waking a worker.
        let plug = crate::scheduler::Plug::start(true);
        for s in served[first..].iter().chain(&served[..first]) {
            let r = s.round(&mut body, &mut used);
            took |= r.took || r.more;
            waits_for_memory |= r.waits_for_memory;
        }
        drop(plug);
        if body.capacity() > 1 << 20 {
            body = Vec::new();
        }
        if took {
            fruitless = 0;
            continue;
        }
        if early {
            fruitless = fruitless.saturating_add(1);
        }
        if fruitless >= SPIN_ROUNDS {
            std::thread::sleep(SPIN_PAUSE);
        }
        // Nothing taken: ask every client to wake the poller, then look once more (a
        // submission published before the flag was seen is found here; one after it, by
        // the client's wake).
        for s in &served {
            s.ring.mem.word(layout::SQ_WAKE).store(1, Ordering::SeqCst);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        early = true;
        if !served.iter().any(|s| s.ring.has_work()) {
            let mut words: Vec<(&AtomicU32, u32)> = Vec::with_capacity(served.len() + 1);
            words.push((&rings.control, control));
            words.extend(served.iter().map(|s| s.ring.sleep_on()));
            let timeout = if waits_for_memory {
                MEMORY_POLL
            } else {
                Duration::from_secs(1)
            };
            let asleep = std::time::Instant::now();
            if let Err(e) = futex::wait_any(&words, timeout) {
                tracing::error!("the ring poller cannot wait: {e}");
                std::thread::sleep(MEMORY_POLL);
            }
            early = asleep.elapsed() < timeout;
        }
        for s in &served {
            s.ring.mem.word(layout::SQ_WAKE).store(0, Ordering::Relaxed);
        }
    }
}
