//! A connection's shared-memory arena: created, sealed and mapped at the handshake, its fd
//! passed with the welcome, its size held from the user's share of the daemon-wide arena
//! budget (`arena-total-bytes`; see `quota`). Jobs that read or write the arena hold their own
//! `Arc` of the mapping, so it is unmapped only once the connection and its last request are
//! gone.

use std::sync::Arc;

use rxd_protocol::{ErrorCode, WireError};

use rxd_shm::socket::WriteSide;

use crate::SharedRef;
use crate::peer::Peer;
use crate::quota::Held;

/// A connection's arena: the sealed memfd (until passed to the client), its mapping, and its
/// share of the daemon-wide arena budget (returned on drop).
pub(super) struct ArenaGrant {
    pub(super) fd: Option<std::os::fd::OwnedFd>,
    pub(super) map: Arc<rxd_shm::Mapping>,
    /// The arena's bytes, held from the user's share of `arena-total-bytes`.
    _held: Held,
}

impl ArenaGrant {
    pub(super) fn new(
        shared: &SharedRef,
        peer: &Peer,
        asked: u64,
        ring_at: Option<u64>,
    ) -> Result<ArenaGrant, WireError> {
        let unavailable = |m: String| WireError::new(ErrorCode::ArenaUnavailable, m);
        let cfg = &shared.config;
        let size = asked.div_ceil(4096).saturating_mul(4096);
        if size > cfg.max_arena_bytes {
            return Err(unavailable(format!(
                "an arena of {asked} bytes exceeds max-arena-bytes ({})",
                cfg.max_arena_bytes
            )));
        }
        let held = shared
            .quotas
            .hold_arena(peer.uid, peer.admin, size)
            .map_err(unavailable)?;
        let fd = rxd_shm::create_sealed("rxd-arena", size as usize)
            .map_err(|e| unavailable(format!("cannot create an arena of {size} bytes: {e}")))?;
        let mut map = rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), size as usize)
            .map_err(|e| unavailable(format!("cannot map an arena of {size} bytes: {e}")))?;
        // The ring's bytes are no tensor's: a reference that covered them would have the
        // daemon write outputs over the words it reads as atomics.
        if let Some(at) = ring_at {
            map.reserve_from(at);
        }
        // The client may keep the memfd after the connection: the pages the daemon touched
        // first (outputs it wrote) would stay charged to the daemon as long as it does.
        // Freed a moment after the connection ends ([`ArenaGrant`]'s drop).
        map.discard_on_drop();
        Ok(ArenaGrant {
            fd: Some(fd),
            map: Arc::new(map),
            _held: held,
        })
    }
}

/// How long after its connection ends an arena's pages are freed: an honest client may still
/// read its last answers' outputs (and the ring's last completions) from the arena after the
/// connection closed under it (the daemon stopping, a half-closed connection).
const DISCARD_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for ArenaGrant {
    fn drop(&mut self) {
        discard_later(self.map.clone());
    }
}

/// Arenas waiting for [`DISCARD_AFTER`] at most: beyond, one is freed at once (a user
/// opening and closing connections fast does not keep many mappings alive).
const DISCARD_PENDING: usize = 256;

/// Keeps `map` alive for [`DISCARD_AFTER`]; its pages are freed when its last reference goes
/// (this one, or a request's still running).
fn discard_later(map: Arc<rxd_shm::Mapping>) {
    use std::collections::VecDeque;
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::Instant;
    type Queue = (Mutex<VecDeque<(Instant, Arc<rxd_shm::Mapping>)>>, Condvar);
    static QUEUE: OnceLock<&'static Queue> = OnceLock::new();
    static RUNNING: OnceLock<bool> = OnceLock::new();
    let q: &'static Queue =
        QUEUE.get_or_init(|| Box::leak(Box::new((Mutex::new(VecDeque::new()), Condvar::new()))));
    let running = *RUNNING.get_or_init(|| {
        std::thread::Builder::new()
            .name("rxd-discard".into())
            .spawn(move || {
                let (queue, cv) = q;
                let mut g = queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    match g.front() {
                        None => g = cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                        Some(&(at, _)) if at <= Instant::now() => {
                            let due = g.pop_front();
                            drop(g);
                            drop(due);
                            g = queue.lock().unwrap_or_else(|e| e.into_inner());
                        }
                        Some(&(at, _)) => {
                            let wait = at.saturating_duration_since(Instant::now());
                            g = cv
                                .wait_timeout(g, wait)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    }
                }
            })
            .is_ok()
    });
    if !running {
        // No thread to wait on: freed now (or when its last request is done).
        return;
    }
    let (queue, cv) = q;
    let mut g = queue.lock().unwrap_or_else(|e| e.into_inner());
    let oldest = (g.len() >= DISCARD_PENDING).then(|| g.pop_front());
    g.push_back((Instant::now() + DISCARD_AFTER, map));
    drop(g);
    cv.notify_one();
    drop(oldest);
}

/// Sends the first bytes of `frame` with `fd` attached; returns how many bytes went.
pub(super) async fn send_with_fd(
    wr: &WriteSide,
    frame: &[u8],
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<usize> {
    use std::os::fd::AsFd;
    wr.write_with(|sock| rxd_shm::send_with_fd(sock, frame, fd.as_fd()))
        .await
}
