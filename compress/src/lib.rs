//! rxd's model compressor: reads and writes ONNX at the protobuf wire level (every field it does
//! not change is kept), applies compression strategies to the graph, and measures what they
//! cost in accuracy with ONNX Runtime before a compressed model may be used.
//!
//! # Layout
//! - [`proto`]: schema-less protobuf messages (lossless).
//! - [`onnx`]: ONNX field numbers and helpers over messages.
//! - [`fold`]: BatchNormalization folded into the Conv before it.
//! - [`quant`]: the `int8-weights` strategy (per-channel QDQ).
//! - [`report`]: original vs compressed on the same inputs through ONNX Runtime.
//!
//! Boundary: no sockets, no daemon state; `rxd compress` is the command-line face.
#![deny(unsafe_code)]

pub mod fold;
pub mod onnx;
pub mod proto;
pub mod quant;
pub mod report;

/// A compression strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Rewrite nothing (a lossless round trip).
    None,
    /// Per-channel symmetric INT8 weights of MatMul/Gemm/Conv (QDQ).
    Int8Weights,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Strategy::None),
            "int8-weights" => Ok(Strategy::Int8Weights),
            other => Err(format!(
                "unknown strategy '{other}' (this build has: none, int8-weights)"
            )),
        }
    }
}

/// Compresses model bytes with `strategy`: the new bytes and what was converted.
pub fn compress(bytes: &[u8], strategy: Strategy) -> Result<(Vec<u8>, quant::Outcome), String> {
    let mut model = onnx::Model::parse(bytes).map_err(|e| e.to_string())?;
    let outcome = match strategy {
        Strategy::None => quant::Outcome::default(),
        Strategy::Int8Weights => {
            fold::fold_batchnorm(&mut model).map_err(|e| e.to_string())?;
            quant::int8_weights(&mut model).map_err(|e| e.to_string())?
        }
    };
    Ok((model.encode(), outcome))
}
