//! What rxctl prints for people: each reply rendered as text by a pure function (the same
//! reply gives the same text; nothing here talks to the daemon), tested without one.

use std::fmt::Write;

use rxd_client::protocol::{
    DeviceSummary, Health, ModelInfo, ModelSettingsView, ModelSummary, Status, TensorSpec,
};

/// `rxctl status`.
pub fn status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{} (protocol {}), pid {}", s.server, s.protocol, s.pid);
    let _ = writeln!(o, "uptime:       {:.1} s", s.uptime_ms as f64 / 1000.0);
    let _ = writeln!(o, "socket:       {}", s.socket);
    let _ = writeln!(o, "repository:   {}", s.model_repository);
    let _ = writeln!(o, "onnxruntime:  {} ({})", s.ort_version, s.ort_library);
    let _ = writeln!(
        o,
        "threads:      {} intra-op per instance",
        s.intra_op_threads
    );
    let _ = writeln!(
        o,
        "models:       {} ready, {} failed",
        s.models_ready, s.models_failed
    );
    let _ = writeln!(
        o,
        "requests:     {} total, {} failed, {} in flight; {} connections",
        s.requests_total, s.requests_failed, s.in_flight, s.connections
    );
    let _ = writeln!(o, "configuration in force:");
    for (k, v) in &s.config {
        let _ = writeln!(o, "  {k} = {v}");
    }
    o
}

/// `rxctl health`.
pub fn health(h: &Health) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({} model versions ready, {} can serve; {} workers, {} queued; \
         models use {}, process {}; GPU {})",
        h.state.name(),
        h.models_loaded,
        h.models_servable,
        h.workers,
        h.queue_size,
        size_text(h.models_memory_bytes),
        h.rss_bytes.map_or("?".into(), size_text),
        if h.gpu_available { "available" } else { "none" }
    );
    for r in &h.reasons {
        let _ = writeln!(o, "  - {r}");
    }
    if let Some(e) = &h.last_error {
        let _ = writeln!(o, "last error: {e}");
    }
    o
}

/// `rxctl models`: one row per version.
pub fn models(models: &[ModelSummary]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:>7}  {:<9} {:<6} {:>9} {:>10}  {:<6} ERROR",
        "MODEL", "VERSION", "STATE", "SERVED", "INSTANCES", "MEMORY", "DEVICE"
    );
    for m in models {
        let served = match (m.served, m.pinned) {
            (_, true) => "pinned",
            (true, _) => "yes",
            _ => "no",
        };
        let _ = writeln!(
            o,
            "{:<24} {:>7}  {:<9} {:<6} {:>9} {:>10}  {:<6} {}",
            m.name,
            m.version,
            m.state.name(),
            served,
            m.instances,
            m.memory_bytes.map(size_text).unwrap_or_default(),
            devices_text(m),
            m.error.as_deref().unwrap_or("")
        );
    }
    o
}

/// The device a version runs on, or every device it has instances on (`cpu-a+cpu-b`).
fn devices_text(m: &ModelSummary) -> String {
    if m.shares.is_empty() {
        return m.device.clone();
    }
    m.shares
        .iter()
        .map(|s| s.device.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// One line per device of a version on several: its instances, what was routed there, its
/// memory and state.
fn shares_text(s: &ModelSummary) -> String {
    let mut o = String::new();
    for d in &s.shares {
        let _ = writeln!(
            o,
            "  on {}: {} instance(s), {} batches, {} rows, {}, {}{}",
            d.device,
            d.instances,
            d.batches,
            d.rows,
            d.memory_bytes.map(size_text).unwrap_or_else(|| "-".into()),
            d.state,
            d.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    o
}

/// Versions after `rxctl rebalance`: each with the devices it now runs on.
pub fn placed(models: &[ModelSummary]) -> String {
    let mut o = String::new();
    if models.is_empty() {
        o.push_str("nothing resident to place\n");
    }
    for m in models {
        let _ = writeln!(
            o,
            "{} version {}: {} instance(s) on {}",
            m.name,
            m.version,
            m.instances,
            devices_text(m)
        );
    }
    o
}

/// `rxctl models NAME`.
pub fn model_info(info: &ModelInfo) -> String {
    let mut o = String::new();
    let s = &info.summary;
    let _ = writeln!(
        o,
        "{} version {}: {} on {}, {} instance(s){}",
        s.name,
        s.version,
        s.state.name(),
        s.device,
        s.instances,
        if s.pinned { ", pinned" } else { "" }
    );
    if !s.shares.is_empty() {
        let _ = writeln!(
            o,
            "on {} devices ({} share eviction(s)):",
            s.shares.len(),
            s.share_evictions
        );
        o.push_str(&shares_text(s));
    }
    if let Some(b) = s.memory_bytes {
        let _ = writeln!(
            o,
            "memory: {} measured ({} estimated), loaded and warmed up in {} ms, \
             evicted {} time(s)",
            size_text(b),
            s.estimated_bytes
                .map(size_text)
                .unwrap_or_else(|| "not".into()),
            s.load_ms.unwrap_or(0),
            s.evictions
        );
    }
    if let Some(ep) = &s.ep {
        let nodes: Vec<String> = s
            .node_placement
            .iter()
            .map(|(ep, n)| format!("{n} on {ep}"))
            .collect();
        let _ = writeln!(
            o,
            "execution provider: {ep}{}",
            if nodes.is_empty() {
                String::new()
            } else {
                format!("; nodes: {}", nodes.join(", "))
            }
        );
        if !s.nodes_on_cpu.is_empty() {
            let _ = writeln!(o, "nodes on the CPU: {}", s.nodes_on_cpu.join(", "));
        }
    }
    if !s.batch_sizes.is_empty() {
        let sizes: Vec<String> = s.batch_sizes.iter().map(u32::to_string).collect();
        let _ = writeln!(
            o,
            "batches padded to {} rows ({} rows of padding run, {} real rows)",
            sizes.join("/"),
            s.padded_rows,
            s.rows
        );
    }
    if let Some(f) = &s.fallback {
        let _ = writeln!(o, "FALLBACK: runs on the CPU: {f}");
    }
    if let Some(c) = &s.compression {
        let _ = writeln!(o, "compression: {c}");
    }
    if let Some(d) = &info.dequantized {
        let _ = writeln!(o, "{}", dequantized(d));
    }
    if let Some(v) = &info.settings {
        let _ = writeln!(
            o,
            "settings: {}, cache-bytes {}",
            scheduling(v),
            cache_text(v.cache_bytes)
        );
    }
    if let Some(t) = &info.tuning {
        let _ = writeln!(o, "{}", tuning(t));
    }
    if let Some(why) = &info.not_tuned {
        let _ = writeln!(o, "not tuned: {why}");
    }
    let _ = writeln!(o, "inputs:");
    for t in &info.inputs {
        let _ = writeln!(o, "  {}", spec_text(t));
    }
    let _ = writeln!(o, "outputs:");
    for t in &info.outputs {
        let _ = writeln!(o, "  {}", spec_text(t));
    }
    o
}

/// What load-time tuning chose, why, and the table it measured.
pub fn tuning(t: &rxd_client::protocol::Tuning) -> String {
    let mut o = format!(
        "tuning ({}): {} session(s) × {} thread(s), batches up to {} rows, latency target \
         {:.2} ms — {}\n  sessions × threads  rows  items/s  ms/batch",
        if t.cached {
            "from the cache".to_string()
        } else {
            format!("measured in {} ms", t.measured_ms)
        },
        t.instances,
        t.threads,
        t.max_batch_rows,
        t.latency_target_ms,
        t.reason
    );
    for c in &t.table {
        let chosen =
            c.instances == t.instances && c.threads == t.threads && c.rows == t.max_batch_rows;
        let _ = write!(
            o,
            "\n  {:>8} × {:<8} {:>5} {:>8.0} {:>9.3}{}",
            c.instances,
            c.threads,
            c.rows,
            c.items_per_s,
            c.run_ms,
            if chosen { "  ← chosen" } else { "" }
        );
    }
    o
}

/// A version and its state (`rxctl load`, `rxctl reload`).
pub fn state(s: &ModelSummary) -> String {
    format!("{} version {}: {}\n", s.name, s.version, s.state.name())
}

/// A version after `rxctl pin` or `unpin`.
pub fn pinned(s: &ModelSummary) -> String {
    format!(
        "{} version {}: {}{}\n",
        s.name,
        s.version,
        s.state.name(),
        if s.pinned { ", pinned" } else { ", not pinned" }
    )
}

/// The settings in force after `rxctl configure`.
pub fn configured(model: &str, v: &ModelSettingsView) -> String {
    format!(
        "{model}: instances {}, {}{}, cache-bytes {}\n",
        v.instances,
        scheduling(v),
        if v.priority_aging_ms == 0 {
            " (strict)"
        } else {
            ""
        },
        cache_text(v.cache_bytes)
    )
}

/// A version's batching and priority settings.
fn scheduling(v: &ModelSettingsView) -> String {
    format!(
        "max-batch-rows {}, max-queue-delay-us {}, latency-target-ms {}, queue-capacity {}, \
         default-priority {}, priority-aging-ms {}",
        v.max_batch_rows,
        v.max_queue_delay_us,
        v.latency_target_ms.map_or("off".into(), |t| format!("{t}")),
        v.queue_capacity,
        v.default_priority,
        v.priority_aging_ms,
    )
}

/// `rxctl devices`: two lines per device.
pub fn devices(devices: &[DeviceSummary]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<12} {:<8} {:>10} {:>10} {:>10} {:>10}  MODELS (least recently used first)",
        "DEVICE", "KIND", "BUDGET", "USED", "FREE", "DEV MEM"
    );
    for d in devices {
        let _ = writeln!(
            o,
            "{:<12} {:<8} {:>10} {:>10} {:>10} {:>10}  {}",
            d.name,
            d.kind,
            d.budget_bytes.map_or("unlimited".into(), size_text),
            size_text(d.used_bytes),
            d.free_bytes.map_or("-".into(), size_text),
            match (d.memory_used_bytes, d.memory_total_bytes) {
                (Some(u), Some(t)) => format!("{}/{}", size_text(u), size_text(t)),
                _ => "-".into(),
            },
            d.models.join(", ")
        );
        let _ = writeln!(
            o,
            "  {}{}{}",
            d.ep,
            d.adapter
                .as_deref()
                .map(|a| format!(" on {a}"))
                .unwrap_or_default(),
            d.error
                .as_deref()
                .map(|e| format!("; unusable: {e}"))
                .unwrap_or_default()
        );
        let mut more = Vec::new();
        if let Some(c) = &d.cores {
            more.push(format!("cores {c}"));
        }
        if let Some(c) = &d.capabilities {
            more.push(format!(
                "float16 {}, int8 {}",
                c.float16.name(),
                c.int8.name()
            ));
        }
        if let Some(l) = &d.load {
            more.push(format!(
                "busy {:.0}%, {:.1} rows/s (last {:.0} s), {} queued; {} rows, {:.1} s busy in all",
                l.busy_ratio * 100.0,
                l.rows_per_s,
                l.window_s,
                l.queue_depth,
                l.rows_total,
                l.busy_seconds_total
            ));
        }
        if !more.is_empty() {
            let _ = writeln!(o, "  {}", more.join("; "));
        }
    }
    o
}

/// A cache size for people: `off`, or `64.0 MiB`.
pub fn cache_text(bytes: u64) -> String {
    if bytes == 0 {
        "off".into()
    } else {
        size_text(bytes)
    }
}

/// What dequantize-at-load did to a weights-only file.
fn dequantized(d: &rxd_client::protocol::Dequantized) -> String {
    let left = match d.remaining {
        0 => String::new(),
        n => format!(", {n} DequantizeLinear of computed values left"),
    };
    format!(
        "dequantized at load: {} DequantizeLinear folded into float weights ({} on disk, {} \
         served{left})",
        d.folded,
        size_text(d.file_bytes),
        size_text(d.served_bytes)
    )
}

/// Bytes for people: `12.3 MiB`.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn spec_text(t: &TensorSpec) -> String {
    let list = |v: &[u64]| {
        let parts: Vec<String> = v.iter().map(u64::to_string).collect();
        format!("[{}]", parts.join(", "))
    };
    let mut text = format!("{:<24} {:<8} {}", t.name, t.dtype.name(), t.dims_text());
    if !t.warmup_dims.is_empty() {
        text.push_str(&format!("  warmup {}", list(&t.warmup_dims)));
    }
    if let Some(v) = t.warmup_value {
        text.push_str(&format!("  warmup value {v}"));
    }
    if !t.max_dims.is_empty() {
        text.push_str(&format!("  at most {}", list(&t.max_dims)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn summary(extra: serde_json::Value) -> ModelSummary {
        let mut v = json!({
            "name": "digits", "version": 2, "state": "ready", "instances": 1, "device": "cpu",
            "batchable": true, "requests": 0, "batches": 0, "rows": 0, "padded_rows": 0,
            "cache_hits": 0, "cache_misses": 0, "cache_bytes": 0, "coalesced": 0,
            "pinned": false, "served": true, "loads": 1, "evictions": 0,
        });
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(size_text(512), "512 B");
        assert_eq!(size_text(1536), "1.5 KiB");
        assert_eq!(size_text(3 << 30), "3.0 GiB");
        assert_eq!(cache_text(0), "off");
        assert_eq!(cache_text(64 << 20), "64.0 MiB");
    }

    #[test]
    fn the_models_table_has_a_row_per_version_and_says_what_is_pinned_or_failed() {
        let text = models(&[
            summary(json!({"pinned": true, "memory_bytes": 2_097_152})),
            summary(
                json!({"name": "vad", "version": 1, "state": "failed", "served": false,
                           "error": "no such op"}),
            ),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("MODEL"), "{text}");
        assert!(lines[1].starts_with("digits"), "{text}");
        assert!(
            lines[1].contains("pinned") && lines[1].contains("2.0 MiB"),
            "{text}"
        );
        assert!(
            lines[2].contains("failed") && lines[2].contains(" no  "),
            "{text}"
        );
        assert!(lines[2].ends_with("no such op"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_version_on_several_devices_shows_each_share() {
        let s = summary(json!({
            "instances": 2, "share_evictions": 1,
            "shares": [
                {"device": "cpu-a", "instances": 1, "batches": 7, "rows": 9,
                 "memory_bytes": 1_048_576, "state": "serving"},
                {"device": "cpu-b", "instances": 1, "batches": 3, "rows": 3,
                 "state": "failed", "error": "lost"},
            ],
        }));
        let table = models(std::slice::from_ref(&s));
        assert!(
            table
                .lines()
                .nth(1)
                .is_some_and(|l| l.contains("cpu-a+cpu-b")),
            "{table}"
        );
        let info = ModelInfo {
            summary: s,
            inputs: Vec::new(),
            outputs: Vec::new(),
            settings: None,
            tuning: None,
            not_tuned: None,
            dequantized: None,
        };
        let text = model_info(&info);
        assert!(
            text.contains("on 2 devices (1 share eviction(s)):\n"),
            "{text}"
        );
        assert!(
            text.contains("  on cpu-a: 1 instance(s), 7 batches, 9 rows, 1.0 MiB, serving\n"),
            "{text}"
        );
        assert!(
            text.contains("  on cpu-b: 1 instance(s), 3 batches, 3 rows, -, failed: lost\n"),
            "{text}"
        );
    }

    #[test]
    fn state_lines_name_the_version() {
        let s = summary(json!({}));
        assert_eq!(state(&s), "digits version 2: ready\n");
        assert_eq!(pinned(&s), "digits version 2: ready, not pinned\n");
        let p = summary(json!({"pinned": true}));
        assert_eq!(pinned(&p), "digits version 2: ready, pinned\n");
    }

    #[test]
    fn configured_settings_say_when_priorities_are_strict() {
        let v: ModelSettingsView = serde_json::from_value(json!({
            "instances": 2, "max_batch_rows": 8, "max_queue_delay_us": 0,
            "latency_target_ms": null, "queue_capacity": 64, "default_priority": 0,
            "priority_aging_ms": 0, "cache_bytes": 0,
        }))
        .unwrap();
        assert_eq!(
            configured("digits", &v),
            "digits: instances 2, max-batch-rows 8, max-queue-delay-us 0, latency-target-ms \
             off, queue-capacity 64, default-priority 0, priority-aging-ms 0 (strict), \
             cache-bytes off\n"
        );
    }

    #[test]
    fn health_names_every_reason_and_the_last_error() {
        let h: Health = serde_json::from_value(json!({
            "state": "degraded", "reasons": ["model 'vad' version 1 failed to load: x"],
            "ready": true, "models_loaded": 1, "uptime_ms": 5, "models_servable": 1,
            "workers": 2, "queue_size": 0, "models_memory_bytes": 1024,
            "last_error": "load_failed (vad)",
        }))
        .unwrap();
        let text = health(&h);
        assert_eq!(
            text,
            "degraded (1 model versions ready, 1 can serve; 2 workers, 0 queued; models use \
             1.0 KiB, process ?; GPU none)\n  - model 'vad' version 1 failed to load: x\n\
             last error: load_failed (vad)\n"
        );
    }

    #[test]
    fn devices_show_budget_use_and_why_a_device_is_unusable() {
        let d: DeviceSummary = serde_json::from_value(json!({
            "name": "gpu", "kind": "webgpu", "ep": "WebGpuExecutionProvider",
            "error": "no adapter", "budget_bytes": 1_073_741_824u64, "used_bytes": 0,
            "free_bytes": 1_073_741_824u64, "models": [],
        }))
        .unwrap();
        let text = devices(&[d]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("gpu          webgpu"), "{text}");
        assert!(lines[1].contains("1.0 GiB"), "{text}");
        assert_eq!(lines[2], "  WebGpuExecutionProvider; unusable: no adapter");
    }

    #[test]
    fn devices_show_capabilities_and_load_where_the_daemon_reports_them() {
        let d: DeviceSummary = serde_json::from_value(json!({
            "name": "gpu0", "kind": "webgpu", "ep": "WebGpuExecutionProvider",
            "used_bytes": 0, "models": ["yolo:1"],
            "capabilities": {"float16": "absent", "int8": "native", "bf16": "native"},
            "load": {"busy_ratio": 0.5, "rows_per_s": 120.0, "window_s": 10.0,
                     "queue_depth": 3, "busy_seconds_total": 61.25, "rows_total": 9000,
                     "batches_total": 800},
        }))
        .unwrap();
        let text = devices(&[d]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[3],
            "  float16 absent, int8 native; busy 50%, 120.0 rows/s (last 10 s), 3 queued; \
             9000 rows, 61.2 s busy in all"
        );
        // A capability value this build does not know reads as unknown.
        let d: DeviceSummary = serde_json::from_value(json!({
            "name": "x", "kind": "cpu", "used_bytes": 0, "models": [],
            "capabilities": {"float16": "bfloat-only"},
        }))
        .unwrap();
        assert!(devices(&[d]).contains("float16 unknown, int8 unknown"));
    }

    #[test]
    fn status_says_what_the_daemon_is_and_the_configuration_in_force() {
        let s: Status = serde_json::from_value(json!({
            "server": "rxd 0.1.0", "protocol": 3, "pid": 42, "uptime_ms": 1500,
            "socket": "/run/rxd/rxd.sock", "model_repository": "/srv/models",
            "ort_version": "1.31.1", "ort_library": "libonnxruntime.so", "intra_op_threads": 1,
            "models_ready": 2, "models_failed": 1, "connections": 3, "requests_total": 10,
            "requests_failed": 1, "in_flight": 0, "config": {"memory-budget": "512 MiB"},
        }))
        .unwrap();
        assert_eq!(
            status(&s),
            "rxd 0.1.0 (protocol 3), pid 42\n\
             uptime:       1.5 s\n\
             socket:       /run/rxd/rxd.sock\n\
             repository:   /srv/models\n\
             onnxruntime:  1.31.1 (libonnxruntime.so)\n\
             threads:      1 intra-op per instance\n\
             models:       2 ready, 1 failed\n\
             requests:     10 total, 1 failed, 0 in flight; 3 connections\n\
             configuration in force:\n  memory-budget = 512 MiB\n"
        );
    }

    #[test]
    fn model_info_shows_memory_placement_and_every_input_and_output() {
        let mut v = serde_json::to_value(summary(json!({
            "memory_bytes": 2_097_152, "estimated_bytes": 1_048_576, "load_ms": 30,
            "ep": "CPUExecutionProvider", "node_placement": {"CPUExecutionProvider": 12},
            "pinned": true,
        })))
        .unwrap();
        let more = json!({
            "inputs": [{"name": "input", "dtype": "float32", "dims": [-1, 64],
                        "dim_names": ["batch", ""], "warmup_dims": [1, 64],
                        "max_dims": [32, 64]}],
            "outputs": [{"name": "label", "dtype": "int64", "dims": [-1],
                         "dim_names": ["?x"]}],
        });
        if let (Some(v), Some(more)) = (v.as_object_mut(), more.as_object()) {
            v.extend(more.clone());
        }
        let info: ModelInfo = serde_json::from_value(v).unwrap();
        let text = model_info(&info);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0], "digits version 2: ready on cpu, 1 instance(s), pinned",
            "{text}"
        );
        assert_eq!(
            lines[1],
            "memory: 2.0 MiB measured (1.0 MiB estimated), loaded and warmed up in 30 ms, \
             evicted 0 time(s)"
        );
        assert_eq!(
            lines[2],
            "execution provider: CPUExecutionProvider; nodes: 12 on CPUExecutionProvider"
        );
        assert_eq!(lines[3], "inputs:");
        assert_eq!(
            lines[4],
            format!(
                "  {:<24} {:<8} [batch, 64]  warmup [1, 64]  at most [32, 64]",
                "input", "float32"
            )
        );
        assert_eq!(lines[5], "outputs:");
        assert_eq!(lines[6], format!("  {:<24} {:<8} [?]", "label", "int64"));
        assert_eq!(lines.len(), 7, "{text}");

        // Why load-time tuning chose nothing, when the daemon says.
        let untuned = ModelInfo {
            not_tuned: Some("tuning is off (tune = false)".into()),
            ..info
        };
        let text = model_info(&untuned);
        assert_eq!(
            text.lines().nth(3),
            Some("not tuned: tuning is off (tune = false)"),
            "{text}"
        );

        // A weights-only file served dequantized at load.
        let dequantized = ModelInfo {
            dequantized: Some(Box::new(rxd_client::protocol::Dequantized {
                folded: 3,
                remaining: 0,
                file_bytes: 1 << 20,
                served_bytes: 4 << 20,
            })),
            ..untuned
        };
        let text = model_info(&dequantized);
        assert_eq!(
            text.lines().nth(3),
            Some(
                "dequantized at load: 3 DequantizeLinear folded into float weights \
                 (1.0 MiB on disk, 4.0 MiB served)"
            ),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tuning_tests {
    use rxd_client::protocol::{Tuning, TuningCell};

    #[test]
    fn tuning_names_the_choice_why_and_marks_its_row_of_the_table() {
        let cell = |instances, threads, rows, items_per_s, run_ms| TuningCell {
            instances,
            threads,
            rows,
            items_per_s,
            run_ms,
        };
        let t = Tuning {
            instances: 2,
            threads: 1,
            max_batch_rows: 1,
            latency_target_ms: 5.5,
            reason: "because".into(),
            measured_ms: 340,
            cached: false,
            table: vec![cell(1, 2, 1, 736.0, 1.335), cell(2, 1, 1, 1333.0, 1.369)],
        };
        let text = super::tuning(&t);
        assert!(text.starts_with("tuning (measured in 340 ms): 2 session(s) × 1 thread(s), batches up to 1 rows, latency target 5.50 ms — because"), "{text}");
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(
            rows[0].contains("736") && !rows[0].contains("chosen"),
            "{text}"
        );
        assert!(
            rows[1].contains("1333") && rows[1].ends_with("← chosen"),
            "{text}"
        );
        let cached = super::tuning(&Tuning { cached: true, ..t });
        assert!(cached.starts_with("tuning (from the cache)"), "{cached}");
    }
}
