//! ONNX Runtime: loading the library, creating sessions, and the worker threads that own them.
//! One file per concern: `ep` (devices and their execution providers), `gate` (sessions on an
//! execution provider that cannot run two at once take turns), `build` (a version's
//! sessions, warmed and profiled), `signature` (inputs/outputs, dtypes, warmup inputs),
//! `profile` (which provider ran each node), `job` (what workers are given), `worker` (the
//! threads and their arena policy), `run` (running a batch), `deliver` (placing outputs),
//! `raw` (the unsafe code around ORT), `log` (ORT's log into tracing), `tune` (a model measured
//! over thread layouts and batch sizes).
//!
//! Nothing outside this module calls ORT. Each model instance is one `Session` owned by one
//! worker thread; connection tasks hand work to workers over a bounded channel and get the
//! answer back through a [`Completion`]. Invariant: `ORT_DISABLE_TELEMETRY=1` is in the
//! environment before [`Runtime::init`] loads the library (the binary's `main` sets it first
//! thing).
//! Boundary: this module knows tensors as (dtype, shape, bytes); it knows nothing about
//! connections, the wire format's framing, the repository layout or the configuration file.

mod build;
mod caps;
mod deliver;
mod ep;
mod gate;
mod job;
mod limit;
pub mod log;
mod profile;
mod raw;
mod run;
mod signature;
mod tune;
mod worker;

use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::session::Session;

pub use build::{BuildSpec, Built, batch_sizes};
pub use deliver::{View, deliver};
pub use ep::{DeviceKind, Probe, Target};
pub use gate::DeviceSession;
pub use job::{
    Batch, BatchListener, Completion, Finished, InputData, InputTensor, Job, OutputData,
    OutputTarget, OutputTensor, Placement, padded_rows,
};
pub use limit::Strikes;
pub use profile::NodePlacement;
pub use run::input_elements;
pub use signature::{
    Axes, AxesConfig, Axis, Signature, WARMUP_AUTO_DIM, dtype_of, element_type_of, fits, integer,
    warmup, warmup_shape, zero_inputs,
};
pub use tune::{Cell, Layout, Measured, TuneSpec, layouts};
pub use worker::{ARENA_IDLE, ArenaRelease, Crew, INLINE_MAX, WorkerPool, WorkerSessions};

use profile::node_placement;

/// Errors from ONNX Runtime.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("cannot create a session for {path}: {message}")]
    Session { path: PathBuf, message: String },
    #[error("model {path} is not servable: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("the model's workers have stopped")]
    WorkersGone,
    #[error("the queue is full ({capacity} waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the client is gone; the request was not run")]
    Abandoned,
    #[error("the deadline passed before the request could run")]
    DeadlineExceeded,
    #[error(
        "stopped after {:.1} s at the run limit of {:.1} s: a run holding a non-admin's \
         request is stopped at half of watchdog-stuck-secs (less for a user whose runs were \
         stopped lately), between two of the model's operators, and this request's values made \
         the model run far longer than requests of its size do",
        took.as_secs_f64(),
        limit.as_secs_f64()
    )]
    Stopped {
        limit: std::time::Duration,
        /// What the run took: past the limit by what the operator running then took to end.
        took: std::time::Duration,
    },
    #[error(
        "refused unrun: a request of this user's to this model ran {:.1} s against its run \
         limit of {:.1} s (one operator ran on: a run is stopped only between operators), so \
         this user's requests to the model are refused for 10 minutes after it ({:.0} s left)",
        took.as_secs_f64(),
        limit.as_secs_f64(),
        left.as_secs_f64().ceil()
    )]
    Barred {
        took: std::time::Duration,
        limit: std::time::Duration,
        left: std::time::Duration,
    },
    #[error("cannot create a private directory in {dir}: {message}")]
    Scratch { dir: PathBuf, message: String },
    #[error("warmup at batch {rows} failed: {message}")]
    Warmup { rows: u64, message: String },
    #[error("no instances")]
    NoInstances,
    #[error("cannot start a worker thread: {0}")]
    Threads(String),
    #[error("{target} holds {available} bytes, {needed} needed")]
    OutputTooSmall {
        target: String,
        needed: u64,
        available: u64,
    },
}

/// The loaded ONNX Runtime library and its environment.
pub struct Runtime {
    env: Environment,
    library: PathBuf,
    version: String,
    /// Plugin EP libraries registered with the environment (by path), or why not.
    plugins: std::sync::Mutex<std::collections::BTreeMap<PathBuf, Result<String, String>>>,
    /// One tiny session per accelerator device, kept for the daemon's life: it pays the
    /// device's one-time set-up (Dawn/Vulkan instance and adapter, CUDA context) before the
    /// first real model's footprint is measured, and keeps that context alive.
    primed: std::sync::Mutex<std::collections::BTreeMap<String, DeviceSession>>,
    /// The daemon's private directory (mode 0700, a random name created exclusively, removed
    /// at exit) for the files ONNX Runtime is told to write: profiles, the prime graph.
    /// Nothing is ever written at a predictable path of a shared directory, where another
    /// local user could plant a symlink (overwrite any file) or a FIFO (hang the writer).
    scratch: tempfile::TempDir,
    /// The cap of the CPU arena every session shares (`run-memory-bytes`), when there is one.
    shared_arena: Option<u64>,
}

/// How to build a model's sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub intra_op_threads: u32,
    /// Let ORT's intra-op threads spin after work (lower latency, burns CPU while idle-ish).
    pub allow_spinning: bool,
    /// Names the session in ORT's log messages (`model:version`).
    pub log_id: String,
    /// model.toml `warmup-values`: what warmup and tuning fill these integer inputs with,
    /// over what the graph says (`TensorSpec::warmup_value`).
    pub warmup_values: std::collections::HashMap<String, i64>,
}

impl Runtime {
    /// Loads the ORT library at `library` (never searches: the config resolved the path).
    /// With `run_memory`, every session allocates its CPU memory (weights and the tensors of
    /// every run) from one arena capped at that many bytes: a request whose shapes would need
    /// more fails (`inference_failed`) instead of growing the daemon without bound.
    pub fn init(library: &Path, run_memory: Option<u64>) -> Result<Runtime, RuntimeError> {
        let lib_err = |message: String| RuntimeError::Library {
            path: library.to_path_buf(),
            message,
        };
        let builder = ort::init_from(library).map_err(|e| lib_err(e.to_string()))?;
        let env = builder
            .with_name("rxd")
            .with_telemetry(false)
            .with_logger(log::logger())
            .build()
            .map_err(|e| lib_err(e.to_string()))?;
        // With a custom logger ORT starts at its most verbose level: every message would be
        // formatted and handed over, per run too. Warnings and errors are what rxd logs.
        env.set_log_level(ort::logging::LogLevel::Warning);
        let version = version_of(library);
        if let Some(cap) = run_memory {
            raw::register_capped_cpu_arena(&env, usize::try_from(cap).unwrap_or(usize::MAX))
                .map_err(|e| lib_err(format!("cannot register the shared CPU arena: {e}")))?;
        }
        let base = std::env::temp_dir();
        let scratch = tempfile::Builder::new()
            .prefix("rxd-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&base)
            .map_err(|e| RuntimeError::Scratch {
                dir: base,
                message: e.to_string(),
            })?;
        tracing::debug!(dir = %scratch.path().display(), "private directory");
        let runtime = Runtime {
            env,
            library: library.to_path_buf(),
            version,
            plugins: Default::default(),
            primed: Default::default(),
            scratch,
            shared_arena: run_memory,
        };
        runtime.prime();
        Ok(runtime)
    }

    /// Pays ONNX Runtime's one-time costs (kernel registries, allocators, first-session
    /// set-up: about 20 MB of resident memory) with a tiny built-in graph, so that the memory
    /// measured over the first real model's load is that model's own.
    fn prime(&self) {
        let result = Session::builder(&self.env)
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| self.shared_allocator(b))
            .and_then(|mut b| DeviceSession::make(&DeviceKind::Cpu, || b.commit_from_memory(PRIME)))
            .map_err(|e| e.to_string())
            .and_then(|mut session| {
                let sig = Signature::of(session.get())?;
                warmup(&mut session, &sig, 1, &Default::default()).map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::warn!(
                "priming ONNX Runtime failed (memory measurements of the first model include its set-up): {e}"
            );
        }
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Makes a session allocate from the shared, capped CPU arena when there is one.
    fn shared_allocator(
        &self,
        b: ort::session::builder::SessionBuilder,
    ) -> ort::Result<ort::session::builder::SessionBuilder> {
        match self.shared_arena {
            Some(_) => b.with_env_allocators().map_err(Into::into),
            None => Ok(b),
        }
    }

    /// The cap of the shared CPU arena (`run-memory-bytes`), if there is one.
    pub fn run_memory(&self) -> Option<u64> {
        self.shared_arena
    }

    /// The daemon's private directory (see [`Runtime`]'s `scratch`).
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The ORT environment (for the compressor's accuracy report).
    pub fn env(&self) -> &Environment {
        &self.env
    }

    /// ONNX Runtime's version, e.g. `1.31.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Creates one session for `path` on the CPU and reads its signature.
    pub fn session(
        &self,
        path: &Path,
        opts: &SessionOptions,
    ) -> Result<(DeviceSession, Signature), RuntimeError> {
        self.session_on(path, None, opts, Target::cpu(), None)
    }

    /// Creates one session for `path` on `target` and reads its signature. The device's
    /// execution provider must come up: if it cannot (plugin library missing, no adapter, EP
    /// not in this ONNX Runtime build), the error says so — never a silent CPU session.
    /// `profile`: a file prefix; ORT profiles the session's runs until [`node_placement`].
    /// `bytes`: the model to make the session from, made from the file at `path` in memory
    /// (dequantized at load); `None`: the file itself.
    pub fn session_on(
        &self,
        path: &Path,
        bytes: Option<&[u8]>,
        opts: &SessionOptions,
        target: Target<'_>,
        profile: Option<&Path>,
    ) -> Result<(DeviceSession, Signature), RuntimeError> {
        let sess_err = |e: &dyn std::fmt::Display| RuntimeError::Session {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut builder = Session::builder(&self.env)
            .and_then(|b| {
                b.with_intra_threads(opts.intra_op_threads as usize)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| self.shared_allocator(b))
            .and_then(|b| b.with_log_id(&opts.log_id).map_err(Into::into))
            .and_then(|b| {
                b.with_config_entry(
                    "session.intra_op.allow_spinning",
                    if opts.allow_spinning { "1" } else { "0" },
                )
                .map_err(Into::into)
            })
            .map_err(|e| sess_err(&e))?;
        // A model made in memory from the file at `path` finds its external data files (if
        // any) where the file's would be.
        if let (Some(_), Some(dir)) = (bytes, path.parent().and_then(Path::to_str)) {
            builder = builder
                .with_config_entry("session.model_external_initializers_file_folder_path", dir)
                .map_err(|e| sess_err(&e))?;
        }
        if let Some(prefix) = profile {
            builder = builder.with_profiling(prefix).map_err(|e| sess_err(&e))?;
        }
        let session = DeviceSession::make(target.kind, || {
            let mut builder = self
                .with_device(builder, target)
                .map_err(|e| sess_err(&e))?;
            match bytes {
                Some(b) => builder.commit_from_memory(b),
                None => builder.commit_from_file(path),
            }
            .map_err(|e| sess_err(&e))
        })?;
        let mut signature =
            Signature::of(session.get()).map_err(|message| RuntimeError::Unsupported {
                path: path.to_path_buf(),
                message,
            })?;
        signature::read_warmup_values(&mut signature, path, bytes);
        for spec in &mut signature.inputs {
            if let Some(&v) = opts.warmup_values.get(&spec.name) {
                spec.warmup_value = Some(v);
            }
        }
        Ok((session, signature))
    }
}

/// One Slice node; made by tests/models/make_models.py (slice_first).
const PRIME: &[u8] = include_bytes!("../../assets/prime.onnx");

fn run_err(e: &dyn std::fmt::Display) -> RuntimeError {
    RuntimeError::Run(e.to_string())
}

/// Statistics of the session's CPU arena as ORT reports them (name, value).
pub fn arena_stats(session: &Session) -> Result<Vec<(String, i64)>, String> {
    raw::arena_stats(session)
}

/// Sets the C heap up for a daemon that loads and unloads models (see
/// `raw::fix_heap_thresholds`). Called once at start, before ONNX Runtime allocates.
pub fn fix_heap_thresholds() {
    raw::fix_heap_thresholds();
}

/// Returns freed heap memory to the kernel (after unloading models).
pub fn release_free_memory() {
    raw::release_free_memory();
}

/// ORT's version: from the library's file name (`libonnxruntime.so.1.31.1`, symlinks
/// followed), else from its build info, else "unknown".
fn version_of(library: &Path) -> String {
    let real = std::fs::canonicalize(library).unwrap_or_else(|_| library.to_path_buf());
    let from_name = real
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split_once(".so."))
        .map(|(_, v)| v.to_string())
        .filter(|v| v.split('.').all(|p| p.parse::<u32>().is_ok()));
    from_name
        .or_else(|| {
            ort::info()
                .split(',')
                .find_map(|kv| kv.trim().strip_prefix("git-branch=rel-"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}
