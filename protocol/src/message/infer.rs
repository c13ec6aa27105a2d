//! The infer request: inputs, wanted outputs and where they go, priority and deadline; and the
//! model-independent checks on names and on a whole request.
//!
//! Checks that need a model's signature live in the daemon.

use serde::{Deserialize, Serialize};

use super::{ArenaRef, Tensor};
use crate::error::{ErrorCode, WireError};
use crate::limits;

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
