//! What the registry reports for metrics and health: every version's metrics, queue
//! saturation, versions kept out by the memory budget.

use std::sync::atomic::{AtomicU64, Ordering};

use rxd_protocol::ModelState;

use super::{Registry, Version};

impl Registry {
    /// Metrics of every version known (resident or not; counters survive evictions).
    pub fn model_metrics_report(&self) -> Vec<rxd_protocol::metrics::ModelMetrics> {
        let models = self.read();
        let mut out = Vec::new();
        for (name, model) in models.iter() {
            let base = model.settings.clone().unwrap_or_default();
            for (&version, ver) in &model.versions {
                let m = self.model_metrics(name, version);
                let loaded = ver.loaded.as_deref();
                let (queue, compute, total, batch_rows, rates) = m.report();
                let (depth, capacity) = loaded.map_or((0, 0), |l| l.scheduler.queue());
                let stats = loaded.map(|l| &l.scheduler.stats);
                let co = loaded.map(|l| &l.coalescer.stats);
                let get = |a: Option<&AtomicU64>| a.map_or(0, |a| a.load(Ordering::Relaxed));
                let (hits, misses) = (get(co.map(|c| &c.hits)), get(co.map(|c| &c.misses)));
                out.push(rxd_protocol::metrics::ModelMetrics {
                    name: name.clone(),
                    version,
                    state: ver.state,
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
                    memory_bytes: if ver.state == ModelState::Ready {
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
            .filter_map(|v| v.loaded.as_ref())
            .map(|l| l.scheduler.queue().0 as u64)
            .sum()
    }

    /// Versions whose queue is at least `fraction` full: (name:version, depth, capacity).
    pub fn saturated(&self, fraction: f64) -> Vec<(String, usize, usize)> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions.iter().filter_map(move |(v, ver)| {
                    let (depth, cap) = ver.loaded.as_ref()?.scheduler.queue();
                    (cap > 0 && depth as f64 >= fraction * cap as f64)
                        .then(|| (format!("{name}:{v}"), depth, cap))
                })
            })
            .collect()
    }

    /// Versions that are not resident because the budget refused them (their error says so).
    pub fn refused_by_budget(&self) -> Vec<String> {
        let refused = |ver: &Version| {
            ver.loaded.is_none()
                && ver.state != ModelState::Failed
                && ver
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("memory budget") || e.contains("can hold"))
        };
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions
                    .iter()
                    .filter(|(_, ver)| refused(ver))
                    .map(move |(v, _)| format!("{name}:{v}"))
            })
            .collect()
    }
}
