//! `rxd compress`: compress an ONNX model offline, evaluate the result against the original
//! with ONNX Runtime, and write it only if the report passes.

use std::cell::RefCell;
use std::process::ExitCode;

use rxd::config;
use serde_json::{Map, Value, json};

/// Exit codes of `rxd compress` (sysexits; listed in its `--help`).
mod code {
    /// OUT written (the report passed, or none was asked for).
    pub const OK: u8 = 0;
    /// Refused: the accuracy report missed the thresholds (OUT not written), or ONNX Runtime
    /// failed to run the models.
    pub const REFUSED: u8 = 1;
    pub const USAGE: u8 = rxd::exit::USAGE;
    /// IN is not an ONNX model, or an .npy file cannot be read.
    pub const DATAERR: u8 = 65;
    /// IN cannot be read.
    pub const NOINPUT: u8 = 66;
    /// The compressor failed on this model.
    pub const SOFTWARE: u8 = rxd::exit::SOFTWARE;
    /// OUT cannot be written.
    pub const CANTCREAT: u8 = 73;
    /// ONNX Runtime's library cannot be loaded.
    pub const CONFIG: u8 = rxd::exit::CONFIG;
}

/// Where the command's words go: with `--json`, stdout carries exactly one JSON document
/// (what `doc` collected, printed once at the end) and every progress line goes to stderr.
struct Out {
    json: bool,
    doc: RefCell<Map<String, Value>>,
}

impl Out {
    /// A line of progress or of the report.
    fn line(&self, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    /// Text that ends in its own newline (the report); left out of `--json` output, whose
    /// document holds the same figures.
    fn text(&self, text: impl std::fmt::Display) {
        if !self.json {
            print!("{text}");
        }
    }

    fn set(&self, key: &str, v: Value) {
        self.doc.borrow_mut().insert(key.into(), v);
    }

    fn finish(&self, code: u8) -> ExitCode {
        if self.json {
            self.set("exit_code", json!(code));
            let doc = Value::Object(self.doc.borrow().clone());
            println!("{doc}");
        }
        ExitCode::from(code)
    }

    fn fail(&self, code: u8, msg: String) -> ExitCode {
        eprintln!("rxd: compress: {msg}");
        self.set("error", json!(msg));
        self.set("written", json!(false));
        self.finish(code)
    }
}

fn report_json(r: &rxd_compress::report::Report, min_top1: f64, min_cosine: f64) -> Value {
    let outputs: Vec<Value> = r
        .outputs
        .iter()
        .map(|o| {
            json!({
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
    json!({
        "size_before": r.size_before,
        "size_after": r.size_after,
        "size_ratio": r.size_ratio(),
        "latency_ms_before": r.latency_ms_before,
        "latency_ms_after": r.latency_ms_after,
        "min_top1": r.min_top1(),
        "min_cosine": r.min_cosine(),
        "passed": r.min_top1() >= min_top1 && r.min_cosine() >= min_cosine,
        "outputs": outputs,
    })
}

/// Checks that `--eval`/`--calibration` inputs name every input of the model and nothing
/// else (ONNX Runtime's own message for a wrong name says neither which nor what exists).
fn check_names(flag: &str, given: &[String], model: &[String]) -> Result<(), String> {
    if given.is_empty() {
        return Ok(());
    }
    let list = model.join(", ");
    for g in given {
        if !model.contains(g) {
            return Err(format!(
                "{flag} {g}: the model has no input of that name (its inputs: {list})"
            ));
        }
    }
    for m in model {
        if !given.contains(m) {
            return Err(format!(
                "{flag} gives no '{m}' (the model's inputs: {list})"
            ));
        }
    }
    Ok(())
}

/// `rxd compress`: compress, evaluate against the original, write only if the report passes.
pub fn run(opts: &rxd::cli::CompressOpts) -> ExitCode {
    let out = Out {
        json: opts.json,
        doc: RefCell::new(Map::new()),
    };
    out.set("input", json!(opts.input.display().to_string()));
    out.set("output", json!(opts.output.display().to_string()));
    out.set("strategy", json!(opts.strategy));
    let fail = |code: u8, msg: String| out.fail(code, msg);
    let is_static = opts.strategy == "static-int8";
    let strategy: rxd_compress::Strategy = if is_static {
        rxd_compress::Strategy::NONE
    } else {
        match opts.strategy.parse() {
            Ok(s) => s,
            Err(e) => return fail(code::USAGE, format!("{e} or static-int8")),
        }
    };
    let read = |args: &[String]| -> Result<Vec<rxd_compress::report::Input>, String> {
        args.iter()
            .map(|e| {
                let (name, path) = e
                    .split_once('=')
                    .ok_or_else(|| format!("'{e}' is not NAME=FILE.npy"))?;
                rxd_compress::report::read_npy(name, std::path::Path::new(path))
                    .map_err(|e| e.to_string())
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
        Err(e) => return fail(code::NOINPUT, format!("{}: {e}", opts.input.display())),
    };
    let model_inputs = match rxd_compress::onnx::Model::parse(&bytes).and_then(|m| m.input_names())
    {
        Ok(names) => names,
        Err(e) => {
            return fail(
                code::DATAERR,
                format!(
                    "{}: not an ONNX model (it does not read as an ONNX ModelProto: {e})",
                    opts.input.display()
                ),
            );
        }
    };
    // Names first (a wrong one is the mistake to report, whatever its file), then the files.
    let read_checked = |flag: &str, args: &[String]| -> Result<_, (u8, String)> {
        let names = args
            .iter()
            .map(|a| {
                a.split_once('=')
                    .map(|(n, _)| n.to_string())
                    .ok_or_else(|| (code::USAGE, format!("{flag} '{a}' is not NAME=FILE.npy")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_names(flag, &names, &model_inputs).map_err(|e| (code::USAGE, e))?;
        read(args).map_err(|e| (code::DATAERR, e))
    };
    let (calibration, eval) = match (
        read_checked("--calibration", &opts.calibration),
        read_checked("--eval", &opts.eval),
    ) {
        (Ok(c), Ok(e)) => (c, e),
        (Err((c, e)), _) | (_, Err((c, e))) => return fail(c, e),
    };
    let static_out = if is_static {
        if calibration.is_empty() {
            return fail(
                code::USAGE,
                "static-int8 needs --calibration NAME=FILE.npy".into(),
            );
        }
        let env = match env() {
            Ok(e) => e,
            Err(e) => return fail(code::CONFIG, e),
        };
        let method = match opts.calibration_method.parse() {
            Ok(m) => m,
            Err(e) => return fail(code::USAGE, rxd_compress::Error::to_string(&e)),
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
                print_static(&out, &st);
                for (node, e) in &kept {
                    out.line(format!(
                        "  kept {node} in float (its quantization added {e:.2e} to 1 − cosine)"
                    ));
                }
                out.set(
                    "kept_in_float",
                    json!(kept.iter().map(|(n, _)| n).collect::<Vec<_>>()),
                );
                Some(b)
            }
            Err(e) => return fail(code::REFUSED, e.to_string()),
        }
    } else {
        None
    };
    let (result, outcome) = match (static_out, &opts.compare_with) {
        (Some(b), _) => (b, rxd_compress::Outcome::default()),
        (None, Some(other)) => match std::fs::read(other) {
            Ok(b) => (b, rxd_compress::Outcome::default()),
            Err(e) => return fail(code::NOINPUT, format!("{}: {e}", other.display())),
        },
        (None, None) => match rxd_compress::compress(&bytes, strategy) {
            Ok(r) => r,
            Err(e) => return fail(code::SOFTWARE, format!("{}: {e}", opts.input.display())),
        },
    };
    if outcome.batchnorms_folded > 0 {
        out.line(format!(
            "{} BatchNormalization nodes folded into their Conv",
            outcome.batchnorms_folded
        ));
    }
    if let Some(p) = &outcome.pruned {
        out.line(format!(
            "pruned {} weight tensors: {} of {} entries are exact zeros ({:.1} %)",
            p.tensors,
            p.zeros,
            p.elements,
            p.sparsity() * 100.0
        ));
    }
    if !outcome.dynamic.converted.is_empty() {
        out.line(format!(
            "{} MatMul weights converted to dynamic INT8 (MatMulInteger)",
            outcome.dynamic.converted.len()
        ));
    }
    match &outcome.fp16_compute {
        Some(h) => {
            out.line(format!(
                "float16 arithmetic: {} tensors converted, {} values clamped to ±65504, \
                 float32 inputs and outputs kept by casts",
                h.tensors, h.clamped
            ));
            if let Some((from, to)) = h.opset_upgraded {
                out.line(format!("  opset {from} → {to} (Clip's float16 kernels)"));
            }
            for n in &h.kept_float {
                out.line(format!("  kept in float32 (no float16 form): {n}"));
            }
        }
        None if outcome.fp16_tensors > 0 => {
            out.line(format!(
                "{} float tensors stored as float16",
                outcome.fp16_tensors
            ));
        }
        None => {}
    }
    if strategy.int8_weights {
        out.line(format!(
            "{} weights converted to INT8, {} kept as they were",
            outcome.quant.converted.len(),
            outcome.quant.kept.len()
        ));
        for (name, why) in &outcome.quant.kept {
            out.line(format!("  kept {name}: {why}"));
        }
    }
    let inputs = eval;
    out.set("report", Value::Null);
    if !inputs.is_empty() {
        let env = match env() {
            Ok(e) => e,
            Err(e) => return fail(code::CONFIG, e),
        };
        let report = match rxd_compress::report::compare(env, &bytes, &result, &inputs) {
            Ok(r) => r,
            Err(e) => return fail(code::REFUSED, e.to_string()),
        };
        out.set(
            "report",
            report_json(&report, opts.min_top1, opts.min_cosine),
        );
        let misses = report.min_top1() < opts.min_top1 || report.min_cosine() < opts.min_cosine;
        if misses && opts.search && strategy == rxd_compress::Strategy::INT8_WEIGHTS {
            out.text(format!("INT8 everywhere: {report}"));
            return match rxd_compress::search::search(
                env,
                &bytes,
                &inputs,
                opts.min_top1,
                opts.min_cosine,
            ) {
                Ok(found) => {
                    for (w, s) in &found.kept {
                        out.line(format!("  kept {w} in float (alone it costs {s:.3e})"));
                    }
                    out.set(
                        "kept_in_float",
                        json!(found.kept.iter().map(|(w, _)| w).collect::<Vec<_>>()),
                    );
                    out.text(format!(
                        "with {} weights in INT8: {}",
                        found.converted, found.report
                    ));
                    out.set(
                        "report",
                        report_json(&found.report, opts.min_top1, opts.min_cosine),
                    );
                    write(&out, opts, bytes.len(), &found.bytes)
                }
                Err(e) => fail(
                    code::REFUSED,
                    format!("refused: {e}; {} not written", opts.output.display()),
                ),
            };
        }
        out.text(&report);
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
    write(&out, opts, bytes.len(), &result)
}

/// Writes OUT and says so.
fn write(out: &Out, opts: &rxd::cli::CompressOpts, before: usize, bytes: &[u8]) -> ExitCode {
    if let Err(e) = std::fs::write(&opts.output, bytes) {
        return out.fail(code::CANTCREAT, format!("{}: {e}", opts.output.display()));
    }
    let ratio = bytes.len() as f64 / before.max(1) as f64;
    out.line(format!(
        "wrote {} ({before} → {} bytes, {ratio:.2}×)",
        opts.output.display(),
        bytes.len(),
    ));
    out.set("written", json!(true));
    out.set("size_before", json!(before));
    out.set("size_after", json!(bytes.len()));
    out.set("size_ratio", json!(ratio));
    out.finish(code::OK)
}

fn print_static(out: &Out, st: &rxd_compress::static_int8::Static) {
    let list = |m: &std::collections::BTreeMap<String, usize>| {
        let v: Vec<String> = m.iter().map(|(op, n)| format!("{n} {op}")).collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    out.line(format!(
        "static INT8: {} activations calibrated, {} weights, {} biases",
        st.activations.len(),
        st.weights,
        st.biases
    ));
    out.line(format!("  in INT8: {}", list(&st.quantized)));
    out.line(format!(
        "  folded into scales and ranges: {}",
        list(&st.folded)
    ));
    out.line(format!("  moved as INT8: {}", list(&st.moved)));
    out.line(format!("  left in float: {}", list(&st.float)));
}
