//! The metrics report (`metrics` request) and its rendering in Prometheus' text exposition
//! format. Pure data and formatting: the daemon fills a [`MetricsReport`]; `rxctl metrics
//! --prometheus` and the daemon's optional `/metrics` listener print [`prometheus`] of it.
//!
//! Values that a source does not report are `None` and are left out of the exposition — absent,
//! never a made-up zero (GPU figures on a machine without one, a budget that is unlimited).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::{DeviceSummary, ModelState};

/// Everything the daemon measures, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    pub uptime_ms: u64,
    pub process: ProcessMetrics,
    /// Request frames read, over the daemon's life.
    pub requests_total: u64,
    /// Answers that were errors, by error name (`busy`, `unknown_model`, ...).
    pub errors: BTreeMap<String, u64>,
    pub connections_open: u64,
    pub connections_total: u64,
    pub in_flight: u64,
    pub models: Vec<ModelMetrics>,
    pub devices: Vec<DeviceSummary>,
    /// GPUs the daemon can see (NVIDIA through NVML, AMD through amdgpu's sysfs files);
    /// empty when there are none.
    #[serde(default)]
    pub gpus: Vec<GpuMetrics>,
}

/// The daemon process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessMetrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// User + system CPU time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_fds: Option<u64>,
}

/// One model version. Counters count over the daemon's life (they survive evictions);
/// `recent` figures cover the last 10–20 seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub name: String,
    pub version: u64,
    pub state: ModelState,
    pub device: String,
    pub instances: u32,
    pub queue_depth: u64,
    pub queue_capacity: u64,
    /// Answers by outcome: `ok` or an error name.
    pub outcomes: BTreeMap<String, u64>,
    pub batches: u64,
    pub rows: u64,
    /// Zero rows run to pad batches to a configured batch size.
    #[serde(default)]
    pub padded_rows: u64,
    /// Rates over the last 1, 10 and 60 seconds.
    pub rates: Vec<Rate>,
    /// Waiting for a worker, per request.
    pub queue: Latency,
    /// Running a batch, per batch.
    pub compute: Latency,
    /// Queue + compute, per request.
    pub total: Latency,
    /// Rows per batch.
    pub batch_rows: Latency,
    pub cache_hits: u64,
    pub cache_misses: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit_rate: Option<f64>,
    pub cache_bytes: u64,
    pub coalesced: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    pub loads: u64,
    pub load_failures: u64,
    pub evictions: u64,
    pub load_seconds_total: f64,
    /// Settings in force (model.toml, then run-time changes).
    pub settings: ModelSettingsView,
}

/// A model's tunable settings as they are in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSettingsView {
    pub instances: u32,
    pub max_batch_rows: u32,
    pub max_queue_delay_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_target_ms: Option<f64>,
    pub queue_capacity: u64,
    pub default_priority: u8,
    /// 0 = strict priorities (no aging).
    pub priority_aging_ms: u64,
    pub cache_bytes: u64,
}

/// Rates over a window of the last `window_s` seconds (fewer just after start).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub window_s: u64,
    pub requests_per_s: f64,
    pub errors_per_s: f64,
    pub batches_per_s: f64,
    pub rows_per_s: f64,
}

/// A distribution: recent percentiles for people, cumulative buckets for Prometheus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Recent window (10–20 s): count, mean and percentiles, in milliseconds (for
    /// `batch_rows`: rows).
    pub recent: Summary,
    /// Since the version was first loaded: observations, their sum (seconds; for `batch_rows`:
    /// rows) and cumulative bucket counts (upper bound, observations ≤ it).
    pub count: u64,
    pub sum: f64,
    pub buckets: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// One GPU; each figure is absent where the driver does not report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuMetrics {
    /// `nvidia:0`, `amdgpu:card0`, ...
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
}

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as the text format writes it.
fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
                .collect();
            let _ = write!(self.text, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.text, " {}", num(value));
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, String)], h: &Latency) {
        for (le, count) in &h.buckets {
            let mut l = labels.to_vec();
            l.push(("le", num(*le)));
            self.sample(&format!("{name}_bucket"), &l, *count as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf".into()));
        self.sample(&format!("{name}_bucket"), &l, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

/// The report in Prometheus' text exposition format (version 0.0.4).
pub fn prometheus(r: &MetricsReport) -> String {
    let mut o = Out {
        text: String::new(),
    };
    o.family(
        "rxd_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    o.sample("rxd_uptime_seconds", &[], r.uptime_ms as f64 / 1000.0);
    if let Some(v) = r.process.rss_bytes {
        o.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        o.sample("process_resident_memory_bytes", &[], v as f64);
    }
    if let Some(v) = r.process.cpu_seconds {
        o.family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        o.sample("process_cpu_seconds_total", &[], v);
    }
    if let Some(v) = r.process.threads {
        o.family(
            "rxd_process_threads",
            "gauge",
            "Threads of the daemon process.",
        );
        o.sample("rxd_process_threads", &[], v as f64);
    }
    if let Some(v) = r.process.open_fds {
        o.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        o.sample("process_open_fds", &[], v as f64);
    }
    o.family(
        "rxd_connections_open",
        "gauge",
        "Client connections open now.",
    );
    o.sample("rxd_connections_open", &[], r.connections_open as f64);
    o.family(
        "rxd_connections_total",
        "counter",
        "Client connections accepted.",
    );
    o.sample("rxd_connections_total", &[], r.connections_total as f64);
    o.family(
        "rxd_requests_in_flight",
        "gauge",
        "Requests read and not yet answered.",
    );
    o.sample("rxd_requests_in_flight", &[], r.in_flight as f64);
    o.family("rxd_requests_total", "counter", "Request frames read.");
    o.sample("rxd_requests_total", &[], r.requests_total as f64);
    o.family(
        "rxd_request_errors_total",
        "counter",
        "Requests answered with an error, by error code.",
    );
    for (code, n) in &r.errors {
        o.sample(
            "rxd_request_errors_total",
            &[("code", code.clone())],
            *n as f64,
        );
    }

    let ml = |m: &ModelMetrics| {
        vec![
            ("model", m.name.clone()),
            ("version", m.version.to_string()),
        ]
    };
    macro_rules! per_model {
        ($name:expr, $kind:expr, $help:expr, $value:expr) => {
            o.family($name, $kind, $help);
            for m in &r.models {
                let v: Option<f64> = $value(m);
                if let Some(v) = v {
                    o.sample($name, &ml(m), v);
                }
            }
        };
    }
    o.family(
        "rxd_model_requests_total",
        "counter",
        "Inference requests answered, by outcome (ok or an error code).",
    );
    for m in &r.models {
        for (outcome, n) in &m.outcomes {
            let mut l = ml(m);
            l.push(("outcome", outcome.clone()));
            o.sample("rxd_model_requests_total", &l, *n as f64);
        }
    }
    o.family(
        "rxd_model_state",
        "gauge",
        "1 for the model version's lifecycle state.",
    );
    for m in &r.models {
        let mut l = ml(m);
        l.push(("state", m.state.name().into()));
        o.sample("rxd_model_state", &l, 1.0);
    }
    per_model!(
        "rxd_model_batches_total",
        "counter",
        "Batches run.",
        |m: &ModelMetrics| Some(m.batches as f64)
    );
    per_model!(
        "rxd_model_rows_total",
        "counter",
        "Rows (items) run.",
        |m: &ModelMetrics| Some(m.rows as f64)
    );
    per_model!(
        "rxd_model_padded_rows_total",
        "counter",
        "Zero rows run to pad batches up to a configured batch size.",
        |m: &ModelMetrics| Some(m.padded_rows as f64)
    );
    per_model!(
        "rxd_model_queue_depth",
        "gauge",
        "Requests waiting for a worker.",
        |m: &ModelMetrics| Some(m.queue_depth as f64)
    );
    per_model!(
        "rxd_model_queue_capacity",
        "gauge",
        "Requests that may wait before new ones get busy.",
        |m: &ModelMetrics| Some(m.queue_capacity as f64)
    );
    per_model!(
        "rxd_model_instances",
        "gauge",
        "Sessions (worker threads) serving the version.",
        |m: &ModelMetrics| Some(f64::from(m.instances))
    );
    per_model!(
        "rxd_model_cache_hits_total",
        "counter",
        "Result cache hits.",
        |m: &ModelMetrics| Some(m.cache_hits as f64)
    );
    per_model!(
        "rxd_model_cache_misses_total",
        "counter",
        "Result cache misses.",
        |m: &ModelMetrics| Some(m.cache_misses as f64)
    );
    per_model!(
        "rxd_model_cache_bytes",
        "gauge",
        "Bytes held by the result cache.",
        |m: &ModelMetrics| Some(m.cache_bytes as f64)
    );
    per_model!(
        "rxd_model_coalesced_total",
        "counter",
        "Requests answered by joining an identical request in flight.",
        |m: &ModelMetrics| Some(m.coalesced as f64)
    );
    per_model!(
        "rxd_model_memory_bytes",
        "gauge",
        "Bytes accounted to the resident version on its device.",
        |m: &ModelMetrics| m.memory_bytes.map(|b| b as f64)
    );
    per_model!(
        "rxd_model_loads_total",
        "counter",
        "Loads (at start, on demand, by an admin).",
        |m: &ModelMetrics| Some(m.loads as f64)
    );
    per_model!(
        "rxd_model_load_failures_total",
        "counter",
        "Loads that failed (including over budget).",
        |m: &ModelMetrics| Some(m.load_failures as f64)
    );
    per_model!(
        "rxd_model_evictions_total",
        "counter",
        "Evictions to make room for other models.",
        |m: &ModelMetrics| Some(m.evictions as f64)
    );
    per_model!(
        "rxd_model_load_seconds_total",
        "counter",
        "Time spent creating sessions and warming up.",
        |m: &ModelMetrics| Some(m.load_seconds_total)
    );

    for (name, help, pick) in [
        (
            "rxd_model_queue_duration_seconds",
            "Time requests waited for a worker.",
            (|m: &ModelMetrics| &m.queue) as fn(&ModelMetrics) -> &Latency,
        ),
        (
            "rxd_model_compute_duration_seconds",
            "Time batches ran in ONNX Runtime.",
            |m: &ModelMetrics| &m.compute,
        ),
        (
            "rxd_model_request_duration_seconds",
            "Queue plus compute time of requests.",
            |m: &ModelMetrics| &m.total,
        ),
        (
            "rxd_model_batch_rows",
            "Rows per batch run.",
            |m: &ModelMetrics| &m.batch_rows,
        ),
    ] {
        o.family(name, "histogram", help);
        for m in &r.models {
            o.histogram(name, &ml(m), pick(m));
        }
    }

    o.family(
        "rxd_device_memory_used_bytes",
        "gauge",
        "Bytes accounted to models on the device.",
    );
    for d in &r.devices {
        o.sample(
            "rxd_device_memory_used_bytes",
            &[("device", d.name.clone())],
            d.used_bytes as f64,
        );
    }
    o.family(
        "rxd_device_memory_budget_bytes",
        "gauge",
        "The device's memory budget (absent when unlimited).",
    );
    for d in &r.devices {
        if let Some(b) = d.budget_bytes {
            o.sample(
                "rxd_device_memory_budget_bytes",
                &[("device", d.name.clone())],
                b as f64,
            );
        }
    }
    type DeviceFigure = fn(&crate::DeviceLoad) -> f64;
    let per_device: [(&str, &str, &str, DeviceFigure); 6] = [
        (
            "rxd_device_busy_ratio",
            "gauge",
            "Share of recent wall time (rxd_device_load_window_seconds) in which a worker on the device ran a batch.",
            |l| l.busy_ratio,
        ),
        (
            "rxd_device_busy_seconds_total",
            "counter",
            "Seconds in which at least one worker on the device ran a batch.",
            |l| l.busy_seconds_total,
        ),
        (
            "rxd_device_queue_depth",
            "gauge",
            "Requests waiting for a worker, all model versions on the device.",
            |l| l.queue_depth as f64,
        ),
        (
            "rxd_device_rows_total",
            "counter",
            "Rows (items) run on the device, padding excluded.",
            |l| l.rows_total as f64,
        ),
        (
            "rxd_device_rows_per_second",
            "gauge",
            "Rows run per second over the recent window (rxd_device_load_window_seconds).",
            |l| l.rows_per_s,
        ),
        (
            "rxd_device_load_window_seconds",
            "gauge",
            "The window the device's busy ratio and rows per second cover.",
            |l| l.window_s,
        ),
    ];
    for (name, kind, help, pick) in per_device {
        o.family(name, kind, help);
        for d in &r.devices {
            if let Some(l) = &d.load {
                o.sample(name, &[("device", d.name.clone())], pick(l));
            }
        }
    }
    o.family(
        "rxd_device_capability",
        "gauge",
        "1 for how the device supports a kind of arithmetic (native, emulated, absent), as probed at start.",
    );
    for d in &r.devices {
        if let Some(c) = &d.capabilities {
            for (cap, support) in [("float16", c.float16), ("int8", c.int8)] {
                o.sample(
                    "rxd_device_capability",
                    &[
                        ("device", d.name.clone()),
                        ("capability", cap.into()),
                        ("support", support.name().into()),
                    ],
                    1.0,
                );
            }
        }
    }
    if !r.gpus.is_empty() {
        o.family(
            "rxd_gpu_utilization_ratio",
            "gauge",
            "GPU busy fraction (0-1).",
        );
        for g in &r.gpus {
            if let Some(u) = g.utilization {
                o.sample("rxd_gpu_utilization_ratio", &[("gpu", g.id.clone())], u);
            }
        }
        o.family("rxd_gpu_memory_used_bytes", "gauge", "GPU memory in use.");
        for g in &r.gpus {
            if let Some(u) = g.memory_used_bytes {
                o.sample(
                    "rxd_gpu_memory_used_bytes",
                    &[("gpu", g.id.clone())],
                    u as f64,
                );
            }
        }
        o.family("rxd_gpu_memory_total_bytes", "gauge", "GPU memory size.");
        for g in &r.gpus {
            if let Some(u) = g.memory_total_bytes {
                o.sample(
                    "rxd_gpu_memory_total_bytes",
                    &[("gpu", g.id.clone())],
                    u as f64,
                );
            }
        }
    }
    o.text
}
