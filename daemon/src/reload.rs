//! Reloading (SIGHUP, `rxctl reload`): the configuration file read again and what may change
//! while serving applied, then the model repository read again.
//! Boundary: decides nothing about models itself; budgets, loads and the repository scan are
//! the registry's.

use crate::{SharedRef, config};

/// Reload (SIGHUP, `rxctl reload`): re-reads the config file and applies what can change
/// while serving — device memory budgets (a smaller one evicts least-recently-used idle
/// models, or is refused if pinned/busy models hold more), `load-on-demand`, the preload list
/// — then re-reads the model repository and loads what is new in the preload list. Keys that need
/// a restart (socket, repository, ONNX Runtime library, threads, limits, devices' kinds) are
/// named in the log and left as they are. A config with problems changes nothing. Blocking.
pub fn apply(shared: &SharedRef) -> Result<Vec<rxd_protocol::ModelSummary>, String> {
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
