//! The daemon's reports, assembled from the registry, the counters and the configuration:
//! status, health (with every reason named) and the metrics report (served over the socket and
//! by the Prometheus exporter).
//! Boundary: reads only; nothing here changes the daemon's state.

use rxd_protocol::{Health, HealthState, ModelState, PROTOCOL_VERSION, Status};

use crate::SharedRef;
use crate::metrics::Metrics;

/// The configuration in force: the start-up configuration with what a reload changed.
fn config_in_force(shared: &SharedRef) -> std::collections::BTreeMap<String, String> {
    let mut m = shared.config.in_force();
    m.insert(
        "load-on-demand".into(),
        shared.registry.load_on_demand().to_string(),
    );
    m.insert(
        "preload".into(),
        shared
            .preload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join(","),
    );
    for d in &shared.config.devices {
        let live = shared
            .registry
            .device_budget(&d.name)
            .filter(|&b| b != u64::MAX);
        m.insert(
            format!("device.{}.memory-budget", d.name),
            live.map_or("unlimited".into(), |b| b.to_string()),
        );
    }
    m
}

/// Every metric, assembled from the global counters, the registry and /proc.
pub fn metrics(shared: &SharedRef) -> rxd_protocol::MetricsReport {
    let m = &shared.metrics;
    rxd_protocol::MetricsReport {
        uptime_ms: uptime_ms(shared),
        process: crate::metrics::process(),
        requests_total: Metrics::get(&m.requests_total),
        errors: m.errors.snapshot(),
        connections_open: Metrics::get(&m.connections_open),
        connections_total: Metrics::get(&m.connections_total),
        in_flight: Metrics::get(&m.in_flight),
        models: shared.registry.model_metrics_report(),
        devices: shared.registry.devices(),
        gpus: crate::gpu::metrics(),
    }
}

fn uptime_ms(shared: &SharedRef) -> u64 {
    shared.started.elapsed().as_millis() as u64
}

pub fn status(shared: &SharedRef) -> Status {
    let (ready, failed) = shared.registry.counts();
    let m = &shared.metrics;
    Status {
        server: crate::SERVER_NAME.into(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        uptime_ms: uptime_ms(shared),
        socket: shared.config.socket.display().to_string(),
        model_repository: shared.config.model_repository.display().to_string(),
        ort_version: shared.registry.runtime().version().into(),
        ort_library: shared.registry.runtime().library().display().to_string(),
        intra_op_threads: shared.registry.cores(),
        models_ready: ready,
        models_failed: failed,
        connections: Metrics::get(&m.connections_open),
        requests_total: Metrics::get(&m.requests_total),
        requests_failed: Metrics::get(&m.requests_failed),
        in_flight: Metrics::get(&m.in_flight),
        config: config_in_force(shared),
    }
}

/// What a non-admin sees of a version's summary: a device's failed run is named, not its
/// error — ONNX Runtime's message is about a batch that may have been another user's (its
/// shapes, its sizes).
pub fn redact(m: &mut rxd_protocol::ModelSummary) {
    redact_shares(&mut m.shares);
}

fn redact_shares(shares: &mut [rxd_protocol::DeviceShare]) {
    for s in shares {
        if s.error.is_some() {
            s.error = Some("a run on this device failed (the error is shown to admins)".into());
        }
    }
}

/// Health: unhealthy when a worker is stuck or no model version can serve; degraded when a
/// model failed to load, a queue is nearly full, or the memory budget keeps a served version
/// out; healthy otherwise. Every reason is named. The last error is shown in full to admins
/// only (`admin`); others see its code and model.
pub fn health(shared: &SharedRef, admin: bool) -> Health {
    let mut models = shared.registry.list();
    if !admin {
        models.iter_mut().for_each(redact);
    }
    let ready = models
        .iter()
        .filter(|m| m.state == ModelState::Ready)
        .count() as u32;
    let servable = models
        .iter()
        .filter(|m| {
            m.state == ModelState::Ready
                || m.state == ModelState::Loading
                || (shared.registry.load_on_demand()
                    && m.served
                    && matches!(m.state, ModelState::Available | ModelState::Evicted))
        })
        .count() as u32;
    let mut unhealthy: Vec<String> = Vec::new();
    let mut degraded: Vec<String> = Vec::new();
    for m in shared.registry.stuck(shared.config.watchdog_stuck) {
        unhealthy.push(format!("model {m}: a worker is stuck on one batch"));
    }
    if servable == 0 && !models.is_empty() {
        unhealthy.push("no model version can serve".into());
    }
    for m in models.iter().filter(|m| m.state == ModelState::Failed) {
        degraded.push(format!(
            "model '{}' version {} failed to load: {}",
            m.name,
            m.version,
            m.error.as_deref().unwrap_or("unknown error")
        ));
    }
    for m in models.iter().filter(|m| m.fallback.is_some()) {
        degraded.push(format!(
            "model '{}' version {} runs on the CPU instead of its device: {}",
            m.name,
            m.version,
            m.fallback.as_deref().unwrap_or("")
        ));
    }
    for m in &models {
        for s in m.shares.iter().filter(|s| s.state == "failed") {
            degraded.push(format!(
                "device '{}' fails its runs (model '{}' version {} serves on its other devices; \
                 the device is tried again later): {}",
                s.device,
                m.name,
                m.version,
                s.error.as_deref().unwrap_or("")
            ));
        }
    }
    for (m, depth, cap) in shared.registry.saturated(0.9) {
        degraded.push(format!(
            "model {m}: queue saturated ({depth} of {cap} waiting)"
        ));
    }
    for m in shared.registry.refused_by_budget() {
        degraded.push(format!(
            "model {m}: memory budget exhausted (it does not fit next to the pinned or busy models)"
        ));
    }
    let state = if !unhealthy.is_empty() {
        HealthState::Unhealthy
    } else if !degraded.is_empty() {
        HealthState::Degraded
    } else {
        HealthState::Healthy
    };
    let devices = shared.registry.devices();
    Health {
        state,
        reasons: unhealthy.into_iter().chain(degraded).collect(),
        ready: true,
        models_loaded: ready,
        uptime_ms: uptime_ms(shared),
        last_error: shared.metrics.last_error(admin),
        engine_running: true,
        models_servable: servable,
        workers: models.iter().map(|m| m.instances).sum(),
        queue_size: shared.registry.queue_size(),
        models_memory_bytes: devices.iter().map(|d| d.used_bytes).sum(),
        rss_bytes: crate::metrics::resident_bytes(),
        gpu_available: !crate::gpu::metrics().is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A non-admin sees that a device's run failed, never ONNX Runtime's words about it
    /// (another user's batch: its shapes, its sizes).
    #[test]
    fn a_devices_run_error_is_named_not_shown() {
        let share = |error: Option<&str>| rxd_protocol::DeviceShare {
            device: "gpu".into(),
            instances: 1,
            batches: 1,
            rows: 0,
            memory_bytes: None,
            state: "failed".into(),
            error: error.map(String::from),
        };
        let mut shares = vec![share(Some("input [7,3,4096] needs 12 GiB")), share(None)];
        redact_shares(&mut shares);
        let e = shares[0].error.as_deref().unwrap();
        assert!(!e.contains("4096") && e.contains("admins"), "{e}");
        assert!(shares[1].error.is_none());
    }
}
