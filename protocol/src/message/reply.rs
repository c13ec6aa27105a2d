//! Response frames: the outcome of each request and every reply type (infer outputs, model
//! lists and signatures, devices, status, health).
//!
//! Replies describe the daemon's state as it reports it; nothing here computes that state.

use serde::{Deserialize, Serialize};

use super::{CompressReply, PublishReply, Tensor};
use crate::dtype::DType;
use crate::error::WireError;

/// Every frame after the handshake from daemon to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The id of the request answered; 0 for an error about the connection itself (for
    /// example a frame that could not be decoded far enough to find its id).
    pub id: u64,
    pub outcome: Outcome,
}

/// Success or failure of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// A reply is built once per request and moved a few times; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Ok(Reply),
    Err(WireError),
}

/// A successful answer; the variant matches the request's `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reply {
    Infer(InferReply),
    ListModels(ModelList),
    ModelInfo(ModelInfo),
    Status(Status),
    Health(Health),
    Load(ModelSummary),
    Unload(ModelSummary),
    Reload(ModelList),
    Pin(ModelSummary),
    Unpin(ModelSummary),
    Devices(DeviceList),
    Metrics(Box<crate::metrics::MetricsReport>),
    Configure(crate::metrics::ModelSettingsView),
    Compress(CompressReply),
    Publish(PublishReply),
    /// The versions placed again, with their devices.
    Rebalance(ModelList),
}

/// Every device with its memory budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceSummary>,
}

/// One device: its budget, what is accounted on it, the model versions resident there, what
/// it can compute and how busy it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Name from the configuration (`cpu` by default).
    pub name: String,
    /// `cpu`, `webgpu`, `cuda` or `tensorrt`.
    pub kind: String,
    /// The execution provider (`CPUExecutionProvider`, `WebGpuExecutionProvider`, ...).
    #[serde(default)]
    pub ep: String,
    /// The adapter or GPU as the EP or driver names it, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Why the device's execution provider is not usable, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Device memory as the driver reports it (NVML, amdgpu sysfs); absent where unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    /// Memory budget in bytes; absent = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// Bytes accounted to resident and loading models (measured, or estimated while loading).
    pub used_bytes: u64,
    /// Budget minus used; absent when the budget is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Resident versions as `name:version`, least recently used first.
    pub models: Vec<String>,
    /// What the device computes, as probed once at start; absent from older daemons and for a
    /// device whose probe could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// How busy the device is; absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<DeviceLoad>,
    /// The CPU cores its threads run on ("0-3,8"), where its configuration lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<String>,
}

/// What a device computes, found by running a one-node model of each kind on it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// float16 arithmetic (an `Add` of two float16 tensors).
    #[serde(default)]
    pub float16: Support,
    /// Integer (INT8) kernels (a `MatMulInteger` of uint8 tensors).
    #[serde(default)]
    pub int8: Support,
}

/// Whether a device computes a kind of arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Support {
    /// The device's own kernels compute it.
    Native,
    /// It runs, converted to another type (the CPU computes most float16 operators in
    /// float32 between casts): correct, not faster.
    Emulated,
    /// The device cannot run it (models that need it are not placed there).
    Absent,
    /// Not probed, or a value this build does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

impl Support {
    pub fn name(self) -> &'static str {
        match self {
            Support::Native => "native",
            Support::Emulated => "emulated",
            Support::Absent => "absent",
            Support::Unknown => "unknown",
        }
    }

    /// Models that need it may run on the device (only `absent` refuses them).
    pub fn usable(self) -> bool {
        self != Support::Absent
    }
}

/// How busy a device is: its workers' batches, and the requests waiting for its models.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceLoad {
    /// Share of wall time in which at least one worker on the device ran a batch, over the
    /// last `window_s` seconds (0–1).
    #[serde(default)]
    pub busy_ratio: f64,
    /// Rows run per second over the last `window_s` seconds.
    #[serde(default)]
    pub rows_per_s: f64,
    /// The window the two figures above cover: about 10 s when the device is reported at
    /// least that often, else the time since it was last reported (at most 60 s).
    #[serde(default)]
    pub window_s: f64,
    /// Requests waiting for a worker, all versions resident on the device.
    #[serde(default)]
    pub queue_depth: u64,
    /// Seconds in which at least one worker on the device ran a batch, since start.
    #[serde(default)]
    pub busy_seconds_total: f64,
    /// Rows run (padding excluded) and batches, since start.
    #[serde(default)]
    pub rows_total: u64,
    #[serde(default)]
    pub batches_total: u64,
}

/// Outputs of one inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferReply {
    pub model: String,
    pub version: u64,
    pub outputs: Vec<Tensor>,
}

/// Every model version the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelSummary>,
}

/// State of one model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub version: u64,
    pub state: ModelState,
    /// Why the model is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Sessions (instances) serving it.
    pub instances: u32,
    /// Device it runs on (`cpu`, ...).
    pub device: String,
    /// Whether requests to it are batched together (dynamic first dimension everywhere).
    #[serde(default)]
    pub batchable: bool,
    /// Requests received, batches run, rows run, since it was loaded.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub batches: u64,
    #[serde(default)]
    pub rows: u64,
    /// Zero rows run to pad batches up to a configured batch size (`batch-sizes`).
    #[serde(default)]
    pub padded_rows: u64,
    /// The batch sizes batches are padded up to (each warmed up at load); empty = none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch_sizes: Vec<u32>,
    /// Result cache hits and misses, bytes held; requests answered by joining an identical
    /// request in flight.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_misses: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub coalesced: u64,
    /// Pinned versions are never evicted.
    #[serde(default)]
    pub pinned: bool,
    /// Whether the version policy serves this version (requests without a version get the
    /// highest served one; unserved versions are loaded only by an explicit `load`).
    #[serde(default)]
    pub served: bool,
    /// Bytes accounted to it on its device: measured once ready, estimated while loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The estimate made before loading (file size × the learned factor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
    /// Session creation + warmup of the last load, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
    /// Part of the footprint that ONNX Runtime's CPU arena reports (`TotalAllocated` after
    /// warmup: activations and reserved buffers; weights are mostly outside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arena_bytes: Option<u64>,
    /// Times it was loaded (on demand, by an admin, or at start).
    #[serde(default)]
    pub loads: u64,
    /// Milliseconds since a request last used it (resident versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// Times it was evicted to make room for another model.
    #[serde(default)]
    pub evictions: u64,
    /// The execution provider its sessions were created for (resident versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep: Option<String>,
    /// Why it runs on the CPU instead of its device (the device's EP could not be created
    /// and CPU fallback is allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Nodes per execution provider, from ONNX Runtime's profile of the warmup.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_placement: std::collections::BTreeMap<String, u64>,
    /// Nodes that fell back to the CPU EP on a GPU device (first 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes_on_cpu: Vec<String>,
    /// What the model's `compress` strategy did: served compressed, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Per device, when it has instances on several (model.toml `spread`): the device it
    /// loaded on first, then its shares on the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<DeviceShare>,
    /// Times one of its shares on another device was evicted (it kept serving).
    #[serde(default)]
    pub share_evictions: u64,
}

/// A model version's instances on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceShare {
    pub device: String,
    /// Its instances (worker threads) there.
    pub instances: u32,
    /// Batches and rows routed to it since the version was loaded.
    pub batches: u64,
    pub rows: u64,
    /// Bytes accounted to it on that device's budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// `serving`; `draining` (evicted, finishing what it holds); `failed` (its last run
    /// failed: it takes no batch until it is tried again).
    pub state: String,
    /// Why its last run failed, while state is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Lifecycle state of a model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelState {
    /// In the repository, not loaded.
    Available,
    Loading,
    Ready,
    Unloading,
    Evicted,
    Failed,
}

impl ModelState {
    pub fn name(self) -> &'static str {
        match self {
            ModelState::Available => "available",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Evicted => "evicted",
            ModelState::Failed => "failed",
        }
    }
}

/// A model version's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    #[serde(flatten)]
    pub summary: ModelSummary,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Settings in force (model.toml with run-time changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<crate::metrics::ModelSettingsView>,
    /// What load-time tuning chose for the settings model.toml leaves unset, and the table it
    /// measured; absent when nothing was tuned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<Tuning>,
    /// Why load-time tuning chose nothing for this loaded version (tuning off, the layout set,
    /// a GPU device, shapes not known, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_tuned: Option<String>,
    /// Set when the file is a weights-only compressed form (DequantizeLinear in front of float
    /// operators) whose weights the daemon turned back into float when it loaded it: small on
    /// disk, float in memory, full speed (model.toml `dequantize-at-load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dequantized: Option<Box<Dequantized>>,
}

/// Dequantize-at-load: what the daemon did to a weights-only model file before it made its
/// sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dequantized {
    /// DequantizeLinear nodes folded into float weights.
    pub folded: u64,
    /// DequantizeLinear nodes left in the graph the sessions run (not of constants).
    pub remaining: u64,
    /// The file's size.
    pub file_bytes: u64,
    /// The size of the model the sessions were made from (float weights).
    pub served_bytes: u64,
}

/// Load-time tuning: the layout and batch policy chosen from measurements of the model on its
/// device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    /// Sessions (workers).
    pub instances: u32,
    /// Intra-op threads per session.
    pub threads: u32,
    pub max_batch_rows: u32,
    /// The adaptive batch policy's latency target.
    pub latency_target_ms: f64,
    /// Why, in words.
    pub reason: String,
    /// How long measuring took (ms); 0 when the choice came from the cache.
    pub measured_ms: u64,
    /// Read from the cache directory instead of measured at this load.
    #[serde(default)]
    pub cached: bool,
    pub table: Vec<TuningCell>,
}

/// One measured point: `instances` sessions of `threads` threads each running batches of
/// `rows` rows at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TuningCell {
    pub instances: u32,
    pub threads: u32,
    pub rows: u32,
    /// Rows finished per second by all the sessions together.
    pub items_per_s: f64,
    /// Mean time of one batch on one session, ms.
    pub run_ms: f64,
}

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// Dimensions; -1 marks a dynamic dimension.
    pub dims: Vec<i64>,
    /// Symbolic names of dimensions ("" where none), same length as `dims`.
    pub dim_names: Vec<String>,
    /// Inputs: the largest size the daemon accepts in each dimension (a fixed dimension's own
    /// size); empty for outputs and where no limit applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub max_dims: Vec<u64>,
    /// The shape this tensor had in the model's warmup at batch 1 (model.toml `warmup-dims`,
    /// else automatic sizes), when that warmup ran and succeeded: for an input, a shape the
    /// model is known to run with; for an output, what such inputs gave. Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup_dims: Vec<u64>,
    /// Inputs of an integer type and one element: the value the model compares this input with (an `Equal`
    /// with a one-element constant in its graph, such as a sample rate checked against 16000),
    /// which its warmup and the daemon's tuning fill it with instead of zero, so that they run
    /// the branch real requests take; a generator of sample inputs should use it too. `None`
    /// where the graph compares it with no constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_value: Option<i64>,
}

impl TensorSpec {
    /// The dimensions for people: fixed sizes as numbers, dynamic ones by their symbolic name
    /// where it is a plain name (`batch`, `p2o.DynamicDimension.0`), else `?` (no name, or a
    /// formula ONNX Runtime inferred): `[batch, 3, ?, ?]`.
    pub fn dims_text(&self) -> String {
        let parts: Vec<String> = self
            .dims
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let name = self.dim_names.get(i).map_or("", String::as_str);
                let plain = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
                match d {
                    d if d >= 0 => d.to_string(),
                    _ if plain => name.to_string(),
                    _ => "?".to_string(),
                }
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }
}

/// What the daemon is and what it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Daemon name and version.
    pub server: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub model_repository: String,
    pub ort_version: String,
    pub ort_library: String,
    pub intra_op_threads: u32,
    pub models_ready: u32,
    pub models_failed: u32,
    pub connections: u64,
    pub requests_total: u64,
    pub requests_failed: u64,
    pub in_flight: u64,
    /// The configuration in force, by config key (values as text).
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
}

/// Overall health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// Why the state is not `healthy`.
    pub reasons: Vec<String>,
    /// Accepting and serving requests.
    pub ready: bool,
    pub models_loaded: u32,
    pub uptime_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// ONNX Runtime is loaded and its environment is up.
    #[serde(default)]
    pub engine_running: bool,
    /// Model versions that can serve now or on demand (ready, or available/evicted and
    /// loadable on demand).
    #[serde(default)]
    pub models_servable: u32,
    /// Worker threads (sessions) of all resident versions.
    #[serde(default)]
    pub workers: u32,
    /// Requests waiting for a worker, all models.
    #[serde(default)]
    pub queue_size: u64,
    /// Bytes accounted to models, all devices.
    #[serde(default)]
    pub models_memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Whether a GPU is visible (NVML or amdgpu).
    #[serde(default)]
    pub gpu_available: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthState {
    pub fn name(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}
