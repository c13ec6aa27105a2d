//! The async client's side of the connection's ring (PROTOCOL.md, "The ring"): an inference
//! whose frame fits a slot goes on the ring while fewer than `entries` of the ring's requests
//! await their completion (else on the socket, which always works); a reaper thread consumes
//! completions and hands each answer to its waiter exactly as the socket's reader does (a
//! redirect is consumed there, and its answer comes on the socket to the reader).
//!
//! Invariant: the ring's requests whose completion is not consumed never exceed `entries`,
//! so the daemon always has a completion slot for each (it never stalls this client).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rxd_protocol::ring::{self as layout, Geometry};
use rxd_protocol::{ResponseFrame, RingGrant, frame};
use rxd_shm::ring::{self as futex, RingMem};

use super::{Inner, lock};
use crate::ClientError;

pub(super) struct ClientRing {
    mem: RingMem,
    geo: Geometry,
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
        let geo = Geometry {
            entries: grant.entries,
            slot_bytes: grant.slot_bytes,
        };
        if !geo.is_valid() {
            return Err(ClientError::Protocol(format!(
                "the daemon granted a ring the protocol does not allow: {geo:?}"
            )));
        }
        let mem = RingMem::new(map, grant.offset, geo.bytes())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(ClientRing {
            mem,
            geo,
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
        if bytes.len() as u64 > u64::from(self.geo.slot_bytes) {
            return false;
        }
        let mut tail = lock(&self.sq_tail);
        if self.outstanding.load(Ordering::Acquire) >= self.geo.entries {
            return false;
        }
        let head = self.mem.word(layout::SQ_HEAD).load(Ordering::Acquire);
        let room = self
            .geo
            .queued(head, *tail)
            .is_some_and(|n| n < self.geo.entries);
        if !room {
            return false;
        }
        if self.mem.write(self.geo.sq_slot(*tail), bytes).is_err() {
            return false;
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.submitted.fetch_add(1, Ordering::Relaxed);
        *tail = tail.wrapping_add(1);
        let word = self.mem.word(layout::SQ_TAIL);
        word.store(*tail, Ordering::SeqCst);
        if self.mem.word(layout::SQ_WAKE).load(Ordering::SeqCst) != 0 {
            futex::wake(word);
        }
        true
    }

    pub(super) fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// Ends the reaper (the client is dropped).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        futex::wake(self.mem.word(layout::CQ_TAIL));
    }

    /// The reaper: consumes completions until the client is dropped, each answer delivered
    /// to its waiter.
    pub(super) fn reap(&self, inner: &Weak<Inner>) {
        let tail_word = self.mem.word(layout::CQ_TAIL);
        let wake_word = self.mem.word(layout::CQ_WAKE);
        let mut head = 0u32;
        let mut body = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let tail = tail_word.load(Ordering::Acquire);
            if tail == head {
                // Spin a moment, then ask to be woken, look once more and sleep.
                let start = Instant::now();
                while tail_word.load(Ordering::Acquire) == head && start.elapsed() < self.spin {
                    std::hint::spin_loop();
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
            if self.geo.queued(head, tail).is_none() {
                // The daemon's count makes no sense: leave the ring (requests then go on the
                // socket once `entries` are outstanding).
                return;
            }
            while head != tail {
                let at = self.geo.cq_slot(head);
                let mut len = [0u8; 4];
                let read = self.mem.read(at, &mut len);
                let len = u32::from_le_bytes(len);
                let resp = if read.is_err() || len == 0 {
                    // A redirect: the answer comes on the socket, to the reader.
                    None
                } else if self.geo.body_fits(len) {
                    body.resize(len as usize, 0);
                    self.mem
                        .read(at + layout::SLOT_PREFIX, &mut body)
                        .ok()
                        .and_then(|()| frame::decode::<ResponseFrame>(&body).ok())
                } else {
                    None
                };
                head = head.wrapping_add(1);
                self.mem
                    .word(layout::CQ_HEAD)
                    .store(head, Ordering::Release);
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
