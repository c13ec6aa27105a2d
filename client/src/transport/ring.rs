//! The async client's side of the connection's ring (PROTOCOL.md, "The ring"): an inference
//! whose frame fits a slot goes on the ring while fewer than `entries` of the ring's requests
//! await their completion (else on the socket, which always works); a reaper thread consumes
//! completions and hands each answer to its waiter exactly as the socket's reader does (a
//! redirect is consumed there, and its answer comes on the socket to the reader).
//!
//! Invariant: the ring's requests whose completion is not consumed never exceed `entries`,
//! so the daemon always has a completion slot for each (it never stalls this client).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rxd_protocol::ring as layout;
use rxd_protocol::{ResponseFrame, RingGrant, frame};
use rxd_shm::ring as futex;

use super::{Inner, lock};
use crate::ClientError;
use crate::ring::{Completion, Slots};

/// Reapers of this process spinning now. At most half the cores' worth spin at once: a
/// program with many ring connections (a load generator, a server fanning out) would
/// otherwise have every reaper burn its spin on cores its own work and the daemon need
/// (`rxctl bench -c 32` with `RXD_CLIENT_RING` served a third of the socket's requests on
/// two cores); the others sleep at once, as a socket reader does.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// A reaper's turn to spin, given back when dropped.
struct Spinner;

impl Spinner {
    fn enter() -> Option<Spinner> {
        static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let max = *MAX.get_or_init(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        });
        if SPINNING.fetch_add(1, Ordering::AcqRel) < max {
            Some(Spinner)
        } else {
            SPINNING.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) struct ClientRing {
    slots: Slots,
    /// How long the reaper spins on the completion tail before it sleeps.
    spin: Duration,
    sq_tail: Mutex<u32>,
    /// Requests submitted on the ring whose completion is not consumed yet.
    outstanding: AtomicU32,
    /// Requests submitted on the ring so far.
    submitted: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
}

impl ClientRing {
    pub(super) fn new(
        map: Arc<rxd_shm::Mapping>,
        grant: RingGrant,
        spin: Duration,
    ) -> Result<ClientRing, ClientError> {
        Ok(ClientRing {
            slots: Slots::new(map, grant)?,
            spin,
            sq_tail: Mutex::new(0),
            outstanding: AtomicU32::new(0),
            submitted: Default::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// Puts a request frame on the ring; `false` when it must go on the socket (it does not
    /// fit a slot, or `entries` of the ring's requests await their completion).
    pub(super) fn try_submit(&self, bytes: &[u8]) -> bool {
        if bytes.len() as u64 > u64::from(self.slots.geo.slot_bytes) {
            return false;
        }
        let mut tail = lock(&self.sq_tail);
        if self.outstanding.load(Ordering::Acquire) >= self.slots.geo.entries
            || !self.slots.submit(*tail, bytes)
        {
            return false;
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.submitted.fetch_add(1, Ordering::Relaxed);
        *tail = tail.wrapping_add(1);
        true
    }

    pub(super) fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// Ends the reaper (the client is dropped).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        futex::wake(self.slots.mem.word(layout::CQ_TAIL));
    }

    /// The reaper: consumes completions until the client is dropped, each answer delivered
    /// to its waiter.
    pub(super) fn reap(&self, inner: &Weak<Inner>) {
        let tail_word = self.slots.mem.word(layout::CQ_TAIL);
        let wake_word = self.slots.mem.word(layout::CQ_WAKE);
        let mut head = 0u32;
        let mut body = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let tail = tail_word.load(Ordering::Acquire);
            if tail == head {
                // Spin a moment (while few of the process's reapers spin), then ask to be
                // woken, look once more and sleep.
                if let Some(_spinning) = Spinner::enter() {
                    let start = Instant::now();
                    while tail_word.load(Ordering::Acquire) == head && start.elapsed() < self.spin {
                        std::hint::spin_loop();
                    }
                }
                if tail_word.load(Ordering::Acquire) == head {
                    wake_word.store(1, Ordering::SeqCst);
                    if tail_word.load(Ordering::SeqCst) == head && !self.stop.load(Ordering::SeqCst)
                    {
                        futex::wait(tail_word, head, Duration::from_millis(200));
                    }
                    wake_word.store(0, Ordering::Relaxed);
                }
                continue;
            }
            if self.slots.geo.queued(head, tail).is_none() {
                // The daemon's count makes no sense: leave the ring (requests then go on the
                // socket once `entries` are outstanding).
                return;
            }
            while head != tail {
                // An unusable completion is consumed all the same; a redirect's answer comes
                // on the socket, to the reader.
                let taken = self.slots.take(head, &mut body);
                head = head.wrapping_add(1);
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                let resp = match taken {
                    Ok(Completion::Frame) => frame::decode::<ResponseFrame>(&body).ok(),
                    Ok(Completion::Redirect(_)) | Err(_) => None,
                };
                if let Some(resp) = resp {
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    super::connect::deliver(&inner, resp);
                }
            }
        }
    }
}
