//! Reloading (SIGHUP, `rxctl reload`): the configuration file read again and what may change
//! while serving applied, then the model repository read again.
//! Boundary: decides nothing about models itself; budgets, loads and the repository scan are
//! the registry's.

use crate::{SharedRef, config};

/// Reload (SIGHUP, `rxctl reload`): re-reads the config file and applies what can change
/// while serving — device memory budgets (a smaller one evicts least-recently-used idle
/// models, or is refused if pinned/busy models hold more), `load-on-demand`, the preload list
/// — then re-reads the model repository and loads what is new in the preload list. Every other key
/// that changed needs a restart ([`config::Config::needs_restart`]): it is named in the log and
/// left as it is. Last, versions spread over several devices are placed again (a budget that
/// grew makes room for a share evicted earlier; a device no longer listed loses its share).
/// A config with problems changes nothing. Blocking.
pub fn apply(shared: &SharedRef) -> Result<Vec<rxd_protocol::ModelSummary>, String> {
    let mut notes = Vec::new();
    let mut added: Vec<String> = Vec::new();
    if shared.opts.config.is_some() {
        let new = config::load(&shared.opts)
            .map_err(|e| format!("the configuration has problems; nothing was reloaded: {e}"))?;
        let old = &shared.config;
        let restart = old.needs_restart(&new);
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
    if let Err(e) = shared.registry.rebalance(None) {
        tracing::warn!("rebalance after reload: {e}");
    }
    Ok(shared.registry.list())
}
