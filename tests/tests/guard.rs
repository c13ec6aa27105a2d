//! Integer division guarded at load (`rxd_compress::guard`): ONNX Runtime's `Div`/`Mod`
//! kernels trap (SIGFPE, the process dies) on the type's minimum divided by −1. The guarded
//! graph answers exactly as ONNX Runtime answers the original on every operand pair that does
//! not trap — over wide data of both integer types, both operators, both `fmod` modes,
//! broadcast divisors and a division inside an `If` branch — gives the two's-complement
//! result on the pairs that do, fails as the original fails on a zero divisor, and leaves the
//! real models' (float) arithmetic untouched. An `STFT` whose frame length is a request's
//! value (ORT divides by it unchecked) answers as the original for every other frame length
//! and step, and fails cleanly on 0.

use rxd_compress::guard::guard_division;
use rxd_compress::onnx::{self, Model, graph};
use rxd_e2e::{
    Reference, division_model, f32_tensor, int_tensor, int_values, model_file, random_f32,
    stft_model,
};
use rxd_protocol::{DType, Tensor};

const INT32: u64 = 6;
const INT64: u64 = 7;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `n` operands of a type of `bits` bits: its edges, small numbers, and pseudo-random ones
/// over the whole range and over ±1000, in a shuffled order.
fn operands(n: usize, bits: u32, seed: u64) -> Vec<i64> {
    let (min, max) = (
        -(1i128 << (bits - 1)) as i64,
        ((1i128 << (bits - 1)) - 1) as i64,
    );
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let edges = [min, min + 1, min + 2, -2, -1, 0, 1, 2, max - 1, max];
    (0..n)
        .map(|i| match i % 4 {
            0 => edges[(xorshift(&mut s) % edges.len() as u64) as usize],
            1 => (xorshift(&mut s) % 41) as i64 - 20,
            2 => (xorshift(&mut s) % 2001) as i64 - 1000,
            _ => {
                let v = xorshift(&mut s) as i64;
                if bits == 32 { i64::from(v as i32) } else { v }
            }
        })
        .collect()
}

/// The inputs of [`division_model`]: `a`, `b` of ONNX type `elem` (6 int32, 7 int64),
/// and `c` (true) when the division sits in an `If` branch.
fn inputs(elem: u64, in_branch: bool, a: &[i64], b: &[i64]) -> Vec<Tensor> {
    let dtype = if elem == INT32 {
        DType::Int32
    } else {
        DType::Int64
    };
    let mut v = vec![
        int_tensor("a", dtype, &[a.len() as u64], a),
        int_tensor("b", dtype, &[b.len() as u64], b),
    ];
    if in_branch {
        v.push(Tensor::inline("c", DType::Bool, vec![1], vec![1]));
    }
    v
}

struct Case {
    op: &'static str,
    elem: u64,
    fmod: Option<i64>,
    in_branch: bool,
    opset: u64,
}

impl Case {
    fn inputs(&self, a: &[i64], b: &[i64]) -> Vec<Tensor> {
        inputs(self.elem, self.in_branch, a, b)
    }
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for elem in [INT32, INT64] {
        for (op, fmod) in [("Div", None), ("Mod", None), ("Mod", Some(1))] {
            for in_branch in [false, true] {
                out.push(Case {
                    op,
                    elem,
                    fmod,
                    in_branch,
                    opset: 17,
                });
            }
        }
        // The oldest opset the guard writes for a typed divisor (Mod came in opset 10).
        for (op, opset) in [("Div", 9), ("Mod", 10)] {
            out.push(Case {
                op,
                elem,
                fmod: None,
                in_branch: false,
                opset,
            });
        }
    }
    out
}

#[test]
fn guarded_integer_division_answers_as_onnx_runtime_and_never_traps() {
    for (k, case) in cases().iter().enumerate() {
        let what = format!(
            "{} fmod={:?} int{} in_branch={} opset {}",
            case.op,
            case.fmod,
            if case.elem == INT32 { 32 } else { 64 },
            case.in_branch,
            case.opset
        );
        let bits = if case.elem == INT32 { 32 } else { 64 };
        let min = -(1i128 << (bits - 1)) as i64;
        let model = division_model(case.op, case.elem, case.fmod, case.in_branch, case.opset);
        let (guarded, report) = guard_division(&model).unwrap();
        assert_eq!(report.guarded, 1, "{what}");
        let mut original = Reference::from_bytes(&model);
        let mut safe = Reference::from_bytes(&guarded.expect("rewritten"));
        for (round, seed) in [11u64, 12, 13].into_iter().enumerate() {
            let n = 4096;
            let a = operands(n, bits, seed + 100 * k as u64);
            // Element-wise and broadcast divisors (one value, -1 in the last round).
            let mut b: Vec<i64> = match round {
                0 => operands(n, bits, seed * 7 + k as u64),
                1 => vec![operands(3, bits, seed)[2]],
                _ => vec![-1],
            };
            for d in &mut b {
                if *d == 0 {
                    *d = 7;
                }
            }
            let divisor = |i: usize| if b.len() == 1 { b[0] } else { b[i] };
            let traps: Vec<bool> = (0..n).map(|i| a[i] == min && divisor(i) == -1).collect();
            assert!(
                round == 1 || traps.iter().any(|&t| t),
                "{what}: the data holds trapping pairs"
            );
            // The original may only see the pairs that do not trap.
            let tame: Vec<i64> = (0..n).map(|i| if traps[i] { 5 } else { a[i] }).collect();
            let want = int_values(&original.run(&case.inputs(&tame, &b))[0]);
            let got = int_values(&safe.run(&case.inputs(&a, &b))[0]);
            assert_eq!(got.len(), n, "{what}");
            for i in 0..n {
                let expect = match (traps[i], case.op) {
                    (true, "Div") => min, // wraps to itself
                    (true, _) => 0,
                    (false, _) => want[i],
                };
                assert_eq!(
                    got[i],
                    expect,
                    "{what}: {} op {} (element {i})",
                    a[i],
                    divisor(i)
                );
            }
        }
        // A zero divisor fails the run, guarded or not.
        let a = operands(64, bits, 5);
        let mut b = operands(64, bits, 6);
        b[17] = 0;
        for d in &mut b {
            if *d == -1 {
                *d = 3;
            }
        }
        let e1 = original.try_run(&case.inputs(&a, &b)).unwrap_err();
        let e2 = safe.try_run(&case.inputs(&a, &b)).unwrap_err();
        for e in [&e1, &e2] {
            assert!(e.contains("by zero"), "{what}: {e}");
        }
    }
}

#[test]
fn a_zero_stft_frame_length_fails_cleanly_and_every_other_answers_as_onnx_runtime() {
    for elem in [INT32, INT64] {
        let dtype = if elem == INT32 {
            DType::Int32
        } else {
            DType::Int64
        };
        let model = stft_model(elem);
        let (guarded, report) = guard_division(&model).unwrap();
        assert_eq!((report.frames, report.guarded), (1, 0));
        let mut original = Reference::from_bytes(&model);
        let mut safe = Reference::from_bytes(&guarded.expect("rewritten"));
        let bits = if elem == INT32 { 32 } else { 64 };
        let (mut answered, mut failed) = (0, 0);
        for (k, n) in [1u64, 7, 16, 64, 257].into_iter().enumerate() {
            let x = f32_tensor("x", &[1, n, 1], &random_f32(n as usize, 40 + k as u64));
            // Frame lengths and steps: the type's edges, small numbers, the signal's length
            // and around it, pseudo-random ones.
            let mut values = operands(24, bits, 90 + k as u64);
            values.extend([1, 2, 3, 4, n as i64 - 1, n as i64, n as i64 + 1]);
            for &length in &values {
                for &step in &values {
                    let inputs = vec![
                        x.clone(),
                        int_tensor("step", dtype, &[], &[step]),
                        int_tensor("length", dtype, &[], &[length]),
                    ];
                    let got = safe.try_run(&inputs);
                    if length == 0 {
                        // The original would kill this process; the guarded one fails.
                        let e = got.expect_err("a zero frame length fails");
                        assert!(e.contains("by zero"), "{e}");
                        continue;
                    }
                    match (original.try_run(&inputs), got) {
                        (Ok(want), Ok(got)) => {
                            assert_eq!(got, want, "n {n} step {step} length {length}");
                            answered += 1;
                        }
                        (Err(_), Err(_)) => failed += 1,
                        (want, got) => {
                            panic!("n {n} step {step} length {length}: {want:?} vs {got:?}")
                        }
                    }
                }
            }
        }
        assert!(
            answered > 50 && failed > 50,
            "{answered} answered, {failed} failed"
        );
    }
}

/// A division inside a model-local function (the graph calls `local.f(a, b)`, whose body
/// is `Div`): ONNX Runtime inlines the function, and the trap is there as in the graph.
fn function_model(op: &str, elem: u64) -> Vec<u8> {
    use rxd_compress::onnx::{model, opset};
    use rxd_compress::proto::{Message, Value};
    let plain = division_model(op, elem, None, false, 17);
    let mut m = Message::parse(&plain).unwrap();
    let mut g = m.message(model::GRAPH).unwrap().unwrap();
    let body = g.messages(graph::NODE).unwrap().remove(0);
    let call = onnx::make_node("f", "local", "", &["a", "b"], &["y"], &[]);
    g.replace(graph::NODE, vec![Value::Bytes(call.encode())]);
    m.replace(model::GRAPH, vec![Value::Bytes(g.encode())]);
    let mut f = Message::default();
    f.push_str(1, "f"); // FunctionProto.name
    f.push_str(4, "a"); // .input
    f.push_str(4, "b");
    f.push_str(5, "y"); // .output
    f.push_message(7, &body); // .node
    let mut o = Message::default();
    o.push_str(opset::DOMAIN, "");
    o.push(opset::VERSION, Value::Varint(17));
    f.push_message(9, &o); // .opset_import
    f.push_str(10, "local"); // .domain
    m.push_message(25, &f); // ModelProto.functions
    let mut local = Message::default();
    local.push_str(opset::DOMAIN, "local");
    local.push(opset::VERSION, Value::Varint(1));
    m.push_message(model::OPSET_IMPORT, &local);
    m.encode()
}

#[test]
fn a_division_in_a_model_local_function_is_guarded() {
    for (op, elem, bits) in [("Div", INT64, 64), ("Mod", INT32, 32)] {
        let model = function_model(op, elem);
        let (guarded, report) = guard_division(&model).unwrap();
        assert_eq!(report.guarded, 1, "{op}");
        let mut original = Reference::from_bytes(&model);
        let mut safe = Reference::from_bytes(&guarded.unwrap());
        let min = -(1i128 << (bits - 1)) as i64;
        let a = operands(2048, bits, 3);
        let mut b = operands(2048, bits, 4);
        for d in &mut b {
            if *d == 0 {
                *d = 7;
            }
        }
        b[0] = -1;
        let mut a_trap = a.clone();
        a_trap[0] = min;
        let tame: Vec<i64> = (0..a.len())
            .map(|i| {
                if a_trap[i] == min && b[i] == -1 {
                    5
                } else {
                    a_trap[i]
                }
            })
            .collect();
        let want = int_values(&original.run(&inputs(elem, false, &tame, &b))[0]);
        let got = int_values(&safe.run(&inputs(elem, false, &a_trap, &b))[0]);
        for i in 0..a.len() {
            let expect = if a_trap[i] == min && b[i] == -1 {
                if op == "Div" { min } else { 0 }
            } else {
                want[i]
            };
            assert_eq!(
                got[i], expect,
                "{op}: {} op {} (element {i})",
                a_trap[i], b[i]
            );
        }
    }
}

/// The real models keep every node: their divisions are float (ORT's fusions still see
/// them), so no model we serve pays for the guard.
#[test]
fn the_real_models_float_division_is_left_as_it_is() {
    let mut divisions = 0;
    for name in [
        "sigmoid",
        "mul_1",
        "ppocr_cls",
        "ppocr_det",
        "ppocr_rec",
        "silero_vad",
        "yolov8n",
        "digits",
    ] {
        let bytes = std::fs::read(model_file(name)).unwrap();
        let m = Model::parse(&bytes).unwrap();
        let mut nodes = m.graph.messages(graph::NODE).unwrap();
        nodes.extend(onnx::nested_nodes(&nodes).unwrap());
        divisions += nodes
            .iter()
            .filter(|n| matches!(onnx::op_type(n).as_str(), "Div" | "Mod"))
            .count();
        let t = std::time::Instant::now();
        let (out, g) = guard_division(&bytes).unwrap();
        // What the guard adds to each load (BENCHMARKS.md).
        eprintln!(
            "{name}: {} bytes, looked at in {:?}",
            bytes.len(),
            t.elapsed()
        );
        assert!(out.is_none(), "{name}: {g}");
        assert_eq!(g.guarded, 0, "{name}");
    }
    assert!(divisions > 50, "the models divide ({divisions} nodes)");
}
