//! The static-INT8 rewrite: weights to per-channel INT8, the plan's activations calibrated
//! and given QuantizeLinear/DequantizeLinear pairs, constant Add/Mul inputs as uint8, biases
//! as INT32, unread quantization steps dropped, the graph sorted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ort::environment::Environment;

use super::calibrate::{Calibration, calibrate, range};
use super::plan::{Act, Graph, node_id, plan};
use super::{INT32, Static, Trace, UINT8, prepare, uint8_params};
use crate::Result;
use crate::onnx::{self, graph, tensor};
use crate::proto::Message;
use crate::report::Input;

pub(crate) fn quantize_traced(
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
