//! `static-int8`: activations and weights in INT8, activation ranges from calibration data,
//! in the QDQ form ONNX Runtime fuses into integer kernels (QLinearConv, QLinearMatMul,
//! QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearConcat, QLinearSigmoid, …).
//!
//! The graph is planned tensor by tensor, in node order:
//! - a *quantized operator* (Conv/MatMul/Gemm with a constant weight, Add, Mul,
//!   GlobalAveragePool, AveragePool, Concat, Sigmoid, LeakyRelu) reads every data input
//!   through a DequantizeLinear and writes its output through a QuantizeLinear → DequantizeLinear
//!   pair (uint8, asymmetric, scale and zero point from the range seen over the calibration
//!   inputs); constant inputs of Add/Mul become uint8 initializers; weights are per-channel
//!   symmetric INT8 (as `int8-weights`), Conv/Gemm biases INT32 at input scale × weight scale;
//! - a Relu, or a Clip whose minimum is 0, that is the only reader of a quantized operator's
//!   output is *absorbed*: the QuantizeLinear takes the operator's output with the range of the
//!   clamped tensor (zero point 0, upper end within the Clip's maximum), which clamps exactly
//!   as the node did, and the node goes;
//! - a Mul or Div by a positive scalar constant whose input is already INT8 becomes a *scale
//!   change*: its readers dequantize the same INT8 values with the scale multiplied (or
//!   divided) by the constant, and the node goes — the `/ 6` of every hard-swish costs nothing;
//! - a data-movement operator (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Resize, Slice,
//!   Split) on an INT8 tensor re-quantizes with its input's scale and zero point, so ONNX
//!   Runtime runs it on the INT8 values;
//! - everything else runs in float on dequantized inputs; graph outputs are never quantized
//!   (a final Concat that mixes box coordinates and scores keeps both).
//!
//! A plan is made twice: once to know which tensors to calibrate, once more with the ranges
//! (a tensor the calibration run cannot give as float leaves its operator in float).
//!
//! Layout: `plan` (the pure planner), `calibrate` (tensor values and ranges), `rewrite` (the
//! QDQ graph), `search` (the nodes to keep in float).

mod calibrate;
mod plan;
mod rewrite;
mod search;

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use crate::onnx::{Model, tensor};
use crate::report::Input;
use crate::{Error, Result};

pub use calibrate::{CHUNK_ITEMS, Calibration, EXACT_VALUES, HALF_BINS, Stats, range};
pub use plan::node_id;
pub use search::{Searched, search, search_within};

/// What the static quantizer did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Static {
    /// Calibrated activations (each one QuantizeLinear), with their (min, max).
    pub activations: Vec<(String, f32, f32)>,
    pub weights: usize,
    pub biases: usize,
    /// Operators computing on INT8 inputs and output, by type.
    pub quantized: BTreeMap<String, usize>,
    /// Operators turned into quantization parameters, by type: Relu/Clip absorbed into a
    /// range, Mul/Div by a positive constant folded into a scale.
    pub folded: BTreeMap<String, usize>,
    /// Data-movement operators running on INT8 values, by type.
    pub moved: BTreeMap<String, usize>,
    /// Operators left in float, by type.
    pub float: BTreeMap<String, usize>,
}

pub(crate) const UINT8: u64 = tensor::UINT8;
pub(crate) const INT32: u64 = 6;

/// Operators whose inputs and output are all quantized (ORT has integer kernels for them).
pub(crate) const KERNELS: &[&str] = &[
    "Conv",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "GlobalAveragePool",
    "AveragePool",
    "Concat",
    "Sigmoid",
    "LeakyRelu",
];
/// Operators that move values without computing on them: output scale = input scale.
pub(crate) const SAME_SCALE: &[&str] = &[
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Resize",
    "Slice",
    "Split",
];
// Not MaxPool: ONNX Runtime's uint8 MaxPool is a plain loop over NCHW — 7.2 ms for the
// PP-OCR classifier's last 2×2 pool over 64 crops, against 0.6 ms in float — so it runs in
// float between a DequantizeLinear and a QuantizeLinear.

pub(crate) fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Quantizes `bytes` with calibration inputs and a range method.
pub fn quantize_with(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
) -> Result<(Vec<u8>, Static)> {
    quantize_except(env, bytes, calibration, method, &BTreeSet::new())
}

/// [`quantize_with`], leaving the nodes named in `keep` ([`node_id`]) in float, weights
/// included.
pub fn quantize_except(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
    keep: &BTreeSet<String>,
) -> Result<(Vec<u8>, Static)> {
    rewrite::quantize_traced(env, bytes, calibration, method, keep, &mut BTreeMap::new())
        .map(|(b, s, _)| (b, s))
}

/// Where each quantized tensor's dequantized values are in the quantized graph, and who put
/// them there ([`Plan::blame`]).
pub(crate) struct Trace {
    pub(crate) dequantized: BTreeMap<String, String>,
    pub(crate) blame: BTreeMap<String, (String, Vec<String>)>,
}

/// The float graph the quantizer works on: moved to opset 13 where that changes nothing,
/// Constant nodes as initializers, BatchNormalization folded. Also says whether per-channel
/// DequantizeLinear is in the default domain (opset 13 or later).
pub(crate) fn prepare(bytes: &[u8]) -> Result<(Model, bool)> {
    let mut model = Model::parse(bytes)?;
    let opset = model.opset("").unwrap_or(0);
    if opset < 10 {
        return Err(Error::Unsupported(
            "static-int8 needs opset 10 (QuantizeLinear)".into(),
        ));
    }
    // Per-channel dequantization needs opset 13, else ONNX Runtime's com.microsoft
    // DequantizeLinear, whose QDQ form ORT does not fuse into integer kernels: graphs that
    // mean the same at 13 move there.
    let standard = opset >= 13 || crate::opset::upgrade_to_13(&mut model)?;
    crate::tidy::constants_to_initializers(&mut model)?;
    crate::fold::fold_batchnorm(&mut model)?;
    Ok((model, standard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_ranges_clip_outliers_and_keep_zero() {
        let mut v: Vec<f32> = (1..=1000).map(|i| i as f32 / 1000.0).collect();
        v.push(100.0);
        assert_eq!(range(&v, Calibration::MinMax), (0.0, 100.0));
        let (lo, hi) = range(&v, Calibration::Percentile(99.0));
        assert_eq!(lo, 0.0);
        assert!((0.98..=1.0).contains(&hi), "{hi}");
        assert!("percentile:99.99".parse::<Calibration>().is_ok());
        assert!("percentile:20".parse::<Calibration>().is_err());
        assert!(
            (127..=128).contains(&uint8_params(-1.0, 1.0).1),
            "zero in the middle"
        );
    }

    /// Values a long calibration would see: a bulk in [-1, 3) and rare outliers to ±40.
    fn stream(n: usize) -> impl Iterator<Item = f32> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        (0..n).map(move |i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            if i % 50_000 == 7 {
                40.0 * (u - 0.5) * 2.0
            } else {
                4.0 * u - 1.0
            }
        })
    }

    #[test]
    fn streamed_statistics_stay_bounded_and_match_the_exact_ranges() {
        let n = 2_000_000;
        let all: Vec<f32> = stream(n).collect();
        let mut st = Stats::default();
        for chunk in all.chunks(4096) {
            st.add(chunk);
        }
        let bound = (EXACT_VALUES * 4).max((2 * HALF_BINS + 1) * 4);
        assert!(st.bytes() <= bound, "{} bytes", st.bytes());
        assert_eq!(
            st.range(Calibration::MinMax),
            range(&all, Calibration::MinMax)
        );
        for p in [99.0, 99.9, 99.99] {
            let (lo, hi) = st.range(Calibration::Percentile(p));
            let (elo, ehi) = range(&all, Calibration::Percentile(p));
            // Within a bin: 1.6 % of the value.
            assert!((lo - elo).abs() <= elo.abs() / 60.0, "{p}: {lo} vs {elo}");
            assert!((hi - ehi).abs() <= ehi.abs() / 60.0, "{p}: {hi} vs {ehi}");
        }
        // Few values: exactly what the one-shot range gives.
        let few: Vec<f32> = stream(1000).collect();
        let mut st = Stats::default();
        st.add(&few[..500]);
        st.add(&few[500..]);
        let p = Calibration::Percentile(99.0);
        assert_eq!(st.range(p), range(&few, p));
    }
}
