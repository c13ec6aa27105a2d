//! What a start or a reload changes: the preload list, a rescan of the repository with the
//! loads and unloads it implies (new served versions ready before old ones go), and device
//! memory budgets.
//! Boundary: made of loads, unloads and evictions (`load`); decides nothing about memory.

use std::collections::{BTreeSet, HashSet};

use rxd_protocol::ModelSummary;

use super::Registry;
use super::load::logged_by_fail;
use super::report::{describe, mib};

impl Registry {
    /// Scans and loads the preload list (`*`, `model`, `model:version`; blocking). Preloads
    /// never evict each other: one that does not fit stays available (loaded on demand).
    /// Failures are recorded in the version's state; the others still load.
    pub fn preload(&self, list: &[String]) -> std::io::Result<()> {
        self.scan()?;
        let mut targets: Vec<(String, u64)> = Vec::new();
        {
            let models = self.read();
            for item in list {
                let (name, version) = match item.split_once(':') {
                    Some((n, v)) => (n, v.parse::<u64>().ok()),
                    None => (item.as_str(), None),
                };
                for (n, m) in models.iter().filter(|(n, _)| name == "*" || *n == name) {
                    match version {
                        Some(v) => targets.push((n.clone(), v)),
                        None => targets.extend(m.served().into_iter().map(|v| (n.clone(), v))),
                    }
                }
                if name != "*" && !models.contains_key(name) {
                    tracing::warn!(model = %name, "preload: no such model in the repository");
                }
            }
        }
        let mut seen = HashSet::new();
        targets.retain(|t| seen.insert(t.clone()));
        for (name, version) in targets {
            if let Err(e) = self.load_with(&name, Some(version), true)
                && !logged_by_fail(&e)
            {
                tracing::error!(model = %name, version, "{e}");
            }
        }
        Ok(())
    }

    /// Re-reads the repository (SIGHUP, `rxctl reload`). For every model with a version
    /// resident (or loading), the served versions are loaded, and only once the default one is
    /// ready are the versions no longer served unloaded (they finish what they hold); models
    /// gone from disk are unloaded. Models never loaded stay available. Blocking.
    pub fn reload(&self) -> std::io::Result<Vec<ModelSummary>> {
        self.scan()?;
        let plan: Vec<(String, BTreeSet<u64>, bool)> = self
            .read()
            .iter()
            .map(|(n, m)| {
                let resident = m.versions.values().any(|v| v.state.resident_or_loading());
                (n.clone(), m.served(), resident)
            })
            .collect();
        for (name, served, resident) in plan {
            if served.is_empty() {
                let _ = self.unload(&name, None);
                continue;
            }
            if !resident {
                continue;
            }
            let mut ok = true;
            for &v in served.iter().rev() {
                if let Err(e) = self.load(&name, Some(v)) {
                    if !logged_by_fail(&e) {
                        tracing::error!(model = %name, version = v, "reload: {e}");
                    }
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            let stale: Vec<u64> = self
                .read()
                .get(&name)
                .map(|m| {
                    m.versions
                        .iter()
                        .filter(|(k, ver)| !served.contains(k) && ver.loaded().is_some())
                        .map(|(&k, _)| k)
                        .collect()
                })
                .unwrap_or_default();
            for old in stale {
                let _ = self.unload(&name, Some(old));
            }
        }
        // Forget what is neither on disk nor loaded.
        self.write().retain(|_, m| {
            m.versions
                .retain(|_, v| v.on_disk || v.state.resident_or_loading());
            !m.versions.is_empty()
        });
        Ok(self.list())
    }

    /// A device's budget in force.
    pub fn device_budget(&self, name: &str) -> Option<u64> {
        let b = self.lock_budget();
        let i = b.budget.device_index(name)?;
        Some(b.budget.devices()[i].budget)
    }

    /// Changes a device's memory budget (config reload): least-recently-used idle models are
    /// evicted to fit under a smaller one; if pinned or busy models hold more than it, the
    /// budget stays as it was and the error says what holds the device.
    pub fn set_device_budget(&self, name: &str, budget: Option<u64>) -> Result<(), String> {
        let mut models = self.write();
        let mut b = self.lock_budget();
        let d = b
            .budget
            .device_index(name)
            .ok_or_else(|| format!("no device '{name}'"))?;
        let busy = self.sync_usage(&models, &mut b);
        let victims = b
            .budget
            .set_budget(d, budget.unwrap_or(u64::MAX), &|h| {
                busy.contains(h.version())
            })
            .map_err(|over| {
                format!(
                    "device '{name}' keeps its budget: a budget of {} cannot hold what is pinned \
                     or busy there ({})",
                    mib(budget.unwrap_or(u64::MAX)),
                    describe(&over)
                )
            })?;
        drop(b);
        let dropped = self.take_victims(&mut models, &victims);
        drop(models);
        self.release(dropped);
        Ok(())
    }
}
