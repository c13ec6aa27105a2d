//! What a model needs of a device beyond memory, found before it is placed: whether it
//! computes in float16 — its settings compress it to `fp16`, or its file has a float16 input
//! or output, or a float16 weight that feeds anything but a `Cast` (a weight only cast back
//! to float32, as `fp16-weights` stores them, needs no float16 arithmetic). The file is read
//! at the protobuf wire level without copying it (only the main graph; subgraphs are not
//! searched). Placement (`registry::load`) keeps such a model off devices whose probe found
//! no float16 (`runtime::caps`), and reads nothing where every device has float16.
//! Boundary: pure reading; no ORT, no registry state.

use std::collections::HashSet;
use std::path::Path;

const FLOAT16: u64 = 10;

/// Why the model at `path`, served with model.toml's `compress`, computes in float16, or
/// `None` when it does not (or its file cannot be read: the load reports that).
pub fn float16_need(path: &Path, compress: Option<&str>) -> Option<String> {
    if compress.is_some_and(|c| c.split('+').any(|s| s.trim() == "fp16")) {
        return Some("model.toml's compress = \"fp16\" makes it compute in float16".into());
    }
    let bytes = std::fs::read(path).ok()?;
    graph_float16(&bytes)
}

/// The float16 use in a serialized ModelProto's main graph, in words.
fn graph_float16(model: &[u8]) -> Option<String> {
    let graph = fields(model).find_map(|(n, v)| match (n, v) {
        (7, Wire::Bytes(g)) => Some(g),
        _ => None,
    })?;
    let mut halves: HashSet<&[u8]> = HashSet::new();
    for (n, v) in fields(graph) {
        let Wire::Bytes(b) = v else { continue };
        match n {
            // input, output: ValueInfoProto { name = 1, type = 2 }
            11 | 12 if value_elem_type(b) == Some(FLOAT16) => {
                let what = if n == 11 { "input" } else { "output" };
                return Some(format!(
                    "its {what} '{}' is float16",
                    String::from_utf8_lossy(string_field(b, 1).unwrap_or_default())
                ));
            }
            // initializer: TensorProto { data_type = 2, name = 8 }
            5 if varint_field(b, 2) == Some(FLOAT16) => {
                halves.insert(string_field(b, 8).unwrap_or_default());
            }
            _ => {}
        }
    }
    if halves.is_empty() {
        return None;
    }
    // node: NodeProto { input = 1, op_type = 4 }
    for (n, v) in fields(graph) {
        let (1, Wire::Bytes(node)) = (n, v) else {
            continue;
        };
        let op = string_field(node, 4).unwrap_or_default();
        if op == b"Cast" {
            continue;
        }
        let weight = fields(node).find_map(|(n, v)| match (n, v) {
            (1, Wire::Bytes(i)) if halves.contains(i) => Some(i),
            _ => None,
        });
        if let Some(w) = weight {
            return Some(format!(
                "its float16 weight '{}' feeds a {} node",
                String::from_utf8_lossy(w),
                String::from_utf8_lossy(op)
            ));
        }
    }
    None
}

/// Operators whose presence means a model's activations are quantized: its DequantizeLinear
/// nodes feed integer kernels, and dequantize-at-load leaves it alone (as
/// `rxd_compress::dequant` does).
const ACTIVATION_QUANT: [&[u8]; 6] = [
    b"QuantizeLinear",
    b"QLinearConv",
    b"QLinearMatMul",
    b"ConvInteger",
    b"MatMulInteger",
    b"DynamicQuantizeLinear",
];

const UINT8: u64 = 2;
const INT8: u64 = 3;

/// What the model at `path` (`file_bytes` long) holds in memory once dequantized at load, as
/// an estimate before its first load: its file plus three bytes for every 8-bit weight of its
/// main graph (each becomes a 4-byte float). `None` when it is not a weights-only quantized
/// file: no DequantizeLinear (a float model: the file stands; found by a streaming search
/// that reads nothing into memory), or quantized activations (served as it is). Budget
/// admission uses it so that a weights-only file, a quarter of its float model on disk, is
/// not admitted at a quarter of what it will take (the measured footprint settles it after).
pub fn dequantized_bytes(path: &Path, file_bytes: u64) -> Option<u64> {
    if !contains(path, b"DequantizeLinear") {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let graph = fields(&bytes).find_map(|(n, v)| match (n, v) {
        (7, Wire::Bytes(g)) => Some(g),
        _ => None,
    })?;
    let mut eight_bit = 0u64;
    for (n, v) in fields(graph) {
        let Wire::Bytes(b) = v else { continue };
        match n {
            // node: NodeProto { op_type = 4 }
            1 if ACTIVATION_QUANT.contains(&string_field(b, 4).unwrap_or_default()) => {
                return None;
            }
            // initializer: TensorProto { dims = 1, data_type = 2 }
            5 if matches!(varint_field(b, 2), Some(INT8 | UINT8)) => {
                eight_bit = eight_bit.saturating_add(elements(b));
            }
            _ => {}
        }
    }
    Some(file_bytes.saturating_add(eight_bit.saturating_mul(3)))
}

/// The elements of a TensorProto: the product of its dims (packed or not).
fn elements(tensor: &[u8]) -> u64 {
    let mut n = 1u64;
    for (f, v) in fields(tensor) {
        match (f, v) {
            (1, Wire::Varint(d)) => n = n.saturating_mul(d),
            (1, Wire::Bytes(packed)) => {
                let mut pos = 0;
                while pos < packed.len() {
                    match read_varint(packed, &mut pos) {
                        Some(d) => n = n.saturating_mul(d),
                        None => break,
                    }
                }
            }
            _ => {}
        }
    }
    n
}

/// Whether the file at `path` contains `needle`, read in pieces (never whole).
fn contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    // A SIMD substring search: comparing every window byte by byte took 5–6 ms on YOLOv8n's
    // 12 MB, a tenth of its load.
    let finder = memchr::memmem::Finder::new(needle);
    let mut buf = vec![0u8; (1 << 20) + needle.len()];
    let mut kept = 0;
    loop {
        let got = match f.read(&mut buf[kept..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let end = kept + got;
        if finder.find(&buf[..end]).is_some() {
            return true;
        }
        // Keep the tail: the needle may straddle two reads.
        let keep = (needle.len() - 1).min(end);
        buf.copy_within(end - keep..end, 0);
        kept = keep;
    }
}

/// TypeProto { tensor_type = 1: { elem_type = 1 } } of a ValueInfoProto.
fn value_elem_type(value_info: &[u8]) -> Option<u64> {
    let ty = string_field(value_info, 2)?;
    let tensor = string_field(ty, 1)?;
    varint_field(tensor, 1)
}

fn string_field(msg: &[u8], field: u32) -> Option<&[u8]> {
    fields(msg).find_map(|(n, v)| match v {
        Wire::Bytes(b) if n == field => Some(b),
        _ => None,
    })
}

fn varint_field(msg: &[u8], field: u32) -> Option<u64> {
    fields(msg).find_map(|(n, v)| match v {
        Wire::Varint(x) if n == field => Some(x),
        _ => None,
    })
}

#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// A message's fields in order, borrowed; stops at the first malformed byte.
fn fields(buf: &[u8]) -> impl Iterator<Item = (u32, Wire<'_>)> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let key = read_varint(buf, &mut pos)?;
        let field = u32::try_from(key >> 3).ok()?;
        let value = match key & 7 {
            0 => Wire::Varint(read_varint(buf, &mut pos)?),
            1 => {
                pos = pos.checked_add(8).filter(|&p| p <= buf.len())?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|&e| e <= buf.len())?;
                let b = &buf[pos..end];
                pos = end;
                Wire::Bytes(b)
            }
            5 => {
                pos = pos.checked_add(4).filter(|&p| p <= buf.len())?;
                Wire::Fixed
            }
            _ => return None,
        };
        Some((field, value))
    })
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxd_compress::onnx::{self, graph, make_node, make_tensor, model::GRAPH};
    use rxd_compress::proto::{Message, Value};

    /// The digits MLP in the form `strategy` writes, in a file; its path and bytes.
    fn digits_as(strategy: &str, dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let float = std::fs::read(root.join("examples/models/digits/1/model.onnx")).unwrap();
        let bytes = if strategy == "none" {
            float
        } else {
            rxd_compress::compress(&float, strategy.parse().unwrap())
                .unwrap()
                .0
        };
        let path = dir.join(format!("{strategy}.onnx"));
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    #[test]
    fn a_weights_only_file_is_estimated_at_its_dequantized_size_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        for strategy in ["int8-weights", "int8-weights+fp16-weights"] {
            let (path, bytes) = digits_as(strategy, dir.path());
            let served = rxd_compress::dequant::dequantize_bytes(&bytes)
                .unwrap()
                .0
                .expect("dequantized")
                .len() as f64;
            let estimate = dequantized_bytes(&path, bytes.len() as u64).expect("an estimate");
            assert!(
                (estimate as f64 - served).abs() / served < 0.15,
                "{strategy}: estimated {estimate}, served {served}, file {}",
                bytes.len()
            );
            assert!(estimate as f64 > 2.5 * bytes.len() as f64, "{strategy}");
        }
        // A float model has no DequantizeLinear; quantized activations are served as they are.
        for strategy in ["none", "dynamic-int8"] {
            let (path, bytes) = digits_as(strategy, dir.path());
            assert_eq!(
                dequantized_bytes(&path, bytes.len() as u64),
                None,
                "{strategy}"
            );
        }
    }

    #[test]
    fn the_streaming_search_finds_a_needle_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut bytes = vec![0u8; (1 << 20) - 5];
        bytes.extend_from_slice(b"DequantizeLinear");
        bytes.extend_from_slice(&[1u8; 100]);
        std::fs::write(&path, &bytes).unwrap();
        assert!(contains(&path, b"DequantizeLinear"));
        assert!(!contains(&path, b"QLinearConv"));
        assert!(!contains(&dir.path().join("missing"), b"x"));
    }

    /// A model with a float32 input `x`, the given initializers and nodes (op, inputs).
    fn model_with(inits: &[(&str, u64)], nodes: &[(&str, &[&str])]) -> Vec<u8> {
        let mut g = Message::default();
        for (i, (op, inputs)) in nodes.iter().enumerate() {
            let out = format!("y{i}");
            let n = make_node(op, "", &format!("n{i}"), inputs, &[&out], &[]);
            g.push_message(graph::NODE, &n);
        }
        for (name, ty) in inits {
            let width = if *ty == FLOAT16 { 2 } else { 4 };
            g.push_message(
                graph::INITIALIZER,
                &make_tensor(name, &[2], *ty, vec![0; 2 * width]),
            );
        }
        g.push_message(graph::INPUT, &value_info("x", 1));
        let mut m = Message::default();
        m.push(1, Value::Varint(8));
        m.push_message(GRAPH, &g);
        m.encode()
    }

    fn value_info(name: &str, elem: u64) -> Message {
        onnx::value_info(name, elem, &[])
    }

    #[test]
    fn float32_models_and_weights_only_cast_back_need_no_float16() {
        assert_eq!(
            graph_float16(&model_with(&[("w", 1)], &[("Add", &["x", "w"])])),
            None
        );
        let cast_back = model_with(
            &[("w16", FLOAT16)],
            &[("Cast", &["w16"]), ("Add", &["x", "y0"])],
        );
        assert_eq!(graph_float16(&cast_back), None);
    }

    #[test]
    fn float16_weights_computed_with_or_float16_inputs_are_found() {
        let m = model_with(&[("w16", FLOAT16)], &[("MatMul", &["x", "w16"])]);
        let why = graph_float16(&m).unwrap();
        assert!(why.contains("'w16'") && why.contains("MatMul"), "{why}");

        let mut g = Message::default();
        g.push_message(graph::INPUT, &value_info("images", FLOAT16));
        let mut m = Message::default();
        m.push_message(GRAPH, &g);
        let why = graph_float16(&m.encode()).unwrap();
        assert!(why.contains("input 'images'"), "{why}");
    }

    #[test]
    fn fp16_compression_in_settings_needs_float16_without_reading_the_file() {
        let none = Path::new("/nonexistent/model.onnx");
        assert!(float16_need(none, Some("fp16")).is_some());
        assert!(float16_need(none, Some("prune:0.5 + fp16")).is_some());
        assert_eq!(float16_need(none, Some("fp16-weights")), None);
        assert_eq!(float16_need(none, None), None);
    }

    #[test]
    fn malformed_bytes_end_the_walk_without_panicking() {
        assert_eq!(graph_float16(&[0x3a, 0xff, 0xff]), None);
        assert_eq!(graph_float16(&[0xff; 12]), None);
        assert_eq!(fields(&[0x08]).count(), 0);
    }
}
