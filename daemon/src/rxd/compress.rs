//! `rxd compress`: the command-line face of [`rxd_compress::job`] — flags into a job, the
//! model file in, the result written only if its report passes, failures as exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rxd::config;
use rxd_compress::Error;
use rxd_compress::job::{self, Compressed, Job, Plan, Thresholds};
use rxd_compress::report::{Input, read_npy};
use serde::Serialize;

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

/// The exit code of a failed job.
fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Usage(_) => code::USAGE,
        Error::NotOnnx(_) | Error::Data(_) => code::DATAERR,
        Error::Read { .. } => code::NOINPUT,
        Error::Malformed(_) | Error::Unsupported(_) => code::SOFTWARE,
        Error::Runtime(_)
        | Error::CompressedDoesNotLoad(_)
        | Error::OutputChanged { .. }
        | Error::NothingChanged(_)
        | Error::ThresholdsUnmet(_) => code::REFUSED,
    }
}

/// A failure: its exit code and what to say.
struct Failed(u8, String);

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed(exit_code(&e), e.to_string())
    }
}

/// `--json`'s one document: the job's result (flattened) and what became of OUT.
#[derive(Serialize)]
struct Doc<'a> {
    input: String,
    output: String,
    strategy: &'a str,
    #[serde(flatten)]
    compressed: Option<&'a Compressed>,
    written: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    exit_code: u8,
}

/// `rxd compress`: compress, evaluate against the original, write only if the report passes.
pub fn run(opts: &rxd::cli::CompressOpts) -> ExitCode {
    let mut compressed = None;
    let outcome = compress(opts, &mut compressed);
    let (code, error) = match outcome {
        Ok(()) => (code::OK, None),
        Err(Failed(c, m)) => {
            eprintln!("rxd: compress: {m}");
            (c, Some(m))
        }
    };
    if opts.json {
        let doc = Doc {
            input: opts.input.display().to_string(),
            output: opts.output.display().to_string(),
            strategy: &opts.strategy,
            compressed: compressed.as_ref(),
            written: code == code::OK,
            error,
            exit_code: code,
        };
        match serde_json::to_string(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("rxd: compress: cannot write JSON: {e}"),
        }
    }
    ExitCode::from(code)
}

/// `NAME=FILE` arguments as (name, file).
fn pairs<'a>(flag: &str, args: &'a [String]) -> Result<Vec<(String, &'a Path)>, Failed> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(n, p)| (n.to_string(), Path::new(p)))
                .ok_or_else(|| Failed(code::USAGE, format!("{flag} '{a}' is not NAME=FILE.npy")))
        })
        .collect()
}

fn compress(opts: &rxd::cli::CompressOpts, result: &mut Option<Compressed>) -> Result<(), Failed> {
    let plan = match &opts.compare_with {
        Some(other) => Plan::Given(std::fs::read(other).map_err(|source| Error::Read {
            path: other.clone(),
            source,
        })?),
        None => Plan::parse(&opts.strategy, opts.calibration_method)?,
    };
    let plan = match (plan, opts.objective) {
        (Plan::Auto(_, method), Some(o)) if opts.strategy == "auto" => Plan::Auto(o, method),
        (p, None) => p,
        _ => {
            return Err(Failed(
                code::USAGE,
                "--objective goes with --strategy auto only".into(),
            ));
        }
    };
    if let Some(s) = opts.max_size.filter(|s| !(*s > 0.0 && s.is_finite())) {
        return Err(Failed(
            code::USAGE,
            format!("--max-size {s} is not a positive ratio"),
        ));
    }
    if !(opts.max_latency > 0.0 && opts.max_latency.is_finite()) {
        return Err(Failed(
            code::USAGE,
            format!("--max-latency {} is not a positive ratio", opts.max_latency),
        ));
    }
    let bytes = std::fs::read(&opts.input).map_err(|source| Error::Read {
        path: opts.input.clone(),
        source,
    })?;
    let names = job::model_inputs(&bytes)
        .map_err(|e| Failed(exit_code(&e), format!("{}: {e}", opts.input.display())))?;
    // Names first (a wrong one is the mistake to report, whatever its file), then the files.
    let calibration = pairs("--calibration", &opts.calibration)?;
    let eval = pairs("--eval", &opts.eval)?;
    job::check_names("--calibration", calibration.iter().map(|p| &p.0), &names)?;
    job::check_names("--eval", eval.iter().map(|p| &p.0), &names)?;
    // An .npy file that cannot be read is bad data (65), as one that does not parse.
    let read = |v: Vec<(String, &Path)>| -> Result<Vec<Input>, Failed> {
        v.iter()
            .map(|(n, p)| read_npy(n, p).map_err(|e| Failed(code::DATAERR, e.to_string())))
            .collect()
    };
    let mut job = Job::new(
        plan,
        read(calibration)?,
        read(eval)?,
        Thresholds {
            min_top1: opts.min_top1,
            min_cosine: opts.min_cosine,
            max_latency: opts.max_latency,
            max_size: opts.max_size,
        },
        opts.search,
    )?;
    job.search_budget = std::time::Duration::from_secs(opts.search_budget);
    let env = if job.needs_runtime() {
        Some(runtime(opts.ort_library.clone())?)
    } else {
        None
    };
    let progress = |m: &str| eprintln!("rxd: compress: {m}");
    let done = job
        .run_with(env.as_ref(), &bytes, &progress)
        .map_err(|e| match e {
            Error::ThresholdsUnmet(m) | Error::NothingChanged(m) => Failed(
                code::REFUSED,
                format!("refused: {m}; {} not written", opts.output.display()),
            ),
            Error::Malformed(_) | Error::Unsupported(_) => {
                Failed(code::SOFTWARE, format!("{}: {e}", opts.input.display()))
            }
            e => e.into(),
        })?;
    // The summary is for people: on stdout, or on stderr when stdout carries the JSON.
    let summary = done.to_string();
    let written = write_out(opts, &done);
    if opts.json {
        eprint!("{summary}");
    } else {
        print!("{summary}");
    }
    let line = written.as_ref().map(|()| {
        format!(
            "wrote {} ({} → {} bytes, {:.2}×)",
            opts.output.display(),
            done.size_before,
            done.size_after(),
            done.size_ratio()
        )
    });
    *result = Some(done);
    match line {
        Ok(l) if opts.json => eprintln!("{l}"),
        Ok(l) => println!("{l}"),
        Err(_) => {}
    }
    written
}

/// Writes OUT when the result passed.
fn write_out(opts: &rxd::cli::CompressOpts, done: &Compressed) -> Result<(), Failed> {
    if let Some(why) = done.shortfall() {
        return Err(Failed(
            code::REFUSED,
            format!("refused: {why}; {} not written", opts.output.display()),
        ));
    }
    std::fs::write(&opts.output, &done.bytes)
        .map_err(|e| Failed(code::CANTCREAT, format!("{}: {e}", opts.output.display())))
}

/// ONNX Runtime, from `--ort-library`, then ORT_DYLIB_PATH, then the bundled library.
fn runtime(flag: Option<PathBuf>) -> Result<ort::environment::Environment, Failed> {
    let lib = flag
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(Into::into))
        .unwrap_or_else(|| config::BUNDLED_ORT_LIBRARY.into());
    let fail = |e: &dyn std::fmt::Display| {
        Failed(
            code::CONFIG,
            format!("ONNX Runtime ({}): {e}", lib.display()),
        )
    };
    ort::init_from(&lib)
        .map_err(|e| fail(&e))?
        .with_name("rxd-compress")
        .build()
        .map_err(|e| fail(&e))
}
