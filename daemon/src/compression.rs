//! `rxctl model compress`: the daemon's face of [`rxd_compress::job`] — a request into a job
//! on a repository model, the result published through [`crate::publish`] as the next
//! version only when its report passes, then the repository reloaded so the new version is
//! served (the original stays on disk); and the check of a model.toml `compress` strategy.
//! Boundary: writes a model version only through `publish`, compressed forms only into the
//! cache directories; blocking (callers use `spawn_blocking`).

use rxd_compress::job::{Job, Plan, RANDOM_CHECK_BATCH, Thresholds};
use rxd_compress::report::Input;
use rxd_compress::static_int8::Calibration;
use rxd_protocol::{CompressReply, CompressRequest, TensorData};

use crate::SharedRef;
use crate::error::RequestError;

fn bad(m: String) -> RequestError {
    RequestError::Invalid(m)
}

/// Inline request tensors as the compressor's inputs (`what`: "evaluation", "calibration").
fn to_inputs(tensors: &[rxd_protocol::Tensor], what: &str) -> Result<Vec<Input>, RequestError> {
    tensors
        .iter()
        .map(|t| Input::from_tensor(t).map_err(|e| bad(format!("{what} {e}"))))
        .collect()
}

/// A compressor error as a request error: what the request asked for or sent is the
/// client's mistake; ONNX Runtime failing on the original or the result is the daemon's.
fn request_error(e: rxd_compress::Error) -> RequestError {
    use rxd_compress::Error as E;
    match e {
        E::Usage(_)
        | E::Data(_)
        | E::NotOnnx(_)
        | E::Unsupported(_)
        | E::NothingChanged(_)
        | E::ThresholdsUnmet(_) => bad(e.to_string()),
        E::Malformed(_)
        | E::Read { .. }
        | E::Runtime(_)
        | E::CompressedDoesNotLoad(_)
        | E::OutputChanged { .. } => RequestError::Internal(format!("compression failed: {e}")),
    }
}

/// Compresses, evaluates, and publishes when the report passes. Blocking.
pub fn compress(shared: &SharedRef, req: &CompressRequest) -> Result<CompressReply, RequestError> {
    rxd_protocol::check_name(&req.model)?;
    let method = match &req.calibration_method {
        Some(m) => m.parse().map_err(request_error)?,
        None => Calibration::DEFAULT,
    };
    let plan = Plan::parse(&req.strategy, method).map_err(request_error)?;
    let defaults = Thresholds::DEFAULT;
    let thresholds = Thresholds {
        min_top1: req.min_top1.unwrap_or(defaults.min_top1),
        min_cosine: req.min_cosine.unwrap_or(defaults.min_cosine),
        ..defaults
    };
    let calibration = to_inputs(&req.calibration, "calibration")?;
    let eval = to_inputs(&req.eval, "evaluation")?;
    let mut job = Job::new(plan, calibration, eval, thresholds, false).map_err(request_error)?;
    // The version compressed: the one named, or the default one (loaded if needed).
    let loaded = shared.registry.load(&req.model, req.version)?;
    let version = loaded.version;
    let path = shared
        .registry
        .root()
        .join(&req.model)
        .join(version.to_string())
        .join("model.onnx");
    let bytes = std::fs::read(&path)
        .map_err(|e| RequestError::Internal(format!("{}: {e}", path.display())))?;
    let env = shared.registry.runtime().env();
    if job.eval.is_empty() {
        // Random inputs of the model's shapes, dynamic dimensions 1: agreement, not accuracy.
        job.eval = rxd_compress::report::random_inputs(env, &bytes, 1)
            .map_err(|e| bad(format!("cannot make evaluation inputs: {e}")))?;
        job.eval_is_random = true;
    }
    let progress = |m: &str| tracing::info!(model = %req.model, version, "compress: {m}");
    let done = job
        .run_with(Some(env), &bytes, &progress)
        .map_err(request_error)?;
    let passed = done.passed();
    let mut text = done.to_string();
    let mut published = None;
    if passed && !req.dry_run {
        // As `publish` writes a client's file: the next version, written whole or not at all,
        // never through a symlink, one writer at a time.
        let publish = rxd_protocol::PublishRequest {
            model: req.model.clone(),
            version: None,
            data: TensorData::Inline(Vec::new()),
        };
        let next = crate::publish::publish(shared, &publish, &done.bytes)?.version;
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
    let report = done.report.as_ref();
    Ok(CompressReply {
        model: req.model.clone(),
        from_version: version,
        published,
        size_before: done.size_before,
        size_after: done.size_after(),
        latency_ms_before: report.map_or(0.0, |r| r.latency_ms_before),
        latency_ms_after: report.map_or(0.0, |r| r.latency_ms_after),
        min_top1: report.map_or(1.0, |r| r.min_top1()),
        min_cosine: report.map_or(1.0, |r| r.min_cosine()),
        report: text,
        passed,
    })
}

/// For a model whose model.toml names a `compress` strategy: the file to load — the compressed
/// form (cached under the cache directory, keyed by the original's bytes and the strategy) when
/// it agrees with the original on random inputs, else the original — and what happened, in
/// words for `rxctl models`. `at_load`: a weights-only result will be dequantized at load
/// (model.toml `dequantize-at-load`); without, `auto` does not try its `@load` candidates.
pub fn prepare(
    runtime: &crate::runtime::Runtime,
    cache_dir: &std::path::Path,
    name: &str,
    version: u64,
    path: &std::path::Path,
    strategy: &str,
    at_load: bool,
) -> (std::path::PathBuf, String) {
    let original = path.to_path_buf();
    let refused = |why: String| {
        (
            original.clone(),
            format!("compression ({strategy}) refused: {why}"),
        )
    };
    // A rewrite, or `auto` (which tries the rewrites; static-int8 needs calibration data
    // that model.toml has no place for).
    let plan = match Plan::parse(strategy, Calibration::DEFAULT) {
        Ok(p @ (Plan::Rewrite(_) | Plan::Auto(..))) => p,
        Ok(_) => return refused(format!("{strategy} needs calibration data")),
        Err(e) => return refused(e.to_string()),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return refused(e.to_string()),
    };
    // Served as it is, auto may choose otherwise: another entry (the key of every other
    // model stays what it was).
    let served_as_is: &[u8] = if at_load { b"" } else { b"\0served as it is" };
    let key = blake3::hash(&[bytes.as_slice(), strategy.as_bytes(), served_as_is].concat());
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
    let env = runtime.env();
    let progress = |m: &str| tracing::info!(model = name, version, "compress: {m}");
    let done = rxd_compress::report::random_inputs(env, &bytes, RANDOM_CHECK_BATCH)
        .and_then(|eval| Job::new(plan, Vec::new(), eval, Thresholds::DEFAULT, false))
        .and_then(|mut job| {
            job.eval_is_random = true;
            job.at_load = at_load;
            job.run_with(Some(env), &bytes, &progress)
        });
    let done = match done {
        Ok(d) => d,
        Err(e) => return refused(e.to_string()),
    };
    if let Some(why) = done.shortfall() {
        return refused(format!("on random inputs {why}"));
    }
    let (out, cosine) = (
        &done.bytes,
        done.report.as_ref().map_or(1.0, |r| r.min_cosine()),
    );
    for d in &dirs {
        let cached = d.join(&file);
        let tmp = d.join(format!(".{file}.tmp"));
        let written = std::fs::create_dir_all(d)
            .and_then(|()| std::fs::write(&tmp, out))
            .and_then(|()| std::fs::rename(&tmp, &cached));
        if written.is_ok() {
            // auto: which strategy won, and that random inputs verify agreement only.
            let chosen = done
                .auto
                .as_ref()
                .and_then(|t| t.chosen_strategy())
                .map_or(String::new(), |s| {
                    format!(" chose {s}, accuracy unverified (random inputs)")
                });
            return (
                cached,
                format!(
                    "served compressed ({strategy}{chosen}: {:.2}× size, cosine {cosine:.6} vs \
                     the original)",
                    done.size_ratio(),
                ),
            );
        }
    }
    refused("cannot write the compressed model to the cache directory".into())
}
