//! Signals and the cancellation tree: SIGTERM/SIGINT cancel the root token (stop accepting,
//! drain, exit 0). SIGHUP is caught so that it does not kill the daemon; reloading on it comes
//! with the model lifecycle work.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher; returns the root token it cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let t = token.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => tracing::info!("SIGHUP: reload is not supported yet; ignored"),
            }
        }
        t.cancel();
    });
    Ok(token)
}
