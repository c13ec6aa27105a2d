//! `rxctl model compress`: compresses a repository model into a new version with the
//! compressor (`rxd-compress`), evaluates it against the original with ONNX Runtime, and
//! publishes it as `<repository>/<model>/<N+1>/model.onnx` only when the report passes — then
//! reloads the repository so the new version is served (the original stays on disk).
//! Boundary: file writes only inside the model's directory; blocking (callers use
//! `spawn_blocking`).

use rxd_compress::report::{Data, Input};
use rxd_protocol::{CompressReply, CompressRequest, DType, TensorData};

use crate::SharedRef;
use crate::error::RequestError;

fn bad(m: String) -> RequestError {
    RequestError::Wire(rxd_protocol::WireError::new(
        rxd_protocol::ErrorCode::InvalidRequest,
        m,
    ))
}

/// Inline request tensors as the compressor's inputs (`what`: "evaluation", "calibration").
fn to_inputs(tensors: &[rxd_protocol::Tensor], what: &str) -> Result<Vec<Input>, RequestError> {
    tensors
        .iter()
        .map(|t| {
            let TensorData::Inline(bytes) = &t.data else {
                return Err(bad(format!("{what} tensors must be inline")));
            };
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let data = match t.dtype {
                DType::Float32 => Data::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                        .collect(),
                ),
                DType::Int64 => Data::I64(
                    bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                        .collect(),
                ),
                other => {
                    return Err(bad(format!(
                        "{what} input '{}': {other:?} is not supported",
                        t.name
                    )));
                }
            };
            Ok(Input {
                name: t.name.clone(),
                shape,
                data,
            })
        })
        .collect()
}

/// Evaluation inputs: the request's tensors, or random ones of the model's shapes.
fn inputs(
    shared: &SharedRef,
    req: &CompressRequest,
    bytes: &[u8],
) -> Result<Vec<Input>, RequestError> {
    if !req.eval.is_empty() {
        return to_inputs(&req.eval, "evaluation");
    }
    // Random inputs of the model's shapes, dynamic dimensions 1.
    rxd_compress::report::random_inputs(shared.registry.runtime().env(), bytes, 1)
        .map_err(|e| bad(format!("cannot make evaluation inputs: {e}")))
}

/// Compresses, evaluates, and publishes when the report passes. Blocking.
pub fn compress(shared: &SharedRef, req: &CompressRequest) -> Result<CompressReply, RequestError> {
    rxd_protocol::check_name(&req.model)?;
    let is_static = req.strategy == "static-int8";
    let strategy: rxd_compress::Strategy = if is_static {
        rxd_compress::Strategy::NONE
    } else {
        req.strategy
            .parse()
            .map_err(|e: rxd_compress::Error| bad(format!("{e} or static-int8")))?
    };
    let calibration = to_inputs(&req.calibration, "calibration")?;
    if is_static && calibration.is_empty() {
        return Err(bad("static-int8 needs calibration inputs".into()));
    }
    let method: rxd_compress::static_int8::Calibration = req
        .calibration_method
        .as_deref()
        .unwrap_or("percentile:99.99")
        .parse()
        .map_err(|e: rxd_compress::Error| bad(e.to_string()))?;
    let (min_top1, min_cosine) = (req.min_top1.unwrap_or(0.99), req.min_cosine.unwrap_or(0.99));
    // The version compressed: the one named, or the default one (loaded if needed).
    let loaded = shared.registry.load(&req.model, req.version)?;
    let version = loaded.version;
    let dir = shared.registry.root().join(&req.model);
    let path = dir.join(version.to_string()).join("model.onnx");
    let bytes = std::fs::read(&path)
        .map_err(|e| RequestError::Internal(format!("{}: {e}", path.display())))?;
    let inputs = inputs(shared, req, &bytes)?;
    let env = shared.registry.runtime().env();
    // static-int8 runs the sensitivity search on the evaluation inputs (as `rxd compress
    // --eval` does): the nodes kept in float are named in the report.
    let mut static_text = String::new();
    let (out, outcome) = if is_static {
        let found = rxd_compress::static_int8::search(
            env,
            &bytes,
            &calibration,
            method,
            &inputs,
            min_top1,
            min_cosine,
        )
        .map_err(|e| bad(e.to_string()))?;
        let st = &found.stat;
        static_text = format!(
            "static INT8: {} activations calibrated, {} weights, {} biases; {} operators in INT8\n",
            st.activations.len(),
            st.weights,
            st.biases,
            st.quantized.values().sum::<usize>()
        );
        for (node, e) in &found.kept {
            static_text.push_str(&format!(
                "  kept {node} in float (its quantization added {e:.2e} to 1 − cosine)\n"
            ));
        }
        (found.bytes, rxd_compress::Outcome::default())
    } else {
        rxd_compress::compress(&bytes, strategy).map_err(|e| bad(e.to_string()))?
    };
    let report = rxd_compress::report::compare(env, &bytes, &out, &inputs)
        .map_err(|e| RequestError::Internal(format!("evaluation failed: {e}")))?;
    let passed = report.min_top1() >= min_top1 && report.min_cosine() >= min_cosine;
    let mut text = if is_static {
        static_text
    } else {
        format!(
            "{} weights to INT8 (QDQ), {} MatMuls to dynamic INT8, {} tensors to fp16{}, {} BatchNorms folded{}\n",
            outcome.quant.converted.len(),
            outcome.dynamic.converted.len(),
            outcome.fp16_tensors,
            if outcome.fp16_compute.is_some() {
                " (float16 arithmetic)"
            } else {
                ""
            },
            outcome.batchnorms_folded,
            outcome
                .pruned
                .as_ref()
                .map(|p| format!(", pruned to {:.1} % zeros", p.sparsity() * 100.0))
                .unwrap_or_default()
        )
    };
    text += &report.to_string();
    let mut published = None;
    if passed && !req.dry_run {
        let next = std::fs::read_dir(&dir)
            .map_err(|e| RequestError::Internal(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(version)
            + 1;
        let vdir = dir.join(next.to_string());
        let tmp = dir.join(format!(".{next}.tmp"));
        std::fs::create_dir_all(&tmp)
            .and_then(|()| std::fs::write(tmp.join("model.onnx"), &out))
            .and_then(|()| std::fs::rename(&tmp, &vdir))
            .map_err(|e| {
                RequestError::Internal(format!("cannot publish {}: {e}", vdir.display()))
            })?;
        text.push_str(&format!(
            "published as version {next} (version {version} stays on disk)\n"
        ));
        published = Some(next);
        crate::reload::apply(shared).map_err(RequestError::Internal)?;
    } else if !passed {
        text.push_str("under the thresholds: not published\n");
    }
    match published {
        Some(p) => {
            tracing::info!(model = %req.model, version, "compressed: published as version {p}")
        }
        None if passed => {
            tracing::info!(model = %req.model, version, "compressed: passed, not published (dry run)")
        }
        None => {
            tracing::info!(model = %req.model, version, "compressed: under the thresholds, not published")
        }
    }
    Ok(CompressReply {
        model: req.model.clone(),
        from_version: version,
        published,
        size_before: report.size_before,
        size_after: report.size_after,
        latency_ms_before: report.latency_ms_before,
        latency_ms_after: report.latency_ms_after,
        min_top1: report.min_top1(),
        min_cosine: report.min_cosine(),
        report: text,
        passed,
    })
}

/// For a model whose model.toml names a `compress` strategy: the file to load — the compressed
/// form (cached under the cache directory, keyed by the original's bytes and the strategy) when
/// it agrees with the original on random inputs, else the original — and what happened, in
/// words for `rxctl models`.
pub fn prepare(
    runtime: &crate::runtime::Runtime,
    cache_dir: &std::path::Path,
    name: &str,
    version: u64,
    path: &std::path::Path,
    strategy: &str,
) -> (std::path::PathBuf, String) {
    let original = path.to_path_buf();
    let refused = |why: String| {
        (
            original.clone(),
            format!("compression ({strategy}) refused: {why}"),
        )
    };
    let parsed: rxd_compress::Strategy = match strategy.parse() {
        Ok(s) => s,
        Err(e) => return refused(e.to_string()),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return refused(e.to_string()),
    };
    let key = blake3::hash(&[bytes.as_slice(), strategy.as_bytes()].concat());
    let file = format!("{name}-{version}-{}.onnx", &key.to_hex()[..16]);
    // Never a shared directory: a compressed model found there would be served, and one
    // written there could follow a planted symlink. Without a writable cache directory the
    // daemon's private directory holds it until the daemon stops.
    let dirs = [
        cache_dir.join("compressed"),
        runtime.scratch_dir().join("compressed"),
    ];
    for d in &dirs {
        let cached = d.join(&file);
        if cached.is_file() {
            return (cached, format!("served compressed ({strategy}, cached)"));
        }
    }
    let (out, _) = match rxd_compress::compress(&bytes, parsed) {
        Ok(r) => r,
        Err(e) => return refused(e.to_string()),
    };
    let report = rxd_compress::report::random_inputs(runtime.env(), &bytes, 32)
        .and_then(|inputs| rxd_compress::report::compare(runtime.env(), &bytes, &out, &inputs));
    let report = match report {
        Ok(r) => r,
        Err(e) => return refused(e.to_string()),
    };
    if report.min_top1() < 0.99 || report.min_cosine() < 0.99 {
        return refused(format!(
            "on random inputs top-1 agreement {:.4}, cosine {:.6} (minimum 0.99)",
            report.min_top1(),
            report.min_cosine()
        ));
    }
    for d in &dirs {
        let cached = d.join(&file);
        let tmp = d.join(format!(".{file}.tmp"));
        let written = std::fs::create_dir_all(d)
            .and_then(|()| std::fs::write(&tmp, &out))
            .and_then(|()| std::fs::rename(&tmp, &cached));
        if written.is_ok() {
            return (
                cached,
                format!(
                    "served compressed ({strategy}: {:.2}× size, cosine {:.6} vs the original)",
                    report.size_ratio(),
                    report.min_cosine()
                ),
            );
        }
    }
    refused("cannot write the compressed model to the cache directory".into())
}
