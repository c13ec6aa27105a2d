//! Arguments and replies of the admin operations that carry more than a model reference:
//! publish, compress and configure.
//!
//! Shapes only; whether a peer may send them is the daemon's decision (`Request::is_admin`).

use serde::{Deserialize, Serialize};

use super::{ModelSummary, Tensor, TensorData};

/// Publish `data` (an ONNX model file's bytes) as `<repository>/<model>/<version>/model.onnx`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The model's directory name: 1 to 255 bytes of ASCII letters, digits, `_`, `-`, `.`,
    /// not starting with `.` or `-` ([`check_repository_name`](super::check_repository_name)).
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
    /// combined with `+`; or `static-int8` (needs `calibration`); or `auto[:OBJECTIVE]`
    /// (objective `size`, `latency` or `balanced`).
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
    /// Measure the loaded version again (load-time tuning, ignoring its cached choice) and
    /// rebuild it with what that chooses; an `instances` set earlier at run time is dropped.
    /// Refused where model.toml sets the layout or turns tuning off, or with `instances`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retune: bool,
}
