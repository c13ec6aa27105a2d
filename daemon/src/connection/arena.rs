//! A connection's shared-memory arena: created, sealed and mapped at the handshake, its fd
//! passed with the welcome, its size counted against the daemon-wide arena budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rxd_protocol::{ErrorCode, WireError};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;

use crate::SharedRef;

/// A connection's arena: the sealed memfd (until passed to the client), its mapping, and its
/// share of the daemon-wide arena budget (returned on drop).
pub(super) struct ArenaGrant {
    pub(super) fd: Option<std::os::fd::OwnedFd>,
    pub(super) map: Arc<rxd_shm::Mapping>,
    shared: SharedRef,
    reserved: u64,
}

impl ArenaGrant {
    pub(super) fn new(shared: &SharedRef, asked: u64) -> Result<ArenaGrant, WireError> {
        let unavailable = |m: String| WireError::new(ErrorCode::ArenaUnavailable, m);
        let cfg = &shared.config;
        let size = asked.div_ceil(4096).saturating_mul(4096);
        if size > cfg.max_arena_bytes {
            return Err(unavailable(format!(
                "an arena of {asked} bytes exceeds max-arena-bytes ({})",
                cfg.max_arena_bytes
            )));
        }
        let total = &shared.metrics.arena_bytes;
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size)
                    .filter(|&t| t <= cfg.arena_total_bytes)
            })
            .map_err(|used| {
                unavailable(format!(
                    "the daemon's arena budget is used up ({used} of {} bytes)",
                    cfg.arena_total_bytes
                ))
            })?;
        let grant = |shared: &SharedRef| -> std::io::Result<ArenaGrant> {
            let fd = rxd_shm::create_sealed("rxd-arena", size as usize)?;
            let map = rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), size as usize)?;
            Ok(ArenaGrant {
                fd: Some(fd),
                map: Arc::new(map),
                shared: shared.clone(),
                reserved: size,
            })
        };
        grant(shared).map_err(|e| {
            total.fetch_sub(size, Ordering::AcqRel);
            unavailable(format!("cannot create an arena of {size} bytes: {e}"))
        })
    }
}

impl Drop for ArenaGrant {
    fn drop(&mut self) {
        self.shared
            .metrics
            .arena_bytes
            .fetch_sub(self.reserved, Ordering::AcqRel);
    }
}

/// Sends the first bytes of `frame` with `fd` attached; returns how many bytes went.
pub(super) async fn send_with_fd(
    wr: &OwnedWriteHalf,
    frame: &[u8],
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<usize> {
    use std::os::fd::{AsFd, AsRawFd};
    let stream: &UnixStream = wr.as_ref();
    loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            rxd_shm::send_with_fd(stream.as_raw_fd(), frame, fd.as_fd())
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
