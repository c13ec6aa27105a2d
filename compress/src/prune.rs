//! `prune:S`: magnitude pruning. In every MatMul/Gemm/Conv weight large enough to quantize
//! (initializer or Constant node), the fraction `S` of entries with the smallest magnitude is
//! set to exactly zero; the model keeps its structure (dense tensors with zeros), so any
//! runtime runs it, and a quantizer after it keeps the zeros exact (0 quantizes to 0).

use crate::onnx::{self, Model, graph, node, tensor};
use crate::proto::{Error, Message, Value};
use crate::quant::MIN_ELEMENTS;

/// What pruning did: entries zeroed and entries in the pruned tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tensors: usize,
    pub zeros: u64,
    pub elements: u64,
}

impl Pruned {
    /// Fraction of exact zeros in the pruned tensors.
    pub fn sparsity(&self) -> f64 {
        self.zeros as f64 / self.elements.max(1) as f64
    }
}

/// Zeroes the `sparsity` fraction of smallest-magnitude entries of `w` (ties at the threshold
/// included until the count is reached).
pub fn prune_values(w: &mut [f32], sparsity: f64) -> u64 {
    let k = ((w.len() as f64) * sparsity.clamp(0.0, 1.0)).round() as usize;
    if k == 0 {
        return w.iter().filter(|v| **v == 0.0).count() as u64;
    }
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()));
    for &i in &order[..k] {
        w[i] = 0.0;
    }
    w.iter().filter(|v| **v == 0.0).count() as u64
}

fn is_weight_input(node: &Message, index: usize) -> bool {
    index == 1 && matches!(onnx::op_type(node).as_str(), "MatMul" | "Gemm" | "Conv")
}

fn with_values(t: &Message, values: &[f32]) -> Message {
    let mut t = t.clone();
    t.replace(tensor::FLOAT_DATA, Vec::new());
    t.replace(
        tensor::RAW_DATA,
        vec![Value::Bytes(
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )],
    );
    t
}

/// Prunes the weights of `model` in place (in the main graph and every If/Loop/Scan body).
pub fn prune(model: &mut Model, sparsity: f64) -> Result<Pruned, Error> {
    let mut out = Pruned::default();
    prune_graph(&mut model.graph, sparsity, &mut out)?;
    Ok(out)
}

/// [`prune`] on one graph, its subgraphs first.
fn prune_graph(g: &mut Message, sparsity: f64, out: &mut Pruned) -> Result<(), Error> {
    let mut nodes = g.messages(graph::NODE)?;
    for n in &mut nodes {
        onnx::map_subgraphs(n, &mut |sub| {
            let before = out.tensors;
            prune_graph(sub, sparsity, out)?;
            Ok(out.tensors > before)
        })?;
    }
    // Weights this graph defines may be read inside its subgraphs (outer-scope names).
    let readers: Vec<Message> = nodes
        .iter()
        .cloned()
        .chain(onnx::nested_nodes(&nodes)?)
        .collect();
    let weights: std::collections::BTreeSet<String> = readers
        .iter()
        .flat_map(|n| {
            onnx::inputs(n)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| is_weight_input(n, *i))
                .map(|(_, name)| name)
                .collect::<Vec<_>>()
        })
        .collect();
    let apply = |t: &Message, out: &mut Pruned| -> Result<Option<Message>, Error> {
        if !weights.contains(&onnx::name_of(t)) {
            return Ok(None);
        }
        let Some(mut v) = onnx::f32_data(t)? else {
            return Ok(None);
        };
        if v.len() < MIN_ELEMENTS {
            return Ok(None);
        }
        out.zeros += prune_values(&mut v, sparsity);
        out.elements += v.len() as u64;
        out.tensors += 1;
        Ok(Some(with_values(t, &v)))
    };
    let mut inits = g.messages(graph::INITIALIZER)?;
    for t in &mut inits {
        if let Some(new) = apply(t, out)? {
            *t = new;
        }
    }
    for n in &mut nodes {
        if onnx::op_type(n) != "Constant" {
            continue;
        }
        let Some(name) = onnx::outputs(n).into_iter().next() else {
            continue;
        };
        let Some(mut t) = onnx::tensor_attr(n, "value")? else {
            continue;
        };
        // The tensor inside a Constant carries no name of its own: give it the output's.
        t.replace(tensor::NAME, vec![Value::Bytes(name.into_bytes())]);
        if let Some(new) = apply(&t, out)? {
            let mut attrs = n.messages(node::ATTRIBUTE)?;
            for a in &mut attrs {
                if a.string(onnx::attr::NAME) == "value" {
                    let mut inner = new.clone();
                    inner.replace(tensor::NAME, Vec::new());
                    a.replace(onnx::attr::T, vec![Value::Bytes(inner.encode())]);
                }
            }
            n.replace(
                node::ATTRIBUTE,
                attrs.iter().map(|a| Value::Bytes(a.encode())).collect(),
            );
        }
    }
    g.replace(
        graph::INITIALIZER,
        inits.iter().map(|t| Value::Bytes(t.encode())).collect(),
    );
    g.replace(
        graph::NODE,
        nodes.iter().map(|n| Value::Bytes(n.encode())).collect(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_magnitudes_go() {
        let mut w = vec![0.5, -0.1, 0.3, -0.9, 0.05, 0.2];
        assert_eq!(prune_values(&mut w, 0.5), 3);
        assert_eq!(w, vec![0.5, 0.0, 0.3, -0.9, 0.0, 0.0]);
        let mut w = vec![1.0; 10];
        assert_eq!(prune_values(&mut w, 0.0), 0);
    }
}
