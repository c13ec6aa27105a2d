//! Constant nodes as initializers, identical ones stored once. A Constant node costs ~30 bytes
//! more than the same tensor as an initializer (op type, attribute name and type, wrappers),
//! and exporters repeat the same small constants (paddle2onnx writes the 3.0 and 6.0 of every
//! hard-swish as new nodes): on the 0.6 MB PP-OCR classifier, 116 Constant nodes hold 40
//! distinct tensors, 6 KB. ONNX Runtime turns Constant nodes into initializers when it loads a
//! model anyway, so the graph computes the same. Applied by every size strategy (not by
//! `none`, the lossless round trip). Graphs with subgraphs are left alone (a subgraph may
//! read an outer constant by name).

use std::collections::BTreeMap;

use crate::onnx::{self, Model, graph, node, tensor};
use crate::proto::{Error, Message, Value};

/// What [`constants_to_initializers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tidy {
    /// Constant nodes that became initializers.
    pub moved: usize,
    /// Constant nodes dropped because an identical tensor was already there.
    pub shared: usize,
}

pub fn constants_to_initializers(model: &mut Model) -> Result<Tidy, Error> {
    let nodes = model.graph.messages(graph::NODE)?;
    for n in &nodes {
        if onnx::has_subgraph(n)? {
            return Ok(Tidy::default());
        }
    }
    let outputs = model.output_names()?;
    let mut out = Tidy::default();
    let mut by_content: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    let mut inits = model.graph.messages(graph::INITIALIZER)?;
    let mut kept = Vec::new();
    for n in nodes {
        let attrs = n.messages(node::ATTRIBUTE)?;
        let name = onnx::outputs(&n).into_iter().next().unwrap_or_default();
        let value = match attrs.as_slice() {
            [a] if a.string(onnx::attr::NAME) == "value" => a.message(onnx::attr::T)?,
            _ => None,
        };
        let movable = onnx::op_type(&n) == "Constant"
            && n.string(node::DOMAIN).is_empty()
            && !name.is_empty()
            && !outputs.contains(&name);
        let (Some(mut t), true) = (value, movable) else {
            kept.push(n);
            continue;
        };
        if t.varint(tensor::DATA_LOCATION) == Some(1) {
            kept.push(n);
            continue;
        }
        t.replace(tensor::NAME, Vec::new());
        let key = t.encode();
        if let Some(first) = by_content.get(&key) {
            renamed.insert(name, first.clone());
            out.shared += 1;
            continue;
        }
        by_content.insert(key, name.clone());
        t.replace(tensor::NAME, vec![Value::Bytes(name.into_bytes())]);
        inits.push(t);
        out.moved += 1;
    }
    if out.moved == 0 {
        return Ok(out);
    }
    let nodes: Vec<Message> = kept
        .into_iter()
        .map(|mut n| {
            let ins = onnx::inputs(&n);
            onnx::set_inputs(
                &mut n,
                ins.into_iter()
                    .map(|i| renamed.get(&i).cloned().unwrap_or(i)),
            );
            n
        })
        .collect();
    model.rewrite(&inits, &nodes, &[])?;
    Ok(out)
}
