//! rxd's model compressor: reads and writes ONNX at the protobuf wire level (every field it does
//! not change is kept), applies compression strategies to the graph, and measures what they
//! cost in accuracy with ONNX Runtime before a compressed model may be used.
//!
//! # Layout
//! - [`auto`]: `--strategy auto` — the candidates, how each is judged, which one wins.
//! - [`proto`]: schema-less protobuf messages (lossless).
//! - [`onnx`]: ONNX field numbers and helpers over messages.
//! - [`opset`]: moving a graph from opset 11/12 to 13 where nothing changes meaning.
//! - [`budget`]: a search's time budget and progress reports.
//! - [`dequant`]: dequantize-at-load (weights-only forms folded back into float weights).
//! - [`error`]: the one error type.
//! - [`dynamic`]: the `dynamic-int8` strategy (MatMulInteger with activations quantized at
//!   run time).
//! - [`fold`]: BatchNormalization folded into the Conv before it.
//! - [`guard`]: integer `Div`/`Mod` guarded against the one operand pair that traps
//!   (MIN / -1), applied to every model the daemon loads.
//! - [`half`]: the `fp16` strategy (float16 arithmetic, float32 at the model's edges) and
//!   `fp16-weights` (float16 storage, cast back to float when loaded).
//! - [`job`]: one compression job (plan, inputs, thresholds → result), as both faces run it.
//! - [`int4`]: the `int4` strategy (block-wise 4-bit MatMul weights, MatMulNBits).
//! - [`prune`]: the `prune:S` strategy (magnitude pruning to sparsity S).
//! - [`quant`]: the `int8-weights` strategy (per-channel QDQ).
//! - [`report`]: original vs compressed on the same inputs through ONNX Runtime.
//! - [`search`]: the sensitivity search (keep the most sensitive weights in float).
//! - [`tidy`]: Constant nodes as initializers, identical ones stored once (every size
//!   strategy).
//!
//! Boundary: no sockets, no daemon state, never writes a model file; `rxd compress` and `rxctl model
//! compress` are thin faces over [`job`].
#![deny(unsafe_code)]

pub mod auto;
pub mod budget;
pub mod dequant;
pub mod dynamic;
pub mod error;
pub mod fold;
pub mod guard;
pub mod half;
pub mod int4;
pub mod job;
pub mod onnx;
pub mod opset;
pub mod proto;
pub mod prune;
pub mod quant;
pub mod report;
pub mod search;
pub mod static_int8;
pub mod tidy;

pub use error::{Error, Result};

/// A compression plan: strategies applied in order (`prune:0.5+int8-weights`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Strategy {
    /// Magnitude pruning to this sparsity of the MatMul/Gemm/Conv weights.
    pub prune: Option<f64>,
    /// BatchNorm folding + per-channel symmetric INT8 weights (QDQ).
    pub int8_weights: bool,
    /// MatMul with INT8 weights and activations quantized at run time (MatMulInteger); runs
    /// before `int8_weights`, which then handles the Conv/Gemm weights left.
    pub dynamic_int8: bool,
    /// Remaining float weights stored as float16 (cast back to float when loaded).
    pub fp16: bool,
    /// The whole model in float16 arithmetic, float32 inputs and outputs kept by casts.
    pub fp16_compute: bool,
    /// MatMul weights as block-wise 4-bit integers (MatMulNBits).
    pub int4: bool,
}

impl Strategy {
    /// Rewrite nothing: a lossless round trip.
    pub const NONE: Strategy = Strategy {
        prune: None,
        int8_weights: false,
        dynamic_int8: false,
        fp16: false,
        fp16_compute: false,
        int4: false,
    };
    pub const INT8_WEIGHTS: Strategy = Strategy {
        prune: None,
        int8_weights: true,
        dynamic_int8: false,
        fp16: false,
        fp16_compute: false,
        int4: false,
    };
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = Strategy::NONE;
        for part in s.split('+').map(str::trim) {
            match part.split_once(':') {
                None if part == "none" => {}
                None if part == "int8-weights" => out.int8_weights = true,
                None if part == "dynamic-int8" => out.dynamic_int8 = true,
                None if part == "fp16" => out.fp16_compute = true,
                None if part == "fp16-weights" => out.fp16 = true,
                None if part == "int4" => out.int4 = true,
                Some(("prune", x)) => {
                    let v: f64 = x
                        .parse()
                        .ok()
                        .filter(|v: &f64| (0.0..1.0).contains(v))
                        .ok_or_else(|| {
                            Error::Usage(format!("prune:{x}: the sparsity is a fraction in [0, 1)"))
                        })?;
                    out.prune = Some(v);
                }
                _ => {
                    return Err(Error::Usage(format!(
                        "unknown strategy '{part}' (this build has: none, int8-weights, \
                         dynamic-int8, int4, fp16, fp16-weights, prune:S, combined with +)"
                    )));
                }
            }
        }
        if out.fp16_compute && (out.int8_weights || out.dynamic_int8 || out.int4 || out.fp16) {
            return Err(Error::Usage(format!(
                "{s}: fp16 (float16 arithmetic) combines only with prune:S; for int8 or int4 \
                 weights with the float tensors left in half precision use fp16-weights"
            )));
        }
        Ok(out)
    }
}

impl std::fmt::Display for Strategy {
    /// The strategy as `--strategy` takes it (`prune:0.5+int8-weights`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(s) = self.prune {
            parts.push(format!("prune:{s}"));
        }
        for (on, name) in [
            (self.int4, "int4"),
            (self.dynamic_int8, "dynamic-int8"),
            (self.int8_weights, "int8-weights"),
            (self.fp16, "fp16-weights"),
            (self.fp16_compute, "fp16"),
        ] {
            if on {
                parts.push(name.to_string());
            }
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join("+"))
    }
}

/// What a compression did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub quant: quant::Outcome,
    pub pruned: Option<prune::Pruned>,
    pub batchnorms_folded: usize,
    pub dynamic: dynamic::Dynamic,
    pub fp16_tensors: usize,
    /// Set when the model now computes in float16 (`fp16`).
    pub fp16_compute: Option<half::HalfCompute>,
    pub tidy: tidy::Tidy,
    pub int4: int4::Int4,
}

impl Outcome {
    /// How many weights the strategy changed (converted, stored smaller or pruned): 0 means
    /// it found nothing it applies to.
    pub fn weights_changed(&self) -> usize {
        self.quant.converted.len()
            + self.dynamic.converted.len()
            + self.fp16_tensors
            + self.int4.converted.len()
            + self.pruned.as_ref().map_or(0, |p| p.tensors)
    }
}

/// Compresses model bytes with `strategy`: the new bytes and what was done.
pub fn compress(bytes: &[u8], strategy: Strategy) -> Result<(Vec<u8>, Outcome)> {
    let mut model = onnx::Model::parse(bytes)?;
    let mut out = Outcome::default();
    // Folding first also keeps BatchNorm statistics out of float16: PP-OCR's detector has
    // running variances near 1e8 (float16 ends at 65504); folded, they become small scales.
    if strategy.int8_weights || strategy.fp16_compute {
        out.batchnorms_folded = fold::fold_batchnorm(&mut model)?;
    }
    if let Some(s) = strategy.prune {
        out.pruned = Some(prune::prune(&mut model, s)?);
    }
    if strategy.int4 {
        out.int4 = int4::int4(&mut model)?;
    }
    if strategy.dynamic_int8 {
        out.dynamic = dynamic::dynamic_int8(&mut model)?;
    }
    if strategy.int8_weights {
        out.quant = quant::int8_weights(&mut model)?;
    }
    if strategy.fp16 {
        out.fp16_tensors = half::fp16(&mut model)?;
    }
    if strategy.fp16_compute {
        let h = half::fp16_compute(&mut model)?;
        out.fp16_tensors = h.tensors;
        out.fp16_compute = Some(h);
    }
    if strategy != Strategy::NONE {
        out.tidy = tidy::constants_to_initializers(&mut model)?;
    }
    // Always re-encoded, also for `none`: that is the lossless round trip the tests check.
    Ok((model.encode(), out))
}
