//! `int8-weights`: per-channel symmetric INT8 quantization of the weight initializers of
//! MatMul, Gemm and Conv, in the QDQ form ONNX Runtime understands — each weight becomes an
//! int8 initializer, a float scale per output channel and a zero point, and a
//! DequantizeLinear node that produces the original name, so every consumer is unchanged.
//! Weights stored as Constant nodes (as paddle2onnx writes them: PP-OCR) are converted too:
//! the Constant becomes the DequantizeLinear node, its tensor the int8 initializer.
//! What cannot be converted (a weight that is not a float tensor, is tiny, is shared by
//! other kinds of consumers, or has external data) stays as it is, with the reason reported.
//! Opsets below 13 have no per-axis DequantizeLinear: ONNX Runtime's `com.microsoft` one is used
//! instead, so the model's own opset (and the meaning of its other operators) is left alone.

use std::collections::BTreeMap;

use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Error, Message, Value};

/// Weights with fewer elements than this stay in float: int8 saves 3 bytes per element, and
/// a scale and zero point per channel plus three tensor headers and a node cost ~150 bytes.
pub const MIN_ELEMENTS: usize = 64;

/// What happened to each weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// (initializer, consumer op, channel axis, channels)
    pub converted: Vec<(String, String, i64, usize)>,
    /// (initializer, why it stayed)
    pub kept: Vec<(String, String)>,
}

/// How a consumer reads a weight at one of its inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reads {
    /// As a weight with channels along this axis (MatMul, Gemm, Conv, recurrent ops).
    Weight(i64),
    /// Moves it (Slice, Concat, Transpose, …) to where a weight is read: a float matrix read
    /// only this way is a weight an exporter sliced or reordered (Silero's LSTM gates).
    Moves,
    /// Anything else: not a weight.
    Other,
}

/// How `node` reads its input `index`.
fn reads(node: &Message, index: usize) -> Result<Reads, Error> {
    Ok(match weight_axis(node, index)? {
        Some(axis) => Reads::Weight(axis),
        None => match (onnx::op_type(node).as_str(), index) {
            (
                "Slice" | "Split" | "Gather" | "Transpose" | "Reshape" | "Squeeze" | "Unsqueeze"
                | "Flatten" | "Identity",
                0,
            )
            | ("Concat", _) => Reads::Moves,
            _ => Reads::Other,
        },
    })
}

/// The channel axis a consumer quantizes its weight along, if it takes one at `index`.
fn weight_axis(node: &Message, index: usize) -> Result<Option<i64>, Error> {
    let op = onnx::op_type(node);
    Ok(match (op.as_str(), index) {
        ("MatMul", 1) => Some(1),
        ("Gemm", 1) => Some(if onnx::int_attr(node, "transB")? == Some(1) {
            0
        } else {
            1
        }),
        ("Conv", 1) => Some(0),
        // Recurrent weights [directions, gates × hidden, ·]: per gate row.
        ("LSTM" | "GRU" | "RNN", 1 | 2) => Some(1),
        _ => None,
    })
}

/// Quantizes `w` (shape `dims`) per slice along `axis`: int8 values and one scale per slice.
pub fn quantize_per_channel(w: &[f32], dims: &[i64], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let scales = channel_scales(w, dims, axis);
    (quantize_with(w, dims, axis, &scales), scales)
}

/// The symmetric scale of each slice along `axis`: its largest magnitude / 127 (1 for an
/// all-zero or non-finite slice).
fn channel_scales(w: &[f32], dims: &[i64], axis: usize) -> Vec<f32> {
    let channels = dims[axis] as usize;
    let inner: usize = dims[axis + 1..].iter().map(|&d| d as usize).product();
    let mut max = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = (i / inner) % channels;
        max[c] = max[c].max(v.abs());
    }
    max.iter()
        .map(|&m| {
            if m > 0.0 && m.is_finite() {
                m / 127.0
            } else {
                1.0
            }
        })
        .collect()
}

/// `w`'s int8 values against the given per-slice scales.
fn quantize_with(w: &[f32], dims: &[i64], axis: usize, scales: &[f32]) -> Vec<i8> {
    let inner: usize = dims[axis + 1..].iter().map(|&d| d as usize).product();
    w.iter()
        .enumerate()
        .map(|(i, v)| {
            let s = scales[(i / inner) % scales.len()];
            (v / s).round().clamp(-127.0, 127.0) as i8
        })
        .collect()
}

/// Scales are stored as float16 (behind a Cast back to float, which ONNX Runtime folds when
/// it loads the model) from this many channels on: 2 bytes saved per channel against ~30 for
/// the Cast node. Their rounding (2^-11 relative) is far below int8's step (1/127 of the
/// range); the int8 values are computed against the rounded scale. On the 0.6 MB PP-OCR
/// classifier this is 4 KB of its 185 KB.
const HALF_SCALES_MIN: usize = 16;

/// The smallest normal float16: scales below it would lose precision (or become 0).
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// The quantized form of one weight: its int8 tensor and per-channel scales (short generated
/// names, `rxd.q<k>`/`rxd.s<k>`: with dozens of convs, long derived names cost kilobytes), and
/// the node that dequantizes them into `name`, after a Cast when the scales are stored as
/// float16. No zero point is stored: symmetric quantization's is 0, DequantizeLinear's default.
fn quantized(
    name: &str,
    k: usize,
    dims: &[i64],
    values: &[f32],
    axis: i64,
    domain: &str,
    half_scales: bool,
) -> (Vec<Message>, Option<Message>, Message, usize) {
    // Per channel always: one scale per tensor for depthwise convs (9 weights per channel)
    // saved 1.3 KB on the PP-OCR classifier but dropped its cosine from 0.9998 to 0.9946.
    let mut scales = channel_scales(values, dims, axis as usize);
    let half = half_scales
        && scales.len() >= HALF_SCALES_MIN
        && scales
            .iter()
            .all(|&s| (F16_MIN_NORMAL..=65504.0).contains(&s));
    if half {
        // The int8 values are computed against the scale as it will be stored.
        for s in &mut scales {
            *s = crate::half::f32_from_f16_bits(crate::half::f16_bits(*s));
        }
    }
    let q = quantize_with(values, dims, axis as usize, &scales);
    let channels = scales.len();
    let (qn, sn) = (format!("rxd.q{k}"), format!("rxd.s{k}"));
    let mut inits = vec![onnx::make_tensor(
        &qn,
        dims,
        tensor::INT8,
        q.iter().map(|&v| v as u8).collect(),
    )];
    let (scale_input, cast) = if half {
        let hn = format!("rxd.h{k}s");
        inits.push(onnx::make_tensor(
            &hn,
            &[channels as i64],
            tensor::FLOAT16,
            scales
                .iter()
                .flat_map(|&s| crate::half::f16_bits(s).to_le_bytes())
                .collect(),
        ));
        let cast = onnx::make_node(
            "Cast",
            "",
            "",
            &[&hn],
            &[&sn],
            &[("to", tensor::FLOAT as i64)],
        );
        (sn, Some(cast))
    } else {
        inits.push(onnx::make_tensor(
            &sn,
            &[channels as i64],
            tensor::FLOAT,
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
        (sn, None)
    };
    let node = onnx::make_node(
        "DequantizeLinear",
        domain,
        "",
        &[&qn, &scale_input],
        &[name],
        &[("axis", axis)],
    );
    (inits, cast, node, channels)
}

/// Why the sensitivity search left a weight in float.
pub const KEPT_BY_SEARCH: &str = "kept in float by the sensitivity search";

/// A quantizable weight: channel axis, dims, values.
type Weight = (i64, Vec<i64>, Vec<f32>);

/// Decides whether a weight named `name` with consumers `uses` can be quantized: the axis, or
/// why not (`None` for tensors that are not weights at all).
fn eligibility(
    nodes: &[Message],
    uses: &[(usize, usize)],
    t: &Message,
) -> Result<Option<Result<Weight, String>>, Error> {
    let mut how = Vec::new();
    for &(n, i) in uses {
        how.push(reads(&nodes[n], i)?);
    }
    // Movers read whatever the weight readers read: they do not vote on the axis.
    let axes: Vec<Option<i64>> = how
        .iter()
        .filter(|r| **r != Reads::Moves)
        .map(|r| match r {
            Reads::Weight(a) => Some(*a),
            _ => None,
        })
        .collect();
    if axes.is_empty() {
        // Only moved: a weight when it is a float matrix worth converting, per row.
        if how.is_empty() {
            return Ok(None);
        }
        let dims = onnx::dims_of(t)?;
        return Ok(match onnx::f32_data(t)? {
            Some(values) if values.len() >= MIN_ELEMENTS && dims.len() >= 2 => {
                Some(Ok((0, dims, values)))
            }
            _ => None,
        });
    }
    if axes.iter().all(Option::is_none) {
        return Ok(None);
    }
    let Some(axis) = axes[0].filter(|a| axes.iter().all(|x| x == &Some(*a))) else {
        return Ok(Some(Err(
            "shared by consumers that are not all quantizable the same way".into(),
        )));
    };
    let dims = onnx::dims_of(t)?;
    let Some(values) = onnx::f32_data(t)? else {
        return Ok(Some(Err("not a float tensor stored in the file".into())));
    };
    if values.len() < MIN_ELEMENTS {
        return Ok(Some(Err(format!(
            "{} elements: too small to gain",
            values.len()
        ))));
    }
    if dims.len() < 2 || axis as usize >= dims.len() {
        return Ok(Some(Err(format!(
            "{} dimension(s), no channel axis {axis}",
            dims.len()
        ))));
    }
    Ok(Some(Ok((axis, dims, values))))
}

/// Rewrites `model` in place; returns what was converted and what was kept.
pub fn int8_weights(model: &mut Model) -> Result<Outcome, Error> {
    int8_weights_except(model, &Default::default())
}

/// Like [`int8_weights`], keeping the weights named in `keep` in float (the sensitivity
/// search's choice).
pub fn int8_weights_except(
    model: &mut Model,
    keep: &std::collections::BTreeSet<String>,
) -> Result<Outcome, Error> {
    quantize_weights(model, keep, true)
}

/// [`int8_weights`] with every scale a float32 initializer: the static-INT8 strategy reads
/// them back to scale the biases, and ONNX Runtime's QDQ fusion wants them constant.
/// Weights named in `keep` stay float.
pub fn int8_weights_float_scales(
    model: &mut Model,
    keep: &std::collections::BTreeSet<String>,
) -> Result<Outcome, Error> {
    quantize_weights(model, keep, false)
}

fn quantize_weights(
    model: &mut Model,
    keep: &std::collections::BTreeSet<String>,
    half_scales: bool,
) -> Result<Outcome, Error> {
    let domain = if model.opset("").unwrap_or(0) >= 13 {
        ""
    } else {
        "com.microsoft"
    };
    let mut out = Outcome::default();
    let how = How {
        keep,
        domain,
        half_scales,
    };
    let Some(replaced) = quantize_graph(&mut model.graph, &how, &mut out)? else {
        return Ok(out);
    };
    // The main graph's initializers that became nodes leave its inputs (old models list
    // initializers there), and the IR version allows initializers absent from the inputs.
    let initializers = model.graph.messages(graph::INITIALIZER)?;
    let nodes = model.graph.messages(graph::NODE)?;
    model.rewrite(&initializers, &nodes, &replaced)?;
    if domain == "com.microsoft" {
        model.ensure_opset("com.microsoft", 1);
    }
    Ok(out)
}

/// What every graph of a model is quantized with.
struct How<'a> {
    keep: &'a std::collections::BTreeSet<String>,
    domain: &'a str,
    half_scales: bool,
}

/// Quantizes the weights of one graph (the model's, or an If/Loop/Scan body) and, first, of
/// the subgraphs its nodes carry: weights a subgraph defines stay in it, weights it reads from
/// an outer scope are found where they are defined. The initializers that became nodes, or
/// `None` when nothing in this graph or below it changed.
fn quantize_graph(
    g: &mut Message,
    how: &How,
    out: &mut Outcome,
) -> Result<Option<Vec<String>>, Error> {
    let mut nodes = g.messages(graph::NODE)?;
    let mut changed = false;
    for n in &mut nodes {
        changed |= onnx::map_subgraphs(n, &mut |sub| Ok(quantize_graph(sub, how, out)?.is_some()))?;
    }
    // Every reader of every name: this graph's nodes, then those of its subgraphs (which
    // read this graph's weights as outer-scope names): (reader, input index).
    let readers: Vec<Message> = nodes
        .iter()
        .cloned()
        .chain(onnx::nested_nodes(&nodes)?)
        .collect();
    let mut uses: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (n, node) in readers.iter().enumerate() {
        for (i, input) in onnx::inputs(node).into_iter().enumerate() {
            uses.entry(input).or_default().push((n, i));
        }
    }
    let converted_before = out.converted.len();
    let mut initializers = Vec::new();
    let mut dq_nodes = Vec::new();
    let mut replaced = Vec::new();
    for init in g.messages(graph::INITIALIZER)? {
        let name = onnx::name_of(&init);
        let consumers = uses.get(&name).cloned().unwrap_or_default();
        if how.keep.contains(&name) {
            out.kept.push((name, KEPT_BY_SEARCH.into()));
            initializers.push(init);
            continue;
        }
        match eligibility(&readers, &consumers, &init)? {
            None => initializers.push(init),
            Some(Err(why)) => {
                out.kept.push((name, why));
                initializers.push(init);
            }
            Some(Ok((axis, dims, values))) => {
                let k = out.converted.len();
                let (inits, cast, node, channels) =
                    quantized(&name, k, &dims, &values, axis, how.domain, how.half_scales);
                initializers.extend(inits);
                dq_nodes.extend(cast);
                dq_nodes.push(node);
                let op = onnx::op_type(&readers[consumers[0].0]);
                out.converted.push((name.clone(), op, axis, channels));
                replaced.push(name);
            }
        }
    }
    // Weights held by Constant nodes: the Constant is replaced, in place, by its dequantizer.
    for slot in &mut nodes {
        if onnx::op_type(slot) != "Constant" {
            continue;
        }
        let Some(name) = onnx::outputs(slot).into_iter().next() else {
            continue;
        };
        let Some(t) = onnx::tensor_attr(slot, "value")? else {
            continue;
        };
        let consumers = uses.get(&name).cloned().unwrap_or_default();
        if how.keep.contains(&name) {
            out.kept.push((name, KEPT_BY_SEARCH.into()));
            continue;
        }
        match eligibility(&readers, &consumers, &t)? {
            None => {}
            Some(Err(why)) => out.kept.push((name, why)),
            Some(Ok((axis, dims, values))) => {
                let k = out.converted.len();
                let (inits, cast, node, channels) =
                    quantized(&name, k, &dims, &values, axis, how.domain, how.half_scales);
                initializers.extend(inits);
                dq_nodes.extend(cast);
                let op = onnx::op_type(&readers[consumers[0].0]);
                *slot = node;
                out.converted.push((name, op, axis, channels));
            }
        }
    }
    if out.converted.len() == converted_before {
        if changed {
            g.replace(
                graph::NODE,
                nodes.iter().map(|n| Value::Bytes(n.encode())).collect(),
            );
            return Ok(Some(Vec::new()));
        }
        return Ok(None);
    }
    // The dequantize nodes of initializer weights and the scales' casts go ahead of every
    // other node (their inputs are constants, so that order is topological).
    dq_nodes.extend(nodes);
    let encode = |ms: &[Message]| ms.iter().map(|m| Value::Bytes(m.encode())).collect();
    g.replace(graph::INITIALIZER, encode(&initializers));
    g.replace(graph::NODE, encode(&dq_nodes));
    Ok(Some(replaced))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_follow_each_channels_range() {
        // 2 × 3 MatMul weight, per column (axis 1).
        let w = [1.0, -2.0, 0.5, -1.0, 4.0, 0.25];
        let (q, s) = quantize_per_channel(&w, &[2, 3], 1);
        assert_eq!(s, vec![1.0 / 127.0, 4.0 / 127.0, 0.5 / 127.0]);
        assert_eq!(q, vec![127, -64, 127, -127, 127, 64]);
        // Per row (axis 0) of the same data.
        let (_, s) = quantize_per_channel(&w, &[2, 3], 0);
        assert_eq!(s, vec![2.0 / 127.0, 4.0 / 127.0]);
        // An all-zero channel gets scale 1, values 0.
        let (q, s) = quantize_per_channel(&[0.0, 0.0, 1.0, 1.0], &[2, 2], 0);
        assert_eq!((q[0], s[0]), (0, 1.0));
    }
}
