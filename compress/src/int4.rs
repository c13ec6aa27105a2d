//! `int4`: MatMul weights as block-wise 4-bit integers in ONNX Runtime's `MatMulNBits` form
//! (com.microsoft): the weight [K, N] is stored transposed, in blocks of `BLOCK` values along
//! K, two values per byte (low nibble first), one float scale per block, symmetric around the
//! default zero point 8. The MatMul becomes MatMulNBits with attributes K, N, bits, block_size.

use crate::onnx::{self, Model, tensor};
use crate::proto::Error;
use crate::quant::MIN_ELEMENTS;

/// Values per block along K.
pub const BLOCK: usize = 32;

/// (weight, K, N) converted and the bytes of float weights they replaced / the packed bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Int4 {
    pub converted: Vec<(String, usize, usize)>,
    pub float_bytes: u64,
    pub packed_bytes: u64,
}

/// Quantizes W [K, N] (row major) into MatMulNBits' B [N, blocks, BLOCK/2] and scales
/// [N × blocks].
pub fn pack(w: &[f32], k: usize, n: usize) -> (Vec<u8>, Vec<f32>) {
    let blocks = k.div_ceil(BLOCK);
    let mut packed = vec![0u8; n * blocks * BLOCK / 2];
    let mut scales = vec![0f32; n * blocks];
    for col in 0..n {
        for b in 0..blocks {
            let rows = (b * BLOCK)..((b + 1) * BLOCK).min(k);
            let max = rows
                .clone()
                .map(|r| w[r * n + col].abs())
                .fold(0f32, f32::max);
            let scale = if max > 0.0 && max.is_finite() {
                max / 7.0
            } else {
                1.0
            };
            scales[col * blocks + b] = scale;
            for (i, r) in rows.enumerate() {
                let q = ((w[r * n + col] / scale).round().clamp(-8.0, 7.0) + 8.0) as u8;
                let at = (col * blocks + b) * BLOCK / 2 + i / 2;
                packed[at] |= if i % 2 == 0 { q } else { q << 4 };
            }
            // Padding rows past K stay at nibble 0 → value (0 − 8)·scale: they multiply
            // A's (absent) columns past K, which MatMulNBits never reads.
        }
    }
    (packed, scales)
}

pub fn int4(model: &mut Model) -> Result<Int4, Error> {
    let mut out = Int4::default();
    let onnx::Indexed {
        nodes,
        mut inits,
        by_name,
        uses,
    } = onnx::indexed(&model.graph)?;
    let mut new_nodes = Vec::new();
    let mut dropped = Vec::new();
    for n in nodes {
        let ins = onnx::inputs(&n);
        let outs = onnx::outputs(&n);
        let weight =
            (onnx::op_type(&n) == "MatMul" && ins.len() == 2 && uses.get(&ins[1]) == Some(&1))
                .then(|| by_name.get(&ins[1]))
                .flatten();
        let Some(&wi) = weight else {
            new_nodes.push(n);
            continue;
        };
        let dims = onnx::dims_of(&inits[wi])?;
        let values = match onnx::f32_data(&inits[wi])? {
            Some(v) if dims.len() == 2 && v.len() >= MIN_ELEMENTS && dims[0] >= 16 => v,
            _ => {
                new_nodes.push(n);
                continue;
            }
        };
        let (k, cols) = (dims[0] as usize, dims[1] as usize);
        let (packed, scales) = pack(&values, k, cols);
        let c = out.converted.len();
        let (bn, sn) = (format!("rxd.n{c}"), format!("rxd.ns{c}"));
        let blocks = k.div_ceil(BLOCK);
        out.float_bytes += (values.len() * 4) as u64;
        out.packed_bytes += (packed.len() + scales.len() * 4) as u64;
        inits.push(onnx::make_tensor(
            &bn,
            &[cols as i64, blocks as i64, (BLOCK / 2) as i64],
            2, // UINT8
            packed,
        ));
        inits.push(onnx::make_tensor(
            &sn,
            &[(cols * blocks) as i64],
            tensor::FLOAT,
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
        new_nodes.push(onnx::make_node(
            "MatMulNBits",
            "com.microsoft",
            "",
            &[&ins[0], &bn, &sn],
            &[&outs[0]],
            &[
                ("K", k as i64),
                ("N", cols as i64),
                ("bits", 4),
                ("block_size", BLOCK as i64),
            ],
        ));
        dropped.push(ins[1].clone());
        out.converted.push((ins[1].clone(), k, cols));
    }
    if out.converted.is_empty() {
        return Ok(out);
    }
    inits.retain(|t| !dropped.contains(&onnx::name_of(t)));
    model.rewrite(&inits, &new_nodes, &dropped)?;
    model.ensure_opset("com.microsoft", 1);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_two_nibbles_per_byte_around_eight() {
        // K = 2, N = 1: one block (padded to 32), values 7·s and −7·s with s = 1.
        let (packed, scales) = pack(&[7.0, -7.0], 2, 1);
        assert_eq!(scales, vec![1.0]);
        assert_eq!(packed.len(), BLOCK / 2);
        assert_eq!(packed[0], 15 | (1 << 4));
    }
}
