//! What a device computes, found by trying: a one-node model of each kind, built here in
//! memory, is run once on the device with ONNX Runtime's CPU fallback disabled (on an
//! accelerator), so a node the device's execution provider cannot run makes the session fail
//! instead of moving to the CPU. A device where the session cannot be created, the run fails or the answer is wrong
//! does not have the capability.
//! - float16: `Add` of two float16 tensors. The CPU execution provider computes most float16
//!   operators by casting to float32 and back, so on a CPU device a passing probe says
//!   `emulated` (correct, not faster); elsewhere it says `native`.
//! - int8: `MatMulInteger` of two uint8 tensors into int32 (the kernel dynamic INT8 models use).
//!
//! Each probe costs one tiny session on the device (milliseconds on the CPU; on a GPU, its
//! shader compilation). The registry probes each device once, at start, and keeps the result.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorElementType;
use rxd_protocol::{Capabilities, Support};

use super::{DeviceKind, DeviceSession, Runtime, Target, raw};

/// ONNX's element type numbers (onnx.proto `TensorProto.DataType`).
const UINT8: u64 = 2;
const INT32: u64 = 6;
const FLOAT16: u64 = 10;

impl Runtime {
    /// Probes `target`'s device for each capability. Errors only when nothing could be tried
    /// (the private directory cannot be written); a probe that fails is that capability absent.
    pub fn capabilities(&self, target: Target<'_>) -> Capabilities {
        let cpu = matches!(target.kind, DeviceKind::Cpu);
        let float16 = match self.try_probe(target, "f16", &float16_model(), &float16_case()) {
            Ok(()) if cpu => Support::Emulated,
            Ok(()) => Support::Native,
            Err(e) => {
                tracing::info!(ep = target.kind.ep(), "no float16: {e}");
                Support::Absent
            }
        };
        let int8 = match self.try_probe(target, "int8", &int8_model(), &int8_case()) {
            Ok(()) => Support::Native,
            Err(e) => {
                tracing::info!(ep = target.kind.ep(), "no integer kernels: {e}");
                Support::Absent
            }
        };
        Capabilities { float16, int8 }
    }

    /// Creates a session for `model` on `target` without CPU fallback, runs `case` once and
    /// checks the output's bytes.
    fn try_probe(
        &self,
        target: Target<'_>,
        what: &str,
        model: &[u8],
        case: &Case,
    ) -> Result<(), String> {
        // A file in the private directory, as for the device's prime graph (a plugin EP's
        // session is created from a path like every model's).
        let path = self
            .scratch
            .path()
            .join(format!("probe-{what}-{}.onnx", probe_number()));
        std::fs::write(&path, model).map_err(|e| format!("cannot write the probe model: {e}"))?;
        let made = self.probe_session(&path, target);
        let _ = std::fs::remove_file(&path);
        let mut session = made?;
        let inputs = case
            .inputs
            .iter()
            .map(|(name, ty, shape, bytes)| {
                raw::tensor_from_bytes(*ty, shape, bytes)
                    .map(|t| (std::borrow::Cow::Borrowed(*name), t.into()))
            })
            .collect::<Result<
                Vec<(
                    std::borrow::Cow<'_, str>,
                    ort::session::SessionInputValue<'_>,
                )>,
                String,
            >>()?;
        let outputs = session.with(|s| s.run(inputs)).map_err(|e| e.to_string())?;
        let out = outputs
            .get("y")
            .ok_or("the probe has no output 'y'")?
            .view();
        let tensor = out
            .downcast::<ort::value::DynTensorValueType>()
            .map_err(|e| e.to_string())?;
        let got = raw::tensor_bytes(&tensor)?;
        if got != case.expect.as_slice() {
            return Err(format!(
                "wrong answer: {got:02x?}, expected {:02x?}",
                case.expect
            ));
        }
        Ok(())
    }

    fn probe_session(&self, path: &Path, target: Target<'_>) -> Result<DeviceSession, String> {
        // On the CPU device the CPU EP is the device's own; elsewhere it is the fallback.
        let fallback = if matches!(target.kind, DeviceKind::Cpu) {
            "0"
        } else {
            "1"
        };
        let builder = Session::builder(&self.env)
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| b.with_log_id("rxd-probe").map_err(Into::into))
            .and_then(|b| {
                b.with_config_entry("session.disable_cpu_ep_fallback", fallback)
                    .map_err(Into::into)
            })
            .map_err(|e| e.to_string())?;
        DeviceSession::make(target.kind, || {
            let mut builder = self.with_device(builder, target)?;
            builder.commit_from_file(path).map_err(|e| e.to_string())
        })
    }
}

/// Distinguishes the files of concurrent probes (the private directory is the daemon's own).
fn probe_number() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A probe's inputs (name, type, shape, bytes) and the output `y`'s expected bytes.
struct Case {
    inputs: Vec<(&'static str, TensorElementType, Vec<u64>, Vec<u8>)>,
    expect: Vec<u8>,
}

fn halves(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// 1 2 3 4 + 0.5 0.25 -1 8 = 1.5 2.25 2 12, all exact in float16.
fn float16_case() -> Case {
    Case {
        inputs: vec![
            (
                "a",
                TensorElementType::Float16,
                vec![4],
                halves(&[0x3C00, 0x4000, 0x4200, 0x4400]),
            ),
            (
                "b",
                TensorElementType::Float16,
                vec![4],
                halves(&[0x3800, 0x3400, 0xBC00, 0x4800]),
            ),
        ],
        expect: halves(&[0x3E00, 0x4080, 0x4000, 0x4A00]),
    }
}

/// [1 2 3 4] × [[1 0] [0 1] [1 1] [2 0]] = [12 5].
fn int8_case() -> Case {
    Case {
        inputs: vec![
            ("a", TensorElementType::Uint8, vec![1, 4], vec![1, 2, 3, 4]),
            (
                "b",
                TensorElementType::Uint8,
                vec![4, 2],
                vec![1, 0, 0, 1, 1, 1, 2, 0],
            ),
        ],
        expect: [12i32, 5].iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// `y = Add(a, b)`, float16 [4].
fn float16_model() -> Vec<u8> {
    model(
        "Add",
        &[("a", FLOAT16, &[4]), ("b", FLOAT16, &[4])],
        ("y", FLOAT16, &[4]),
    )
}

/// `y = MatMulInteger(a, b)`, uint8 [1,4] × uint8 [4,2] → int32 [1,2].
fn int8_model() -> Vec<u8> {
    model(
        "MatMulInteger",
        &[("a", UINT8, &[1, 4]), ("b", UINT8, &[4, 2])],
        ("y", INT32, &[1, 2]),
    )
}

type ValueInfo<'a> = (&'a str, u64, &'a [u64]);

/// A one-node ONNX model (IR 8, opset 13), encoded by hand: onnx.proto's field numbers.
fn model(op: &str, inputs: &[ValueInfo<'_>], output: ValueInfo<'_>) -> Vec<u8> {
    let mut node = Vec::new();
    for (name, ..) in inputs {
        bytes_field(&mut node, 1, name.as_bytes());
    }
    bytes_field(&mut node, 2, output.0.as_bytes());
    bytes_field(&mut node, 3, b"probe");
    bytes_field(&mut node, 4, op.as_bytes());
    let mut graph = Vec::new();
    bytes_field(&mut graph, 1, &node);
    bytes_field(&mut graph, 2, b"rxd-probe");
    for i in inputs {
        bytes_field(&mut graph, 11, &value_info(*i));
    }
    bytes_field(&mut graph, 12, &value_info(output));
    let mut opset = Vec::new();
    bytes_field(&mut opset, 1, b"");
    varint_field(&mut opset, 2, 13);
    let mut m = Vec::new();
    varint_field(&mut m, 1, 8);
    bytes_field(&mut m, 7, &graph);
    bytes_field(&mut m, 8, &opset);
    m
}

/// ValueInfoProto { name = 1, type = 2: TypeProto { tensor_type = 1: { elem_type = 1,
/// shape = 2: { dim = 1: { dim_value = 1 } } } } }.
fn value_info((name, elem, dims): ValueInfo<'_>) -> Vec<u8> {
    let mut shape = Vec::new();
    for &d in dims {
        let mut dim = Vec::new();
        varint_field(&mut dim, 1, d);
        bytes_field(&mut shape, 1, &dim);
    }
    let mut tensor = Vec::new();
    varint_field(&mut tensor, 1, elem);
    bytes_field(&mut tensor, 2, &shape);
    let mut ty = Vec::new();
    bytes_field(&mut ty, 1, &tensor);
    let mut v = Vec::new();
    bytes_field(&mut v, 1, name.as_bytes());
    bytes_field(&mut v, 2, &ty);
    v
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_models_are_what_the_compressor_reads_back() {
        for (bytes, op) in [(float16_model(), "Add"), (int8_model(), "MatMulInteger")] {
            let m = rxd_compress::onnx::Model::parse(&bytes).unwrap();
            assert_eq!(m.ir_version(), 8);
            assert_eq!(m.opset(""), Some(13));
            assert_eq!(m.input_names().unwrap(), vec!["a", "b"]);
            let nodes = m.graph.messages(rxd_compress::onnx::graph::NODE).unwrap();
            assert_eq!(nodes.len(), 1);
            assert_eq!(rxd_compress::onnx::op_type(&nodes[0]), op);
        }
    }
}
