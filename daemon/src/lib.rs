//! rxd, the local inference daemon, as a library: the `rxd` binary is a thin shell around it,
//! and tests can drive [`serve`] in-process with a listener they bound themselves.
//!
//! # Layout
//! - [`budget`]: device memory budgets and the admission/eviction policy (pure).
//! - [`capability`]: what a model needs of a device beyond memory (float16), read from its
//!   file.
//! - [`cli`]: command-line flags (clap), shared by the binary, man pages and completions.
//! - [`config`]: TOML configuration, flag overrides, validation (parse → validate → act).
//! - [`listener`]: binding the Unix socket, accepting connections, peer credentials.
//! - [`connection`]: one client connection: handshake, framed reads/writes, pipelining.
//! - [`dispatch`]: routes a decoded request to the registry or the reports.
//! - [`report`]: status, health and the metrics report, assembled (read only).
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
//! - [`supervise`]: when to notify systemd (status, watchdog, stopping) and SIGHUP reloads.
//! - [`reload`]: a configuration and repository reload (SIGHUP, `rxctl reload`).
//! - [`error`]: the daemon's error enums and their one mapping to wire error codes.
//! - [`shutdown`]: signals and the cancellation tree.
//! - [`affinity`]: the CPU cores a thread may run on; pinning a device's threads to its cores.
//! - `alloc_count` (feature `alloc-count`, benchmarks only): counts the daemon's allocations.
#![deny(unsafe_code)]

pub mod affinity;
#[cfg(feature = "alloc-count")]
pub mod alloc_count;
pub mod budget;
pub mod capability;
pub mod cli;
pub mod closer;
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
pub mod reload;
pub mod report;
pub mod runtime;
pub mod scheduler;
pub mod shutdown;
mod supervise;
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
    /// The connections' submission/completion rings and their poller.
    pub rings: connection::Rings,
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
            follow_cores: config.cores_auto,
            tune: config.tune,
            queue_capacity: config.queue_capacity,
            devices: config.devices.clone(),
            load_on_demand: config.load_on_demand,
            cache_dir: config.cache_directory.clone(),
            load_timeout: config.load_timeout,
            run_limit: config.watchdog_stuck / 2,
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
        rings: connection::Rings::default(),
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
    scheduler::timer::start()?;
    let s = shared.clone();
    let preload = tokio::task::spawn_blocking(move || {
        // What each device computes, found once before anything is placed on it.
        s.registry.probe_devices();
        s.registry.preload(&s.config.preload)
    });
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
    supervise::spawn_reloader(shared.clone(), notifier.clone(), shutdown.clone());
    supervise::spawn_housekeeping(shared.clone(), shutdown.clone());
    if notifier.enabled() {
        // The socket is bound (before this function) and the preloads are done: ready.
        notifier.send(&format!(
            "READY=1\nSTATUS={}",
            supervise::status_line(&shared, None)
        ));
        supervise::spawn_notifications(shared.clone(), notifier.clone(), shutdown.clone());
    }
    serve(listener, shared.clone(), shutdown).await;
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.registry.unload_all())
        .await
        .map_err(std::io::Error::other)?;
    Ok(())
}
