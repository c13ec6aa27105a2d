//! The static-INT8 plan: which tensors get an INT8 form and how (calibrated, rescaled by a
//! folded Mul/Div, moved with their input's parameters), which nodes go, and which stay in
//! float. Pure: reads the graph, touches neither ONNX Runtime nor the model.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{KERNELS, SAME_SCALE};
use crate::onnx;
use crate::proto::Message;

/// How a tensor gets its INT8 form.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Act {
    /// Calibrated: QuantizeLinear of `feed` (the tensor itself, or the input of the Relu/Clip
    /// that was absorbed) with the tensor's range.
    Point { feed: String },
    /// The INT8 values of `of`, read at `factor` × its scale (a folded Mul/Div).
    Rescale { of: String, factor: f32 },
    /// Re-quantized with `of`'s parameters (the output of a data-movement operator).
    Same { of: String },
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) acts: Vec<(String, Act)>,
    pub(crate) planned: BTreeSet<String>,
    /// Nodes that go (absorbed or folded), by index.
    pub(crate) removed: BTreeSet<usize>,
    /// Constant inputs of quantized Add/Mul nodes: (node, input index).
    pub(crate) consts: Vec<(usize, usize)>,
    pub(crate) quantized: BTreeMap<String, usize>,
    pub(crate) folded: BTreeMap<String, usize>,
    pub(crate) moved: BTreeMap<String, usize>,
    pub(crate) float: BTreeMap<String, usize>,
    /// For each calibrated tensor: the node whose quantization put it there and, for that
    /// node's output, the quantized tensors the node reads (the sensitivity search's map).
    pub(crate) blame: BTreeMap<String, (String, Vec<String>)>,
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
pub(crate) struct Graph<'a> {
    pub(crate) nodes: &'a [Message],
    /// Float constants (initializers, and DequantizeLinear outputs of constant weights).
    pub(crate) consts: &'a HashMap<String, Option<Vec<f32>>>,
    pub(crate) float: &'a BTreeSet<String>,
    pub(crate) outputs: &'a BTreeSet<String>,
    pub(crate) readers: HashMap<String, Vec<usize>>,
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

pub(crate) fn plan(
    g: &Graph,
    keep: &BTreeSet<String>,
    ranges: Option<&BTreeMap<String, (f32, f32)>>,
) -> Plan {
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
