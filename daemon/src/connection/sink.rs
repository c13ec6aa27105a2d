//! The connection's write side, shared by its request tasks and the model workers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rxd_protocol::frame;
use rxd_protocol::{ErrorCode, Outcome, ResponseFrame, WireError};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

pub(super) fn encode_response(id: u64, outcome: Outcome) -> Vec<u8> {
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
pub(super) struct Sink {
    pub(super) wr: OwnedWriteHalf,
    pub(super) state: Mutex<SinkState>,
    pub(super) wake: Notify,
    pub(super) broken: AtomicBool,
}

#[derive(Default)]
pub(super) struct SinkState {
    /// Frames waiting, with how much of the first one is already written.
    backlog: VecDeque<(Vec<u8>, usize)>,
    finished: bool,
}

impl Sink {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a whole frame now if the socket takes it, else queues it. Never blocks.
    pub(super) fn send(&self, frame: Vec<u8>) {
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

    pub(super) fn finish(&self) {
        self.lock().finished = true;
        self.wake.notify_one();
    }
}

/// Writes queued frames whenever the socket can take them; ends when the connection is
/// finished and the backlog is empty, or the peer is gone.
pub(super) async fn drain_sink(sink: &Sink) {
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
