//! Command-line flags of `rxd`, defined once (clap derive). Flags override the config file.
//! This module only describes flags; `config` turns them into a validated configuration.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
pub use rxd_client::generate::Generate;

/// rxd — local inference daemon: serves ONNX models to local processes over a Unix socket.
#[derive(Debug, Parser)]
#[command(
    name = "rxd",
    version,
    about = "rxd — local inference daemon: serves ONNX models to local processes over a Unix socket",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: ServeOpts,
    /// Print a man page or a shell completion script generated from these definitions.
    #[arg(long, value_enum, hide = true, value_name = "WHAT")]
    pub generate: Option<Generate>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default when no subcommand is given).
    Serve(ServeOpts),
    /// Validate the configuration, print every problem, exit 78 if there is any.
    CheckConfig(ServeOpts),
    /// Compress an ONNX model (offline): write OUT only if its accuracy report passes.
    #[command(after_help = COMPRESS_EXIT_CODES)]
    Compress(CompressOpts),
}

/// What `rxd compress` exits with (in its `--help` and rxd(8)).
pub const COMPRESS_EXIT_CODES: &str = "Exit codes: 0 OUT written (the report passed, or none was \
asked for); 1 refused: the report missed --min-top1/--min-cosine (auto: no candidate passed; \
the table names what each missed), or the strategy found \
nothing to change in this model (OUT not written), or ONNX Runtime failed to run a model; 64 usage: an unknown strategy, static-int8 without \
--calibration, --eval/--calibration not NAME=FILE.npy or not naming exactly the model's \
inputs, auto without --eval; 65 IN is not an ONNX model, or an .npy file cannot be read; 66 IN cannot be read; \
70 the compressor failed on this model; 73 OUT cannot be written; 78 ONNX Runtime cannot be \
loaded. With --json, stdout holds exactly one JSON object (progress goes to stderr), with \
\"written\", \"report\" and, on failure, \"error\" and \"exit_code\".";

/// `rxd compress IN -o OUT --strategy S [--eval NAME=FILE.npy]...`
#[derive(Debug, Clone, Args)]
pub struct CompressOpts {
    /// The model to compress.
    #[arg(value_name = "IN.onnx")]
    pub input: PathBuf,
    /// Where to write the compressed model.
    #[arg(long, short = 'o', value_name = "OUT.onnx")]
    pub output: PathBuf,
    /// auto (try the strategies below, each judged against IN on --eval and timed at batch 1
    /// against IN in the same run; write the one --objective prefers among those that meet
    /// the thresholds, are smaller and not slower than IN; needs --eval, static-int8 is tried
    /// only with --calibration), static-int8 (activations too, ranges from --calibration),
    /// none (a lossless round
    /// trip), int8-weights (BatchNorm folding + per-channel INT8
    /// weights of MatMul/Gemm/Conv), dynamic-int8 (MatMul as MatMulInteger with activations
    /// quantized at run time), fp16 (weights and arithmetic in float16, float32 inputs and
    /// outputs), fp16-weights (float weights stored as float16, computed in float32),
    /// prune:S (magnitude
    /// pruning to sparsity S), combined with +
    /// (prune:0.5+int8-weights).
    #[arg(long, default_value = rxd_compress::job::DEFAULT_STRATEGY)]
    pub strategy: String,
    /// With --strategy auto, what to prefer among the variants that pass: size (the
    /// smallest), latency (the fastest at batch 1), balanced (the smallest size ratio ×
    /// latency ratio).
    #[arg(long, value_name = "size|latency|balanced")]
    pub objective: Option<rxd_compress::auto::Objective>,
    /// Evaluation inputs, NAME=FILE.npy (float32 or int64), once per model input.
    #[arg(long = "eval", value_name = "NAME=FILE")]
    pub eval: Vec<String>,
    /// Calibration inputs for static-int8, NAME=FILE.npy, once per model input.
    #[arg(long = "calibration", value_name = "NAME=FILE")]
    pub calibration: Vec<String>,
    /// How static-int8 turns calibration values into ranges: minmax or percentile:P. The
    /// default clips the 0.01 % outliers at each end: min/max ranges broke the PP-OCR
    /// classifier's squeeze-excite blocks (55 % agreement) and cost YOLOv8n a decimal of
    /// cosine; percentile ranges kept both (100 %, 0.9999).
    #[arg(long, default_value_t = rxd_compress::static_int8::Calibration::DEFAULT)]
    pub calibration_method: rxd_compress::static_int8::Calibration,
    /// Print one JSON object on stdout (the report, what was written); progress goes to
    /// stderr.
    #[arg(long)]
    pub json: bool,
    /// Refuse the result when a classifier-like output's top-1 agreement is below this.
    #[arg(long, default_value_t = rxd_compress::job::Thresholds::DEFAULT.min_top1)]
    pub min_top1: f64,
    /// Refuse the result when an output's cosine similarity is below this.
    #[arg(long, default_value_t = rxd_compress::job::Thresholds::DEFAULT.min_cosine)]
    pub min_cosine: f64,
    /// With auto: a candidate slower at batch 1 than this ratio of the original's latency
    /// misses (the default, 1.05, is "not slower" with room for timing noise; 0.8 asks for a
    /// model at least 20 % faster — or a refusal naming what each candidate missed).
    #[arg(long, value_name = "RATIO", default_value_t = rxd_compress::job::Thresholds::DEFAULT.max_latency)]
    pub max_latency: f64,
    /// With auto: a candidate whose file is larger than this ratio of the original's misses
    /// (default: any file smaller than the original). With --max-latency, one command asks
    /// for "at most 0.3× the size and 0.8× the latency, as accurate" — or a refusal naming
    /// what each candidate missed.
    #[arg(long, value_name = "RATIO")]
    pub max_size: Option<f64>,
    /// Evaluate this already compressed file against IN instead of compressing IN (for
    /// comparing other tools' output with the same report).
    #[arg(long, value_name = "FILE", hide = true)]
    pub compare_with: Option<PathBuf>,
    /// With int8-weights and --eval: when the thresholds are missed, keep the most sensitive
    /// weights in float until they hold (and say which).
    #[arg(long)]
    pub search: bool,
    /// Seconds a sensitivity search (--search, or static-int8 with --eval) may take before it
    /// gives up (exit 1); its progress goes to stderr. With auto: all candidates together (one
    /// that would not fit what is left is skipped, and the table says so).
    #[arg(long, value_name = "SECONDS", default_value_t = rxd_compress::job::DEFAULT_SEARCH_BUDGET.as_secs())]
    pub search_budget: u64,
    /// ONNX Runtime library (otherwise ORT_DYLIB_PATH, then the bundled one).
    #[arg(long, value_name = "FILE")]
    pub ort_library: Option<PathBuf>,
}

/// Settings that may come from flags; each overrides the config file's key of the same name.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeOpts {
    /// Configuration file (TOML). Without it, built-in defaults and flags are used.
    #[arg(long, short = 'c', env = "RXD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Path of the Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket, octal (e.g. 0660).
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Model repository: <dir>/<model>/<version>/model.onnx.
    #[arg(long, value_name = "DIR")]
    pub model_repository: Option<PathBuf>,
    /// ONNX Runtime shared library (otherwise ORT_DYLIB_PATH, then the bundled one).
    #[arg(long, value_name = "FILE")]
    pub ort_library: Option<PathBuf>,
    /// Intra-op threads per model instance (0 = number of cores).
    #[arg(long, value_name = "N")]
    pub intra_op_threads: Option<u32>,
    /// Threads reading and writing sockets (default 1; model workers have their own).
    #[arg(long, value_name = "N")]
    pub io_threads: Option<u32>,
    /// Group whose members may run admin operations (load, unload).
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Memory budget of the default device (e.g. 512MiB; 0 = unlimited). Least-recently-used
    /// idle models are evicted to admit others within it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<crate::config::ByteSize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (loopback only, e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter directive).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

fn parse_size(s: &str) -> Result<crate::config::ByteSize, String> {
    crate::config::ByteSize::parse(s)
}
