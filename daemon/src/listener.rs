//! The Unix socket: binding it (with its mode, and replacing a stale socket file), accepting
//! connections within the connection limit, and the drain on shutdown.
//! Invariant: a socket file that a running daemon answers on is never removed.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::SharedRef;
use crate::connection;
use crate::metrics::Metrics;
use crate::peer::Peer;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} is in use by a running daemon")]
    InUse(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("cannot bind {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the socket at `path` with permission bits `mode`. A leftover socket file that nobody
/// answers on is replaced. Returns a std listener (non-blocking) for any runtime to adopt.
pub fn bind(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, BindError> {
    let shown = path.display().to_string();
    let io = |source| BindError::Io {
        path: shown.clone(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(shown));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(shown)),
            Err(_) => std::fs::remove_file(path).map_err(io)?,
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// Turns `SO_PASSRIGHTS` off on a socket (the listening one: its connections inherit it, and
/// fds sent even before a connection is accepted are refused; and each accepted one); says
/// once where the kernel lacks it.
fn refuse_fds(sock: &impl std::os::fd::AsFd) {
    static SAID: std::sync::Once = std::sync::Once::new();
    match rxd_shm::fd::refuse_passed_fds(sock.as_fd()) {
        Ok(true) => {}
        Ok(false) => SAID.call_once(|| {
            tracing::info!(
                "this kernel cannot refuse fds sent over a socket (SO_PASSRIGHTS, Linux 6.16): \
                 any a peer sends are received and closed on threads of their own"
            )
        }),
        Err(e) => SAID.call_once(|| tracing::warn!("cannot turn SO_PASSRIGHTS off: {e}")),
    }
}

/// Accepts connections until `shutdown` fires, then waits (up to the configured grace) for
/// every connection to answer what it accepted.
pub async fn serve(listener: UnixListener, shared: SharedRef, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections as usize));
    let tracker = TaskTracker::new();
    let pass_fds = crate::config::TestHooks::from_env().pass_fds;
    if !pass_fds {
        refuse_fds(&listener);
    }
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No peer may pass fds (PROTOCOL.md): where the kernel can, it refuses them itself
        // (off on the listening socket already; again here in case a kernel does not carry
        // it over). Where it cannot, they are received and closed by the closer threads.
        if !pass_fds {
            refuse_fds(&stream);
        }
        let peer = match Peer::identify(&stream, shared.own_uid, shared.config.admin_gid) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot read peer credentials: {e}");
                if let Ok(s) = stream.into_std() {
                    // Whose it is is unknown: any user's bucket would do.
                    crate::closer::close_later(u32::MAX, [s.into()]);
                }
                continue;
            }
        };
        Metrics::inc(&shared.metrics.connections_total);
        Metrics::inc(&shared.metrics.connections_open);
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            connection::run(stream, shared.clone(), peer, shutdown).await;
            Metrics::dec(&shared.metrics.connections_open);
            drop(permit);
        });
    }
    drop(listener);
    shared.registry.stop_loading();
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(connections = open, "draining connections");
    }
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown grace of {:?} expired with connections still open",
            shared.config.shutdown_grace
        );
    }
}
