//! Tensors on the wire: name, dtype, shape and where the bytes are (inline or an arena range),
//! with the limits that do not depend on a model.
//!
//! Never prints tensor bytes (`TensorData`'s Debug prints lengths only).

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{ErrorCode, WireError};
use crate::limits;

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
