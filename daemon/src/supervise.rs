//! The daemon's conversation with its supervisor (systemd): `STATUS=` every 10 s, `STOPPING=1`
//! when shutdown begins, `WATCHDOG=1` while no model worker is stuck, and SIGHUP reloads
//! between `RELOADING=1` and `READY=1`. `notify` sends the messages; this module decides when.
//! Boundary: no request handling; what a reload changes is `reload`'s.

use std::sync::Arc;

use crate::{SharedRef, metrics, notify};

/// One line for systemd's `STATUS=`: what is served and how busy.
pub(crate) fn status_line(shared: &SharedRef, rate: Option<f64>) -> String {
    let (ready, failed) = shared.registry.counts();
    let mut line = format!(
        "serving {ready} model(s) on {}",
        shared.config.socket.display()
    );
    if failed > 0 {
        line.push_str(&format!(", {failed} failed"));
    }
    if let Some(r) = rate {
        line.push_str(&format!(", {r:.1} req/s"));
    }
    line
}

/// STOPPING=1 when shutdown begins; STATUS= every 10 s; WATCHDOG=1 at half the watchdog
/// interval while no model worker is stuck (a wedged worker stops the pings).
pub(crate) fn spawn_notifications(
    shared: SharedRef,
    notifier: Arc<notify::Notifier>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (n, s) = (notifier.clone(), shutdown.clone());
    tokio::spawn(async move {
        s.cancelled().await;
        n.send("STOPPING=1\nSTATUS=stopping: answering requests in flight");
    });
    let (n, s, sh) = (notifier.clone(), shutdown.clone(), shared.clone());
    tokio::spawn(async move {
        let mut last = metrics::Metrics::get(&sh.metrics.requests_total);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = metrics::Metrics::get(&sh.metrics.requests_total);
            let rate = (now - last) as f64 / 10.0;
            last = now;
            n.send(&format!("STATUS={}", status_line(&sh, Some(rate))));
        }
    });
    if let Some(interval) = notify::watchdog_interval() {
        let limit = shared.config.watchdog_stuck;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            let mut was_stuck = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let stuck = shared.registry.stuck(limit);
                if stuck.is_empty() {
                    notifier.send("WATCHDOG=1");
                    was_stuck = false;
                } else if !was_stuck {
                    tracing::error!(
                        "a model worker is stuck ({}); stopping watchdog pings",
                        stuck.join(", ")
                    );
                    was_stuck = true;
                }
            }
        });
    }
}

/// How often the cores the daemon may use are read (`Registry::follow_cores`), and missing
/// shares of spread models placed (`Registry::place_missing_shares`).
const HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(5);

/// Every [`HOUSEKEEPING`]: follows the cores the daemon may use — CPU affinity (`taskset`,
/// systemd's `CPUAffinity=`) and cgroup quota (`CPUQuota=`), as the standard library reads
/// them — re-tuning the tuned models when they change (reading them is a `sched_getaffinity`
/// and two small cgroup files); and, with several devices, gives spread models the shares
/// that fit now. Both are blocking work, done off the async threads, one check at a time.
pub(crate) fn spawn_housekeeping(shared: SharedRef, shutdown: tokio_util::sync::CancellationToken) {
    let (cores, shares) = (shared.config.cores_auto, shared.config.devices.len() > 1);
    if !cores && !shares {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sh = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if cores {
                    let now = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                    sh.registry.follow_cores(now);
                }
                if shares {
                    sh.registry.place_missing_shares();
                }
            })
            .await;
        }
    });
}

/// Reloads on request (SIGHUP): `RELOADING=1`, re-read the repository, `READY=1`.
pub(crate) fn spawn_reloader(
    shared: SharedRef,
    notifier: Arc<notify::Notifier>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = shared.reload_requested.notified() => {}
            }
            notifier.send("RELOADING=1\nSTATUS=reloading the model repository");
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || crate::reload::apply(&s)).await {
                Ok(Ok(models)) => tracing::info!(versions = models.len(), "reloaded"),
                Ok(Err(e)) => tracing::error!("reload failed: {e}"),
                Err(e) => tracing::error!("reload failed: {e}"),
            }
            notifier.send(&format!("READY=1\nSTATUS={}", status_line(&shared, None)));
        }
    });
}
