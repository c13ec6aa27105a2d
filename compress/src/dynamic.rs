//! `dynamic-int8`: MatMul with a constant 2-D weight becomes integer arithmetic with the
//! activations quantized at run time — DynamicQuantizeLinear(A) → MatMulInteger with the weight
//! in INT8 (symmetric, per output column) → Cast to float → times (A's scale × the column's
//! scale). ONNX Runtime runs MatMulInteger with int8 kernels. Opset 11 or later (where
//! DynamicQuantizeLinear exists); anything else stays as it is.

use crate::onnx::{self, Model, tensor};
use crate::proto::Error;
use crate::quant::{MIN_ELEMENTS, quantize_per_channel};

/// (weight, columns) converted, and (node output, why) kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dynamic {
    pub converted: Vec<(String, usize)>,
    pub kept: Vec<(String, String)>,
}

pub fn dynamic_int8(model: &mut Model) -> Result<Dynamic, Error> {
    let mut out = Dynamic::default();
    if model.opset("").unwrap_or(0) < 11 {
        out.kept.push((
            "*".into(),
            "opset below 11 has no DynamicQuantizeLinear".into(),
        ));
        return Ok(out);
    }
    let onnx::Indexed {
        nodes,
        mut inits,
        by_name,
        uses,
    } = onnx::indexed(&model.graph)?;
    let mut new_nodes = Vec::new();
    let mut drop_inits = Vec::new();
    for n in nodes {
        let ins = onnx::inputs(&n);
        let outs = onnx::outputs(&n);
        if onnx::op_type(&n) != "MatMul" || ins.len() != 2 || outs.len() != 1 {
            new_nodes.push(n);
            continue;
        }
        let Some(&wi) = by_name.get(&ins[1]) else {
            new_nodes.push(n);
            continue;
        };
        let w = &inits[wi];
        let dims = onnx::dims_of(w)?;
        let values = match onnx::f32_data(w)? {
            Some(v)
                if dims.len() == 2 && v.len() >= MIN_ELEMENTS && uses.get(&ins[1]) == Some(&1) =>
            {
                v
            }
            _ => {
                out.kept.push((
                    outs[0].clone(),
                    "weight is not a 2-D float initializer of its own".into(),
                ));
                new_nodes.push(n);
                continue;
            }
        };
        let k = out.converted.len();
        let cols = dims[1] as usize;
        let (q, scales) = quantize_per_channel(&values, &dims, 1);
        let (wq, ws) = (format!("rxd.dq{k}"), format!("rxd.ds{k}"));
        let (aq, asc, azp, yi, yf, sc) = (
            format!("rxd.dyn{k}.a"),
            format!("rxd.dyn{k}.as"),
            format!("rxd.dyn{k}.azp"),
            format!("rxd.dyn{k}.i"),
            format!("rxd.dyn{k}.f"),
            format!("rxd.dyn{k}.s"),
        );
        inits.push(onnx::make_tensor(
            &wq,
            &dims,
            tensor::INT8,
            q.iter().map(|&v| v as u8).collect(),
        ));
        inits.push(onnx::make_tensor(
            &ws,
            &[cols as i64],
            tensor::FLOAT,
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
        drop_inits.push(ins[1].clone());
        new_nodes.push(onnx::make_node(
            "DynamicQuantizeLinear",
            "",
            "",
            &[&ins[0]],
            &[&aq, &asc, &azp],
            &[],
        ));
        new_nodes.push(onnx::make_node(
            "MatMulInteger",
            "",
            "",
            &[&aq, &wq, &azp],
            &[&yi],
            &[],
        ));
        new_nodes.push(onnx::make_node(
            "Cast",
            "",
            "",
            &[&yi],
            &[&yf],
            &[("to", tensor::FLOAT as i64)],
        ));
        new_nodes.push(onnx::make_node("Mul", "", "", &[&asc, &ws], &[&sc], &[]));
        new_nodes.push(onnx::make_node(
            "Mul",
            "",
            "",
            &[&yf, &sc],
            &[&outs[0]],
            &[],
        ));
        out.converted.push((ins[1].clone(), cols));
    }
    if out.converted.is_empty() {
        return Ok(out);
    }
    inits.retain(|t| !drop_inits.contains(&onnx::name_of(t)));
    model.rewrite(&inits, &new_nodes, &drop_inits)?;
    Ok(out)
}
