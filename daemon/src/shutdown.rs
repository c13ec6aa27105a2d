//! Signals and the cancellation tree: SIGTERM/SIGINT cancel the root token (stop accepting,
//! drain, exit 0); SIGHUP asks for a reload of the model repository.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher; returns the root token it cancels. `on_hup` runs on SIGHUP.
pub fn install(on_hup: impl Fn() + Send + 'static) -> std::io::Result<CancellationToken> {
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
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the model repository");
                    on_hup();
                }
            }
        }
        t.cancel();
    });
    Ok(token)
}
