//! `model.toml`: a model's settings as a typed schema, the one check of them (shared with
//! run-time changes), what they mean for the scheduler, and which versions a version policy
//! serves; plus the daemon-wide defaults they fall back to.
//! Boundary: no state; reading model.toml is the only IO.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ByteSize, Device};

/// `model.toml`: per-model settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelSettings {
    /// Sessions (worker threads) serving the model; default 1.
    pub instances: Option<u32>,
    /// Intra-op threads per instance; default: the daemon's `intra-op-threads`.
    pub intra_op_threads: Option<u32>,
    /// Requests that may wait for a worker before new ones get `busy`.
    pub queue_capacity: Option<u32>,
    /// Let ORT threads spin between runs (lower latency, more idle CPU). Default false.
    pub allow_spinning: Option<bool>,
    /// Largest batch in rows for models with a dynamic first dimension (1 = no batching).
    /// Default 32.
    pub max_batch_rows: Option<u32>,
    /// Batch sizes a batch is padded up to (with zero rows, whose outputs are dropped), e.g.
    /// `[1, 2, 4, 8, 16, 32]`; each is warmed up at load. GPU execution providers pick (and
    /// cuDNN searches for) kernels per input shape, which costs up to seconds the first time
    /// a batch size is seen: padding to a few warmed sizes keeps that out of the request path.
    /// Default on CUDA/TensorRT devices: the powers of two up to max-batch-rows, and
    /// max-batch-rows; elsewhere none (`[]`: batches run at their own size).
    pub batch_sizes: Option<Vec<u32>>,
    /// On GPU devices, one session per batch size in `batch-sizes` (each only ever sees its
    /// own shape: ORT's CUDA EP re-plans every convolution when a session's input shape
    /// changes, ~0.1–0.7 s per change). Costs a session's device memory per size. Default
    /// true; false runs every size on one session.
    pub session_per_batch_size: Option<bool>,
    /// Static batching: how long a request may wait for its batch to fill, in µs. Default 0:
    /// batches form only from requests that arrive while the workers are busy.
    pub max_queue_delay_us: Option<u64>,
    /// Adaptive batching: the latency (queue + compute) to keep, in ms. When set, batch size
    /// and wait follow the measured compute time and arrival rate.
    pub latency_target_ms: Option<f64>,
    /// Priority of requests that do not give one (0–255). Default 0.
    pub default_priority: Option<u8>,
    /// A waiting request gains one priority level per this many ms (no starvation). Default 100.
    pub priority_aging_ms: Option<u64>,
    /// Identical requests in flight at once run once and share the answer, for requests with
    /// at most this many input bytes (hashing costs ~1 ms per MB, and arena inputs are copied
    /// before hashing). Default 16 KiB; 0 = off.
    pub coalesce_max_bytes: Option<ByteSize>,
    /// Result cache (LRU) size; 0 = off (default). Answers repeats without running.
    pub cache_bytes: Option<ByteSize>,
    /// Which versions on disk are served: `"latest"` (default), `{ latest = N }`, `"all"`,
    /// `{ specific = [1, 3] }`.
    pub version_policy: Option<VersionPolicy>,
    /// Served versions stay resident once loaded: never evicted.
    pub pinned: Option<bool>,
    /// Devices to place it on, in order of preference (default: the one with most free budget).
    pub devices: Option<Vec<String>>,
    /// Serve on every device in `devices` at once, not only the first that has room: the
    /// version loads on the first, then gets `instances` on each other one (a share, admitted
    /// and accounted on that device's budget, evicted on its own), and each batch goes to
    /// the device expected to finish it first. Default false.
    pub spread: Option<bool>,
    /// Instances on particular devices, over `instances`, e.g. `{ gpu0 = 2, cpu = 1 }` (a
    /// device it does not name gets `instances`).
    pub device_instances: Option<HashMap<String, u32>>,
    /// How a spread version's batches are divided between its devices: `expected-finish`
    /// (default: each to the device expected to finish it first) or `round-robin` (each device
    /// in turn, whatever its speed: what other servers do, kept to compare with).
    pub route: Option<crate::scheduler::route::Routing>,
    /// Run the model on zero inputs (at batch 1 and at max-batch-rows) before it is ready, so
    /// that the first request does not pay for allocation and the measured footprint includes
    /// the arena of the largest batch. Default true.
    pub warmup: Option<bool>,
    /// Shapes for warmup inputs whose dimensions are dynamic (other than the batch dimension),
    /// e.g. `{ x = [1, 3, 48, 320] }`. Without it such dimensions get 32 and a failing warmup
    /// is only logged; with it a failing warmup fails the load.
    pub warmup_dims: Option<HashMap<String, Vec<i64>>>,
    /// The value warmup and tuning fill an integer input with, by input name, e.g.
    /// `{ sr = 8000 }`. Default: the constant the model's graph compares the input with (an
    /// `Equal` with a one-element constant), else 0.
    pub warmup_values: Option<HashMap<String, i64>>,
    /// When its device's execution provider cannot be created, run on the CPU instead
    /// (health: degraded) rather than failing. Default: the device's `cpu-fallback`.
    pub cpu_fallback: Option<bool>,
    /// The largest size each input dimension may have in a request, by input name, e.g.
    /// `{ x = [8, 3, 1280, 1280] }` (0 or -1: the default for that dimension). Default for a
    /// dynamic dimension: 8 × its largest warmup size, at least 2048 (`validate::max_dims`).
    /// Larger requests are refused with `tensor_too_large` before they reach ONNX Runtime.
    pub max_dims: Option<HashMap<String, Vec<i64>>>,
    /// Where each tensor's rows are when requests run as one batch, by input or output name,
    /// for tensors whose rows are not along dimension 0: e.g. a recurrent model's state
    /// `[layers, batch, hidden]` — `{ state = 1, stateN = 1 }`. Default: dimension 0.
    pub batch_axes: Option<HashMap<String, u32>>,
    /// Inputs that are not batched: every request of a batch gives the same value, and
    /// requests with different values run in different batches (rank-0 inputs always are).
    /// Only values sent in the request frame (not through the arena) of at most 4 KiB batch.
    pub shared_inputs: Option<Vec<String>>,
    /// Let inputs with a zero-sized dimension through validation. Default false: ONNX
    /// Runtime's kernels abort the whole process on some (Silero VAD's LSTM on a zero batch).
    pub allow_empty_inputs: Option<bool>,
    /// Seconds a load (session creation, compression, warmup) may take before it fails with
    /// `load_failed`; default: the daemon's `load-timeout-secs`.
    pub load_timeout_secs: Option<u64>,
    /// Measure the model at load over thread layouts and batch sizes and serve with the best
    /// (the keys this file leaves unset: `instances`/`intra-op-threads` together,
    /// `max-batch-rows`, `latency-target-ms`), on CPU devices; the choice is kept in the cache
    /// directory per model file, device and machine. Default true.
    pub tune: Option<bool>,
    /// Serve a compressed form of the model (`int8-weights`, `dynamic-int8`, `fp16`,
    /// `prune:S`, joined with `+`; or `auto`/`auto:OBJECTIVE`, the smallest candidate that
    /// agrees and is not slower): compressed when loaded (cached in the cache directory),
    /// checked against the original on random inputs, used only if it agrees (cosine and
    /// top-1 ≥ 0.99); otherwise the original serves and the summary says why.
    pub compress: Option<String>,
    /// When the model file is a weights-only compressed form (DequantizeLinear of constant
    /// int8 weights in front of float operators, as `int8-weights` writes), fold its weights
    /// back into float when it loads, so it runs at full speed (ONNX Runtime would dequantize
    /// them on every run): small on disk, the float size in memory. Default true.
    pub dequantize_at_load: Option<bool>,
}

impl ModelSettings {
    /// These settings for a build on `device`: `instances` from `device-instances` where it
    /// names the device.
    pub fn on_device(&self, device: &str) -> ModelSettings {
        let mut s = self.clone();
        if let Some(n) = self.device_instances.as_ref().and_then(|m| m.get(device)) {
            s.instances = Some(*n);
        }
        s
    }

    /// `self` with every key that `over` sets replaced (run-time changes over model.toml).
    pub fn merged(&self, over: &ModelSettings) -> ModelSettings {
        macro_rules! pick {
            ($($f:ident),*) => {
                ModelSettings { $($f: over.$f.clone().or_else(|| self.$f.clone()),)* }
            };
        }
        pick!(
            instances,
            intra_op_threads,
            queue_capacity,
            allow_spinning,
            max_batch_rows,
            batch_sizes,
            session_per_batch_size,
            max_queue_delay_us,
            latency_target_ms,
            default_priority,
            priority_aging_ms,
            coalesce_max_bytes,
            cache_bytes,
            version_policy,
            pinned,
            devices,
            spread,
            device_instances,
            route,
            warmup,
            warmup_dims,
            warmup_values,
            cpu_fallback,
            compress,
            tune,
            max_dims,
            allow_empty_inputs,
            batch_axes,
            shared_inputs,
            load_timeout_secs,
            dequantize_at_load
        )
    }

    /// `batch-axes` and `shared-inputs` as the runtime takes them.
    pub fn axes(&self) -> crate::runtime::AxesConfig {
        crate::runtime::AxesConfig {
            axes: self.batch_axes.clone().unwrap_or_default(),
            shared: self.shared_inputs.clone().unwrap_or_default(),
        }
    }
}

/// Default `coalesce-max-bytes`: small requests, where identical ones are common and hashing
/// is cheap.
pub const DEFAULT_COALESCE_MAX: u64 = 16 << 10;

/// Which versions of a model are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// `"all"`.
    All,
    /// `"latest"` (N = 1) or `{ latest = N }`: the N newest.
    Latest(std::num::NonZeroU32),
    /// `{ specific = [1, 3] }`.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(std::num::NonZeroU32::MIN)
    }
}

impl<'de> Deserialize<'de> for VersionPolicy {
    /// Any other value is refused naming the four forms (toml adds the line).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let forms = "is not \"latest\", \"all\", { latest = N } (N ≥ 1) or { specific = [..] }";
        let value = toml::Value::deserialize(d)?;
        let policy = match &value {
            toml::Value::String(s) if s == "latest" => Some(VersionPolicy::default()),
            toml::Value::String(s) if s == "all" => Some(VersionPolicy::All),
            toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
                Some((k, toml::Value::Integer(n))) if k == "latest" => u32::try_from(*n)
                    .ok()
                    .and_then(std::num::NonZeroU32::new)
                    .map(VersionPolicy::Latest),
                Some((k, toml::Value::Array(a))) if k == "specific" => a
                    .iter()
                    .map(|v| v.as_integer().and_then(|n| u64::try_from(n).ok()))
                    .collect::<Option<Vec<u64>>>()
                    .map(VersionPolicy::Specific),
                _ => None,
            },
            _ => None,
        };
        policy.ok_or_else(|| D::Error::custom(format!("version-policy {value} {forms}")))
    }
}

impl VersionPolicy {
    /// The served versions among `on_disk`.
    pub fn select(&self, on_disk: &BTreeSet<u64>) -> BTreeSet<u64> {
        match self {
            VersionPolicy::All => on_disk.clone(),
            VersionPolicy::Latest(n) => on_disk
                .iter()
                .rev()
                .take(n.get() as usize)
                .copied()
                .collect(),
            VersionPolicy::Specific(specific) => specific
                .iter()
                .filter(|v| on_disk.contains(v))
                .copied()
                .collect(),
        }
    }
}

impl ModelSettings {
    /// The scheduler settings these give, with the daemon's queue capacity as default.
    pub fn scheduler(&self, default_queue: u32) -> crate::scheduler::policy::Settings {
        let d = crate::scheduler::policy::Settings::default();
        crate::scheduler::policy::Settings {
            max_batch_rows: self.max_batch_rows.unwrap_or(d.max_batch_rows).max(1),
            max_queue_delay: self
                .max_queue_delay_us
                .map_or(d.max_queue_delay, std::time::Duration::from_micros),
            latency_target: self
                .latency_target_ms
                .filter(|&t| t > 0.0)
                .map(|t| std::time::Duration::from_secs_f64(t / 1000.0)),
            queue_capacity: self.queue_capacity.unwrap_or(default_queue) as usize,
            aging: self
                .priority_aging_ms
                .map_or(d.aging, std::time::Duration::from_millis),
            batchable: true,
            routing: self.route.unwrap_or_default(),
        }
    }
}

impl ModelSettings {
    /// Reads `<model_dir>/model.toml` (absent: defaults) and checks it.
    pub fn read(model_dir: &Path) -> Result<ModelSettings, String> {
        let path = model_dir.join("model.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let s: ModelSettings =
                    toml::from_str(&text).map_err(|e| format!("model.toml: {e}"))?;
                s.check().map_err(|e| format!("model.toml: {e}"))?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelSettings::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// The one check of settings, for model.toml and for run-time changes (`configure`)
    /// alike: the first problem found, in words.
    pub fn check(&self) -> Result<(), String> {
        if self.instances.is_some_and(|n| !(1..=64).contains(&n)) {
            return Err("instances must be 1..=64".into());
        }
        if self.queue_capacity == Some(0) {
            return Err("queue-capacity must be at least 1".into());
        }
        if self.load_timeout_secs == Some(0) {
            return Err("load-timeout-secs must be at least 1".into());
        }
        if self.max_batch_rows == Some(0) {
            return Err("max-batch-rows must be at least 1".into());
        }
        if let Some(per) = &self.device_instances {
            if per.values().any(|n| !(1..=64).contains(n)) {
                return Err("device-instances must be 1..=64 on each device".into());
            }
            let devices = self.devices.as_deref().unwrap_or_default();
            if let Some(d) = per.keys().find(|d| !devices.contains(d)) {
                return Err(format!(
                    "device-instances names '{d}', which `devices` does not list"
                ));
            }
        }
        if self.route.is_some() && self.spread != Some(true) {
            return Err(
                "route is for spread = true (how batches are divided between devices)".into(),
            );
        }
        if self.spread == Some(true) {
            let devices = self.devices.as_deref().unwrap_or_default();
            if devices.len() < 2 {
                return Err("spread = true needs at least two devices in `devices`".into());
            }
            let unique: BTreeSet<&String> = devices.iter().collect();
            if unique.len() != devices.len() {
                return Err("spread = true: `devices` lists a device twice".into());
            }
        }
        if self
            .latency_target_ms
            .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
        {
            return Err("latency-target-ms must be 0 (off) or positive".into());
        }
        Ok(())
    }

    /// The settings a run-time `configure` request changes, as settings over model.toml.
    pub fn of_configure(c: &rxd_protocol::Configure) -> ModelSettings {
        ModelSettings {
            instances: c.instances,
            max_batch_rows: c.max_batch_rows,
            max_queue_delay_us: c.max_queue_delay_us,
            latency_target_ms: c.latency_target_ms,
            default_priority: c.default_priority,
            priority_aging_ms: c.priority_aging_ms,
            cache_bytes: c.cache_bytes.map(ByteSize),
            devices: c.device.clone().map(|d| vec![d]),
            ..ModelSettings::default()
        }
    }
}

/// Daemon-wide defaults the registry applies.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub intra_op_threads: u32,
    /// `intra_op_threads` is the cores the daemon may use, and follows them when they change
    /// (see `Registry::follow_cores`).
    pub follow_cores: bool,
    /// Load-time tuning where model.toml does not say (`registry::tune`).
    pub tune: bool,
    pub queue_capacity: u32,
    /// Devices, the default one first.
    pub devices: Vec<Device>,
    /// Load a non-resident model when a request names it.
    pub load_on_demand: bool,
    /// Where engine caches go.
    pub cache_dir: PathBuf,
    /// How long a load may take (model.toml `load-timeout-secs` overrides it per model).
    pub load_timeout: std::time::Duration,
    /// A run holding a non-admin's request is stopped after this long (half of
    /// `watchdog-stuck-secs`).
    pub run_limit: std::time::Duration,
    pub hooks: crate::config::TestHooks,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Result<ModelSettings, String> {
        let s: ModelSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        s.check().map(|()| s)
    }

    #[test]
    fn spread_needs_two_distinct_devices_and_device_instances_name_listed_ones() {
        assert!(checked("spread = true\ndevices = ['a', 'b']").is_ok());
        for bad in [
            "spread = true",
            "spread = true\ndevices = ['a']",
            "spread = true\ndevices = ['a', 'a']",
            "devices = ['a', 'b']\ndevice-instances = { c = 2 }",
            "devices = ['a', 'b']\ndevice-instances = { b = 0 }",
        ] {
            assert!(checked(bad).is_err(), "{bad}");
        }
        let s =
            checked("instances = 3\ndevices = ['a', 'b']\ndevice-instances = { b = 2 }").unwrap();
        assert_eq!(s.on_device("a").instances, Some(3));
        assert_eq!(s.on_device("b").instances, Some(2));
    }

    fn policy(text: &str) -> Result<Option<VersionPolicy>, String> {
        toml::from_str::<ModelSettings>(text)
            .map(|s| s.version_policy)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn version_policies_parse_to_their_meaning_and_others_are_refused_with_the_line() {
        let n = |n| VersionPolicy::Latest(std::num::NonZeroU32::new(n).unwrap());
        assert_eq!(policy(""), Ok(None));
        assert_eq!(policy("version-policy = \"latest\""), Ok(Some(n(1))));
        assert_eq!(
            policy("version-policy = \"all\""),
            Ok(Some(VersionPolicy::All))
        );
        assert_eq!(policy("version-policy = { latest = 3 }"), Ok(Some(n(3))));
        assert_eq!(
            policy("version-policy = { specific = [1, 3] }"),
            Ok(Some(VersionPolicy::Specific(vec![1, 3])))
        );
        for bad in [
            "\"newest\"",
            "{ latest = 0 }",
            "{ latest = -2 }",
            "{ specific = [-1] }",
            "{ specific = [\"1\"] }",
            "{ latest = 1, specific = [1] }",
            "3",
        ] {
            let e = policy(&format!("instances = 1\nversion-policy = {bad}\n")).unwrap_err();
            assert!(
                e.contains("line 2") && e.contains("latest = N"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_policy_selects_its_versions_from_those_on_disk() {
        let disk: BTreeSet<u64> = [1, 2, 5, 9].into();
        let n = |n| VersionPolicy::Latest(std::num::NonZeroU32::new(n).unwrap());
        assert_eq!(VersionPolicy::default().select(&disk), [9].into());
        assert_eq!(n(2).select(&disk), [5, 9].into());
        assert_eq!(n(9).select(&disk), disk);
        assert_eq!(VersionPolicy::All.select(&disk), disk);
        assert_eq!(
            VersionPolicy::Specific(vec![2, 3]).select(&disk),
            [2].into()
        );
        assert!(VersionPolicy::default().select(&BTreeSet::new()).is_empty());
    }
}
