//! `fp16`: float weights stored in half precision. Each float initializer (or Constant-node
//! tensor) large enough to matter becomes a FLOAT16 tensor followed by a Cast back to float
//! under its original name, so the graph's arithmetic and its inputs and outputs keep their
//! types: the file halves, and ONNX Runtime folds the casts when it loads the model (compute
//! stays in float32; the CPU execution provider has few float16 kernels).

use crate::onnx::{self, Model, graph, node, tensor};
use crate::proto::{Error, Message, Value};
use crate::quant::MIN_ELEMENTS;

/// ONNX's FLOAT16 data type.
pub const FLOAT16: u64 = 10;

/// IEEE 754 binary16 from binary32, rounding to nearest even (overflow to ±inf, NaN kept).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the mantissa (with its implicit 1) into place, round to even.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut v = m >> shift;
        if rest > half || (rest == half && v & 1 == 1) {
            v += 1;
        }
        return sign | v as u16;
    }
    let mut v = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && v & 1 == 1) {
        v += 1; // may carry into the exponent, which is still correct (up to inf)
    }
    sign | v as u16
}

fn half_tensor(name: &str, dims: &[i64], values: &[f32]) -> Message {
    onnx::make_tensor(
        name,
        dims,
        FLOAT16,
        values
            .iter()
            .flat_map(|&v| f16_bits(v).to_le_bytes())
            .collect(),
    )
}

fn cast_to_float(from: &str, to: &str) -> Message {
    onnx::make_node(
        "Cast",
        "",
        "",
        &[from],
        &[to],
        &[("to", tensor::FLOAT as i64)],
    )
}

/// Converts the model's large float weights to float16 in place; returns how many.
pub fn fp16(model: &mut Model) -> Result<usize, Error> {
    let mut count = 0;
    let mut casts = Vec::new();
    let mut inits = Vec::new();
    for t in model.graph.messages(graph::INITIALIZER)? {
        match onnx::f32_data(&t)? {
            Some(v) if v.len() >= MIN_ELEMENTS => {
                let name = onnx::name_of(&t);
                let hn = format!("rxd.h{count}");
                inits.push(half_tensor(&hn, &onnx::dims_of(&t)?, &v));
                casts.push((hn, name));
                count += 1;
            }
            _ => inits.push(t),
        }
    }
    let mut nodes = Vec::new();
    for mut n in model.graph.messages(graph::NODE)? {
        let is_const = onnx::op_type(&n) == "Constant";
        let tensor = if is_const {
            onnx::tensor_attr(&n, "value")?
        } else {
            None
        };
        let Some(t) = tensor else {
            nodes.push(n);
            continue;
        };
        match onnx::f32_data(&t)? {
            Some(v) if v.len() >= MIN_ELEMENTS => {
                let out = onnx::outputs(&n).into_iter().next().unwrap_or_default();
                let hn = format!("rxd.h{count}");
                count += 1;
                let mut h = half_tensor("", &onnx::dims_of(&t)?, &v);
                h.replace(tensor::NAME, Vec::new());
                let mut attrs = n.messages(node::ATTRIBUTE)?;
                for a in &mut attrs {
                    if a.string(onnx::attr::NAME) == "value" {
                        a.replace(onnx::attr::T, vec![Value::Bytes(h.encode())]);
                    }
                }
                n.replace(
                    node::ATTRIBUTE,
                    attrs.iter().map(|a| Value::Bytes(a.encode())).collect(),
                );
                n.replace(node::OUTPUT, vec![Value::Bytes(hn.clone().into_bytes())]);
                nodes.push(n);
                nodes.push(cast_to_float(&hn, &out));
            }
            _ => nodes.push(n),
        }
    }
    if count == 0 {
        return Ok(0);
    }
    let mut all: Vec<Message> = casts.iter().map(|(h, n)| cast_to_float(h, n)).collect();
    all.extend(nodes);
    let renamed: Vec<String> = casts.iter().map(|(_, n)| n.clone()).collect();
    model.rewrite(&inits, &all, &renamed)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bits_match_ieee() {
        assert_eq!(f16_bits(0.0), 0x0000);
        assert_eq!(f16_bits(-0.0), 0x8000);
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-2.0), 0xc000);
        assert_eq!(f16_bits(65504.0), 0x7bff);
        assert_eq!(f16_bits(1e6), 0x7c00, "overflow is inf");
        assert_eq!(f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_eq!(f16_bits(5.960_464_5e-8), 0x0001, "smallest subnormal");
        assert_eq!(f16_bits(0.1), 0x2e66);
        assert_eq!(f16_bits(1.0 + 1.0 / 2048.0), 0x3c00, "ties to even");
        assert_eq!(f16_bits(1.0 + 3.0 / 2048.0), 0x3c02);
    }
}
