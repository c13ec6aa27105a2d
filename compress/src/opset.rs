//! Moving a graph from opset 11 or 12 to 13, where DequantizeLinear takes a per-channel axis,
//! so that static INT8 can write the standard QDQ form ONNX Runtime fuses into integer
//! kernels (below 13 only its com.microsoft DequantizeLinear has an axis, and the fusion does
//! not pick that up: the opset-11 PP-OCR classifier ran slower than float).
//!
//! Only graphs whose every operator means the same at 13 are moved (the list below: operators
//! whose versions 12 and 13 only added types or attributes with neutral defaults). Softmax,
//! LogSoftmax and Hardmax changed: before 13 they flatten the input to 2-D at `axis`; they are
//! rewritten to that meaning explicitly (Flatten, the op over the last axis, Reshape back).
//! Anything else (Squeeze/Unsqueeze/Split/ReduceSum, whose attributes became inputs; Dropout;
//! Resize; other domains' operators aside) leaves the graph as it was.

use crate::onnx::{self, Model, graph, node};
use crate::proto::{Error, Message, Value};

const SAME_AT_13: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Cos",
    "DepthToSpace",
    "DequantizeLinear",
    "Div",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "LRN",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "Or",
    "Pad",
    "Pow",
    "PRelu",
    "QuantizeLinear",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "Relu",
    "Reshape",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softplus",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Where",
    "Xor",
];
const FLATTENING: &[&str] = &["Softmax", "LogSoftmax", "Hardmax"];

/// Moves the default domain to opset 13 if the graph allows it; true when it did.
pub fn upgrade_to_13(model: &mut Model) -> Result<bool, Error> {
    let opset = model.opset("").unwrap_or(0);
    if !(11..13).contains(&opset) {
        return Ok(false);
    }
    let nodes = model.graph.messages(graph::NODE)?;
    let movable = nodes.iter().all(|n| {
        let op = onnx::op_type(n);
        !n.string(node::DOMAIN).is_empty()
            || SAME_AT_13.contains(&op.as_str())
            || FLATTENING.contains(&op.as_str())
    });
    if !movable {
        return Ok(false);
    }
    let mut out = Vec::with_capacity(nodes.len());
    for (k, n) in nodes.into_iter().enumerate() {
        let op = onnx::op_type(&n);
        if !n.string(node::DOMAIN).is_empty() || !FLATTENING.contains(&op.as_str()) {
            out.push(n);
            continue;
        }
        // Before 13: the input as 2-D [d0·…·d(axis-1), d(axis)·…], the op along dim 1.
        let axis = onnx::int_attr(&n, "axis")?.unwrap_or(1);
        let x = onnx::inputs(&n).into_iter().next().unwrap_or_default();
        let y = onnx::outputs(&n).into_iter().next().unwrap_or_default();
        let (flat, done, shape) = (
            format!("{x}.flat{k}"),
            format!("{y}.flat{k}"),
            format!("{x}.shape{k}"),
        );
        out.push(onnx::make_node(
            "Flatten",
            "",
            "",
            &[&x],
            &[&flat],
            &[("axis", axis)],
        ));
        let mut inner = n.clone();
        inner.replace(node::INPUT, vec![Value::Bytes(flat.into_bytes())]);
        inner.replace(node::OUTPUT, vec![Value::Bytes(done.clone().into_bytes())]);
        let attrs: Vec<Value> = inner
            .messages(node::ATTRIBUTE)?
            .into_iter()
            .filter(|a| a.string(onnx::attr::NAME) != "axis")
            .map(|a| Value::Bytes(a.encode()))
            .collect();
        inner.replace(node::ATTRIBUTE, attrs);
        let mut a = Message::default();
        a.push_str(onnx::attr::NAME, "axis");
        a.push(onnx::attr::I, Value::Varint(-1i64 as u64));
        a.push(onnx::attr::TYPE, Value::Varint(onnx::attr::TYPE_INT));
        inner.push_message(node::ATTRIBUTE, &a);
        out.push(inner);
        out.push(onnx::make_node("Shape", "", "", &[&x], &[&shape], &[]));
        out.push(onnx::make_node(
            "Reshape",
            "",
            "",
            &[&done, &shape],
            &[&y],
            &[],
        ));
    }
    model.graph.replace(
        graph::NODE,
        out.iter().map(|n| Value::Bytes(n.encode())).collect(),
    );
    model.set_opset("", 13)?;
    Ok(true)
}
