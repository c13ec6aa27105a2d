//! Half precision, two ways.
//!
//! `fp16` ([`fp16_compute`]): the model computes in float16 — every float weight and constant
//! is float16, and the graph's float inputs and outputs are cast at the edges so clients keep
//! sending and receiving float32. This is what makes a GPU faster (tensor cores, half the
//! memory traffic). On the CPU, ONNX Runtime runs the operators it has no float16 kernel for in
//! float32 between casts it inserts itself, so the answers are the same but nothing is gained.
//!
//! `fp16-weights` ([`fp16`]): storage only. Each float initializer (or Constant-node tensor)
//! large enough to matter becomes a FLOAT16 tensor followed by a Cast back to float under its
//! original name, so the arithmetic stays float32: the file halves, and ONNX Runtime folds the
//! casts when it loads the model. It combines with the integer strategies.

use crate::onnx::{self, Model, graph, node, tensor, value_info};
use crate::proto::{Error, Message, Value};
use crate::quant::MIN_ELEMENTS;
use std::collections::{HashMap, HashSet};

use crate::onnx::tensor::{BOOL, FLOAT, FLOAT16, INT64, UINT8};

/// IEEE 754 binary16 from binary32, rounding to nearest even (overflow to ±inf, NaN kept).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the mantissa (with its implicit 1) into place, round to even.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut v = m >> shift;
        if rest > half || (rest == half && v & 1 == 1) {
            v += 1;
        }
        return sign | v as u16;
    }
    let mut v = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && v & 1 == 1) {
        v += 1; // may carry into the exponent, which is still correct (up to inf)
    }
    sign | v as u16
}

/// binary32 from IEEE 754 binary16 (exact: every half is a float).
pub fn f32_from_f16_bits(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value m · 2^-24, normalised for binary32.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | ((m << shift) & 0x3ff) << 13
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn half_tensor(name: &str, dims: &[i64], values: &[f32]) -> Message {
    onnx::make_tensor(
        name,
        dims,
        FLOAT16,
        values
            .iter()
            .flat_map(|&v| f16_bits(v).to_le_bytes())
            .collect(),
    )
}

fn cast_to_float(from: &str, to: &str) -> Message {
    cast(from, to, tensor::FLOAT)
}

/// Converts the model's large float weights to float16 in place — in the main graph and in
/// every If/Loop/Scan body — and returns how many.
pub fn fp16(model: &mut Model) -> Result<usize, Error> {
    let mut count = 0;
    let Some(renamed) = fp16_graph(&mut model.graph, &mut count)? else {
        return Ok(0);
    };
    let inits = model.graph.messages(graph::INITIALIZER)?;
    let nodes = model.graph.messages(graph::NODE)?;
    model.rewrite(&inits, &nodes, &renamed)?;
    Ok(count)
}

/// [`fp16`] on one graph, its subgraphs first: the initializers now produced by a Cast, or
/// `None` when nothing here or below changed. `count` numbers the float16 tensors.
fn fp16_graph(g: &mut Message, count: &mut usize) -> Result<Option<Vec<String>>, Error> {
    let mut subgraphs = false;
    let mut own = g.messages(graph::NODE)?;
    for n in &mut own {
        subgraphs |= onnx::map_subgraphs(n, &mut |sub| Ok(fp16_graph(sub, count)?.is_some()))?;
    }
    let inner = *count;
    let mut casts = Vec::new();
    let mut inits = Vec::new();
    for t in g.messages(graph::INITIALIZER)? {
        match onnx::f32_data(&t)? {
            Some(v) if v.len() >= MIN_ELEMENTS => {
                let name = onnx::name_of(&t);
                let hn = format!("rxd.h{count}");
                inits.push(half_tensor(&hn, &onnx::dims_of(&t)?, &v));
                casts.push((hn, name));
                *count += 1;
            }
            _ => inits.push(t),
        }
    }
    let mut nodes = Vec::new();
    for mut n in own {
        let is_const = onnx::op_type(&n) == "Constant";
        let tensor = if is_const {
            onnx::tensor_attr(&n, "value")?
        } else {
            None
        };
        let Some(t) = tensor else {
            nodes.push(n);
            continue;
        };
        match onnx::f32_data(&t)? {
            Some(v) if v.len() >= MIN_ELEMENTS => {
                let out = onnx::outputs(&n).into_iter().next().unwrap_or_default();
                let hn = format!("rxd.h{count}");
                *count += 1;
                let mut h = half_tensor("", &onnx::dims_of(&t)?, &v);
                h.replace(tensor::NAME, Vec::new());
                let mut attrs = n.messages(node::ATTRIBUTE)?;
                for a in &mut attrs {
                    if a.string(onnx::attr::NAME) == "value" {
                        a.replace(onnx::attr::T, vec![Value::Bytes(h.encode())]);
                    }
                }
                n.replace(
                    node::ATTRIBUTE,
                    attrs.iter().map(|a| Value::Bytes(a.encode())).collect(),
                );
                n.replace(node::OUTPUT, vec![Value::Bytes(hn.clone().into_bytes())]);
                nodes.push(n);
                nodes.push(cast_to_float(&hn, &out));
            }
            _ => nodes.push(n),
        }
    }
    let encode = |ms: &[Message]| ms.iter().map(|m| Value::Bytes(m.encode())).collect();
    if *count == inner {
        if !subgraphs {
            return Ok(None);
        }
        g.replace(graph::NODE, encode(&nodes));
        return Ok(Some(Vec::new()));
    }
    let mut all: Vec<Message> = casts.iter().map(|(h, n)| cast_to_float(h, n)).collect();
    all.extend(nodes);
    g.replace(graph::INITIALIZER, encode(&inits));
    g.replace(graph::NODE, encode(&all));
    Ok(Some(casts.into_iter().map(|(_, n)| n).collect()))
}

/// What `fp16` (compute) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HalfCompute {
    /// Float initializers and Constant tensors now float16.
    pub tensors: usize,
    /// Float values outside float16's range, clamped to ±65504.
    pub clamped: usize,
    /// Nodes kept in float32 (no float16 form in ONNX), with casts around them.
    pub kept_float: Vec<String>,
    /// The default domain's opset moved (from, to) so that float16 kernels exist.
    pub opset_upgraded: Option<(u64, u64)>,
}

/// The largest finite float16.
const F16_MAX: f32 = 65504.0;

fn set_elem_type(vi: &mut Message, t: u64) -> Result<(), Error> {
    let Some(mut ty) = vi.message(2)? else {
        return Ok(());
    };
    let Some(mut tt) = ty.message(1)? else {
        return Ok(());
    };
    tt.replace(1, vec![Value::Varint(t)]);
    ty.replace(1, vec![Value::Bytes(tt.encode())]);
    vi.replace(2, vec![Value::Bytes(ty.encode())]);
    Ok(())
}

/// A float tensor as float16 (name kept), values clamped to float16's range.
fn to_half(t: &Message, clamped: &mut usize) -> Result<Option<Message>, Error> {
    let Some(v) = onnx::f32_data(t)? else {
        return Ok(None);
    };
    let v: Vec<f32> = v
        .into_iter()
        .map(|x| {
            if x.is_finite() && x.abs() > F16_MAX {
                *clamped += 1;
                x.clamp(-F16_MAX, F16_MAX)
            } else {
                x
            }
        })
        .collect();
    let mut h = half_tensor(&onnx::name_of(t), &onnx::dims_of(t)?, &v);
    if onnx::name_of(t).is_empty() {
        h.replace(tensor::NAME, Vec::new());
    }
    Ok(Some(h))
}

fn set_attrs(n: &mut Message, attrs: &[Message]) {
    n.replace(
        node::ATTRIBUTE,
        attrs.iter().map(|a| Value::Bytes(a.encode())).collect(),
    );
}

fn tensor_attribute(name: &str, t: &Message) -> Message {
    let mut a = Message::default();
    a.push_str(onnx::attr::NAME, name);
    a.push_message(onnx::attr::T, t);
    a.push(onnx::attr::TYPE, Value::Varint(4));
    a
}

fn cast(from: &str, to: &str, ty: u64) -> Message {
    onnx::make_node("Cast", "", "", &[from], &[to], &[("to", ty as i64)])
}

/// Inputs that ONNX types as float32 whatever the node's data type: (op, input index).
const FLOAT32_INPUTS: &[(&str, usize)] = &[("Resize", 2), ("Upsample", 1)];
/// Operators with no float16 form in ONNX: they run in float32 between casts.
const FLOAT32_OPS: &[&str] = &["Range", "NonMaxSuppression"];
/// Operators whose `dtype` attribute chooses a float output (float32 when absent).
const DTYPE_OPS: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "EyeLike",
    "Bernoulli",
];

/// The data types of a node's outputs, from its inputs' types (`None`: not known). Enough
/// of ONNX's type rules to find where float values flow; not a full inference.
fn output_types(n: &Message, types: &HashMap<String, u64>) -> Result<Vec<Option<u64>>, Error> {
    let ins = onnx::inputs(n);
    let outs = onnx::outputs(n);
    let of = |i: usize| ins.get(i).and_then(|x| types.get(x)).copied();
    let first = ins.iter().find_map(|x| types.get(x)).copied();
    let all = |t: Option<u64>| vec![t; outs.len()];
    Ok(match onnx::op_type(n).as_str() {
        "Constant" => all(onnx::constant_type(n, FLOAT16)?),
        "Cast" => all(onnx::int_attr(n, "to")?.map(|t| t as u64)),
        "CastLike" => all(of(1)),
        "ConstantOfShape" => all(Some(
            onnx::tensor_attr(n, "value")?
                .and_then(|t| t.varint(tensor::DATA_TYPE))
                .unwrap_or(FLOAT),
        )),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => {
            all(Some(INT64))
        }
        "TopK" => vec![first, Some(INT64)],
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
        | "Xor" | "IsNaN" | "IsInf" => all(Some(BOOL)),
        "QuantizeLinear" => all(Some(of(2).unwrap_or(UINT8))),
        "DequantizeLinear" => all(of(1)),
        "Where" => all(of(1)),
        op if DTYPE_OPS.contains(&op) => all(Some(
            onnx::int_attr(n, "dtype")?
                .map(|t| t as u64)
                .unwrap_or(if op.ends_with("Like") {
                    first.unwrap_or(FLOAT)
                } else {
                    FLOAT
                }),
        )),
        _ => all(first),
    })
}

/// The data type of every value the graph's inputs, initializers and nodes define, as far as
/// [`output_types`] can tell (absent: not known).
pub(crate) fn value_types(model: &Model) -> Result<HashMap<String, u64>, Error> {
    let mut types = HashMap::new();
    for t in model.graph.messages(graph::INITIALIZER)? {
        if let Some(ty) = t.varint(tensor::DATA_TYPE) {
            types.insert(onnx::name_of(&t), ty);
        }
    }
    for i in model.graph.messages(graph::INPUT)? {
        if let Some(ty) = onnx::elem_type(&i) {
            types.entry(i.string(value_info::NAME)).or_insert(ty);
        }
    }
    for n in model.graph.messages(graph::NODE)? {
        for (o, t) in onnx::outputs(&n).into_iter().zip(output_types(&n, &types)?) {
            if let Some(t) = t {
                types.insert(o, t);
            }
        }
    }
    Ok(types)
}

/// Converts the whole model to float16 arithmetic: every float initializer and constant
/// becomes float16, casts to float16 become the model's float sources, Cast nodes to float
/// cast to float16 instead, and float graph inputs and outputs keep their float type through
/// a Cast at each (clients keep sending and receiving float32). Operators without a float16
/// form run in float32 between casts. Graphs with control flow (If/Loop/Scan subgraphs) are
/// refused: their bodies would need the same conversion.
pub fn fp16_compute(model: &mut Model) -> Result<HalfCompute, Error> {
    let mut out = HalfCompute::default();
    // Clip has float16 kernels in ONNX Runtime's CUDA EP from opset 12 on (before, float32
    // only: an opset-11 model's Clips would fall back to the CPU, with copies around each).
    // Opset 12 changed no node this affects but Dropout (its ratio became an input), so an
    // opset-11 graph without Dropout moves to 12; older ones keep their Clips in float32.
    let ops: HashSet<String> = model
        .graph
        .messages(graph::NODE)?
        .iter()
        .map(onnx::op_type)
        .collect();
    let opset = model.opset("").unwrap_or(0);
    let mut float32_ops: Vec<&str> = FLOAT32_OPS.to_vec();
    if opset < 12 && ops.contains("Clip") {
        if opset == 11 && !ops.contains("Dropout") {
            model.set_opset("", 12)?;
            out.opset_upgraded = Some((11, 12));
        } else {
            float32_ops.push("Clip");
        }
    }
    let mut types: HashMap<String, u64> = HashMap::new();
    let mut inits = Vec::new();
    for t in model.graph.messages(graph::INITIALIZER)? {
        let t = match to_half(&t, &mut out.clamped)? {
            Some(h) => {
                out.tensors += 1;
                h
            }
            None => t,
        };
        if let Some(ty) = t.varint(tensor::DATA_TYPE) {
            types.insert(onnx::name_of(&t), ty);
        }
        inits.push(t);
    }
    let init_names: HashSet<String> = inits.iter().map(onnx::name_of).collect();
    // Graph inputs: initializers listed there (old IR versions) leave the list; float inputs
    // are cast to float16 under a new name that every consumer reads instead.
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut nodes = Vec::new();
    let mut dropped = Vec::new();
    for i in model.graph.messages(graph::INPUT)? {
        let name = i.string(value_info::NAME);
        if init_names.contains(&name) {
            dropped.push(name);
        } else if onnx::elem_type(&i) == Some(FLOAT) {
            let h = format!("{name}.fp16");
            nodes.push(cast(&name, &h, FLOAT16));
            types.insert(h.clone(), FLOAT16);
            renamed.insert(name, h);
        } else if let Some(t) = onnx::elem_type(&i) {
            types.insert(name, t);
        }
    }
    // Graph outputs: a float output is produced under a new name and cast back to float.
    let mut out_renamed: HashMap<String, String> = HashMap::new();
    let mut out_casts = Vec::new();
    for o in model.graph.messages(graph::OUTPUT)? {
        let name = o.string(value_info::NAME);
        if onnx::elem_type(&o) == Some(FLOAT) && !renamed.contains_key(&name) {
            let h = format!("{name}.fp16");
            out_casts.push(cast(&h, &name, FLOAT));
            out_renamed.insert(name, h);
        }
    }
    let rename = |x: String| {
        renamed
            .get(&x)
            .or_else(|| out_renamed.get(&x))
            .cloned()
            .unwrap_or(x)
    };
    for (k, mut n) in model.graph.messages(graph::NODE)?.into_iter().enumerate() {
        let op = onnx::op_type(&n);
        if onnx::has_subgraph(&n)? {
            return Err(Error(format!(
                "node {} ({op}) has a subgraph: fp16 compute does not convert control flow \
                 (fp16-weights stores the weights in half precision without it)",
                n.string(node::NAME)
            )));
        }
        let mut attrs = n.messages(node::ATTRIBUTE)?;
        // Float sources inside the node: tensors in attributes, target types.
        for a in &mut attrs {
            let an = a.string(onnx::attr::NAME);
            match (op.as_str(), an.as_str()) {
                ("Constant" | "ConstantOfShape", "value") => {
                    if let Some(t) = a.message(onnx::attr::T)?
                        && let Some(h) = to_half(&t, &mut out.clamped)?
                    {
                        out.tensors += 1;
                        a.replace(onnx::attr::T, vec![Value::Bytes(h.encode())]);
                    }
                }
                ("Constant", "value_float" | "value_floats") => {
                    let v: Vec<f32> = a
                        .fixed32s(if an == "value_float" { 2 } else { 7 })?
                        .into_iter()
                        .map(f32::from_bits)
                        .collect();
                    let dims: Vec<i64> = if an == "value_float" {
                        vec![]
                    } else {
                        vec![v.len() as i64]
                    };
                    let mut h = half_tensor("", &dims, &v);
                    h.replace(tensor::NAME, Vec::new());
                    *a = tensor_attribute("value", &h);
                    out.tensors += 1;
                }
                ("Cast", "to") if a.varint(onnx::attr::I) == Some(FLOAT) => {
                    a.replace(onnx::attr::I, vec![Value::Varint(FLOAT16)]);
                }
                (op, "dtype")
                    if DTYPE_OPS.contains(&op) && a.varint(onnx::attr::I) == Some(FLOAT) =>
                {
                    a.replace(onnx::attr::I, vec![Value::Varint(FLOAT16)]);
                }
                _ => {}
            }
        }
        let names: Vec<String> = attrs.iter().map(|a| a.string(onnx::attr::NAME)).collect();
        if op == "ConstantOfShape" && !names.iter().any(|a| a == "value") {
            let mut zero = half_tensor("", &[1], &[0.0]);
            zero.replace(tensor::NAME, Vec::new());
            attrs.push(tensor_attribute("value", &zero));
        }
        if DTYPE_OPS.contains(&op.as_str())
            && !op.ends_with("Like")
            && !names.iter().any(|a| a == "dtype")
        {
            let mut a = Message::default();
            a.push_str(onnx::attr::NAME, "dtype");
            a.push(onnx::attr::I, Value::Varint(FLOAT16));
            a.push(onnx::attr::TYPE, Value::Varint(onnx::attr::TYPE_INT));
            attrs.push(a);
        }
        set_attrs(&mut n, &attrs);
        let ins: Vec<String> = onnx::inputs(&n).into_iter().map(rename).collect();
        let outs: Vec<String> = onnx::outputs(&n).into_iter().map(rename).collect();
        let mut ins2 = ins.clone();
        let mut outs2 = outs.clone();
        let whole = float32_ops.contains(&op.as_str());
        for (i, x) in ins.iter().enumerate() {
            let must = whole || FLOAT32_INPUTS.contains(&(op.as_str(), i));
            if must && !x.is_empty() && types.get(x) == Some(&FLOAT16) {
                let f = format!("{x}.f32.{k}.{i}");
                nodes.push(cast(x, &f, FLOAT));
                types.insert(f.clone(), FLOAT);
                ins2[i] = f;
            }
        }
        onnx::set_inputs(&mut n, ins2.iter().cloned());
        let tys = output_types(&n, &types)?;
        let mut after = Vec::new();
        for (o, (x, t)) in outs.iter().zip(&tys).enumerate() {
            if whole && *t == Some(FLOAT) {
                let f = format!("{x}.f32");
                after.push(cast(&f, x, FLOAT16));
                outs2[o] = f;
                types.insert(x.clone(), FLOAT16);
            } else if let Some(t) = t {
                types.insert(x.clone(), *t);
            }
        }
        if whole && ins2 != ins {
            out.kept_float
                .push(format!("{} ({op})", n.string(node::NAME)));
        }
        n.replace(
            node::OUTPUT,
            outs2
                .iter()
                .map(|x| Value::Bytes(x.clone().into_bytes()))
                .collect(),
        );
        nodes.push(n);
        nodes.extend(after);
    }
    nodes.extend(out_casts);
    // Intermediate value types recorded in the file follow.
    let mut vis = model.graph.messages(VALUE_INFO)?;
    for vi in &mut vis {
        if onnx::elem_type(vi) == Some(FLOAT) {
            set_elem_type(vi, FLOAT16)?;
        }
    }
    model.graph.replace(
        VALUE_INFO,
        vis.iter().map(|v| Value::Bytes(v.encode())).collect(),
    );
    model.rewrite(&inits, &nodes, &dropped)?;
    Ok(out)
}

/// GraphProto.value_info.
const VALUE_INFO: u32 = 13;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bits_match_ieee() {
        assert_eq!(f16_bits(0.0), 0x0000);
        assert_eq!(f16_bits(-0.0), 0x8000);
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-2.0), 0xc000);
        assert_eq!(f16_bits(65504.0), 0x7bff);
        assert_eq!(f16_bits(1e6), 0x7c00, "overflow is inf");
        assert_eq!(f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_eq!(f16_bits(5.960_464_5e-8), 0x0001, "smallest subnormal");
        assert_eq!(f16_bits(0.1), 0x2e66);
        assert_eq!(f16_bits(1.0 + 1.0 / 2048.0), 0x3c00, "ties to even");
        assert_eq!(f16_bits(1.0 + 3.0 / 2048.0), 0x3c02);
    }

    #[test]
    fn every_half_converts_back_exactly() {
        for h in 0..=u16::MAX {
            let f = f32_from_f16_bits(h);
            if f.is_nan() {
                assert_eq!(h & 0x7c00, 0x7c00);
                continue;
            }
            assert_eq!(f16_bits(f), h, "{h:#06x} → {f:e}");
        }
        assert_eq!(f32_from_f16_bits(0x3c00), 1.0);
        assert_eq!(f32_from_f16_bits(0x0001), 5.960_464_5e-8);
    }
}
