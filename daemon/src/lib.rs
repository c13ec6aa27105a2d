//! rxd, the local inference daemon, as a library: the `rxd` binary is a thin shell around it,
//! and tests can drive [`serve`] in-process with a listener they bound themselves.
//!
//! # Layout
//! - [`budget`]: device memory budgets and the admission/eviction policy (pure).
//! - [`cli`]: command-line flags (clap), shared by the binary, man pages and completions.
//! - [`config`]: TOML configuration, flag overrides, validation (parse → validate → act).
//! - [`listener`]: binding the Unix socket, accepting connections, peer credentials.
//! - [`connection`]: one client connection: handshake, framed reads/writes, pipelining.
//! - [`dispatch`]: routes a decoded request to the registry or the status reports.
//! - [`peer`]: who is on the other end (SO_PEERCRED) and whether they are an admin.
//! - [`quota`]: what one user may hold: connections and request memory.
//! - [`registry`]: the model repository on disk and the models loaded from it.
//! - [`model`]: a loaded model version and the serving hot path into it (`submit`).
//! - [`validate`]: checks a request's tensors against a model's signature.
//! - [`runtime`]: ONNX Runtime — library loading, sessions, worker threads. Nothing outside
//!   it calls ORT.
//! - [`compression`]: `rxctl model compress` — compress a repository model into a new version.
//! - [`publish`]: `rxctl model add` — write a client's model file into the repository.
//! - [`coalesce`]: identical-request coalescing and the result cache.
//! - [`metrics`]: global counters, per-model distributions and rates, process figures.
//! - [`exporter`]: the optional loopback HTTP `/metrics` endpoint for Prometheus.
//! - [`gpu`]: GPU utilisation and memory (NVML, amdgpu sysfs) where there are GPUs.
//! - [`notify`]: sd_notify (READY, STATUS, STOPPING) and the liveness-driven watchdog.
//! - [`error`]: the daemon's error enums and their one mapping to wire error codes.
//! - [`shutdown`]: signals and the cancellation tree.
#![deny(unsafe_code)]

pub mod budget;
pub mod cli;
pub mod coalesce;
pub mod compression;
pub mod config;
pub mod connection;
pub mod dispatch;
pub mod error;
pub mod exporter;
pub mod gpu;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod peer;
pub mod publish;
pub mod quota;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod shutdown;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

pub use listener::serve;

/// Name and version reported in the handshake and status.
pub const SERVER_NAME: &str = concat!("rxd ", env!("CARGO_PKG_VERSION"));

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    pub config: config::Config,
    pub registry: registry::Registry,
    pub metrics: metrics::Metrics,
    /// Per-user shares of connections and request memory.
    pub quotas: Arc<quota::Quotas>,
    pub started: Instant,
    /// The uid the daemon runs as (admin by definition).
    pub own_uid: u32,
    /// SIGHUP: reload the configuration and the repository.
    pub reload_requested: tokio::sync::Notify,
    /// The flags the daemon started with (a reload re-reads the config file under them).
    pub opts: cli::ServeOpts,
    /// The preload list in force (changes with a config reload).
    pub preload: std::sync::Mutex<Vec<String>>,
}

pub type SharedRef = Arc<Shared>;

/// Exit codes (sysexits) of the `rxd` binary.
pub mod exit {
    pub const OK: u8 = 0;
    /// Bad command line.
    pub const USAGE: u8 = 64;
    /// A needed resource is unavailable (socket in use by another daemon).
    pub const UNAVAILABLE: u8 = 69;
    /// Internal error.
    pub const SOFTWARE: u8 = 70;
    /// An OS call failed (binding the socket, reading the repository).
    pub const OSERR: u8 = 71;
    /// Bad configuration; the unit does not restart on it (`RestartPreventExitStatus=78`).
    pub const CONFIG: u8 = 78;
}

/// Builds the shared state: loads ONNX Runtime and prepares the registry (nothing loaded yet).
pub fn prepare(
    config: config::Config,
    opts: cli::ServeOpts,
) -> Result<SharedRef, runtime::RuntimeError> {
    let runtime = Arc::new(runtime::Runtime::init(
        &config.ort_library,
        config.run_memory_bytes,
    )?);
    let registry = registry::Registry::new(
        config.model_repository.clone(),
        runtime,
        registry::Defaults {
            intra_op_threads: config.intra_op_threads,
            queue_capacity: config.queue_capacity,
            devices: config.devices.clone(),
            load_on_demand: config.load_on_demand,
            cache_dir: config.cache_directory.clone(),
            load_timeout: config.load_timeout,
            hooks: config::TestHooks::from_env(),
        },
    );
    Ok(Arc::new(Shared {
        registry,
        metrics: metrics::Metrics::default(),
        quotas: quota::Quotas::new(
            config.max_connections_per_uid,
            config.request_memory_bytes,
            config.arena_total_bytes,
        ),
        started: Instant::now(),
        own_uid: nix::unistd::geteuid().as_raw(),
        reload_requested: tokio::sync::Notify::new(),
        opts,
        preload: std::sync::Mutex::new(config.preload.clone()),
        config,
    }))
}

/// Loads the repository's models, then serves `listener` until `shutdown` fires, drains, and
/// unloads everything. The listener is bound before models load, so clients that connect
/// early wait in the backlog instead of being refused.
pub async fn run(
    shared: SharedRef,
    listener: tokio::net::UnixListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    // Requests keyed off the IO thread hold at most one more copy of what clients may map.
    coalesce::set_key_budget(shared.config.arena_total_bytes);
    let s = shared.clone();
    let preload = tokio::task::spawn_blocking(move || s.registry.preload(&s.config.preload));
    tokio::select! {
        done = preload => done.map_err(std::io::Error::other)??,
        // Loads are bounded by their deadline, but SIGTERM need not wait for it.
        () = shutdown.cancelled() => {
            tracing::info!("stopping before the preloads finished");
            return Ok(());
        }
    }
    let (ready, failed) = shared.registry.counts();
    tracing::info!(
        socket = %shared.config.socket.display(),
        ready,
        failed,
        "serving"
    );
    if let Some(addr) = shared.config.metrics_listen {
        let l = exporter::bind(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(exporter::serve(l, shared.clone(), shutdown.clone()));
    }
    let notifier = Arc::new(notify::Notifier::from_env());
    spawn_reloader(shared.clone(), notifier.clone(), shutdown.clone());
    if notifier.enabled() {
        // The socket is bound (before this function) and the preloads are done: ready.
        notifier.send(&format!("READY=1\nSTATUS={}", status_line(&shared, None)));
        spawn_notifications(shared.clone(), notifier.clone(), shutdown.clone());
    }
    serve(listener, shared.clone(), shutdown).await;
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.registry.unload_all())
        .await
        .map_err(std::io::Error::other)?;
    Ok(())
}

/// One line for systemd's `STATUS=`: what is served and how busy.
fn status_line(shared: &SharedRef, rate: Option<f64>) -> String {
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
fn spawn_notifications(
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

/// Reloads on request (SIGHUP): `RELOADING=1`, re-read the repository, `READY=1`.
fn spawn_reloader(
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
            match tokio::task::spawn_blocking(move || reload(&s)).await {
                Ok(Ok(models)) => tracing::info!(versions = models.len(), "reloaded"),
                Ok(Err(e)) => tracing::error!("reload failed: {e}"),
                Err(e) => tracing::error!("reload failed: {e}"),
            }
            notifier.send(&format!("READY=1\nSTATUS={}", status_line(&shared, None)));
        }
    });
}

/// Reload (SIGHUP, `rxctl reload`): re-reads the config file and applies what can change
/// while serving — device memory budgets (a smaller one evicts least-recently-used idle
/// models, or is refused if pinned/busy models hold more), `load-on-demand`, the preload list
/// — then re-reads the model repository and loads what is new in the preload list. Keys that need
/// a restart (socket, repository, ONNX Runtime library, threads, limits, devices' kinds) are
/// named in the log and left as they are. A config with problems changes nothing. Blocking.
pub fn reload(shared: &SharedRef) -> Result<Vec<rxd_protocol::ModelSummary>, String> {
    let mut notes = Vec::new();
    let mut added: Vec<String> = Vec::new();
    if shared.opts.config.is_some() {
        let new = config::load(&shared.opts)
            .map_err(|e| format!("the configuration has problems; nothing was reloaded: {e}"))?;
        let old = &shared.config;
        let restart: Vec<&str> = [
            ("socket", old.socket != new.socket),
            ("socket-mode", old.socket_mode != new.socket_mode),
            (
                "model-repository",
                old.model_repository != new.model_repository,
            ),
            ("ort-library", old.ort_library != new.ort_library),
            (
                "intra-op-threads",
                old.intra_op_threads != new.intra_op_threads,
            ),
            ("io-threads", old.io_threads != new.io_threads),
            ("admin-group", old.admin_group != new.admin_group),
            (
                "max-connections",
                old.max_connections != new.max_connections,
            ),
            (
                "max-connections-per-uid",
                old.max_connections_per_uid != new.max_connections_per_uid,
            ),
            ("max-in-flight", old.max_in_flight != new.max_in_flight),
            (
                "max-unsent-bytes",
                old.max_unsent_bytes != new.max_unsent_bytes,
            ),
            (
                "request-memory-bytes",
                old.request_memory_bytes != new.request_memory_bytes,
            ),
            (
                "run-memory-bytes",
                old.run_memory_bytes != new.run_memory_bytes,
            ),
            (
                "handshake-timeout-secs",
                old.handshake_timeout != new.handshake_timeout,
            ),
            ("frame-timeout-secs", old.frame_timeout != new.frame_timeout),
            ("idle-timeout-secs", old.idle_timeout != new.idle_timeout),
            (
                "max-frame-bytes",
                old.max_frame_bytes != new.max_frame_bytes,
            ),
            (
                "max-arena-bytes",
                old.max_arena_bytes != new.max_arena_bytes,
            ),
            (
                "arena-total-bytes",
                old.arena_total_bytes != new.arena_total_bytes,
            ),
            ("queue-capacity", old.queue_capacity != new.queue_capacity),
            (
                "max-peer-priority",
                old.max_peer_priority != new.max_peer_priority,
            ),
            ("metrics-listen", old.metrics_listen != new.metrics_listen),
            (
                "cache-directory",
                old.cache_directory != new.cache_directory,
            ),
            (
                "device",
                old.devices.len() != new.devices.len()
                    || old.devices.iter().zip(&new.devices).any(|(a, b)| {
                        a.name != b.name
                            || a.kind != b.kind
                            || a.options != b.options
                            || a.cpu_fallback != b.cpu_fallback
                    }),
            ),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| k)
        .collect();
        if !restart.is_empty() {
            tracing::warn!(
                "these configuration changes take effect after a restart: {}",
                restart.join(", ")
            );
        }
        for d in &new.devices {
            if shared.registry.device_budget(&d.name) == Some(d.budget.unwrap_or(u64::MAX)) {
                continue;
            }
            match shared.registry.set_device_budget(&d.name, d.budget) {
                Ok(()) => notes.push(format!("device '{}' budget now {:?}", d.name, d.budget)),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        shared.registry.set_load_on_demand(new.load_on_demand);
        let mut preload = shared.preload.lock().unwrap_or_else(|e| e.into_inner());
        added = new
            .preload
            .iter()
            .filter(|p| !preload.contains(p))
            .cloned()
            .collect();
        *preload = new.preload.clone();
    }
    for n in &notes {
        tracing::info!("{n}");
    }
    shared
        .registry
        .reload()
        .map_err(|e| format!("cannot read the repository: {e}"))?;
    // Entries new to the preload list load now (never evicting anything).
    if !added.is_empty()
        && let Err(e) = shared.registry.preload(&added)
    {
        tracing::warn!("preload after reload: {e}");
    }
    Ok(shared.registry.list())
}
