//! Dequantize-at-load: a weights-only compressed model (`int8-weights`, `fp16-weights` and
//! their combinations) turned back into the float model it stands for, so that it is small
//! on disk and runs at full speed. ONNX Runtime keeps a DequantizeLinear whose inputs are
//! constants as a node (QDQ fusions want it) and runs it on every inference: 1.5–6× slower
//! than float on the CPU. Here every DequantizeLinear whose inputs are all constants
//! (initializers or Constant nodes, of its own graph or an outer one) becomes a float
//! initializer holding exactly what the node would compute, `(q − zero point) × scale` in
//! float32 as ONNX Runtime computes it, and so does every Cast of a constant float16 tensor to
//! float (the int8 scales' and `fp16-weights`' casts, which ONNX Runtime folds at load anyway).
//! Nodes inside If/Loop/Scan bodies are folded too. Constants nothing reads any more are
//! dropped. Anything else — a DequantizeLinear of a computed value, a blocked one, data stored
//! outside the file — is left as it is and said so.
//!
//! A model that quantizes activations (static INT8: QuantizeLinear, integer kernels) is not a
//! weights-only form: its DequantizeLinear nodes are what ONNX Runtime fuses into integer
//! kernels, and folding them would make it slower. It is left alone, and the outcome says why.
//!
//! Must not: change what the graph computes beyond float rounding (it does not round at all:
//! the folded values are bit-identical to what the node produces), or touch fields it does not
//! understand.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::onnx::tensor::{INT16, INT32, INT32_DATA, UINT16};
use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Error, Message, Value};

/// What [`dequantize`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dequantized {
    /// DequantizeLinear nodes replaced by float initializers.
    pub folded: usize,
    /// Casts of float16 constants to float replaced by float initializers.
    pub casts: usize,
    /// Constant tensors (the integer weights, scales, zero points) nothing reads any more,
    /// dropped.
    pub dropped: usize,
    /// DequantizeLinear nodes left as they were: (output, why).
    pub left: Vec<(String, String)>,
    /// Set when the model was left alone as a whole (its activations are quantized).
    pub refused: Option<String>,
}

impl Dequantized {
    /// Whether the model changed: some DequantizeLinear was folded (casts alone do not count:
    /// ONNX Runtime folds those itself).
    pub fn changed(&self) -> bool {
        self.folded > 0
    }
}

impl std::fmt::Display for Dequantized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(why) = &self.refused {
            return write!(f, "not dequantized: {why}");
        }
        if self.folded == 0 {
            write!(f, "nothing to dequantize: no DequantizeLinear of constants")?;
        } else {
            write!(
                f,
                "{} DequantizeLinear and {} Cast nodes folded into float weights ({} constants \
                 dropped)",
                self.folded, self.casts, self.dropped
            )?;
        }
        if !self.left.is_empty() {
            write!(
                f,
                "; {} DequantizeLinear left as they were",
                self.left.len()
            )?;
        }
        Ok(())
    }
}

/// Operators that mean activations are quantized (static or dynamic INT8): such a model is not
/// a weights-only form.
const ACTIVATION_QUANT: &[&str] = &[
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
];

/// [`dequantize`] on model bytes: the rewritten bytes (`None` when nothing changed, so the
/// original bytes stand) and what was done.
pub fn dequantize_bytes(bytes: &[u8]) -> Result<(Option<Vec<u8>>, Dequantized), Error> {
    // Every model a daemon loads comes here: one without the operator's name anywhere in its
    // bytes (a float model) is not parsed, which would copy it.
    const OP: &[u8] = b"DequantizeLinear";
    if !bytes.windows(OP.len()).any(|w| w == OP) {
        return Ok((None, Dequantized::default()));
    }
    let mut model = Model::parse(bytes)?;
    let d = dequantize(&mut model)?;
    Ok((d.changed().then(|| model.encode()), d))
}

/// Folds the DequantizeLinear nodes of constants (and the float16 casts) of `model` into float
/// initializers, in place. A model whose activations are quantized is left as it is.
pub fn dequantize(model: &mut Model) -> Result<Dequantized, Error> {
    let mut out = Dequantized::default();
    let nodes = model.graph.messages(graph::NODE)?;
    let all: Vec<Message> = nodes
        .iter()
        .cloned()
        .chain(onnx::nested_nodes(&nodes)?)
        .collect();
    if let Some(n) = all
        .iter()
        .find(|n| ACTIVATION_QUANT.contains(&onnx::op_type(n).as_str()))
    {
        out.refused = Some(format!(
            "its activations are quantized ({} nodes): its DequantizeLinear nodes feed \
             integer kernels",
            onnx::op_type(n)
        ));
        return Ok(out);
    }
    if !all.iter().any(|n| onnx::op_type(n) == "DequantizeLinear") {
        return Ok(out);
    }
    let outputs = model.output_names()?;
    let mut freed = BTreeSet::new();
    let dropped = fold_graph(
        &mut model.graph,
        &Scope::default(),
        &outputs,
        &mut freed,
        &mut out,
    )?;
    if out.folded == 0 && out.casts == 0 {
        return Ok(out);
    }
    // Weights dropped from the main graph leave its inputs too (old models list them there).
    let inits = model.graph.messages(graph::INITIALIZER)?;
    let nodes = model.graph.messages(graph::NODE)?;
    model.rewrite(&inits, &nodes, &dropped)?;
    Ok(out)
}

/// The constant tensors a graph sees: its own, then its outer graphs' (by name).
#[derive(Default)]
struct Scope<'a> {
    own: HashMap<String, Message>,
    outer: Option<&'a Scope<'a>>,
}

impl Scope<'_> {
    fn get(&self, name: &str) -> Option<&Message> {
        self.own
            .get(name)
            .or_else(|| self.outer.and_then(|o| o.get(name)))
    }
}

/// Folds one graph (and, as each node carrying subgraphs is reached, its bodies). Returns the
/// names of the initializers it dropped.
/// `freed` gathers the inputs of the nodes folded (here and in every subgraph): the constants
/// that may now go unread.
fn fold_graph(
    g: &mut Message,
    outer: &Scope,
    graph_outputs: &BTreeSet<String>,
    freed: &mut BTreeSet<String>,
    out: &mut Dequantized,
) -> Result<Vec<String>, Error> {
    let mut scope = Scope {
        own: HashMap::new(),
        outer: Some(outer),
    };
    let mut inits = g.messages(graph::INITIALIZER)?;
    for t in &inits {
        scope.own.insert(onnx::name_of(t), t.clone());
    }
    let mut kept = Vec::new();
    let mut changed = false;
    for mut n in g.messages(graph::NODE)? {
        let op = onnx::op_type(&n);
        if op == "Constant"
            && let (Some(name), Some(t)) = (
                onnx::outputs(&n).into_iter().next(),
                onnx::tensor_attr(&n, "value")?,
            )
        {
            scope.own.insert(name, t);
        }
        let folded = match op.as_str() {
            "DequantizeLinear" => match fold_dequantize(&n, &scope)? {
                Ok(t) => {
                    out.folded += 1;
                    Some(t)
                }
                Err(why) => {
                    let name = onnx::outputs(&n).into_iter().next().unwrap_or_default();
                    out.left.push((name, why));
                    None
                }
            },
            "Cast" => {
                let t = fold_cast(&n, &scope)?;
                out.casts += usize::from(t.is_some());
                t
            }
            _ => None,
        };
        if let Some(t) = folded {
            freed.extend(onnx::inputs(&n));
            scope.own.insert(onnx::name_of(&t), t.clone());
            inits.push(t);
            changed = true;
            continue;
        }
        if onnx::has_subgraph(&n)? {
            let inner_outputs = BTreeSet::new();
            changed |= onnx::map_subgraphs(&mut n, &mut |sub| {
                let before = (out.folded, out.casts);
                fold_graph(sub, &scope, &inner_outputs, freed, out)?;
                Ok((out.folded, out.casts) != before)
            })?;
        }
        kept.push(n);
    }
    if !changed {
        return Ok(Vec::new());
    }
    // Drop the folded nodes' constants that nothing reads any more: not a node here or in a
    // subgraph, not an output. (Subgraphs dropped the ones they read themselves.)
    let mut read: BTreeSet<String> = graph_outputs.clone();
    for v in g.messages(graph::OUTPUT)? {
        read.insert(v.string(onnx::value_info::NAME));
    }
    for n in kept.iter().cloned().chain(onnx::nested_nodes(&kept)?) {
        read.extend(onnx::inputs(&n));
    }
    let mut dropped = Vec::new();
    inits.retain(|t| {
        let name = onnx::name_of(t);
        let keep = read.contains(&name) || !freed.contains(&name);
        if !keep {
            dropped.push(name);
        }
        keep
    });
    kept.retain(|n| {
        let unread = onnx::op_type(n) == "Constant"
            && onnx::outputs(n)
                .iter()
                .all(|o| freed.contains(o) && !read.contains(o));
        if unread {
            dropped.extend(onnx::outputs(n));
        }
        !unread
    });
    out.dropped += dropped.len();
    let encode = |ms: &[Message]| ms.iter().map(|m| Value::Bytes(m.encode())).collect();
    g.replace(graph::INITIALIZER, encode(&inits));
    g.replace(graph::NODE, encode(&kept));
    Ok(dropped)
}

/// A constant's values as f64-exact numbers of its element type (`None`: a type or storage
/// this does not read).
fn numbers(t: &Message) -> Result<Option<(u64, Vec<f64>)>, Error> {
    let ty = t.varint(tensor::DATA_TYPE).unwrap_or(0);
    if t.varint(tensor::DATA_LOCATION) == Some(1) {
        return Ok(None);
    }
    let raw = t.bytes(tensor::RAW_DATA);
    let v: Vec<f64> = match (ty, raw) {
        (tensor::FLOAT, _) => match onnx::f32_data(t)? {
            Some(v) => v.into_iter().map(f64::from).collect(),
            None => return Ok(None),
        },
        (tensor::INT8, Some(r)) => r.iter().map(|&b| f64::from(b as i8)).collect(),
        (tensor::UINT8, Some(r)) => r.iter().map(|&b| f64::from(b)).collect(),
        (INT16, Some(r)) => le(r, |c| f64::from(i16::from_le_bytes([c[0], c[1]])), 2)?,
        (UINT16, Some(r)) => le(r, |c| f64::from(u16::from_le_bytes([c[0], c[1]])), 2)?,
        (INT32, Some(r)) => le(
            r,
            |c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            4,
        )?,
        (tensor::FLOAT16, Some(r)) => le(
            r,
            |c| {
                f64::from(crate::half::f32_from_f16_bits(u16::from_le_bytes([
                    c[0], c[1],
                ])))
            },
            2,
        )?,
        (tensor::INT8 | tensor::UINT8 | INT16 | UINT16 | INT32 | tensor::FLOAT16, None) => {
            // int32_data holds each value in an int32 (float16 as its bits).
            let ints = t.varints(INT32_DATA)?;
            ints.into_iter()
                .map(|x| {
                    let x = x as u32 as i32;
                    match ty {
                        tensor::INT8 => f64::from(x as i8),
                        tensor::UINT8 => f64::from(x as u8),
                        INT16 => f64::from(x as i16),
                        UINT16 => f64::from(x as u16),
                        tensor::FLOAT16 => f64::from(crate::half::f32_from_f16_bits(x as u16)),
                        _ => f64::from(x),
                    }
                })
                .collect()
        }
        _ => return Ok(None),
    };
    Ok(Some((ty, v)))
}

fn le(raw: &[u8], f: impl Fn(&[u8]) -> f64, width: usize) -> Result<Vec<f64>, Error> {
    if !raw.len().is_multiple_of(width) {
        return Err(Error(format!(
            "raw_data of {} bytes is not whole values",
            raw.len()
        )));
    }
    Ok(raw.chunks_exact(width).map(f).collect())
}

fn element_count(dims: &[i64]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// A DequantizeLinear of constants as the float initializer it computes, or why not.
fn fold_dequantize(n: &Message, scope: &Scope) -> Result<Result<Message, String>, Error> {
    let ins = onnx::inputs(n);
    let Some(out_name) = onnx::outputs(n).into_iter().next() else {
        return Ok(Err("no output".into()));
    };
    if !(2..=3).contains(&ins.len()) || ins[..2].iter().any(String::is_empty) {
        return Ok(Err(
            "not an (x, scale[, zero point]) DequantizeLinear".into()
        ));
    }
    if onnx::int_attr(n, "block_size")?.is_some_and(|b| b != 0) {
        return Ok(Err("blocked quantization (block_size) is not folded".into()));
    }
    let mut tensors = Vec::new();
    for name in ins.iter().filter(|i| !i.is_empty()) {
        let Some(t) = scope.get(name) else {
            return Ok(Err(format!("{name} is computed, not a constant")));
        };
        let Some(values) = numbers(t)? else {
            return Ok(Err(format!("{name}: a type or storage this does not read")));
        };
        tensors.push((onnx::dims_of(t)?, values));
    }
    let (dims, (x_ty, x)) = (&tensors[0].0, &tensors[0].1);
    if !matches!(*x_ty, tensor::INT8 | tensor::UINT8 | INT16 | UINT16 | INT32) {
        return Ok(Err(format!("x of element type {x_ty} is not an integer")));
    }
    let (scale_ty, scale) = &tensors[1].1;
    if *scale_ty != tensor::FLOAT {
        // A float16 scale gives a float16 output: not a float weight.
        return Ok(Err("the scale is not float".into()));
    }
    let zero: Vec<f64> = tensors
        .get(2)
        .map(|(_, (_, z))| z.clone())
        .unwrap_or_else(|| vec![0.0; scale.len()]);
    if element_count(dims) != Some(x.len()) || zero.len() != scale.len() {
        return Ok(Err("tensor sizes do not match their dims".into()));
    }
    let (channels, inner) = if scale.len() == 1 {
        (1, x.len().max(1))
    } else {
        let rank = dims.len() as i64;
        let axis = onnx::int_attr(n, "axis")?.unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) || dims[axis as usize] as usize != scale.len() {
            return Ok(Err(format!(
                "{} scales do not match axis {axis} of dims {dims:?}",
                scale.len()
            )));
        }
        let inner = element_count(&dims[axis as usize + 1..]).unwrap_or(1);
        (scale.len(), inner)
    };
    // As ONNX Runtime: the difference in int32, converted to float, times the float scale.
    let values: Vec<u8> = x
        .iter()
        .enumerate()
        .flat_map(|(i, &q)| {
            let c = (i / inner) % channels;
            let d = (q as i32 - zero[c] as i32) as f32;
            (d * scale[c] as f32).to_le_bytes()
        })
        .collect();
    Ok(Ok(onnx::make_tensor(
        &out_name,
        dims,
        tensor::FLOAT,
        values,
    )))
}

/// A Cast of a float16 constant to float as the float initializer it computes.
fn fold_cast(n: &Message, scope: &Scope) -> Result<Option<Message>, Error> {
    if onnx::int_attr(n, "to")? != Some(tensor::FLOAT as i64) {
        return Ok(None);
    }
    let (Some(input), Some(out_name)) = (
        onnx::inputs(n).into_iter().next(),
        onnx::outputs(n).into_iter().next(),
    ) else {
        return Ok(None);
    };
    let Some(t) = scope.get(&input) else {
        return Ok(None);
    };
    if t.varint(tensor::DATA_TYPE) != Some(tensor::FLOAT16) {
        return Ok(None);
    }
    let Some((_, v)) = numbers(t)? else {
        return Ok(None);
    };
    let dims = onnx::dims_of(t)?;
    let raw = v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
    Ok(Some(onnx::make_tensor(
        &out_name,
        &dims,
        tensor::FLOAT,
        raw,
    )))
}

/// The node count of a model by operator, at every depth (a model info's `ops` figure, and
/// what tests check for DequantizeLinear).
pub fn op_counts(bytes: &[u8]) -> Result<BTreeMap<String, usize>, Error> {
    let m = Model::parse(bytes)?;
    let nodes = m.graph.messages(graph::NODE)?;
    let mut counts = BTreeMap::new();
    for n in nodes.iter().chain(&onnx::nested_nodes(&nodes)?) {
        *counts.entry(onnx::op_type(n)).or_default() += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::node;

    fn graph_of(nodes: &[Message], inits: &[Message], outputs: &[&str]) -> Message {
        let mut g = Message::default();
        for n in nodes {
            g.push_message(graph::NODE, n);
        }
        for t in inits {
            g.push_message(graph::INITIALIZER, t);
        }
        for o in outputs {
            let mut v = Message::default();
            v.push_str(onnx::value_info::NAME, o);
            g.push_message(graph::OUTPUT, &v);
        }
        g
    }

    fn model_of(g: &Message) -> Model {
        let mut m = Message::default();
        m.push(onnx::model::IR_VERSION, Value::Varint(8));
        m.push_message(onnx::model::GRAPH, g);
        let mut o = Message::default();
        o.push_str(onnx::opset::DOMAIN, "");
        o.push(onnx::opset::VERSION, Value::Varint(17));
        m.push_message(onnx::model::OPSET_IMPORT, &o);
        Model::parse(&m.encode()).unwrap()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn floats_of(t: &Message) -> Vec<f32> {
        onnx::f32_data(t).unwrap().unwrap()
    }

    /// A per-channel DequantizeLinear behind a float16 scale Cast, as `int8-weights` writes
    /// it, feeding a MatMul: the weight becomes a float initializer with exactly
    /// `q × scale` per column, the int8 and float16 tensors go, the MatMul stays.
    #[test]
    fn a_per_channel_dequantize_of_constants_becomes_the_float_weight() {
        let q = onnx::make_tensor("q", &[2, 3], tensor::INT8, vec![127, 0xC0, 1, 0x81, 5, 0]);
        let scales = [0.5f32, 0.25, 3.0];
        let hs = onnx::make_tensor(
            "hs",
            &[3],
            tensor::FLOAT16,
            scales
                .iter()
                .flat_map(|&s| crate::half::f16_bits(s).to_le_bytes())
                .collect(),
        );
        let cast = onnx::make_node("Cast", "", "", &["hs"], &["s"], &[("to", 1)]);
        let dq = onnx::make_node(
            "DequantizeLinear",
            "",
            "",
            &["q", "s"],
            &["w"],
            &[("axis", 1)],
        );
        let mm = onnx::make_node("MatMul", "", "", &["x", "w"], &["y"], &[]);
        let mut m = model_of(&graph_of(&[cast, dq, mm], &[q, hs], &["y"]));
        let d = dequantize(&mut m).unwrap();
        assert_eq!((d.folded, d.casts, d.dropped), (1, 1, 3), "{d}");
        assert!(d.changed() && d.left.is_empty());
        let nodes = m.graph.messages(graph::NODE).unwrap();
        assert_eq!(
            nodes.iter().map(onnx::op_type).collect::<Vec<_>>(),
            ["MatMul"]
        );
        let inits = m.graph.messages(graph::INITIALIZER).unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(onnx::name_of(&inits[0]), "w");
        assert_eq!(onnx::dims_of(&inits[0]).unwrap(), [2, 3]);
        assert_eq!(
            floats_of(&inits[0]),
            [63.5, -16.0, 3.0, -63.5, 1.25, 0.0],
            "row-major [2, 3], scale per column"
        );
    }

    /// A uint8 per-tensor DequantizeLinear with a zero point: `(q − zp) × scale`.
    #[test]
    fn zero_points_and_per_tensor_scales_are_honoured() {
        let q = onnx::make_tensor("q", &[4], tensor::UINT8, vec![0, 128, 255, 130]);
        let s = onnx::make_tensor("s", &[], tensor::FLOAT, f32s(&[0.5]));
        let z = onnx::make_tensor("z", &[], tensor::UINT8, vec![128]);
        let dq = onnx::make_node("DequantizeLinear", "", "", &["q", "s", "z"], &["w"], &[]);
        let add = onnx::make_node("Add", "", "", &["x", "w"], &["y"], &[]);
        let mut m = model_of(&graph_of(&[dq, add], &[q, s, z], &["y"]));
        let d = dequantize(&mut m).unwrap();
        assert_eq!(d.folded, 1);
        let inits = m.graph.messages(graph::INITIALIZER).unwrap();
        assert_eq!(floats_of(&inits[0]), [-64.0, 0.0, 63.5, 1.0]);
    }

    /// A model without DequantizeLinear comes back unchanged, and says so; one whose
    /// activations are quantized is refused as a whole; a DequantizeLinear of a computed value
    /// is left and named.
    #[test]
    fn what_is_not_a_weights_only_form_is_left_and_said_so() {
        let w = onnx::make_tensor("w", &[2], tensor::FLOAT, f32s(&[1.0, 2.0]));
        let add = onnx::make_node("Add", "", "", &["x", "w"], &["y"], &[]);
        let plain = model_of(&graph_of(&[add], &[w], &["y"])).encode();
        let (bytes, d) = dequantize_bytes(&plain).unwrap();
        assert!(bytes.is_none() && !d.changed(), "{d}");
        assert!(d.to_string().starts_with("nothing to dequantize"), "{d}");

        let s = onnx::make_tensor("s", &[], tensor::FLOAT, f32s(&[0.1]));
        let qx = onnx::make_node("QuantizeLinear", "", "", &["x", "s"], &["xq"], &[]);
        let dq = onnx::make_node("DequantizeLinear", "", "", &["xq", "s"], &["y"], &[]);
        let static_form = model_of(&graph_of(&[qx, dq], std::slice::from_ref(&s), &["y"])).encode();
        let (bytes, d) = dequantize_bytes(&static_form).unwrap();
        assert!(bytes.is_none());
        assert!(
            d.refused.as_deref().unwrap().contains("QuantizeLinear"),
            "{d}"
        );

        let relu = onnx::make_node("Relu", "", "", &["x"], &["r"], &[]);
        let dq = onnx::make_node("DequantizeLinear", "", "", &["r", "s"], &["y"], &[]);
        let computed = model_of(&graph_of(&[relu, dq], &[s], &["y"])).encode();
        let (bytes, d) = dequantize_bytes(&computed).unwrap();
        assert!(bytes.is_none());
        assert_eq!(d.left.len(), 1);
        assert!(d.left[0].1.contains("computed"), "{:?}", d.left);
    }

    /// Silero's layout: weights as Constant nodes inside an If branch (int8-weights makes the
    /// Constant a DequantizeLinear of an initializer of the branch) and a scale from the outer
    /// graph: folded inside the branch; the outer scale, read by nothing else, is dropped.
    #[test]
    fn dequantize_nodes_inside_subgraphs_are_folded() {
        let q = onnx::make_tensor("q", &[2], tensor::INT8, vec![2, 0xFE]);
        let dq = onnx::make_node("DequantizeLinear", "", "", &["q", "s"], &["w"], &[]);
        let mul = onnx::make_node("Mul", "", "", &["x", "w"], &["b"], &[]);
        let branch = graph_of(&[dq, mul], &[q], &["b"]);
        let mut iff = onnx::make_node("If", "", "", &["c"], &["y"], &[]);
        let mut a = Message::default();
        a.push_str(onnx::attr::NAME, "then_branch");
        a.push_message(onnx::attr::G, &branch);
        iff.push_message(node::ATTRIBUTE, &a);
        let s = onnx::make_tensor("s", &[], tensor::FLOAT, f32s(&[0.25]));
        let mut m = model_of(&graph_of(&[iff], &[s], &["y"]));
        let d = dequantize(&mut m).unwrap();
        assert_eq!(d.folded, 1, "{d}");
        assert!(m.graph.messages(graph::INITIALIZER).unwrap().is_empty());
        let counts = op_counts(&m.encode()).unwrap();
        assert_eq!(counts.get("DequantizeLinear"), None, "{counts:?}");
        assert_eq!(counts.get("Mul"), Some(&1));
        let inner = onnx::nested_nodes(&m.graph.messages(graph::NODE).unwrap()).unwrap();
        assert_eq!(inner.len(), 1);
        let iff = &m.graph.messages(graph::NODE).unwrap()[0];
        let attr = iff.messages(node::ATTRIBUTE).unwrap()[0].clone();
        let branch = attr.message(onnx::attr::G).unwrap().unwrap();
        let inits = branch.messages(graph::INITIALIZER).unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(floats_of(&inits[0]), [0.5, -0.5]);
    }
}
