//! `rxd compress`: compress an ONNX model offline, evaluate the result against the original
//! with ONNX Runtime, and write it only if the report passes.

use std::process::ExitCode;

use rxd::{config, exit};

/// `rxd compress`: compress, evaluate against the original, write only if the report passes.
pub fn run(opts: &rxd::cli::CompressOpts) -> ExitCode {
    let fail = |code: u8, msg: String| {
        eprintln!("rxd: compress: {msg}");
        ExitCode::from(code)
    };
    let is_static = opts.strategy == "static-int8";
    let strategy: rxd_compress::Strategy = if is_static {
        rxd_compress::Strategy::NONE
    } else {
        match opts.strategy.parse() {
            Ok(s) => s,
            Err(e) => return fail(exit::USAGE, format!("{e} or static-int8")),
        }
    };
    let read = |args: &[String]| -> Result<Vec<rxd_compress::report::Input>, String> {
        args.iter()
            .map(|e| {
                let (name, path) = e
                    .split_once('=')
                    .ok_or_else(|| format!("'{e}' is not NAME=FILE.npy"))?;
                rxd_compress::report::read_npy(name, std::path::Path::new(path))
            })
            .collect()
    };
    let lib = opts
        .ort_library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(Into::into))
        .unwrap_or_else(|| config::BUNDLED_ORT_LIBRARY.into());
    let env_cell = std::cell::OnceCell::new();
    let env = || {
        env_cell
            .get_or_init(|| {
                ort::init_from(&lib)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        b.with_name("rxd-compress")
                            .build()
                            .map_err(|e| e.to_string())
                    })
            })
            .as_ref()
            .map_err(|e| format!("ONNX Runtime ({}): {e}", lib.display()))
    };
    let bytes = match std::fs::read(&opts.input) {
        Ok(b) => b,
        Err(e) => return fail(exit::OSERR, format!("{}: {e}", opts.input.display())),
    };
    let static_out = if is_static {
        let calibration = match read(&opts.calibration) {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                return fail(
                    exit::USAGE,
                    "static-int8 needs --calibration NAME=FILE.npy".into(),
                );
            }
            Err(e) => return fail(65, e),
        };
        let env = match env() {
            Ok(e) => e,
            Err(e) => return fail(exit::CONFIG, e),
        };
        let method = match opts.calibration_method.parse() {
            Ok(m) => m,
            Err(e) => return fail(exit::USAGE, e),
        };
        let eval = match read(&opts.eval) {
            Ok(e) => e,
            Err(e) => return fail(65, e),
        };
        // With evaluation inputs the sensitivity search runs when the thresholds are missed:
        // a static model that misses them is of no use, and which nodes to keep in float is
        // what a user would otherwise find by hand.
        let quantized = if eval.is_empty() {
            rxd_compress::static_int8::quantize_with(env, &bytes, &calibration, method)
                .map(|(b, st)| (b, st, Vec::new()))
        } else {
            rxd_compress::static_int8::search(
                env,
                &bytes,
                &calibration,
                method,
                &eval,
                opts.min_top1,
                opts.min_cosine,
            )
            .map(|f| (f.bytes, f.stat, f.kept))
        };
        match quantized {
            Ok((b, st, kept)) => {
                print_static(&st);
                for (node, e) in &kept {
                    println!(
                        "  kept {node} in float (its quantization added {e:.2e} to 1 − cosine)"
                    );
                }
                Some(b)
            }
            Err(e) => return fail(1, e),
        }
    } else {
        None
    };
    let (out, outcome) = match &opts.compare_with {
        _ if static_out.is_some() => (
            static_out.clone().expect("checked"),
            rxd_compress::Outcome::default(),
        ),
        Some(other) => match std::fs::read(other) {
            Ok(b) => (b, rxd_compress::Outcome::default()),
            Err(e) => return fail(exit::OSERR, format!("{}: {e}", other.display())),
        },
        None => match rxd_compress::compress(&bytes, strategy) {
            Ok(r) => r,
            Err(e) => return fail(70, format!("{}: {e}", opts.input.display())),
        },
    };
    if outcome.batchnorms_folded > 0 {
        println!(
            "{} BatchNormalization nodes folded into their Conv",
            outcome.batchnorms_folded
        );
    }
    if let Some(p) = &outcome.pruned {
        println!(
            "pruned {} weight tensors: {} of {} entries are exact zeros ({:.1} %)",
            p.tensors,
            p.zeros,
            p.elements,
            p.sparsity() * 100.0
        );
    }
    if !outcome.dynamic.converted.is_empty() {
        println!(
            "{} MatMul weights converted to dynamic INT8 (MatMulInteger)",
            outcome.dynamic.converted.len()
        );
    }
    match &outcome.fp16_compute {
        Some(h) => {
            println!(
                "float16 arithmetic: {} tensors converted, {} values clamped to ±65504, \
                 float32 inputs and outputs kept by casts",
                h.tensors, h.clamped
            );
            if let Some((from, to)) = h.opset_upgraded {
                println!("  opset {from} → {to} (Clip's float16 kernels)");
            }
            for n in &h.kept_float {
                println!("  kept in float32 (no float16 form): {n}");
            }
        }
        None if outcome.fp16_tensors > 0 => {
            println!("{} float tensors stored as float16", outcome.fp16_tensors);
        }
        None => {}
    }
    if strategy.int8_weights {
        println!(
            "{} weights converted to INT8, {} kept as they were",
            outcome.quant.converted.len(),
            outcome.quant.kept.len()
        );
        for (name, why) in &outcome.quant.kept {
            println!("  kept {name}: {why}");
        }
    }
    let inputs = match read(&opts.eval) {
        Ok(i) => i,
        Err(e) => return fail(65, e),
    };
    if !inputs.is_empty() {
        let env = match env() {
            Ok(e) => e,
            Err(e) => return fail(exit::CONFIG, e),
        };
        let report = match rxd_compress::report::compare(env, &bytes, &out, &inputs) {
            Ok(r) => r,
            Err(e) => return fail(1, e),
        };
        let misses = report.min_top1() < opts.min_top1 || report.min_cosine() < opts.min_cosine;
        if misses && opts.search && strategy == rxd_compress::Strategy::INT8_WEIGHTS {
            print!("INT8 everywhere: {report}");
            return match rxd_compress::search::search(
                env,
                &bytes,
                &inputs,
                opts.min_top1,
                opts.min_cosine,
            ) {
                Ok(found) => {
                    for (w, s) in &found.kept {
                        println!("  kept {w} in float (alone it costs {s:.3e})");
                    }
                    print!("with {} weights in INT8: {}", found.converted, found.report);
                    match std::fs::write(&opts.output, &found.bytes) {
                        Ok(()) => {
                            println!("wrote {}", opts.output.display());
                            ExitCode::from(exit::OK)
                        }
                        Err(e) => fail(exit::OSERR, format!("{}: {e}", opts.output.display())),
                    }
                }
                Err(e) => fail(
                    1,
                    format!("refused: {e}; {} not written", opts.output.display()),
                ),
            };
        }
        if opts.json {
            let outputs: Vec<serde_json::Value> = report
                .outputs
                .iter()
                .map(|o| {
                    serde_json::json!({
                        "name": o.name,
                        "max_abs_error": o.max_abs_error,
                        "mean_abs_error": o.mean_abs_error,
                        "relative_error": o.relative_error,
                        "cosine": o.cosine,
                        "top1_agreement": o.top1_agreement,
                        "sequence_agreement": o.sequence_agreement,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "size_before": report.size_before,
                    "size_after": report.size_after,
                    "size_ratio": report.size_ratio(),
                    "latency_ms_before": report.latency_ms_before,
                    "latency_ms_after": report.latency_ms_after,
                    "min_top1": report.min_top1(),
                    "min_cosine": report.min_cosine(),
                    "passed": report.min_top1() >= opts.min_top1
                        && report.min_cosine() >= opts.min_cosine,
                    "outputs": outputs,
                })
            );
        } else {
            print!("{report}");
        }
        if report.min_top1() < opts.min_top1 || report.min_cosine() < opts.min_cosine {
            return fail(
                1,
                format!(
                    "refused: top-1 agreement {:.4} (minimum {}), cosine {:.6} (minimum {}); {} not written",
                    report.min_top1(),
                    opts.min_top1,
                    report.min_cosine(),
                    opts.min_cosine,
                    opts.output.display()
                ),
            );
        }
    }
    if let Err(e) = std::fs::write(&opts.output, &out) {
        return fail(exit::OSERR, format!("{}: {e}", opts.output.display()));
    }
    println!(
        "wrote {} ({} → {} bytes, {:.2}×)",
        opts.output.display(),
        bytes.len(),
        out.len(),
        out.len() as f64 / bytes.len().max(1) as f64
    );
    ExitCode::from(exit::OK)
}

fn print_static(st: &rxd_compress::static_int8::Static) {
    let list = |m: &std::collections::BTreeMap<String, usize>| {
        let v: Vec<String> = m.iter().map(|(op, n)| format!("{n} {op}")).collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "static INT8: {} activations calibrated, {} weights, {} biases",
        st.activations.len(),
        st.weights,
        st.biases
    );
    println!("  in INT8: {}", list(&st.quantized));
    println!("  folded into scales and ranges: {}", list(&st.folded));
    println!("  moved as INT8: {}", list(&st.moved));
    println!("  left in float: {}", list(&st.float));
}
