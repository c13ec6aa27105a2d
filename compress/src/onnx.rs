//! The parts of ONNX's schema the compressor touches, as field numbers and helpers over
//! [`Message`]s (onnx.proto: ModelProto, GraphProto, NodeProto, TensorProto, AttributeProto).
//! Everything else stays raw and is written back unchanged.

use crate::proto::{Error, Message, Value};

pub mod model {
    pub const IR_VERSION: u32 = 1;
    pub const GRAPH: u32 = 7;
    pub const OPSET_IMPORT: u32 = 8;
}
pub mod opset {
    pub const DOMAIN: u32 = 1;
    pub const VERSION: u32 = 2;
}
pub mod graph {
    pub const NODE: u32 = 1;
    pub const OUTPUT: u32 = 12;
    pub const INITIALIZER: u32 = 5;
    pub const INPUT: u32 = 11;
}
pub mod node {
    pub const INPUT: u32 = 1;
    pub const OUTPUT: u32 = 2;
    pub const NAME: u32 = 3;
    pub const OP_TYPE: u32 = 4;
    pub const ATTRIBUTE: u32 = 5;
    pub const DOMAIN: u32 = 7;
}
pub mod attr {
    pub const NAME: u32 = 1;
    pub const F: u32 = 2;
    pub const I: u32 = 3;
    pub const T: u32 = 5;
    pub const G: u32 = 6;
    pub const GRAPHS: u32 = 11;
    pub const TENSORS: u32 = 10;
    pub const TYPE: u32 = 20;
    pub const TYPE_INT: u64 = 2;
}
pub mod tensor {
    pub const DIMS: u32 = 1;
    pub const DATA_TYPE: u32 = 2;
    pub const FLOAT_DATA: u32 = 4;
    pub const NAME: u32 = 8;
    pub const RAW_DATA: u32 = 9;
    /// int8/uint8/int16/uint16/int32/float16 values when not raw.
    pub const INT32_DATA: u32 = 5;
    pub const INT64_DATA: u32 = 7;
    pub const UINT64_DATA: u32 = 11;
    pub const DATA_LOCATION: u32 = 14;
    pub const FLOAT: u64 = 1;
    pub const UINT8: u64 = 2;
    pub const INT8: u64 = 3;
    pub const UINT16: u64 = 4;
    pub const INT16: u64 = 5;
    pub const INT32: u64 = 6;
    pub const INT64: u64 = 7;
    pub const UINT32: u64 = 12;
    pub const UINT64: u64 = 13;
    pub const BOOL: u64 = 9;
    pub const FLOAT16: u64 = 10;
}
pub mod value_info {
    pub const NAME: u32 = 1;
}

/// A model: the top-level message, with its graph parsed (the part that gets rewritten).
#[derive(Debug, Clone)]
pub struct Model {
    pub msg: Message,
    pub graph: Message,
}

impl Model {
    pub fn parse(bytes: &[u8]) -> Result<Model, Error> {
        let msg = Message::parse(bytes)?;
        let graph = msg
            .message(model::GRAPH)?
            .ok_or_else(|| Error("the model has no graph".into()))?;
        Ok(Model { msg, graph })
    }

    /// The model with the data of every tensor larger than [`OUTLINE_TENSOR`] bytes left
    /// out (initializers and constants, in subgraphs too): what an analysis of the graph
    /// needs — names, types, shapes, nodes, one-element constants — without a copy of the
    /// weights, which would cost a model's size in memory on every load and leave the
    /// allocator's heap laid out around it (unloading it then freed less).
    pub fn parse_outline(bytes: &[u8]) -> Result<Model, Error> {
        let msg = Message::parse_mapped(bytes, &mut |n, b| match n {
            model::GRAPH => outline_graph(b).map(Some),
            _ => Ok(Some(b.to_vec())),
        })?;
        let graph = msg
            .message(model::GRAPH)?
            .ok_or_else(|| Error("the model has no graph".into()))?;
        Ok(Model { msg, graph })
    }

    /// The model as bytes, with the (possibly rewritten) graph in its place.
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = self.msg.clone();
        msg.replace(model::GRAPH, vec![Value::Bytes(self.graph.encode())]);
        msg.encode()
    }

    pub fn ir_version(&self) -> u64 {
        self.msg.varint(model::IR_VERSION).unwrap_or(0)
    }

    pub fn set_ir_version(&mut self, v: u64) {
        self.msg.replace(model::IR_VERSION, vec![Value::Varint(v)]);
    }

    /// The imported version of an operator domain ("" is the default ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<u64> {
        self.msg
            .messages(model::OPSET_IMPORT)
            .ok()?
            .into_iter()
            .find(|o| {
                let d = o.string(opset::DOMAIN);
                d == domain || (domain.is_empty() && d == "ai.onnx")
            })
            .and_then(|o| o.varint(opset::VERSION))
    }

    /// Writes a rewritten graph: its initializers and nodes (in order); weights that were
    /// initializers and are now produced by nodes (`produced`) leave the graph inputs, where
    /// old models list initializers; the IR version becomes at least 4, which lets the new
    /// initializers be absent from the inputs.
    pub fn rewrite(
        &mut self,
        initializers: &[Message],
        nodes: &[Message],
        produced: &[String],
    ) -> Result<(), Error> {
        let encode = |ms: &[Message]| ms.iter().map(|m| Value::Bytes(m.encode())).collect();
        self.graph.replace(graph::INITIALIZER, encode(initializers));
        self.graph.replace(graph::NODE, encode(nodes));
        if self.ir_version() < 4 {
            self.set_ir_version(4);
        }
        if produced.is_empty() {
            return Ok(());
        }
        let inputs: Vec<Message> = self
            .graph
            .messages(graph::INPUT)?
            .into_iter()
            .filter(|i| !produced.contains(&i.string(value_info::NAME)))
            .collect();
        self.graph.replace(graph::INPUT, encode(&inputs));
        Ok(())
    }

    /// Changes the imported version of an operator domain ("" is the default ONNX domain);
    /// the caller checks that the graph's nodes mean the same at the new version.
    pub fn set_opset(&mut self, domain: &str, version: u64) -> Result<(), Error> {
        let mut imports = self.msg.messages(model::OPSET_IMPORT)?;
        for o in &mut imports {
            let d = o.string(opset::DOMAIN);
            if d == domain || (domain.is_empty() && d == "ai.onnx") {
                o.replace(opset::VERSION, vec![Value::Varint(version)]);
            }
        }
        self.msg.replace(
            model::OPSET_IMPORT,
            imports.iter().map(|o| Value::Bytes(o.encode())).collect(),
        );
        Ok(())
    }

    /// The names of the graph's outputs.
    pub fn output_names(&self) -> Result<std::collections::BTreeSet<String>, Error> {
        Ok(self
            .graph
            .messages(graph::OUTPUT)?
            .iter()
            .map(|v| v.string(value_info::NAME))
            .collect())
    }

    /// The names of the inputs a caller feeds, in order: the graph's inputs that are not
    /// initializers (old models list their weights among the inputs too).
    pub fn input_names(&self) -> Result<Vec<String>, Error> {
        let weights: std::collections::HashSet<String> = self
            .graph
            .messages(graph::INITIALIZER)?
            .iter()
            .map(name_of)
            .collect();
        Ok(self
            .graph
            .messages(graph::INPUT)?
            .iter()
            .map(|v| v.string(value_info::NAME))
            .filter(|n| !weights.contains(n))
            .collect())
    }

    /// Imports `domain` at `version` if it is not imported yet.
    pub fn ensure_opset(&mut self, domain: &str, version: u64) {
        if self.opset(domain).is_some() {
            return;
        }
        let mut o = Message::default();
        o.push_str(opset::DOMAIN, domain);
        o.push(opset::VERSION, Value::Varint(version));
        self.msg.push_message(model::OPSET_IMPORT, &o);
    }
}

/// The size of a TensorProto above which [`Model::parse_outline`] leaves its data out.
pub const OUTLINE_TENSOR: usize = 64;

fn outline_graph(b: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(Message::parse_mapped(b, &mut |n, b| match n {
        graph::INITIALIZER => outline_tensor(b).map(Some),
        graph::NODE => outline_node(b).map(Some),
        _ => Ok(Some(b.to_vec())),
    })?
    .encode())
}

fn outline_node(b: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(Message::parse_mapped(b, &mut |n, b| match n {
        node::ATTRIBUTE => Message::parse_mapped(b, &mut |n, b| match n {
            attr::T | attr::TENSORS => outline_tensor(b).map(Some),
            attr::G | attr::GRAPHS => outline_graph(b).map(Some),
            _ => Ok(Some(b.to_vec())),
        })
        .map(|a| Some(a.encode())),
        _ => Ok(Some(b.to_vec())),
    })?
    .encode())
}

fn outline_tensor(b: &[u8]) -> Result<Vec<u8>, Error> {
    if b.len() <= OUTLINE_TENSOR {
        return Ok(b.to_vec());
    }
    Ok(Message::parse_mapped(b, &mut |n, b| match n {
        // float, int32, string, int64, raw, double, uint64 data.
        4 | 5 | 6 | 7 | 9 | 10 | 11 => Ok(None),
        _ => Ok(Some(b.to_vec())),
    })?
    .encode())
}

/// A graph's nodes and initializers, with each initializer's index by name and how many node
/// inputs read each name: what a strategy that rewrites weights in place starts from.
pub struct Indexed {
    pub nodes: Vec<Message>,
    pub inits: Vec<Message>,
    pub by_name: std::collections::BTreeMap<String, usize>,
    pub uses: std::collections::BTreeMap<String, usize>,
}

/// [`Indexed`] of `graph`.
pub fn indexed(graph: &Message) -> Result<Indexed, Error> {
    let nodes = graph.messages(graph::NODE)?;
    let inits = graph.messages(graph::INITIALIZER)?;
    let by_name = inits
        .iter()
        .enumerate()
        .map(|(i, t)| (name_of(t), i))
        .collect();
    let mut uses = std::collections::BTreeMap::new();
    for n in &nodes {
        for i in inputs(n) {
            *uses.entry(i).or_default() += 1;
        }
    }
    Ok(Indexed {
        nodes,
        inits,
        by_name,
        uses,
    })
}

/// ValueInfoProto.type → TypeProto.tensor_type → elem_type.
pub fn elem_type(vi: &Message) -> Option<u64> {
    vi.message(2).ok()??.message(1).ok()??.varint(1)
}

/// A ValueInfoProto of a tensor of `elem` type, with symbolic dimensions `dims` (no shape
/// when empty).
pub fn value_info(name: &str, elem: u64, dims: &[&str]) -> Message {
    let mut tensor_type = Message::default();
    tensor_type.push(1, Value::Varint(elem));
    if !dims.is_empty() {
        let mut shape = Message::default();
        for d in dims {
            let mut dim = Message::default();
            dim.push_str(2, d); // Dimension.dim_param
            shape.push_message(1, &dim);
        }
        tensor_type.push_message(2, &shape);
    }
    let mut ty = Message::default();
    ty.push_message(1, &tensor_type);
    let mut v = Message::default();
    v.push_str(value_info::NAME, name);
    v.push_message(2, &ty);
    v
}

/// The data type of a `Constant` node's output: its `value` tensor's, int64 for
/// `value_int(s)`, `float` (the caller's float type) for `value_float(s)`.
pub fn constant_type(n: &Message, float: u64) -> Result<Option<u64>, Error> {
    Ok(n.messages(node::ATTRIBUTE)?
        .iter()
        .find_map(|a| match a.string(attr::NAME).as_str() {
            "value" => a
                .message(attr::T)
                .ok()
                .flatten()
                .and_then(|t| t.varint(tensor::DATA_TYPE)),
            "value_float" | "value_floats" => Some(float),
            "value_int" | "value_ints" => Some(tensor::INT64),
            _ => None,
        }))
}

pub fn name_of(t: &Message) -> String {
    t.string(tensor::NAME)
}

pub fn dims_of(t: &Message) -> Result<Vec<i64>, Error> {
    Ok(t.varints(tensor::DIMS)?
        .into_iter()
        .map(|d| d as i64)
        .collect())
}

/// A float tensor's values, if stored in the file (raw_data or float_data).
pub fn f32_data(t: &Message) -> Result<Option<Vec<f32>>, Error> {
    if t.varint(tensor::DATA_TYPE) != Some(tensor::FLOAT)
        || t.varint(tensor::DATA_LOCATION) == Some(1)
    {
        return Ok(None);
    }
    if let Some(raw) = t.bytes(tensor::RAW_DATA) {
        if raw.len() % 4 != 0 {
            return Err(Error(format!(
                "{}: raw_data is not whole floats",
                name_of(t)
            )));
        }
        return Ok(Some(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ));
    }
    Ok(Some(
        t.fixed32s(tensor::FLOAT_DATA)?
            .into_iter()
            .map(f32::from_bits)
            .collect(),
    ))
}

/// The value of a one-element integer tensor stored in the file (`None`: not one element,
/// not an integer type, or stored elsewhere).
pub fn int_scalar(t: &Message) -> Result<Option<i64>, Error> {
    use tensor::*;
    // One element: rank 0, or every dimension 1 (a product could overflow on crafted dims).
    if t.varint(DATA_LOCATION) == Some(1) || dims_of(t)?.iter().any(|&d| d != 1) {
        return Ok(None);
    }
    let ty = t.varint(DATA_TYPE).unwrap_or(0);
    let width = match ty {
        INT8 | UINT8 | BOOL => 1,
        INT16 | UINT16 => 2,
        INT32 | UINT32 => 4,
        INT64 | UINT64 => 8,
        _ => return Ok(None),
    };
    if let Some(raw) = t.bytes(RAW_DATA) {
        if raw.len() != width {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(raw);
        let u = u64::from_le_bytes(b);
        return Ok(match ty {
            INT8 => Some(i64::from(u as u8 as i8)),
            INT16 => Some(i64::from(u as u16 as i16)),
            INT32 => Some(i64::from(u as u32 as i32)),
            _ => i64::try_from(u).ok(),
        });
    }
    let field = match ty {
        INT64 => INT64_DATA,
        UINT32 | UINT64 => UINT64_DATA,
        _ => INT32_DATA,
    };
    Ok(match *t.varints(field)?.as_slice() {
        [v] if ty == UINT64 => i64::try_from(v).ok(),
        [v] if matches!(ty, INT64 | UINT32) => Some(v as i64),
        [v] => Some(i64::from(v as u32 as i32)),
        _ => None,
    })
}

/// For each of `names` (graph inputs), the integer constant an `Equal` node compares it with —
/// in the graph or any subgraph — when the other operand is a one-element constant (a graph
/// initializer, or a `Constant` node's `value` or `value_int`); the first comparison found
/// wins. A model that branches on an input's value (Silero VAD's `sr == 16000`) takes the
/// branch real requests take when it is run on that value, not on zero's.
pub fn equal_constants(
    model: &Model,
    names: &[&str],
) -> Result<std::collections::BTreeMap<String, i64>, Error> {
    // The graph's own comparisons first, then its subgraphs'.
    let mut nodes = model.graph.messages(graph::NODE)?;
    let nested = nested_nodes(&nodes)?;
    nodes.extend(nested);
    let mut consts = std::collections::HashMap::new();
    for t in model.graph.messages(graph::INITIALIZER)? {
        if let Some(v) = int_scalar(&t)? {
            consts.insert(name_of(&t), v);
        }
    }
    for n in nodes.iter().filter(|n| op_type(n) == "Constant") {
        let v = match tensor_attr(n, "value")? {
            Some(t) => int_scalar(&t)?,
            None => int_attr(n, "value_int")?,
        };
        if let (Some(v), Some(out)) = (v, outputs(n).first()) {
            consts.insert(out.clone(), v);
        }
    }
    let mut found = std::collections::BTreeMap::new();
    for n in nodes.iter().filter(|n| op_type(n) == "Equal") {
        if let [a, b] = inputs(n).as_slice() {
            for (x, c) in [(a, b), (b, a)] {
                if let (true, Some(&v)) = (names.contains(&x.as_str()), consts.get(c)) {
                    found.entry(x.clone()).or_insert(v);
                }
            }
        }
    }
    Ok(found)
}

/// A tensor initializer with raw data.
pub fn make_tensor(name: &str, dims: &[i64], data_type: u64, raw: Vec<u8>) -> Message {
    let mut t = Message::default();
    for &d in dims {
        t.push(tensor::DIMS, Value::Varint(d as u64));
    }
    t.push(tensor::DATA_TYPE, Value::Varint(data_type));
    t.push_str(tensor::NAME, name);
    t.push(tensor::RAW_DATA, Value::Bytes(raw));
    t
}

/// Whether a node carries a subgraph (If/Loop/Scan bodies), which rewrites that rename or
/// retype values would have to follow.
pub fn has_subgraph(n: &Message) -> Result<bool, Error> {
    Ok(n.messages(node::ATTRIBUTE)?
        .iter()
        .any(|a| a.bytes(attr::G).is_some() || a.bytes(attr::GRAPHS).is_some()))
}

/// Rewrites each subgraph `n` carries (If branches, Loop/Scan bodies: attributes of type
/// GRAPH or GRAPHS) with `f`, writing back the ones `f` says it changed; true when any was.
pub fn map_subgraphs(
    n: &mut Message,
    f: &mut dyn FnMut(&mut Message) -> Result<bool, Error>,
) -> Result<bool, Error> {
    let mut attrs = n.messages(node::ATTRIBUTE)?;
    let mut changed = false;
    for a in &mut attrs {
        for field in [attr::G, attr::GRAPHS] {
            let mut graphs = a.messages(field)?;
            let mut any = false;
            for g in &mut graphs {
                any |= f(g)?;
            }
            if any {
                a.replace(
                    field,
                    graphs.iter().map(|g| Value::Bytes(g.encode())).collect(),
                );
                changed = true;
            }
        }
    }
    if changed {
        n.replace(
            node::ATTRIBUTE,
            attrs.iter().map(|a| Value::Bytes(a.encode())).collect(),
        );
    }
    Ok(changed)
}

/// Every node inside the subgraphs of `nodes`, at any depth: the readers of names a graph
/// defines that its subgraphs use from the outer scope.
pub fn nested_nodes(nodes: &[Message]) -> Result<Vec<Message>, Error> {
    let mut out = Vec::new();
    for n in nodes {
        for a in n.messages(node::ATTRIBUTE)? {
            for field in [attr::G, attr::GRAPHS] {
                for g in a.messages(field)? {
                    let inner = g.messages(graph::NODE)?;
                    out.extend(nested_nodes(&inner)?);
                    out.extend(inner);
                }
            }
        }
    }
    Ok(out)
}

/// `nodes` in an order where each runs after the producers of its inputs (names not produced
/// by any node — graph inputs, initializers — count as present); among the nodes that are
/// ready, the earliest in `nodes` goes first, so a sorted list keeps its order.
pub fn topo_sort(nodes: Vec<Message>) -> Result<Vec<Message>, Error> {
    use std::collections::{BTreeSet, HashMap};
    let mut producer: HashMap<String, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in outputs(n) {
            producer.insert(o, i);
        }
    }
    let mut waits = vec![0usize; nodes.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let deps: BTreeSet<usize> = inputs(n)
            .iter()
            .filter_map(|x| producer.get(x).copied())
            .filter(|&p| p != i)
            .collect();
        waits[i] = deps.len();
        for p in deps {
            users[p].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&i| waits[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            waits[u] -= 1;
            if waits[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != nodes.len() {
        return Err(Error(format!(
            "{} nodes are in a cycle",
            nodes.len() - order.len()
        )));
    }
    let mut slots: Vec<Option<Message>> = nodes.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().expect("each node once"))
        .collect())
}

pub fn op_type(n: &Message) -> String {
    n.string(node::OP_TYPE)
}

pub fn inputs(n: &Message) -> Vec<String> {
    n.strings(node::INPUT)
}

pub fn outputs(n: &Message) -> Vec<String> {
    n.strings(node::OUTPUT)
}

/// Replaces a node's inputs.
pub fn set_inputs(n: &mut Message, inputs: impl IntoIterator<Item = String>) {
    n.replace(
        node::INPUT,
        inputs
            .into_iter()
            .map(|i| Value::Bytes(i.into_bytes()))
            .collect(),
    );
}

/// An integer attribute of a node.
pub fn int_attr(n: &Message, name: &str) -> Result<Option<i64>, Error> {
    Ok(n.messages(node::ATTRIBUTE)?
        .into_iter()
        .find(|a| a.string(attr::NAME) == name)
        .and_then(|a| a.varint(attr::I))
        .map(|v| v as i64))
}

/// A float attribute of a node.
pub fn float_attr(n: &Message, name: &str) -> Result<Option<f32>, Error> {
    Ok(n.messages(node::ATTRIBUTE)?
        .into_iter()
        .find(|a| a.string(attr::NAME) == name)
        .and_then(|a| {
            a.all(attr::F).find_map(|v| match v {
                Value::I32(x) => Some(f32::from_bits(*x)),
                _ => None,
            })
        }))
}

/// A tensor attribute of a node (a Constant's `value`).
pub fn tensor_attr(n: &Message, name: &str) -> Result<Option<Message>, Error> {
    n.messages(node::ATTRIBUTE)?
        .into_iter()
        .find(|a| a.string(attr::NAME) == name)
        .map(|a| a.message(attr::T))
        .transpose()
        .map(Option::flatten)
}

/// A node with integer attributes.
pub fn make_node(
    op: &str,
    domain: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    ints: &[(&str, i64)],
) -> Message {
    let mut n = Message::default();
    for i in inputs {
        n.push_str(node::INPUT, i);
    }
    for o in outputs {
        n.push_str(node::OUTPUT, o);
    }
    if !name.is_empty() {
        n.push_str(node::NAME, name);
    }
    n.push_str(node::OP_TYPE, op);
    for (k, v) in ints {
        let mut a = Message::default();
        a.push_str(attr::NAME, k);
        a.push(attr::I, Value::Varint(*v as u64));
        a.push(attr::TYPE, Value::Varint(attr::TYPE_INT));
        n.push_message(node::ATTRIBUTE, &a);
    }
    if !domain.is_empty() {
        n.push_str(node::DOMAIN, domain);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, ins: &[&str], outs: &[&str]) -> Message {
        make_node(op, "", "", ins, outs, &[])
    }

    /// Integer inputs compared with one-element constants, in the graph and in a subgraph:
    /// the constant is found whichever side of `Equal` it is on and however it is stored;
    /// comparisons with non-constants or with several elements are not.
    #[test]
    fn equal_constants_finds_what_each_input_is_compared_with() {
        let mut g = Message::default();
        let push_init = |g: &mut Message, t: Message| g.push_message(graph::INITIALIZER, &t);
        push_init(
            &mut g,
            make_tensor("k", &[], tensor::INT64, 16000i64.to_le_bytes().to_vec()),
        );
        push_init(
            &mut g,
            make_tensor(
                "pair",
                &[2],
                tensor::INT64,
                [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        );
        // A Constant node, its value in int32_data (not raw), inside an If's branch.
        let mut t = Message::default();
        t.push(tensor::DATA_TYPE, Value::Varint(tensor::INT32));
        t.push(tensor::INT32_DATA, Value::Varint((-3i32) as u32 as u64));
        let mut c = node("Constant", &[], &["minus3"]);
        let mut a = Message::default();
        a.push_str(attr::NAME, "value");
        a.push_message(attr::T, &t);
        c.push_message(node::ATTRIBUTE, &a);
        let mut branch = Message::default();
        branch.push_message(graph::NODE, &c);
        branch.push_message(graph::NODE, &node("Equal", &["minus3", "mode"], &["m"]));
        // The graph's own comparison of `sr` wins over its subgraph's.
        branch.push_message(graph::NODE, &node("Equal", &["sr", "minus3"], &["m2"]));
        let mut iff = node("If", &["e"], &["y"]);
        let mut a = Message::default();
        a.push_str(attr::NAME, "then_branch");
        a.push_message(attr::G, &branch);
        iff.push_message(node::ATTRIBUTE, &a);
        for n in [
            node("Equal", &["sr", "k"], &["e"]),
            node("Equal", &["sr", "pair"], &["e2"]),
            node("Equal", &["x", "sr"], &["e3"]),
            node("Equal", &["flag", "pair"], &["e4"]),
            iff,
        ] {
            g.push_message(graph::NODE, &n);
        }
        let mut m = Message::default();
        m.push_message(model::GRAPH, &g);
        let model = Model::parse(&m.encode()).unwrap();
        let found = equal_constants(&model, &["sr", "mode", "flag", "x"]).unwrap();
        // Dimensions whose product overflows are not one element (and do not panic).
        let crafted = make_tensor("c", &[3, i64::MAX / 2], tensor::INT64, vec![0; 8]);
        assert_eq!(int_scalar(&crafted).unwrap(), None);
        let big = make_tensor("u", &[1], tensor::UINT64, u64::MAX.to_le_bytes().to_vec());
        assert_eq!(int_scalar(&big).unwrap(), None, "past i64");
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [("mode".to_string(), -3), ("sr".to_string(), 16000)]
        );
    }

    #[test]
    fn topo_sort_puts_producers_first_and_keeps_sorted_lists_as_they_are() {
        let sorted = vec![
            node("Relu", &["x"], &["a"]),
            node("Neg", &["a"], &["b"]),
            node("Add", &["a", "b"], &["c"]),
        ];
        let ops = |v: &[Message]| v.iter().map(op_type).collect::<Vec<_>>();
        assert_eq!(
            ops(&topo_sort(sorted.clone()).unwrap()),
            ["Relu", "Neg", "Add"]
        );
        let mut shuffled = sorted.clone();
        shuffled.reverse();
        assert_eq!(ops(&topo_sort(shuffled).unwrap()), ["Relu", "Neg", "Add"]);
        let cycle = vec![node("Neg", &["b"], &["a"]), node("Neg", &["a"], &["b"])];
        assert!(topo_sort(cycle).unwrap_err().0.contains("cycle"));
    }

    /// An `If` whose then-branch holds a nested `If`: the subgraphs are found at any depth,
    /// and only a subgraph the closure changes is written back.
    #[test]
    fn subgraphs_are_found_at_any_depth_and_only_changed_ones_rewritten() {
        let graph = |nodes: &[Message]| {
            let mut g = Message::default();
            for n in nodes {
                g.push_message(graph::NODE, n);
            }
            g
        };
        let with_branch = |op: &str, branch: &Message| {
            let mut n = node(op, &["cond"], &["y"]);
            let mut a = Message::default();
            a.push_str(attr::NAME, "then_branch");
            a.push_message(attr::G, branch);
            n.push_message(node::ATTRIBUTE, &a);
            n
        };
        let inner = graph(&[node("Relu", &["w"], &["r"])]);
        let middle = graph(&[with_branch("If", &inner), node("Neg", &["w"], &["n"])]);
        let mut top = with_branch("If", &middle);
        let found: Vec<String> = nested_nodes(std::slice::from_ref(&top))
            .unwrap()
            .iter()
            .map(op_type)
            .collect();
        assert_eq!(found, ["Relu", "If", "Neg"]);
        let before = top.clone();
        assert!(!map_subgraphs(&mut top, &mut |_| Ok(false)).unwrap());
        assert_eq!(top, before);
        let changed = map_subgraphs(&mut top, &mut |g| {
            let mut nodes = g.messages(graph::NODE)?;
            nodes.retain(|n| op_type(n) != "Neg");
            g.replace(
                graph::NODE,
                nodes.iter().map(|n| Value::Bytes(n.encode())).collect(),
            );
            Ok(true)
        })
        .unwrap();
        assert!(changed);
        let found: Vec<String> = nested_nodes(std::slice::from_ref(&top))
            .unwrap()
            .iter()
            .map(op_type)
            .collect();
        assert_eq!(found, ["Relu", "If"]);
    }
}
