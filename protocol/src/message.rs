//! Message types: the handshake, requests, replies and tensor descriptors.
//!
//! Owns the shape of every message and the pure, model-independent checks on them (limits on
//! names, ranks, element counts). It does not know models or ONNX Runtime; checks that need a
//! model's signature live in the daemon.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{ErrorCode, WireError};
use crate::limits;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// First frame from client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// Free-form client name and version, for logs.
    #[serde(default)]
    pub client: String,
    /// Size of the shared-memory arena the client asks for, in bytes; 0 = none.
    #[serde(default)]
    pub arena_bytes: u64,
}

/// First frame from daemon to client, answering [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandshakeReply {
    Welcome(Welcome),
    /// The handshake was refused (for example [`ErrorCode::UnsupportedVersion`]); the daemon
    /// closes the connection after sending it.
    Error(HandshakeError),
}

/// The daemon accepted the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// Daemon name and version, e.g. `rxd 0.1.0`.
    pub server: String,
    /// Largest frame body the daemon accepts, in bytes.
    pub max_frame_bytes: u64,
    /// Requests that may be in flight on this connection at once; the daemon stops reading
    /// the connection while that many are unanswered.
    pub max_in_flight: u32,
    /// Size of the arena granted; 0 = none. When non-zero the frame carries the arena's fd
    /// (see PROTOCOL.md).
    #[serde(default)]
    pub arena_bytes: u64,
}

/// A refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeError {
    #[serde(flatten)]
    pub error: WireError,
    /// Protocol versions the daemon speaks.
    pub supported: Vec<u32>,
}

/// Every frame after the handshake from client to daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client, non-zero, unique among the connection's requests in flight.
    pub id: u64,
    pub body: Request,
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum Request {
    Infer(InferRequest),
    ListModels,
    ModelInfo(ModelRef),
    Status,
    Health,
    /// Admin: load a model version from the repository.
    Load(ModelRef),
    /// Admin: unload a model version (in-flight requests finish first).
    Unload(ModelRef),
    /// Admin: re-read the repository (as SIGHUP does).
    Reload,
    /// Admin: keep a model version resident (loads it if needed); never evicted.
    Pin(ModelRef),
    /// Admin: let a pinned version be evicted again.
    Unpin(ModelRef),
    /// Devices, their memory budgets and the models resident on each.
    Devices,
    /// Every metric: global, per model version, per device, process, GPUs.
    Metrics,
    /// Admin: change a loaded version's settings at run time.
    Configure(Configure),
    /// Admin: compress a repository model into a new version, published only when its
    /// accuracy report passes.
    Compress(CompressRequest),
    /// Admin: write a model file into the repository as a new version, then rescan it.
    Publish(PublishRequest),
}

/// Publish `data` (an ONNX model file's bytes) as `<repository>/<model>/<version>/model.onnx`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The model's directory name: 1 to 255 bytes of ASCII letters, digits, `_`, `-`, `.`,
    /// not starting with `.` or `-` ([`check_repository_name`]).
    pub model: String,
    /// The version to write (at least 1, not on disk yet); absent: one more than the highest
    /// on disk (1 for a new model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The file's bytes: inline, or a range of the sender's arena (large files).
    pub data: TensorData,
}

/// Where a published model was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReply {
    pub model: String,
    pub version: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The new version's state after the repository was rescanned (`available`, or `ready`
    /// when a reload loaded it).
    pub summary: ModelSummary,
}

/// Compress `model` (version: default) with `strategy` into version N+1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// As `rxd compress --strategy`: `int8-weights`, `dynamic-int8`, `fp16`, `prune:S`,
    /// combined with `+`; or `static-int8` (needs `calibration`).
    pub strategy: String,
    /// Calibration inputs for `static-int8` (inline tensors, one per model input, a batch of
    /// items each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calibration: Vec<Tensor>,
    /// `static-int8` range method: `percentile:P` (default `percentile:99.99`) or `minmax`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_method: Option<String>,
    /// Evaluation inputs (inline tensors, one per model input). Empty: random inputs of the
    /// model's shapes (dynamic dimensions 1), which check agreement but not task accuracy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval: Vec<Tensor>,
    /// Thresholds; defaults 0.99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
    /// Only report; write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a compression did and whether the new version was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressReply {
    pub model: String,
    pub from_version: u64,
    /// The version written, when the report passed (and it was not a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
    pub size_before: u64,
    pub size_after: u64,
    pub latency_ms_before: f64,
    pub latency_ms_after: f64,
    pub min_top1: f64,
    pub min_cosine: f64,
    /// The report in words (per output errors, cosine, top-1; what was converted).
    pub report: String,
    pub passed: bool,
}

/// Run-time changes to a model version's settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Configure {
    pub model: String,
    /// Default: the model's default version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Sessions serving it: workers are added or retired without dropping a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_rows: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_delay_us: Option<u64>,
    /// 0 turns adaptive batching off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_target_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_priority: Option<u8>,
    /// Priority mode: a waiting request gains a level per this many ms; 0 = strict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_aging_ms: Option<u64>,
    /// Result cache size; 0 turns the cache off (and empties it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_bytes: Option<u64>,
    /// Empty the result cache.
    #[serde(default)]
    pub clear_cache: bool,
    /// Move the version to this device (it is reloaded there; requests wait, none fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Also write the changes to the model's model.toml, so they survive a restart.
    #[serde(default)]
    pub persist: bool,
}

impl Request {
    /// Short name for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Infer(_) => "infer",
            Request::ListModels => "list_models",
            Request::ModelInfo(_) => "model_info",
            Request::Status => "status",
            Request::Health => "health",
            Request::Load(_) => "load",
            Request::Unload(_) => "unload",
            Request::Reload => "reload",
            Request::Pin(_) => "pin",
            Request::Unpin(_) => "unpin",
            Request::Devices => "devices",
            Request::Metrics => "metrics",
            Request::Configure(_) => "configure",
            Request::Compress(_) => "compress",
            Request::Publish(_) => "publish",
        }
    }

    /// Whether the request needs admin rights.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::Load(_)
                | Request::Unload(_)
                | Request::Reload
                | Request::Pin(_)
                | Request::Unpin(_)
                | Request::Configure(_)
                | Request::Compress(_)
                | Request::Publish(_)
        )
    }
}

/// Names a model and optionally one version (default: the model's default version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// Run a model on some inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// One tensor per model input, in any order.
    pub inputs: Vec<Tensor>,
    /// Output names wanted; empty = all outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Outputs to write at a given place in the sender's arena.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_regions: Vec<OutputRegion>,
    /// Where to write every other output in the sender's arena: packed in output order, each
    /// starting at a 64-byte-aligned offset. Absent: such outputs travel inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_area: Option<ArenaRef>,
    /// Higher runs first (0–255); absent: the model's default priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// If the request has not started running this many milliseconds after the daemon read
    /// it, it is answered `deadline_exceeded` and never run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// An output that does not fit its region or what is left of the output area comes
    /// inline instead of failing the request with `output_region_too_small` (so a client
    /// whose guess of the output sizes was short gets its answer from one run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline_overflow: bool,
}

/// An arena region for one named output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRegion {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

/// Alignment of outputs packed into an `output_area`.
pub const OUTPUT_ALIGN: u64 = 64;

/// A tensor: name, element type, shape and where its bytes are.
///
/// Bytes are little-endian, C order (row-major), packed 4-bit types two per byte, low nibble
/// first, as ONNX stores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

/// Where a tensor's bytes are.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TensorData {
    /// In the frame itself (MessagePack `bin`).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// In the sender's shared-memory arena, `len` bytes from `offset`.
    Arena(ArenaRef),
}

impl std::fmt::Debug for TensorData {
    // Never print tensor bytes (logs must not carry them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorData::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            TensorData::Arena(r) => write!(f, "Arena({r:?})"),
        }
    }
}

/// A region of the sender's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaRef {
    pub offset: u64,
    pub len: u64,
}

impl Tensor {
    /// Builds an inline tensor.
    pub fn inline(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        bytes: Vec<u8>,
    ) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            shape,
            data: TensorData::Inline(bytes),
        }
    }

    /// Number of elements, `None` on overflow.
    pub fn element_count(&self) -> Option<u64> {
        element_count(&self.shape)
    }

    /// Checks the limits that do not depend on a model: name length, rank, dimension sizes,
    /// element count, and that an inline tensor's byte length equals element count × dtype
    /// size. Returns the expected byte length.
    pub fn check(&self) -> Result<u64, WireError> {
        if self.name.len() > limits::MAX_NAME_LEN {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("tensor name longer than {} bytes", limits::MAX_NAME_LEN),
            ));
        }
        if self.shape.len() > limits::MAX_RANK {
            return Err(WireError::new(
                ErrorCode::TensorTooLarge,
                format!(
                    "tensor '{}' has rank {}, the limit is {}",
                    self.name,
                    self.shape.len(),
                    limits::MAX_RANK
                ),
            ));
        }
        if let Some((i, d)) = self
            .shape
            .iter()
            .enumerate()
            .find(|&(_, &d)| d > limits::MAX_DIM)
        {
            return Err(WireError::new(
                ErrorCode::TensorTooLarge,
                format!(
                    "tensor '{}' dimension {i} is {d}, more than a dimension can be ({})",
                    self.name,
                    limits::MAX_DIM
                ),
            ));
        }
        let too_large = || {
            WireError::new(
                ErrorCode::TensorTooLarge,
                format!("tensor '{}' shape {:?} is too large", self.name, self.shape),
            )
        };
        let elements = self.element_count().ok_or_else(too_large)?;
        let bytes = self.dtype.byte_len(elements).ok_or_else(too_large)?;
        if bytes > limits::MAX_TENSOR_BYTES {
            return Err(too_large());
        }
        if let TensorData::Inline(data) = &self.data
            && data.len() as u64 != bytes
        {
            return Err(WireError::new(
                ErrorCode::DataLengthMismatch,
                format!(
                    "tensor '{}' is {} {:?}: {} bytes expected, {} given",
                    self.name,
                    self.dtype,
                    self.shape,
                    bytes,
                    data.len()
                ),
            ));
        }
        Ok(bytes)
    }
}

/// Product of dims, `None` on overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

impl InferRequest {
    /// A request for `model` with these inputs and defaults for everything else.
    pub fn new(model: impl Into<String>, inputs: Vec<Tensor>) -> InferRequest {
        InferRequest {
            model: model.into(),
            version: None,
            inputs,
            outputs: Vec::new(),
            output_regions: Vec::new(),
            output_area: None,
            priority: None,
            timeout_ms: None,
            inline_overflow: false,
        }
    }

    /// Model-independent checks on the whole request (counts and every tensor).
    pub fn check(&self) -> Result<(), WireError> {
        check_name(&self.model)?;
        if self.inputs.len() > limits::MAX_TENSORS || self.outputs.len() > limits::MAX_TENSORS {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("more than {} tensors in one request", limits::MAX_TENSORS),
            ));
        }
        if self.output_regions.len() > limits::MAX_TENSORS {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("more than {} output regions", limits::MAX_TENSORS),
            ));
        }
        for t in &self.inputs {
            t.check()?;
        }
        Ok(())
    }
}

/// Checks a model name's length (names are otherwise matched exactly).
pub fn check_name(name: &str) -> Result<(), WireError> {
    if name.is_empty() || name.len() > limits::MAX_NAME_LEN {
        return Err(WireError::new(
            ErrorCode::InvalidRequest,
            format!("model name must be 1 to {} bytes", limits::MAX_NAME_LEN),
        ));
    }
    Ok(())
}

/// Checks a name that becomes a directory of the model repository (a published model): 1 to
/// 255 bytes of ASCII letters, digits, `_`, `-` and `.`, not starting with `.` (hidden, `..`)
/// or `-` — so it can name nothing but one entry directly inside the repository.
pub fn check_repository_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::InvalidRequest,
        format!(
            "model name {:?} cannot name a repository directory: use 1 to 255 ASCII letters, \
             digits, '_', '-' or '.', not starting with '.' or '-'",
            name.chars().take(64).collect::<String>()
        ),
    ))
}

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
}

/// Every device with its memory budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceSummary>,
}

/// One device: its budget, what is accounted on it, and the model versions resident there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
