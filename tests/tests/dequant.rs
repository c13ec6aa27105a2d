//! Dequantize-at-load (issue 24 item 5) on real models in ONNX Runtime: a weights-only
//! compressed model (`int8-weights`, `int8-weights+fp16-weights`) folded back into float
//! weights answers what the weights-only file answers — within float rounding, on varied
//! inputs none of the compression tests use — and has no DequantizeLinear left, in the main
//! graph or in subgraphs (Silero VAD's If branches); a model with nothing to fold is returned
//! unchanged and says so. The daemon serving such a model: `dequantize_at_load_*` below.

use rxd_compress::dequant::{dequantize_bytes, op_counts};
use rxd_compress::report::{self, Data, Input};
use rxd_compress::{Strategy, compress};
use rxd_e2e::*;

fn f32_input(name: &str, shape: &[i64], seed: u64, scale: f32, offset: f32) -> Input {
    let n = shape.iter().product::<i64>() as usize;
    Input {
        name: name.into(),
        shape: shape.to_vec(),
        data: Data::F32(
            random_f32(n, seed)
                .into_iter()
                .map(|v| v * scale + offset)
                .collect(),
        ),
    }
}

/// Each model's inputs: random batches of several ranges (seeds unused elsewhere), and the
/// real data that exists for it.
fn varied(model: &str) -> Vec<Vec<Input>> {
    match model {
        "digits" => vec![
            vec![
                report::read_npy(
                    "input",
                    &repo_root().join("examples/data/digits_test_x.npy"),
                )
                .unwrap(),
            ],
            vec![f32_input("input", &[64, 64], 2401, 16.0, 0.0)],
            vec![f32_input("input", &[16, 64], 2402, 40.0, -20.0)],
        ],
        "ppocr_cls" => vec![
            vec![f32_input("x", &[6, 3, 48, 192], 2403, 2.0, -1.0)],
            vec![f32_input("x", &[3, 3, 48, 192], 2404, 0.5, 0.0)],
        ],
        "ppocr_rec" => vec![vec![f32_input("x", &[2, 3, 48, 320], 2405, 2.0, -1.0)]],
        "yolov8n" => vec![vec![f32_input("images", &[1, 3, 320, 320], 2406, 1.0, 0.0)]],
        _ => unreachable!(),
    }
}

/// The outputs of `model` on `inputs` with ONNX Runtime's graph optimizations off (each node
/// as written, so two graphs that compute the same values give the same bits) or on (as the
/// daemon runs a model).
fn outputs(model: &[u8], inputs: &[Input], optimize: bool) -> Vec<Vec<f32>> {
    use ort::session::builder::GraphOptimizationLevel;
    let level = if optimize {
        GraphOptimizationLevel::All
    } else {
        GraphOptimizationLevel::Disable
    };
    let mut s = ort::session::Session::builder(reference_env())
        .unwrap()
        .with_optimization_level(level)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_memory(model)
        .unwrap();
    let mut values: Vec<(String, ort::value::DynValue)> = Vec::new();
    for i in inputs {
        let v = match &i.data {
            Data::F32(d) => ort::value::Tensor::from_array((i.shape.clone(), d.clone()))
                .unwrap()
                .into_dyn(),
            Data::I64(d) => ort::value::Tensor::from_array((i.shape.clone(), d.clone()))
                .unwrap()
                .into_dyn(),
        };
        values.push((i.name.clone(), v));
    }
    let out = s.run(values).unwrap();
    out.iter()
        .filter_map(|(_, v)| v.try_extract_tensor::<f32>().ok().map(|(_, d)| d.to_vec()))
        .collect()
}

/// The largest difference of two runs' outputs against the largest magnitude of `want`.
fn relative_difference(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (a, b) in g.iter().zip(w) {
            worst = worst.max(f64::from((a - b).abs() / scale));
        }
    }
    worst
}

/// Folded models answer as the weights-only ones mean: with ONNX Runtime's graph optimizations
/// off, as the weights-only file does (the folded weights are exactly what each
/// DequantizeLinear computes; bit for bit on digits and the classifier, within a kernel's
/// summation order where ONNX Runtime packs constant MatMul weights ahead), and
/// served as the daemon runs them (optimizations on) within 1e-5 of that. The weights-only
/// file itself strays further once optimized (7e-4 of the PP-OCR classifier's probabilities
/// measured: ONNX Runtime's fused kernels for a Conv whose weights a node computes round
/// differently), so it is not the reference. No DequantizeLinear is left.
#[test]
fn dequantized_weights_only_models_answer_as_the_weights_only_files_do() {
    for model in ["digits", "ppocr_cls", "ppocr_rec", "yolov8n"] {
        let bytes = std::fs::read(model_file(model)).unwrap();
        for strategy in ["int8-weights", "int8-weights+fp16-weights"] {
            let s: Strategy = strategy.parse().unwrap();
            let (small, _) = compress(&bytes, s).unwrap();
            assert!(op_counts(&small).unwrap()["DequantizeLinear"] > 0);
            let (full, d) = dequantize_bytes(&small).unwrap();
            let full = full.unwrap_or_else(|| panic!("{model} {strategy}: {d}"));
            assert!(d.left.is_empty() && d.refused.is_none(), "{model}: {d}");
            let ops = op_counts(&full).unwrap();
            assert_eq!(ops.get("DequantizeLinear"), None, "{model}: {ops:?}");
            // The float model again: about the original's size (the int8-rounded weights).
            let ratio = full.len() as f64 / bytes.len() as f64;
            assert!((0.9..1.1).contains(&ratio), "{model}: {ratio}");
            for inputs in varied(model) {
                let meant = outputs(&small, &inputs, false);
                let plain = relative_difference(&outputs(&full, &inputs, false), &meant);
                assert!(plain <= 1e-6, "{model} {strategy}: {plain:.2e} unoptimized");
                let served = relative_difference(&outputs(&full, &inputs, true), &meant);
                let small_served = relative_difference(&outputs(&small, &inputs, true), &meant);
                eprintln!(
                    "{model} {strategy}: from the weights-only model's unoptimized outputs: \
                     dequantized {plain:.2e} unoptimized, {served:.2e} optimized; weights-only \
                     {small_served:.2e} optimized"
                );
                assert!(served <= 1e-5, "{model} {strategy}: {served:.2e}");
            }
        }
    }
}

/// Silero VAD's weights are Constant nodes inside the two branches of an `If`: after
/// `int8-weights` the DequantizeLinear nodes are in the branches, and they are folded there.
#[test]
fn dequantize_nodes_inside_silero_vads_if_branches_are_folded() {
    let bytes = std::fs::read(model_file("silero_vad")).unwrap();
    let (small, _) = compress(&bytes, Strategy::INT8_WEIGHTS).unwrap();
    let before = op_counts(&small).unwrap()["DequantizeLinear"];
    let (full, d) = dequantize_bytes(&small).unwrap();
    let full = full.unwrap();
    assert_eq!(d.folded, before, "{d}");
    assert_eq!(op_counts(&full).unwrap().get("DequantizeLinear"), None);
    for seed in [2407, 2408, 2409] {
        let inputs = vec![
            f32_input("input", &[1, 576], seed, 0.4, -0.2),
            f32_input("state", &[2, 1, 128], seed + 10, 0.2, -0.1),
            Input {
                name: "sr".into(),
                shape: vec![],
                data: Data::I64(vec![16000]),
            },
        ];
        let meant = outputs(&small, &inputs, false);
        let plain = relative_difference(&outputs(&full, &inputs, false), &meant);
        assert!(plain <= 1e-6, "{plain:.2e}");
        let served = relative_difference(&outputs(&full, &inputs, true), &meant);
        assert!(served <= 1e-5, "{served:.2e}");
    }
}

/// A float model, and one compressed in a form that has no DequantizeLinear of constants
/// (`fp16-weights`: casts ONNX Runtime folds itself), come back unchanged and say so.
#[test]
fn a_model_with_nothing_to_dequantize_is_returned_unchanged() {
    let bytes = std::fs::read(model_file("digits")).unwrap();
    let (out, d) = dequantize_bytes(&bytes).unwrap();
    assert!(out.is_none() && !d.changed());
    assert!(d.to_string().starts_with("nothing to dequantize"), "{d}");
    let (half, _) = compress(&bytes, "fp16-weights".parse().unwrap()).unwrap();
    let (out, d) = dequantize_bytes(&half).unwrap();
    assert!(out.is_none() && !d.changed(), "{d}");
}

fn values_of(i: &Input) -> Vec<f32> {
    match &i.data {
        Data::F32(v) => v.clone(),
        Data::I64(_) => unreachable!("float inputs"),
    }
}

fn as_tensor(i: &Input) -> rxd_protocol::Tensor {
    let shape: Vec<u64> = i.shape.iter().map(|&d| d as u64).collect();
    f32_tensor(&i.name, &shape, &values_of(i))
}

fn argmax_rows(v: &[f32], classes: usize) -> Vec<usize> {
    v.chunks_exact(classes)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0
        })
        .collect()
}

/// Issue 24 item 5: the daemon loads a weights-only INT8 file (the PP-OCR classifier and the
/// digits MLP after `int8-weights`) dequantized: model info says so, and that the graph its
/// sessions run has no DequantizeLinear left; it answers what the weights-only file means (its
/// outputs in ONNX Runtime without graph optimizations, within 1e-5) and what in-process ONNX
/// Runtime answers on the file (same classes, within the fused kernels' rounding). With
/// `dequantize-at-load = false` the file serves as it is, as in-process ONNX Runtime runs it.
#[test]
fn dequantize_at_load_serves_a_weights_only_model_with_the_files_answers() {
    let (cls_small, _) = compress(
        &std::fs::read(model_file("ppocr_cls")).unwrap(),
        Strategy::INT8_WEIGHTS,
    )
    .unwrap();
    let (digits_small, _) = compress(
        &std::fs::read(model_file("digits")).unwrap(),
        Strategy::INT8_WEIGHTS,
    )
    .unwrap();
    let repo = Repo::new();
    repo.write("cls", 1, &cls_small)
        .write("cls_file", 1, &cls_small)
        .settings("cls_file", "dequantize-at-load = false\n")
        .write("digits", 1, &digits_small);
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();

    let info = c.model_info("cls", None).unwrap();
    let dq = info.dequantized.expect("dequantized at load");
    let folded = op_counts(&cls_small).unwrap()["DequantizeLinear"] as u64;
    assert_eq!((dq.folded, dq.remaining), (folded, 0), "{dq:?}");
    assert_eq!(dq.file_bytes, cls_small.len() as u64);
    assert!(dq.served_bytes > 3 * dq.file_bytes, "{dq:?}");
    assert!(
        c.model_info("cls_file", None)
            .unwrap()
            .dequantized
            .is_none()
    );
    let text = String::from_utf8(d.rxctl(&["models", "cls"]).stdout).unwrap();
    assert!(
        text.contains(&format!(
            "dequantized at load: {folded} DequantizeLinear folded into float weights"
        )),
        "{text}"
    );

    let file = |m: &str| repo.path().join(m).join("1/model.onnx");
    for (seed, scale, offset) in [(2411, 2.0, -1.0), (2412, 0.6, 0.2)] {
        let x = f32_input("x", &[4, 3, 48, 192], seed, scale, offset);
        let got = tensor_f32(&c.infer("cls", vec![as_tensor(&x)]).unwrap()[0]);
        let meant = outputs(&cls_small, std::slice::from_ref(&x), false);
        let off = relative_difference(std::slice::from_ref(&got), &meant[..1]);
        assert!(
            off <= 1e-5,
            "{off:.2e} from the weights-only model's meaning"
        );
        let file_run = Reference::new(&file("cls")).run(&[as_tensor(&x)]);
        let in_process = tensor_f32(&file_run[0]);
        assert_eq!(argmax_rows(&got, 2), argmax_rows(&in_process, 2));
        assert!(relative_difference(&[got], std::slice::from_ref(&in_process)) <= 5e-3);
        // Served as the file: what in-process ONNX Runtime computes on the file.
        let as_file = tensor_f32(&c.infer("cls_file", vec![as_tensor(&x)]).unwrap()[0]);
        assert!(relative_difference(&[as_file], &[in_process]) <= 1e-5);
    }

    // The digits MLP: the same labels as in-process ONNX Runtime on the file, on the test
    // split.
    let x = example_npy("digits_test_x.npy", "input");
    let want = Reference::new(&file("digits")).run(std::slice::from_ref(&x));
    let got = c.infer("digits", vec![x]).unwrap();
    assert_eq!(got[0], want[0]);
    let dq = c.model_info("digits", None).unwrap().dequantized.unwrap();
    assert_eq!(dq.remaining, 0);
}
