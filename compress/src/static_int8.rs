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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ort::environment::Environment;

use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Message, Value};
use crate::report::{Input, Report};
use crate::{Error, Result};

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

const UINT8: u64 = tensor::UINT8;
const INT32: u64 = 6;

/// Operators whose inputs and output are all quantized (ORT has integer kernels for them).
const KERNELS: &[&str] = &[
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
const SAME_SCALE: &[&str] = &[
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

/// How a tensor gets its INT8 form.
#[derive(Debug, Clone, PartialEq)]
enum Act {
    /// Calibrated: QuantizeLinear of `feed` (the tensor itself, or the input of the Relu/Clip
    /// that was absorbed) with the tensor's range.
    Point { feed: String },
    /// The INT8 values of `of`, read at `factor` × its scale (a folded Mul/Div).
    Rescale { of: String, factor: f32 },
    /// Re-quantized with `of`'s parameters (the output of a data-movement operator).
    Same { of: String },
}

#[derive(Debug, Default)]
struct Plan {
    acts: Vec<(String, Act)>,
    planned: BTreeSet<String>,
    /// Nodes that go (absorbed or folded), by index.
    removed: BTreeSet<usize>,
    /// Constant inputs of quantized Add/Mul nodes: (node, input index).
    consts: Vec<(usize, usize)>,
    quantized: BTreeMap<String, usize>,
    folded: BTreeMap<String, usize>,
    moved: BTreeMap<String, usize>,
    float: BTreeMap<String, usize>,
    /// For each calibrated tensor: the node whose quantization put it there and, for that
    /// node's output, the quantized tensors the node reads (the sensitivity search's map).
    blame: BTreeMap<String, (String, Vec<String>)>,
}

impl Plan {
    fn add(&mut self, t: &str, act: Act) -> bool {
        let new = self.planned.insert(t.to_string());
        if new {
            self.acts.push((t.to_string(), act));
        }
        new
    }
}

/// What the planner knows of the graph.
struct Graph<'a> {
    nodes: &'a [Message],
    /// Float constants (initializers, and DequantizeLinear outputs of constant weights).
    consts: &'a HashMap<String, Option<Vec<f32>>>,
    float: &'a BTreeSet<String>,
    outputs: &'a BTreeSet<String>,
    readers: HashMap<String, Vec<usize>>,
}

impl Graph<'_> {
    fn scalar(&self, t: &str) -> Option<f32> {
        match self.consts.get(t) {
            Some(Some(v)) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }
    fn is_const(&self, t: &str) -> bool {
        self.consts.contains_key(t)
    }
    /// A float activation that may be calibrated (given `ranges`, one that was).
    fn calibratable(&self, t: &str, ranges: Option<&BTreeMap<String, (f32, f32)>>) -> bool {
        self.float.contains(t)
            && !self.is_const(t)
            && !self.outputs.contains(t)
            && ranges.is_none_or(|r| r.contains_key(t))
    }
    /// The Relu or Clip(0, ·) that is the only reader of `t`, and its output.
    fn clamp_after(&self, t: &str) -> Option<(usize, String)> {
        let [j] = self.readers.get(t)?.as_slice() else {
            return None;
        };
        let n = &self.nodes[*j];
        let ins = onnx::inputs(n);
        let absorbs = match onnx::op_type(n).as_str() {
            "Relu" => true,
            "Clip" => {
                ins.get(1).and_then(|m| self.scalar(m)) == Some(0.0)
                    && ins
                        .get(2)
                        .is_none_or(|m| m.is_empty() || self.scalar(m).is_some())
            }
            _ => false,
        };
        let out = onnx::outputs(n).into_iter().next()?;
        (absorbs && !self.outputs.contains(&out) && self.float.contains(&out)).then_some((*j, out))
    }
}

/// A node's name, or for a node without one `OpType:first-output` (output names are unique
/// and survive the rewrites, node positions do not).
pub fn node_id(n: &Message) -> String {
    let name = n.string(onnx::node::NAME);
    if name.is_empty() {
        let out = onnx::outputs(n).into_iter().next().unwrap_or_default();
        format!("{}:{out}", onnx::op_type(n))
    } else {
        name
    }
}

fn plan(g: &Graph, keep: &BTreeSet<String>, ranges: Option<&BTreeMap<String, (f32, f32)>>) -> Plan {
    let mut p = Plan::default();
    for (i, n) in g.nodes.iter().enumerate() {
        if p.removed.contains(&i) {
            continue;
        }
        let op = onnx::op_type(n);
        let ins = onnx::inputs(n);
        let outs = onnx::outputs(n);
        let Some(out) = outs.first().cloned() else {
            continue;
        };
        let id = node_id(n);
        let free = !keep.contains(&id);
        let count = |m: &mut BTreeMap<String, usize>| *m.entry(op.clone()).or_default() += 1;
        // A Mul/Div by a positive scalar on an INT8 tensor: a scale change.
        if free
            && (op == "Mul" || op == "Div")
            && ins.len() == 2
            && outs.len() == 1
            && !g.outputs.contains(&out)
        {
            let pair = if op == "Div" || g.scalar(&ins[1]).is_some() {
                (&ins[0], &ins[1])
            } else {
                (&ins[1], &ins[0])
            };
            if let Some(c) = g.scalar(pair.1).filter(|c| *c > 0.0 && c.is_finite())
                && p.planned.contains(pair.0)
            {
                let factor = if op == "Div" { 1.0 / c } else { c };
                p.add(
                    &out,
                    Act::Rescale {
                        of: pair.0.clone(),
                        factor,
                    },
                );
                p.removed.insert(i);
                count(&mut p.folded);
                continue;
            }
        }
        if free
            && SAME_SCALE.contains(&op.as_str())
            && ins.first().is_some_and(|x| p.planned.contains(x))
            && outs
                .iter()
                .all(|o| g.float.contains(o) && !g.outputs.contains(o))
        {
            for o in &outs {
                p.add(o, Act::Same { of: ins[0].clone() });
            }
            count(&mut p.moved);
            continue;
        }
        if free && outs.len() == 1 && KERNELS.contains(&op.as_str()) {
            let weighted = matches!(op.as_str(), "Conv" | "MatMul" | "Gemm");
            let (data, consts): (Vec<usize>, Vec<usize>) = if weighted {
                let ok = ins.len() >= 2 && !g.is_const(&ins[0]) && g.is_const(&ins[1]);
                (if ok { vec![0] } else { vec![] }, vec![])
            } else {
                (0..ins.len())
                    .filter(|&k| !ins[k].is_empty())
                    .partition(|&k| !g.is_const(&ins[k]))
            };
            let consts_ok = consts.is_empty()
                || (matches!(op.as_str(), "Add" | "Mul")
                    && consts
                        .iter()
                        .all(|&k| matches!(g.consts.get(&ins[k]), Some(Some(_)))));
            let data_ok = !data.is_empty()
                && data
                    .iter()
                    .all(|&k| p.planned.contains(&ins[k]) || g.calibratable(&ins[k], ranges));
            let absorbed = g.clamp_after(&out);
            let point = absorbed.as_ref().map_or(&out, |a| &a.1).clone();
            let out_ok = g.calibratable(&point, ranges);
            if consts_ok && data_ok && (out_ok || weighted) {
                for &k in &data {
                    if p.add(
                        &ins[k],
                        Act::Point {
                            feed: ins[k].clone(),
                        },
                    ) {
                        p.blame.insert(ins[k].clone(), (id.clone(), Vec::new()));
                    }
                }
                p.consts.extend(consts.iter().map(|&k| (i, k)));
                if out_ok {
                    p.add(&point, Act::Point { feed: out.clone() });
                    let read = data.iter().map(|&k| ins[k].clone()).collect();
                    p.blame.insert(point.clone(), (id.clone(), read));
                    if let Some((j, _)) = absorbed {
                        p.removed.insert(j);
                        *p.folded.entry(onnx::op_type(&g.nodes[j])).or_default() += 1;
                    }
                }
                count(&mut p.quantized);
                continue;
            }
        }
        if op != "Constant" {
            count(&mut p.float);
        }
    }
    p
}

/// The values of the float tensors in `names` on `inputs` (the model run with those tensors
/// added as outputs); names the run cannot give as float are absent.
fn tensors(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    inputs: &[Input],
) -> Result<BTreeMap<String, Vec<f32>>> {
    // A graph input is read from `inputs`: asked for as an output, ONNX Runtime hands back
    // the input's own buffer, which is freed with the inputs when the run returns.
    let mut values = BTreeMap::new();
    for i in inputs {
        if let (true, crate::report::Data::F32(d)) = (names.contains(&i.name), &i.data) {
            values.insert(i.name.clone(), d.clone());
        }
    }
    let mut m = model.clone();
    let existing = m.output_names()?;
    for n in names
        .iter()
        .filter(|n| !existing.contains(*n) && !values.contains_key(*n))
    {
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
    let outs = s.run(crate::report::values(inputs)?)?;
    let from_run: Vec<&String> = names.iter().filter(|n| !values.contains_key(*n)).collect();
    for n in from_run {
        if let Ok((_, data)) = outs[n.as_str()].try_extract_tensor::<f32>() {
            values.insert(n.clone(), data.to_vec());
        }
    }
    Ok(values)
}

/// The range of each tensor in `names` over the calibration inputs.
fn calibrate(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    calibration: &[Input],
    method: Calibration,
) -> Result<BTreeMap<String, (f32, f32)>> {
    Ok(tensors(env, model, names, calibration)?
        .into_iter()
        .map(|(n, v)| (n, range(&v, method)))
        .collect())
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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(Calibration::MinMax),
            Some(("percentile", p)) => p
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 50.0 && *p <= 100.0)
                .map(Calibration::Percentile)
                .ok_or_else(|| Error::Usage(format!("percentile:{p}: a percentile in (50, 100]"))),
            _ => Err(Error::Usage(format!(
                "calibration '{s}' is not minmax or percentile:P"
            ))),
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
            // Two selections, not a sort: calibration tensors hold millions of values.
            let mut at = |q: f64| {
                let k = (((v.len() - 1) as f64) * q).round() as usize;
                *v.select_nth_unstable_by(k, f32::total_cmp).1
            };
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
    quantize_traced(env, bytes, calibration, method, keep, &mut BTreeMap::new())
        .map(|(b, s, _)| (b, s))
}

/// Where each quantized tensor's dequantized values are in the quantized graph, and who put
/// them there ([`Plan::blame`]).
struct Trace {
    dequantized: BTreeMap<String, String>,
    blame: BTreeMap<String, (String, Vec<String>)>,
}

/// The float graph the quantizer works on: moved to opset 13 where that changes nothing,
/// Constant nodes as initializers, BatchNormalization folded. Also says whether per-channel
/// DequantizeLinear is in the default domain (opset 13 or later).
fn prepare(bytes: &[u8]) -> Result<(Model, bool)> {
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

fn quantize_traced(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
    keep: &BTreeSet<String>,
    ranges: &mut BTreeMap<String, (f32, f32)>,
) -> Result<(Vec<u8>, Static, Trace)> {
    let (mut model, standard) = prepare(bytes)?;
    let per_channel_domain = if standard { "" } else { "com.microsoft" };
    let mut out = Static::default();
    let mut keep_weights = BTreeSet::new();
    for n in model.graph.messages(graph::NODE)? {
        if keep.contains(&node_id(&n))
            && matches!(onnx::op_type(&n).as_str(), "Conv" | "MatMul" | "Gemm")
        {
            keep_weights.extend(onnx::inputs(&n).into_iter().nth(1));
        }
    }
    out.weights = crate::quant::int8_weights_float_scales(&mut model, &keep_weights)?
        .converted
        .len();

    let nodes = model.graph.messages(graph::NODE)?;
    let mut inits = model.graph.messages(graph::INITIALIZER)?;
    let mut consts: HashMap<String, Option<Vec<f32>>> = HashMap::new();
    for t in &inits {
        consts.insert(onnx::name_of(t), onnx::f32_data(t)?);
    }
    // Dequantized weights are constants too; their scales scale the biases.
    let mut weight_scale: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for n in nodes
        .iter()
        .filter(|n| onnx::op_type(n) == "DequantizeLinear")
    {
        let ins = onnx::inputs(n);
        if ins.iter().all(|i| i.is_empty() || consts.contains_key(i)) {
            let o = onnx::outputs(n).into_iter().next().unwrap_or_default();
            if let Some(Some(s)) = ins.get(1).and_then(|s| consts.get(s)) {
                weight_scale.insert(o.clone(), s.clone());
            }
            consts.insert(o, None);
        }
    }
    let types = crate::half::value_types(&model)?;
    let float: BTreeSet<String> = types
        .iter()
        .filter(|(_, t)| **t == tensor::FLOAT)
        .map(|(n, _)| n.clone())
        .collect();
    let outputs = model.output_names()?;
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for x in onnx::inputs(n) {
            let r = readers.entry(x).or_default();
            if !r.contains(&i) {
                r.push(i);
            }
        }
    }
    let g = Graph {
        nodes: &nodes,
        consts: &consts,
        float: &float,
        outputs: &outputs,
        readers,
    };
    // `ranges` keeps what earlier calls (the search's rounds) calibrated on the same model.
    let wanted: BTreeSet<String> = plan(&g, keep, None)
        .acts
        .into_iter()
        .filter(|(t, a)| matches!(a, Act::Point { .. }) && !ranges.contains_key(t))
        .map(|(t, _)| t)
        .collect();
    if !wanted.is_empty() {
        ranges.extend(calibrate(env, &model, &wanted, calibration, method)?);
    }
    let p = plan(&g, keep, Some(ranges));
    out.quantized = p.quantized.clone();
    out.folded = p.folded.clone();
    out.moved = p.moved.clone();
    out.float = p.float.clone();

    // Quantization parameters per tensor: (INT8 tensor, scale, zero point, their names).
    struct Qp {
        q: String,
        scale: f32,
        scale_name: String,
        zp_name: String,
    }
    let mut params: BTreeMap<String, Qp> = BTreeMap::new();
    let mut dq: BTreeMap<String, String> = BTreeMap::new();
    let mut added: Vec<Message> = Vec::new();
    let scalar = |name: &str, ty: u64, raw: Vec<u8>| onnx::make_tensor(name, &[], ty, raw);
    for (k, (t, act)) in p.acts.iter().enumerate() {
        let d = format!("rxd.ad{k}");
        let qp = match act {
            Act::Point { feed } => {
                let (lo, hi) = ranges[t];
                let (scale, zp) = uint8_params(lo, hi);
                let (sn, zn, qn) = (
                    format!("rxd.as{k}"),
                    format!("rxd.az{k}"),
                    format!("rxd.aq{k}"),
                );
                inits.push(scalar(&sn, tensor::FLOAT, scale.to_le_bytes().to_vec()));
                inits.push(scalar(&zn, UINT8, vec![zp]));
                added.push(onnx::make_node(
                    "QuantizeLinear",
                    "",
                    "",
                    &[feed, &sn, &zn],
                    &[&qn],
                    &[],
                ));
                out.activations.push((t.clone(), lo, hi));
                Qp {
                    q: qn,
                    scale,
                    scale_name: sn,
                    zp_name: zn,
                }
            }
            Act::Rescale { of, factor } => {
                let src = &params[of];
                let scale = src.scale * factor;
                let sn = format!("rxd.as{k}");
                inits.push(scalar(&sn, tensor::FLOAT, scale.to_le_bytes().to_vec()));
                Qp {
                    q: src.q.clone(),
                    scale,
                    scale_name: sn,
                    zp_name: src.zp_name.clone(),
                }
            }
            Act::Same { of } => {
                let src = &params[of];
                let qn = format!("rxd.aq{k}");
                added.push(onnx::make_node(
                    "QuantizeLinear",
                    "",
                    "",
                    &[t, &src.scale_name, &src.zp_name],
                    &[&qn],
                    &[],
                ));
                Qp {
                    q: qn,
                    scale: src.scale,
                    scale_name: src.scale_name.clone(),
                    zp_name: src.zp_name.clone(),
                }
            }
        };
        added.push(onnx::make_node(
            "DequantizeLinear",
            "",
            "",
            &[&qp.q, &qp.scale_name, &qp.zp_name],
            &[&d],
            &[],
        ));
        dq.insert(t.clone(), d);
        params.insert(t.clone(), qp);
    }

    // The kept nodes read dequantized tensors; constant inputs of Add/Mul and Conv/Gemm
    // biases are quantized.
    let mut nodes: Vec<Option<Message>> = nodes.into_iter().map(Some).collect();
    for &i in &p.removed {
        nodes[i] = None;
    }
    let mut const_dq: BTreeMap<String, String> = BTreeMap::new();
    for &(i, k) in &p.consts {
        let Some(n) = nodes[i].as_mut() else { continue };
        let mut ins = onnx::inputs(n);
        let c = ins[k].clone();
        let d = match const_dq.get(&c) {
            Some(d) => d.clone(),
            None => {
                let Some(Some(v)) = consts.get(&c) else {
                    continue;
                };
                let (lo, hi) = range(v, Calibration::MinMax);
                let (scale, zp) = uint8_params(lo, hi);
                let j = const_dq.len();
                let (qn, sn, zn, d) = (
                    format!("rxd.cq{j}"),
                    format!("rxd.cs{j}"),
                    format!("rxd.cz{j}"),
                    format!("rxd.cd{j}"),
                );
                let dims = inits
                    .iter()
                    .find(|t| onnx::name_of(t) == c)
                    .map(onnx::dims_of)
                    .transpose()?
                    .unwrap_or_default();
                let q: Vec<u8> = v
                    .iter()
                    .map(|x| ((x / scale).round() + zp as f32).clamp(0.0, 255.0) as u8)
                    .collect();
                inits.push(onnx::make_tensor(&qn, &dims, UINT8, q));
                inits.push(scalar(&sn, tensor::FLOAT, scale.to_le_bytes().to_vec()));
                inits.push(scalar(&zn, UINT8, vec![zp]));
                added.push(onnx::make_node(
                    "DequantizeLinear",
                    "",
                    "",
                    &[&qn, &sn, &zn],
                    &[&d],
                    &[],
                ));
                const_dq.insert(c.clone(), d.clone());
                d
            }
        };
        ins[k] = d;
        onnx::set_inputs(n, ins);
    }
    for n in nodes.iter_mut().flatten() {
        let mut ins = onnx::inputs(n);
        let quantized_conv = matches!(onnx::op_type(n).as_str(), "Conv" | "Gemm")
            && ins.len() >= 3
            && params.contains_key(&ins[0]);
        if quantized_conv
            && let (Some(ws), Some(Some(bias))) = (weight_scale.get(&ins[1]), consts.get(&ins[2]))
            && bias.len() == ws.len()
        {
            let xs = params[&ins[0]].scale;
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
            added.push(onnx::make_node(
                "DequantizeLinear",
                per_channel_domain,
                "",
                &[&qn, &sn],
                &[&dn],
                &[("axis", 0)],
            ));
            ins[2] = dn;
            out.biases += 1;
        }
        onnx::set_inputs(n, ins.into_iter().map(|x| dq.get(&x).cloned().unwrap_or(x)));
    }
    let mut all: Vec<Message> = nodes.into_iter().flatten().chain(added).collect();
    // Quantization steps nobody reads (the INT8 form of a tensor only a folded node used).
    loop {
        let read: BTreeSet<String> = all
            .iter()
            .flat_map(onnx::inputs)
            .chain(outputs.iter().cloned())
            .collect();
        let before = all.len();
        all.retain(|n| {
            !matches!(
                onnx::op_type(n).as_str(),
                "QuantizeLinear" | "DequantizeLinear"
            ) || onnx::outputs(n).iter().any(|o| read.contains(o))
        });
        if all.len() == before {
            break;
        }
    }
    let all = onnx::topo_sort(all)?;
    let produced: BTreeSet<String> = all.iter().flat_map(onnx::outputs).collect();
    dq.retain(|_, d| produced.contains(d));
    let used: BTreeSet<String> = all.iter().flat_map(onnx::inputs).collect();
    inits.retain(|t| used.contains(&onnx::name_of(t)));
    model.rewrite(&inits, &all, &[])?;
    let trace = Trace {
        dequantized: dq,
        blame: p.blame,
    };
    Ok((model.encode(), out, trace))
}

/// What [`search`] found.
#[derive(Debug, Clone)]
pub struct Searched {
    pub bytes: Vec<u8>,
    pub stat: Static,
    pub report: Report,
    /// Nodes kept in float, in the order chosen, each with the error its quantization added
    /// (1 − cosine of the tensor it wrote against float, less the worst of the quantized
    /// tensors it read) when it was chosen.
    pub kept: Vec<(String, f64)>,
    pub passed: bool,
}

/// Rounds of the search: round k keeps 2^k more nodes in float (at most 63 in all).
const SEARCH_ROUNDS: u32 = 6;

/// Static INT8 that meets the thresholds on `eval` with as few float nodes as it can find:
/// quantize everything; while the report misses, compare every quantized tensor with its
/// float value on the evaluation inputs, charge each quantized node with the error it adds
/// (what it writes, less the worst of what it reads) and keep the worst nodes in float —
/// one, then two, four, … more per round.
pub fn search(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
    eval: &[Input],
    min_top1: f64,
    min_cosine: f64,
) -> Result<Searched> {
    let (float_model, _) = prepare(bytes)?;
    let mut keep = BTreeSet::new();
    let mut kept = Vec::new();
    let mut ranges = BTreeMap::new();
    let mut round = 0;
    loop {
        let (q, stat, trace) =
            quantize_traced(env, bytes, calibration, method, &keep, &mut ranges)?;
        let report = crate::report::compare(env, bytes, &q, eval)?;
        let passed = report.min_top1() >= min_top1 && report.min_cosine() >= min_cosine;
        let done = |passed| Searched {
            bytes: q.clone(),
            stat: stat.clone(),
            report: report.clone(),
            kept: kept.clone(),
            passed,
        };
        if passed && stat.weights == 0 && stat.activations.is_empty() {
            return Err(Error::ThresholdsUnmet(
                "no static INT8 model meets the thresholds: only the float model does".into(),
            ));
        }
        if passed || round == SEARCH_ROUNDS {
            return Ok(done(passed));
        }
        let names: BTreeSet<String> = trace.dequantized.keys().cloned().collect();
        let want = tensors(env, &float_model, &names, eval)?;
        let dq_names: BTreeSet<String> = trace.dequantized.values().cloned().collect();
        let got = tensors(env, &Model::parse(&q)?, &dq_names, eval)?;
        let error = |t: &String| -> Option<f64> {
            let (a, b) = (want.get(t)?, got.get(trace.dequantized.get(t)?)?);
            Some(1.0 - crate::report::cosine(a, b))
        };
        let mut by_node: BTreeMap<String, f64> = BTreeMap::new();
        for (t, (node, read)) in &trace.blame {
            let Some(e) = error(t) else { continue };
            let upstream = read.iter().filter_map(error).fold(0.0, f64::max);
            let own = by_node.entry(node.clone()).or_default();
            *own = own.max(e - upstream);
        }
        let mut ranked: Vec<(String, f64)> = by_node
            .into_iter()
            .filter(|(n, e)| *e > 0.0 && !keep.contains(n))
            .collect();
        if ranked.is_empty() {
            return Err(Error::ThresholdsUnmet(format!(
                "no static INT8 model meets the thresholds: {} nodes kept in float, and no \
                 other quantized node adds error",
                kept.len()
            )));
        }
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (n, e) in ranked.into_iter().take(1 << round) {
            keep.insert(n.clone());
            kept.push((n, e));
        }
        round += 1;
    }
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
