//! The connection's write side, shared by its request tasks and the model workers.
//!
//! Invariants: bytes are written only while holding `state`, and only when the backlog is
//! empty or by the drain task from the backlog's front, so frames never interleave. A writer
//! that finds the socket full queues the rest and wakes the drain task: a slow client never
//! blocks a model worker. What a client has not read is bounded: an answer that would take the
//! backlog past `max_unsent` bytes (while it holds anything) is replaced by a small
//! `unread_answers` error for the same id, so each request still gets exactly one answer and
//! the backlog holds at most `max_unsent` bytes plus one frame plus those small errors (one per
//! request in flight, which `max-in-flight` bounds: a request's in-flight permit is held until
//! its answer is written, not merely queued). Answers queued behind unread ones are also held
//! from the user's share of request memory (`quota`), so a user's many connections cannot
//! multiply the per-connection bound. A client that takes no bytes for `stall` while
//! answers wait is gone as far as the daemon is concerned: the sink breaks and drops them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rxd_protocol::frame;
use rxd_protocol::{ErrorCode, Outcome, ResponseFrame, WireError};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::quota::{Held, Quotas};
use rxd_shm::socket::WriteSide;

/// Encodes an answer into a buffer of `capacity` bytes (an estimate of the frame's size: an
/// inference answer knows its outputs' sizes, so its buffer is allocated once, not grown by
/// doubling; 0 = let it grow).
pub(super) fn encode_response(id: u64, outcome: Outcome, capacity: usize) -> Vec<u8> {
    let frame = ResponseFrame { id, outcome };
    let mut out = Vec::with_capacity(capacity);
    match frame::encode_into(&frame, &mut out) {
        Ok(()) => out,
        // Only an output too large for a u32 frame can get here; answer with the error.
        Err(e) => error_frame(
            id,
            WireError::new(ErrorCode::Internal, format!("cannot encode response: {e}")),
        ),
    }
}

fn error_frame(id: u64, err: WireError) -> Vec<u8> {
    let frame = ResponseFrame {
        id,
        outcome: Outcome::Err(err),
    };
    // A response holding only an error (a short message) always encodes.
    frame::encode(&frame).unwrap_or_default()
}

/// Answers up to this size are queued without asking the user's share (it may go over by that
/// much per connection); larger ones, and any queued behind an unread answer, must fit it.
const FORCED_MAX: usize = 64 << 10;

/// A frame waiting to be written, with how much of it is written already and the in-flight
/// permit of its request (released once the frame is out).
struct Pending {
    bytes: Vec<u8>,
    off: usize,
    _permit: Option<OwnedSemaphorePermit>,
    /// The frame's bytes, held from its user's request memory until written.
    _held: Option<Held>,
}

/// Whose request memory a connection's unread answers are held from.
pub(super) struct Owner {
    pub(super) quotas: Arc<Quotas>,
    pub(super) uid: u32,
    pub(super) admin: bool,
}

#[derive(Default)]
struct SinkState {
    backlog: VecDeque<Pending>,
    /// Bytes of the backlog not yet written.
    unsent: usize,
    finished: bool,
}

/// What became of an answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// Written, or queued whole.
    Queued,
    /// Replaced by an `unread_answers` error (its size in bytes).
    Dropped(usize),
    /// The connection is gone; nothing was written.
    Gone,
}

pub(super) struct Sink {
    wr: WriteSide,
    state: Mutex<SinkState>,
    max_unsent: usize,
    owner: Option<Owner>,
    /// Wakes the drain task: something was queued, or the connection finished.
    wake: Notify,
    /// Wakes the reader waiting for the backlog to shrink.
    drained: Notify,
    broken: AtomicBool,
}

impl Sink {
    pub(super) fn new(wr: WriteSide, max_unsent: u64, owner: Option<Owner>) -> Sink {
        Sink {
            wr,
            state: Mutex::default(),
            max_unsent: usize::try_from(max_unsent).unwrap_or(usize::MAX),
            owner,
            wake: Notify::new(),
            drained: Notify::new(),
            broken: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn set_broken(&self, st: &mut SinkState) {
        self.broken.store(true, Ordering::Relaxed);
        st.backlog.clear();
        st.unsent = 0;
        self.drained.notify_waiters();
    }

    /// Bytes queued and not yet taken by the client.
    pub(super) fn unsent(&self) -> usize {
        self.lock().unsent
    }

    /// Writes the answer `frame` to request `id` now if the socket takes it, else queues it —
    /// or, when the client has left `max_unsent` bytes unread, queues an `unread_answers`
    /// error instead. `permit` (the request's in-flight permit) is released once the bytes are
    /// written. Never blocks.
    pub(super) fn send(
        &self,
        id: u64,
        frame: Vec<u8>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Sent {
        if self.is_broken() {
            return Sent::Gone;
        }
        let mut st = self.lock();
        let mut frame = frame;
        let mut sent = Sent::Queued;
        let mut held = None;
        let unread = |why: String| WireError::new(ErrorCode::UnreadAnswers, why);
        if st.unsent > 0 && st.unsent.saturating_add(frame.len()) > self.max_unsent {
            let err = unread(format!(
                "this answer ({} bytes) was dropped: {} bytes of earlier answers are still \
                 unread (max-unsent-bytes is {}); read answers as they come, and ask for large \
                 outputs in the arena",
                frame.len(),
                st.unsent,
                self.max_unsent
            ));
            sent = Sent::Dropped(frame.len());
            frame = error_frame(id, err);
        } else if (!st.backlog.is_empty() || frame.len() > FORCED_MAX)
            && let Some(o) = &self.owner
        {
            // An answer that may wait (queued behind unread ones, or too large for the
            // socket's buffer) is held from the user's share of request memory first, so that
            // many connections cannot multiply the per-connection bound; without room it
            // becomes an `unread_answers` error.
            held = o
                .quotas
                .hold_answer(o.uid, o.admin, frame.len() as u64, false);
            if held.is_none() {
                let err = unread(format!(
                    "this answer ({} bytes) was dropped: this user's unread answers and requests \
                     hold its share of request-memory-bytes; read answers as they come, and ask \
                     for large outputs in the arena",
                    frame.len()
                ));
                sent = Sent::Dropped(frame.len());
                frame = error_frame(id, err);
            }
        }
        let mut off = 0;
        if st.backlog.is_empty() {
            while off < frame.len() {
                match self.wr.try_write(&frame[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.set_broken(&mut st);
                        drop(st);
                        self.wake.notify_one();
                        return Sent::Gone;
                    }
                }
            }
            if off == frame.len() {
                return sent;
            }
        }
        let rest = frame.len() - off;
        if held.is_none()
            && let Some(o) = &self.owner
        {
            // A small answer (at most `FORCED_MAX`) or an error always goes, counted.
            held = o.quotas.hold_answer(o.uid, o.admin, rest as u64, true);
        }
        st.unsent += rest;
        st.backlog.push_back(Pending {
            bytes: frame,
            off,
            _permit: permit,
            _held: held,
        });
        drop(st);
        self.wake.notify_one();
        sent
    }

    /// No more answers will come: the drain task ends once the backlog is written.
    pub(super) fn finish(&self) {
        self.lock().finished = true;
        self.wake.notify_one();
    }

    /// Waits until at most `limit` bytes are unsent (or the connection is gone).
    pub(super) async fn wait_unsent_at_most(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.is_broken() || self.unsent() <= limit {
                return;
            }
            drained.await;
        }
    }

    /// Writes queued frames whenever the socket can take them; ends when the connection is
    /// finished and the backlog is empty, or the peer is gone — or has taken no byte for
    /// `stall` while answers wait (then the sink breaks and the answers are dropped).
    pub(super) async fn drain(&self, stall: Option<Duration>) {
        loop {
            let (pending, finished) = {
                let st = self.lock();
                (!st.backlog.is_empty(), st.finished)
            };
            if self.is_broken() || (!pending && finished) {
                return;
            }
            if !pending {
                self.wake.notified().await;
                continue;
            }
            let writable = match stall {
                Some(t) => match tokio::time::timeout(t, self.wr.writable()).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => {
                        tracing::debug!(
                            "the client took no answer bytes for {t:?}; closing the connection"
                        );
                        false
                    }
                },
                None => self.wr.writable().await.is_ok(),
            };
            let mut st = self.lock();
            if !writable {
                self.set_broken(&mut st);
                return;
            }
            while let Some(p) = st.backlog.front_mut() {
                match self.wr.try_write(&p.bytes[p.off..]) {
                    Ok(n) => {
                        p.off += n;
                        let done = p.off == p.bytes.len();
                        st.unsent -= n;
                        if done {
                            st.backlog.pop_front();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.set_broken(&mut st);
                        return;
                    }
                }
            }
            if st.unsent <= self.max_unsent {
                self.drained.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;
    use tokio::sync::Semaphore;

    use super::*;

    fn ok_frame(id: u64, bytes: usize) -> Vec<u8> {
        encode_response(
            id,
            Outcome::Err(WireError::new(ErrorCode::Internal, "x".repeat(bytes))),
            0,
        )
    }

    async fn read_frames(rd: &mut UnixStream, n: usize) -> Vec<ResponseFrame> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut header = [0u8; 4];
            rd.read_exact(&mut header).await.unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
            rd.read_exact(&mut body).await.unwrap();
            out.push(frame::decode(&body).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn frames_larger_than_the_socket_buffer_arrive_whole_and_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (_rd, wr) = rxd_shm::socket::split(a).unwrap();
        let sink = Arc::new(Sink::new(wr, 64 << 20, None));
        let drainer = tokio::spawn({
            let s = sink.clone();
            async move { s.drain(None).await }
        });
        // Each frame is larger than a Unix socket's buffer: partial writes, then the backlog.
        for id in 1..=5 {
            assert_eq!(sink.send(id, ok_frame(id, 1 << 20), None), Sent::Queued);
        }
        assert!(sink.unsent() > 0, "the socket cannot take 5 MiB at once");
        let frames = read_frames(&mut b, 5).await;
        let ids: Vec<u64> = frames.iter().map(|f| f.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        sink.finish();
        drainer.await.unwrap();
        assert_eq!(sink.unsent(), 0);
    }

    #[tokio::test]
    async fn answers_past_the_unsent_bound_become_small_errors_and_permits_wait_for_writes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (_rd, wr) = rxd_shm::socket::split(a).unwrap();
        let sink = Arc::new(Sink::new(wr, 1 << 20, None));
        let permits = Arc::new(Semaphore::new(4));
        for id in 1..=4 {
            let p = permits.clone().try_acquire_owned().unwrap();
            let sent = sink.send(id, ok_frame(id, 900 << 10), Some(p));
            if id == 1 {
                assert_eq!(sent, Sent::Queued, "the first goes even past the bound");
            } else {
                assert!(matches!(sent, Sent::Dropped(_)), "{id}: {sent:?}");
            }
        }
        assert!(
            sink.unsent() < (1 << 20) + 4096,
            "bounded: {}",
            sink.unsent()
        );
        assert_eq!(
            permits.available_permits(),
            0,
            "permits held until the answers are written"
        );
        let drainer = tokio::spawn({
            let s = sink.clone();
            async move { s.drain(None).await }
        });
        let frames = read_frames(&mut b, 4).await;
        assert_eq!(frames[0].id, 1);
        for f in &frames[1..] {
            match &f.outcome {
                Outcome::Err(e) => assert_eq!(e.kind(), Some(ErrorCode::UnreadAnswers)),
                other => panic!("{other:?}"),
            }
        }
        sink.finish();
        drainer.await.unwrap();
        assert_eq!(permits.available_permits(), 4, "every permit came back");
    }

    #[tokio::test]
    async fn unread_answers_are_held_from_the_users_share_across_connections() {
        // A user's share of request memory: 4 MiB (a quarter of 16).
        let quotas = Quotas::new(64, 16 << 20, 16 << 20);
        let owner = || Owner {
            quotas: quotas.clone(),
            uid: 1000,
            admin: false,
        };
        let mut peers = Vec::new();
        let mut sinks = Vec::new();
        for _ in 0..3 {
            let (a, b) = UnixStream::pair().unwrap();
            let (_rd, wr) = rxd_shm::socket::split(a).unwrap();
            peers.push(b);
            sinks.push(Sink::new(wr, 64 << 20, Some(owner())));
        }
        let mut dropped = 0;
        for (i, sink) in sinks.iter().enumerate() {
            for id in 1..=4 {
                if let Sent::Dropped(_) = sink.send(id, ok_frame(id, 1 << 20), None) {
                    dropped += 1;
                }
            }
            assert!(sink.unsent() > 0 || i > 0, "sink {i} queued answers");
        }
        // Large answers go only while the user's 4 MiB last, over all its connections.
        assert!(dropped >= 8, "{dropped} dropped");
        assert!(
            quotas.memory_held() <= (4 << 20) + 4096,
            "{}",
            quotas.memory_held()
        );
        drop(sinks);
        assert_eq!(quotas.memory_held(), 0, "given back when the answers go");
    }

    #[tokio::test]
    async fn a_client_that_takes_nothing_breaks_the_sink_after_the_stall_time() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (_rd, wr) = rxd_shm::socket::split(a).unwrap();
        let sink = Arc::new(Sink::new(wr, 64 << 20, None));
        let permits = Arc::new(Semaphore::new(1));
        let p = permits.clone().try_acquire_owned().unwrap();
        sink.send(1, ok_frame(1, 4 << 20), Some(p));
        let drainer = tokio::spawn({
            let s = sink.clone();
            async move { s.drain(Some(Duration::from_millis(100))).await }
        });
        tokio::time::timeout(Duration::from_secs(5), drainer)
            .await
            .expect("the drain gave up")
            .unwrap();
        assert!(sink.is_broken());
        assert_eq!(sink.unsent(), 0);
        assert_eq!(
            permits.available_permits(),
            1,
            "the dropped answer's permit is back"
        );
        assert_eq!(sink.send(2, ok_frame(2, 10), None), Sent::Gone);
        // A reader waiting for the backlog to shrink is not left waiting.
        sink.wait_unsent_at_most(0).await;
    }

    #[tokio::test]
    async fn a_closed_peer_breaks_the_sink() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_rd, wr) = rxd_shm::socket::split(a).unwrap();
        let sink = Sink::new(wr, 64 << 20, None);
        drop(b);
        // The first write may land in the buffer of a socket whose peer is gone.
        let mut gone = false;
        for id in 1..=3 {
            gone |= sink.send(id, ok_frame(id, 10), None) == Sent::Gone;
        }
        assert!(gone && sink.is_broken());
    }
}
