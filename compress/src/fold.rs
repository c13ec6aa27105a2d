//! Folds BatchNormalization into the Conv before it (inference-mode BN is an affine map per
//! channel, so W' = W·s and b' = (b − mean)·s + β with s = γ / √(var + ε)), then drops the
//! constants nothing uses any more. Done before weight quantization: fewer tensors to store,
//! one node less per conv, and the quantizer sees the weights the model really multiplies by.
//! Only the plain pattern is folded: a Conv whose single output feeds only a BatchNormalization
//! (one output, not in training mode), all parameters constant.

use std::collections::{BTreeMap, BTreeSet};

use crate::onnx::{self, Model, graph, node, tensor};
use crate::proto::{Error, Message, Value};

/// A float constant: dims and values.
type Constant = (Vec<i64>, Vec<f32>);

/// Constants of the graph by name: dims and float values (initializers and Constant nodes).
fn constants(model: &Model, nodes: &[Message]) -> Result<BTreeMap<String, Constant>, Error> {
    let mut out = BTreeMap::new();
    for t in model.graph.messages(graph::INITIALIZER)? {
        if let Some(v) = onnx::f32_data(&t)? {
            out.insert(onnx::name_of(&t), (onnx::dims_of(&t)?, v));
        }
    }
    for n in nodes.iter().filter(|n| onnx::op_type(n) == "Constant") {
        if let (Some(o), Some(t)) = (
            onnx::outputs(n).into_iter().next(),
            onnx::tensor_attr(n, "value")?,
        ) && let Some(v) = onnx::f32_data(&t)?
        {
            out.insert(o, (onnx::dims_of(&t)?, v));
        }
    }
    Ok(out)
}

/// Folds every foldable Conv → BatchNormalization pair; returns how many.
pub fn fold_batchnorm(model: &mut Model) -> Result<usize, Error> {
    let mut nodes = model.graph.messages(graph::NODE)?;
    let consts = constants(model, &nodes)?;
    let mut consumers: BTreeMap<String, usize> = BTreeMap::new();
    for n in &nodes {
        for i in onnx::inputs(n) {
            *consumers.entry(i).or_default() += 1;
        }
    }
    let graph_outputs = model.output_names()?;
    let producer: BTreeMap<String, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| onnx::outputs(n).into_iter().map(move |o| (o, i)))
        .collect();
    let mut new_inits = Vec::new();
    let mut remove = BTreeSet::new();
    // Names whose old definitions give way to folded tensors of the same name.
    let mut replaced: BTreeSet<String> = BTreeSet::new();
    let mut folded = 0;
    for b in 0..nodes.len() {
        if onnx::op_type(&nodes[b]) != "BatchNormalization" {
            continue;
        }
        let bn_in = onnx::inputs(&nodes[b]);
        let bn_out = onnx::outputs(&nodes[b]);
        if bn_in.len() != 5
            || bn_out.len() != 1
            || onnx::int_attr(&nodes[b], "training_mode")? == Some(1)
        {
            continue;
        }
        let Some(&c) = producer.get(&bn_in[0]) else {
            continue;
        };
        if onnx::op_type(&nodes[c]) != "Conv"
            || consumers.get(&bn_in[0]) != Some(&1)
            || graph_outputs.contains(&bn_in[0])
        {
            continue;
        }
        let conv_in = onnx::inputs(&nodes[c]);
        let params: Option<Vec<&Constant>> = bn_in[1..].iter().map(|n| consts.get(n)).collect();
        let (Some(params), Some((wdims, w))) = (params, conv_in.get(1).and_then(|n| consts.get(n)))
        else {
            continue;
        };
        let m = *wdims.first().unwrap_or(&0) as usize;
        if m == 0 || params.iter().any(|p| p.1.len() != m) {
            continue;
        }
        let bias: Vec<f32> = match conv_in.get(2).filter(|s| !s.is_empty()) {
            Some(name) => match consts.get(name) {
                Some((_, v)) if v.len() == m => v.clone(),
                _ => continue,
            },
            None => vec![0.0; m],
        };
        let eps = onnx::float_attr(&nodes[b], "epsilon")?.unwrap_or(1e-5);
        let (gamma, beta, mean, var) = (&params[0].1, &params[1].1, &params[2].1, &params[3].1);
        let s: Vec<f32> = (0..m).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
        let per = w.len() / m;
        let w2: Vec<f32> = w.iter().enumerate().map(|(i, x)| x * s[i / per]).collect();
        let b2: Vec<f32> = (0..m)
            .map(|i| (bias[i] - mean[i]) * s[i] + beta[i])
            .collect();
        // The folded tensors take over names nothing else reads (the conv's own weight and
        // bias, or the BN's shift), so the file does not grow by new names and the weights
        // keep the names a user knows them by (the sensitivity search reports them).
        let only_here = |n: &String| consumers.get(n) == Some(&1) && !graph_outputs.contains(n);
        let wn = if only_here(&conv_in[1]) {
            replaced.insert(conv_in[1].clone());
            conv_in[1].clone()
        } else {
            format!("{}_bn_folded", conv_in[1])
        };
        let bn = match conv_in.get(2).filter(|s| !s.is_empty()) {
            Some(b) if only_here(b) => b.clone(),
            _ if only_here(&bn_in[2]) => bn_in[2].clone(),
            _ => format!("{}_bn_bias", bn_out[0]),
        };
        if !bn.ends_with("_bn_bias") {
            replaced.insert(bn.clone());
        }
        new_inits.push(onnx::make_tensor(
            &wn,
            wdims,
            tensor::FLOAT,
            w2.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        new_inits.push(onnx::make_tensor(
            &bn,
            &[m as i64],
            tensor::FLOAT,
            b2.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        // The conv now takes the folded weight and bias and produces the BN's output.
        let conv = &mut nodes[c];
        let mut ins = vec![Value::Bytes(conv_in[0].as_bytes().to_vec())];
        ins.push(Value::Bytes(wn.into_bytes()));
        ins.push(Value::Bytes(bn.into_bytes()));
        conv.replace(node::INPUT, ins);
        conv.replace(
            node::OUTPUT,
            vec![Value::Bytes(bn_out[0].as_bytes().to_vec())],
        );
        remove.insert(b);
        folded += 1;
    }
    if folded == 0 {
        return Ok(0);
    }
    let nodes: Vec<Message> = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(_, n)| n)
        .collect();
    // Drop constants nothing reads any more (the old weights and BN parameters).
    let used: BTreeSet<String> = nodes
        .iter()
        .flat_map(onnx::inputs)
        .chain(graph_outputs.iter().cloned())
        .collect();
    let nodes: Vec<Message> = nodes
        .into_iter()
        .filter(|n| {
            onnx::op_type(n) != "Constant"
                || onnx::outputs(n)
                    .iter()
                    .any(|o| used.contains(o) && !replaced.contains(o))
        })
        .collect();
    let mut inits: Vec<Message> = model
        .graph
        .messages(graph::INITIALIZER)?
        .into_iter()
        .filter(|t| used.contains(&onnx::name_of(t)) && !replaced.contains(&onnx::name_of(t)))
        .collect();
    inits.extend(new_inits);
    let kept: BTreeSet<String> = inits.iter().map(onnx::name_of).collect();
    model.graph.replace(
        graph::INITIALIZER,
        inits.iter().map(|t| Value::Bytes(t.encode())).collect(),
    );
    model.graph.replace(
        graph::NODE,
        nodes.iter().map(|n| Value::Bytes(n.encode())).collect(),
    );
    // Graph inputs that named dropped initializers (old IR) go too.
    let inputs: Vec<Value> = model
        .graph
        .messages(graph::INPUT)?
        .into_iter()
        .filter(|i| {
            let n = i.string(onnx::value_info::NAME);
            kept.contains(&n) || used.contains(&n)
        })
        .map(|m| Value::Bytes(m.encode()))
        .collect();
    model.graph.replace(graph::INPUT, inputs);
    Ok(folded)
}
