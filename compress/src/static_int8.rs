//! `static-int8`: activations and weights in INT8, ranges from calibration data. Every
//! activation entering or leaving a Conv/MatMul/Gemm gets a QuantizeLinear → DequantizeLinear
//! pair (uint8, asymmetric, scale and zero point from the min/max seen over the calibration
//! inputs), weights are per-channel symmetric INT8 (as `int8-weights`), Conv/Gemm biases INT32
//! at scale = input scale × weight scale. That is the full QDQ form ONNX Runtime fuses into
//! QLinearConv / QLinearMatMul, which run in integer arithmetic.

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Message, Value};
use crate::report::Input;

/// What the static quantizer did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Static {
    /// Activations given a Q/DQ pair, with their calibrated (min, max).
    pub activations: Vec<(String, f32, f32)>,
    pub weights: usize,
    pub biases: usize,
}

const UINT8: u64 = 2;
const INT32: u64 = 6;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Min/max of each tensor in `names` over the calibration inputs (the model run with those
/// tensors added as outputs).
fn calibrate(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    calibration: &[Input],
    method: Calibration,
) -> Result<BTreeMap<String, (f32, f32)>, String> {
    let mut m = model.clone();
    let existing: BTreeSet<String> = m
        .graph
        .messages(graph::OUTPUT)
        .map_err(err)?
        .iter()
        .map(|v| v.string(onnx::value_info::NAME))
        .collect();
    for n in names.iter().filter(|n| !existing.contains(*n)) {
        // ValueInfoProto { name, type: TypeProto { tensor_type: { elem_type: FLOAT } } }
        let mut tt = Message::default();
        tt.push(1, Value::Varint(tensor::FLOAT));
        let mut ty = Message::default();
        ty.push_message(1, &tt);
        let mut vi = Message::default();
        vi.push_str(onnx::value_info::NAME, n);
        vi.push_message(2, &ty);
        m.graph.push_message(graph::OUTPUT, &vi);
    }
    let mut s = crate::report::session(env, &m.encode())?;
    let outs = s.run(crate::report::values(calibration)?).map_err(err)?;
    let mut ranges = BTreeMap::new();
    for n in names {
        if let Ok((_, data)) = outs[n.as_str()].try_extract_tensor::<f32>() {
            ranges.insert(n.clone(), range(data, method));
        }
    }
    Ok(ranges)
}

/// How activation ranges come from the calibration values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The smallest and largest value seen (always including 0).
    MinMax,
    /// The given percentile of the values at each end (e.g. 99.99): outliers are clipped so
    /// the common values get finer steps.
    Percentile(f64),
}

impl std::str::FromStr for Calibration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(Calibration::MinMax),
            Some(("percentile", p)) => p
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 50.0 && *p <= 100.0)
                .map(Calibration::Percentile)
                .ok_or_else(|| format!("percentile:{p}: a percentile in (50, 100]")),
            _ => Err(format!("calibration '{s}' is not minmax or percentile:P")),
        }
    }
}

/// The range of `data` under `method`, always including 0 (so that 0 is exact).
pub fn range(data: &[f32], method: Calibration) -> (f32, f32) {
    match method {
        Calibration::MinMax => data
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x))),
        Calibration::Percentile(p) => {
            let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                return (0.0, 0.0);
            }
            v.sort_by(f32::total_cmp);
            let at = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
            let (lo, hi) = (at(1.0 - p / 100.0), at(p / 100.0));
            (lo.min(0.0), hi.max(0.0))
        }
    }
}

fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Quantizes `bytes` with calibration inputs (ranges by min/max).
pub fn quantize(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
) -> Result<(Vec<u8>, Static), String> {
    quantize_with(env, bytes, calibration, Calibration::MinMax)
}

/// Quantizes `bytes` with calibration inputs and a range method.
pub fn quantize_with(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
) -> Result<(Vec<u8>, Static), String> {
    let mut model = Model::parse(bytes).map_err(err)?;
    let mut opset = model.opset("").unwrap_or(0);
    if opset < 10 {
        return Err("static-int8 needs opset 10 (QuantizeLinear)".into());
    }
    // Per-channel dequantization (biases; weights likewise in `int8_weights`) needs opset 13,
    // else ONNX Runtime's com.microsoft DequantizeLinear, whose QDQ form ORT does not fuse
    // into integer kernels: graphs that mean the same at 13 move there.
    if opset < 13 && crate::opset::upgrade_to_13(&mut model).map_err(err)? {
        opset = 13;
    }
    let per_channel_domain = if opset >= 13 { "" } else { "com.microsoft" };
    crate::fold::fold_batchnorm(&mut model).map_err(err)?;
    let nodes = model.graph.messages(graph::NODE).map_err(err)?;
    let inits = model.graph.messages(graph::INITIALIZER).map_err(err)?;
    let init_names: BTreeSet<String> = inits.iter().map(onnx::name_of).collect();
    let const_outputs: BTreeSet<String> = nodes
        .iter()
        .filter(|n| onnx::op_type(n) == "Constant")
        .flat_map(onnx::outputs)
        .collect();
    let is_const = |n: &String| init_names.contains(n) || const_outputs.contains(n);
    let quantizable = |n: &Message| matches!(onnx::op_type(n).as_str(), "Conv" | "MatMul" | "Gemm");
    // Activations: the data input and the output of every quantizable node.
    let mut acts = BTreeSet::new();
    for n in nodes.iter().filter(|n| quantizable(n)) {
        let ins = onnx::inputs(n);
        if ins.len() >= 2 && is_const(&ins[1]) && !is_const(&ins[0]) {
            acts.insert(ins[0].clone());
            acts.extend(onnx::outputs(n));
        }
    }
    let ranges = calibrate(env, &model, &acts, calibration, method)?;
    let mut out = Static::default();

    // Weights and biases first (biases need the input's scale).
    let weights_before = crate::quant::int8_weights_float_scales(&mut model).map_err(err)?;
    out.weights = weights_before.converted.len();
    // The weight scales, by weight name: from the DequantizeLinear nodes just written.
    let mut nodes = model.graph.messages(graph::NODE).map_err(err)?;
    let mut inits = model.graph.messages(graph::INITIALIZER).map_err(err)?;
    let init_values: BTreeMap<String, Message> = inits
        .iter()
        .map(|t| (onnx::name_of(t), t.clone()))
        .collect();
    let mut weight_scale: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for n in nodes
        .iter()
        .filter(|n| onnx::op_type(n) == "DequantizeLinear")
    {
        let ins = onnx::inputs(n);
        if let (Some(out_name), Some(s)) = (
            onnx::outputs(n).first().cloned(),
            ins.get(1).and_then(|s| init_values.get(s)),
        ) && let Some(v) = onnx::f32_data(s).map_err(err)?
        {
            weight_scale.insert(out_name, v);
        }
    }
    let mut extra_nodes = Vec::new();
    for n in nodes
        .iter_mut()
        .filter(|n| matches!(onnx::op_type(n).as_str(), "Conv" | "Gemm"))
    {
        let ins = onnx::inputs(n);
        let (Some(x), Some(w), Some(b)) = (ins.first(), ins.get(1), ins.get(2)) else {
            continue;
        };
        let (Some(&(lo, hi)), Some(ws), Some(bt)) =
            (ranges.get(x), weight_scale.get(w), init_values.get(b))
        else {
            continue;
        };
        let Some(bias) = onnx::f32_data(bt).map_err(err)? else {
            continue;
        };
        if bias.len() != ws.len() {
            continue;
        }
        let (xs, _) = uint8_params(lo, hi);
        let scales: Vec<f32> = ws.iter().map(|s| s * xs).collect();
        let q: Vec<i32> = bias
            .iter()
            .zip(&scales)
            .map(|(v, s)| (v / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
            .collect();
        let k = out.biases;
        let (qn, sn, dn) = (
            format!("rxd.bq{k}"),
            format!("rxd.bs{k}"),
            format!("rxd.bd{k}"),
        );
        inits.push(onnx::make_tensor(
            &qn,
            &[q.len() as i64],
            INT32,
            q.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        inits.push(onnx::make_tensor(
            &sn,
            &[q.len() as i64],
            tensor::FLOAT,
            scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        extra_nodes.push(onnx::make_node(
            "DequantizeLinear",
            per_channel_domain,
            "",
            &[&qn, &sn],
            &[&dn],
            &[("axis", 0)],
        ));
        let mut new_ins: Vec<Value> = ins
            .iter()
            .map(|s| Value::Bytes(s.as_bytes().to_vec()))
            .collect();
        new_ins[2] = Value::Bytes(dn.into_bytes());
        n.replace(onnx::node::INPUT, new_ins);
        out.biases += 1;
    }

    // Activation Q/DQ pairs; every consumer reads the dequantized tensor.
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    let mut qdq = Vec::new();
    for (i, (name, &(lo, hi))) in ranges.iter().enumerate() {
        let (scale, zp) = uint8_params(lo, hi);
        let (sn, zn, qn, dn) = (
            format!("rxd.as{i}"),
            format!("rxd.az{i}"),
            format!("rxd.aq{i}"),
            format!("rxd.ad{i}"),
        );
        inits.push(onnx::make_tensor(
            &sn,
            &[],
            tensor::FLOAT,
            scale.to_le_bytes().to_vec(),
        ));
        inits.push(onnx::make_tensor(&zn, &[], UINT8, vec![zp]));
        qdq.push((
            name.clone(),
            onnx::make_node("QuantizeLinear", "", "", &[name, &sn, &zn], &[&qn], &[]),
        ));
        qdq.push((
            name.clone(),
            onnx::make_node("DequantizeLinear", "", "", &[&qn, &sn, &zn], &[&dn], &[]),
        ));
        renamed.insert(name.clone(), dn);
        out.activations.push((name.clone(), lo, hi));
    }
    for n in &mut nodes {
        let ins = onnx::inputs(n);
        if ins.iter().any(|i| renamed.contains_key(i)) {
            let new: Vec<Value> = ins
                .iter()
                .map(|i| Value::Bytes(renamed.get(i).unwrap_or(i).as_bytes().to_vec()))
                .collect();
            n.replace(onnx::node::INPUT, new);
        }
    }
    // Order: each Q/DQ pair right after the producer of its tensor (graph inputs: first).
    let mut ordered: Vec<Message> = extra_nodes;
    let graph_inputs: BTreeSet<String> = model
        .graph
        .messages(graph::INPUT)
        .map_err(err)?
        .iter()
        .map(|v| v.string(onnx::value_info::NAME))
        .collect();
    for (t, n) in &qdq {
        if graph_inputs.contains(t) {
            ordered.push(n.clone());
        }
    }
    for n in nodes {
        let outs = onnx::outputs(&n);
        ordered.push(n);
        for (t, q) in &qdq {
            if outs.contains(t) {
                ordered.push(q.clone());
            }
        }
    }
    let used: BTreeSet<String> = ordered.iter().flat_map(onnx::inputs).collect();
    inits.retain(|t| used.contains(&onnx::name_of(t)));
    model.graph.replace(
        graph::INITIALIZER,
        inits.iter().map(|t| Value::Bytes(t.encode())).collect(),
    );
    model.graph.replace(
        graph::NODE,
        ordered.iter().map(|n| Value::Bytes(n.encode())).collect(),
    );
    Ok((model.encode(), out))
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
}
