//! What the registry reports: version summaries and signatures, devices with their budgets,
//! residents, capabilities and load, every version's metrics, and the figures health is judged on (stuck
//! workers, queue saturation, versions kept out by the memory budget).
//! Boundary: reads the registry's state; changes nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rxd_protocol::{DeviceSummary, ModelInfo, ModelState, ModelSummary};

use super::{Held, Model, Registry, Version, lookup};
use crate::error::RequestError;

impl Registry {
    /// Metrics of every version known (resident or not; counters survive evictions).
    pub fn model_metrics_report(&self) -> Vec<rxd_protocol::metrics::ModelMetrics> {
        let models = self.read();
        let mut out = Vec::new();
        for (name, model) in models.iter() {
            let base = model.settings.clone().unwrap_or_default();
            for (&version, ver) in &model.versions {
                let m = self.model_metrics(name, version);
                let loaded = ver.loaded().map(|l| &**l);
                let (queue, compute, total, batch_rows, rates) = m.report();
                let (depth, capacity) = loaded.map_or((0, 0), |l| l.scheduler().queue());
                let stats = loaded.map(|l| &l.scheduler().stats);
                let co = loaded.map(|l| &l.coalescer.stats);
                let get = |a: Option<&AtomicU64>| a.map_or(0, |a| a.load(Ordering::Relaxed));
                let (hits, misses) = (get(co.map(|c| &c.hits)), get(co.map(|c| &c.misses)));
                out.push(rxd_protocol::metrics::ModelMetrics {
                    name: name.clone(),
                    version,
                    state: ver.state.kind(),
                    device: loaded.map_or_else(String::new, |l| l.device.clone()),
                    instances: loaded.map_or(0, |l| l.instances() as u32),
                    queue_depth: depth as u64,
                    queue_capacity: capacity as u64,
                    outcomes: m.outcomes(),
                    batches: get(stats.map(|s| &s.batches)),
                    rows: get(stats.map(|s| &s.rows)),
                    padded_rows: get(stats.map(|s| &s.padded_rows)),
                    rates,
                    queue,
                    compute,
                    total,
                    batch_rows,
                    cache_hits: hits,
                    cache_misses: misses,
                    cache_hit_rate: (hits + misses > 0)
                        .then(|| hits as f64 / (hits + misses) as f64),
                    cache_bytes: loaded.map_or(0, |l| l.coalescer.cache_bytes()),
                    coalesced: get(co.map(|c| &c.coalesced)),
                    memory_bytes: if ver.state.kind() == ModelState::Ready {
                        ver.measured
                    } else {
                        None
                    },
                    loads: m.loads.load(Ordering::Relaxed),
                    load_failures: m.load_failures.load(Ordering::Relaxed),
                    evictions: m.evictions.load(Ordering::Relaxed),
                    load_seconds_total: m.load_us.load(Ordering::Relaxed) as f64 / 1e6,
                    settings: self.view(&base.merged(&ver.overrides), loaded),
                });
            }
        }
        out
    }

    /// Requests waiting for a worker, all versions.
    pub fn queue_size(&self) -> u64 {
        self.read()
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|v| v.loaded())
            .map(|l| l.scheduler().queue().0 as u64)
            .sum()
    }

    /// Versions whose queue is at least `fraction` full: (name:version, depth, capacity).
    pub fn saturated(&self, fraction: f64) -> Vec<(String, usize, usize)> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions.iter().filter_map(move |(v, ver)| {
                    let (depth, cap) = ver.loaded()?.scheduler().queue();
                    (cap > 0 && depth as f64 >= fraction * cap as f64)
                        .then(|| (format!("{name}:{v}"), depth, cap))
                })
            })
            .collect()
    }

    /// Versions that are not resident because the budget refused them (their error says so).
    pub fn refused_by_budget(&self) -> Vec<String> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions
                    .iter()
                    .filter(|(_, ver)| ver.state.refused_by_budget())
                    .map(move |(v, _)| format!("{name}:{v}"))
            })
            .collect()
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        let models = self.read();
        models
            .iter()
            .flat_map(|(name, m)| {
                m.versions
                    .iter()
                    .map(|(&v, ver)| self.summary(m, name, v, ver))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(super) fn summary_of(
        &self,
        name: &str,
        version: u64,
    ) -> Result<ModelSummary, RequestError> {
        self.summary_of_locked(&self.read(), name, version)
    }

    /// A version's summary, with the map already locked.
    pub(super) fn summary_of_locked(
        &self,
        models: &BTreeMap<String, Model>,
        name: &str,
        version: u64,
    ) -> Result<ModelSummary, RequestError> {
        let (model, ver) = lookup(models, name, version)?;
        Ok(self.summary(model, name, version, ver))
    }

    pub fn info(&self, name: &str, version: Option<u64>) -> Result<ModelInfo, RequestError> {
        let loaded = self.get(name, version)?;
        let summary = self.summary_of(name, loaded.version)?;
        Ok(ModelInfo {
            summary,
            inputs: loaded.signature.inputs.clone(),
            outputs: loaded.signature.outputs.clone(),
            settings: self.settings_view(name, loaded.version).ok(),
            tuning: loaded.tuning.clone(),
            not_tuned: loaded.not_tuned.clone(),
            dequantized: loaded.dequantized.clone(),
        })
    }

    /// Every device: budget, use, and resident versions (least recently used first).
    pub fn devices(&self) -> Vec<DeviceSummary> {
        // The devices' probes first, outside the locks (a GPU driver's queries can take
        // milliseconds; a load would wait behind them).
        let probes: Vec<_> = self
            .defaults
            .devices
            .iter()
            .map(|dev| self.runtime.probe(&dev.kind))
            .collect();
        let models = self.read();
        let mut b = self.lock_budget();
        self.sync_usage(&models, &mut b);
        let mut out = Vec::new();
        for ((i, dev), probe) in self.defaults.devices.iter().enumerate().zip(probes) {
            let u = b.budget.device_use(i);
            // The budget in force (a config reload may have changed it).
            let live = Some(u.budget).filter(|&b| b != u64::MAX);
            let mut residents: Vec<(u64, String)> = u
                .residents
                .iter()
                .map(|(h, ..)| {
                    let (n, v) = h.version();
                    let last = models
                        .get(n)
                        .and_then(|m| m.versions.get(v))
                        .and_then(|ver| ver.loaded())
                        .map_or(u64::MAX, |l| l.last_used());
                    (last, format!("{n}:{v}"))
                })
                .collect();
            residents.sort();
            // Requests waiting for the versions placed on this device.
            let queued: u64 = models
                .values()
                .flat_map(|m| m.versions.values())
                .filter_map(|v| v.loaded())
                .filter(|l| l.device == dev.name)
                .map(|l| l.scheduler().queue().0 as u64)
                .sum();
            out.push(DeviceSummary {
                name: dev.name.clone(),
                kind: dev.kind.name().into(),
                ep: dev.kind.ep().into(),
                adapter: probe.as_ref().ok().and_then(|p| p.adapter.clone()),
                error: probe.as_ref().err().cloned(),
                memory_total_bytes: probe.as_ref().ok().and_then(|p| p.memory_total),
                memory_used_bytes: probe.as_ref().ok().and_then(|p| p.memory_used),
                budget_bytes: live,
                used_bytes: u.used,
                free_bytes: live.map(|b| b.saturating_sub(u.used)),
                models: residents.into_iter().map(|(_, n)| n).collect(),
                capabilities: self.capabilities(i),
                load: self.device_load_report(i, queued),
                cores: dev.cores.as_deref().map(crate::affinity::show),
            });
        }
        out
    }

    /// Models with a worker stuck on one batch for longer than `limit`.
    pub fn stuck(&self, limit: std::time::Duration) -> Vec<String> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions.iter().filter_map(move |(v, ver)| {
                    let l = ver.loaded()?;
                    (l.scheduler().stuck_workers(limit) > 0).then(|| format!("{name} v{v}"))
                })
            })
            .collect()
    }

    /// (ready, failed) version counts.
    pub fn counts(&self) -> (u32, u32) {
        let models = self.read();
        let mut ready = 0;
        let mut failed = 0;
        for ver in models.values().flat_map(|m| m.versions.values()) {
            match ver.state.kind() {
                ModelState::Ready => ready += 1,
                ModelState::Failed => failed += 1,
                _ => {}
            }
        }
        (ready, failed)
    }

    fn summary(&self, model: &Model, name: &str, version: u64, ver: &Version) -> ModelSummary {
        let now = self.now_ms();
        let loaded = ver.loaded();
        let stats = loaded.map(|l| &l.scheduler().stats);
        let memory_bytes = match ver.state.kind() {
            ModelState::Ready => ver.measured,
            ModelState::Loading => ver.estimated,
            _ => None,
        };
        ModelSummary {
            name: name.into(),
            version,
            state: ver.state.kind(),
            error: ver.state.error().map(str::to_string),
            instances: loaded.map_or(0, |l| l.scheduler().all_instances() as u32),
            device: loaded.map_or_else(String::new, |l| l.device.clone()),
            shares: loaded.map_or_else(Vec::new, |l| shares(l, ver)),
            share_evictions: ver.share_evictions,
            batchable: loaded.is_some_and(|l| l.batchable()),
            requests: stats.map_or(0, |s| s.requests.load(Ordering::Relaxed))
                + loaded.map_or(0, |l| {
                    l.coalescer.stats.hits.load(Ordering::Relaxed)
                        + l.coalescer.stats.coalesced.load(Ordering::Relaxed)
                }),
            cache_hits: loaded.map_or(0, |l| l.coalescer.stats.hits.load(Ordering::Relaxed)),
            cache_misses: loaded.map_or(0, |l| l.coalescer.stats.misses.load(Ordering::Relaxed)),
            cache_bytes: loaded.map_or(0, |l| l.coalescer.cache_bytes()),
            coalesced: loaded.map_or(0, |l| l.coalescer.stats.coalesced.load(Ordering::Relaxed)),
            batches: stats.map_or(0, |s| s.batches.load(Ordering::Relaxed)),
            rows: stats.map_or(0, |s| s.rows.load(Ordering::Relaxed)),
            padded_rows: stats.map_or(0, |s| s.padded_rows.load(Ordering::Relaxed)),
            batch_sizes: loaded.map_or_else(Vec::new, |l| l.scheduler().batch_sizes().to_vec()),
            pinned: ver.pinned,
            ep: loaded.map(|l| l.ep.to_string()),
            fallback: loaded.and_then(|l| l.fallback.clone()),
            compression: loaded.and_then(|l| l.compression.clone()),
            node_placement: loaded
                .and_then(|l| l.placement.as_ref())
                .map(|p| p.nodes.clone())
                .unwrap_or_default(),
            nodes_on_cpu: loaded
                .and_then(|l| l.placement.as_ref())
                .map(|p| p.on_cpu.clone())
                .unwrap_or_default(),
            served: model.served().contains(&version),
            memory_bytes,
            estimated_bytes: ver.estimated,
            load_ms: ver.load_ms,
            arena_bytes: ver.arena,
            loads: ver.loads,
            idle_ms: loaded.map(|l| now.saturating_sub(l.last_used())),
            evictions: ver.evictions,
        }
    }
}

/// A version's instances per device, when it has more than one device's (or its one device
/// fails its runs: health names it from here).
fn shares(loaded: &crate::model::LoadedModel, ver: &Version) -> Vec<rxd_protocol::DeviceShare> {
    let lanes = loaded.scheduler().lanes();
    if lanes.len() < 2 && ver.shares.is_empty() && lanes.iter().all(|l| l.error.is_none()) {
        return Vec::new();
    }
    lanes
        .into_iter()
        .map(|l| rxd_protocol::DeviceShare {
            memory_bytes: if l.device == loaded.device {
                ver.measured
            } else {
                ver.shares.get(&l.device).copied()
            },
            device: l.device,
            instances: l.instances as u32,
            batches: l.batches,
            rows: l.rows,
            state: l.state.into(),
            error: l.error,
        })
        .collect()
}

/// The policy's refusal in words: each device's budget and use and what is resident.
pub(super) fn describe(over: &crate::budget::OverBudget<Held>) -> String {
    let mut parts = Vec::new();
    for d in &over.devices {
        let residents: Vec<String> = d
            .residents
            .iter()
            .map(|(h, bytes, pinned, loading)| {
                let (n, v) = h.version();
                let why = if *pinned {
                    ", pinned"
                } else if *loading {
                    ", loading"
                } else {
                    ""
                };
                format!("{n}:{v} ({}{why})", mib(*bytes))
            })
            .collect();
        parts.push(format!(
            "device '{}' has a budget of {} with {} used{}",
            d.name,
            mib(d.budget),
            mib(d.used),
            if residents.is_empty() {
                String::new()
            } else {
                format!(" by {}", residents.join(", "))
            }
        ));
    }
    format!("needs {}; {}", mib(over.need), parts.join("; "))
}

pub(super) fn mib(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
