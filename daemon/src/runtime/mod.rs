//! ONNX Runtime: loading the library, creating sessions, and the worker threads that own them.
//!
//! Nothing outside this module calls ORT. Each model instance is one `Session` owned by one
//! worker thread; connection tasks hand work to workers over a bounded channel and get the
//! answer back on a oneshot. Invariant: `ORT_DISABLE_TELEMETRY=1` is in the environment before
//! [`Runtime::init`] loads the library (the binary's `main` sets it first thing).
//! Boundary: this module knows tensors as (dtype, shape, bytes); it knows nothing about
//! connections, the wire format's framing or the repository layout.

pub mod log;
mod raw;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, ValueType};
use rxd_protocol::{DType, TensorSpec};
use rxd_shm::Mapping;

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
    #[error("cannot create a private directory in {dir}: {message}")]
    Scratch { dir: PathBuf, message: String },
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
    primed: std::sync::Mutex<std::collections::BTreeMap<String, Session>>,
    /// The daemon's private directory (mode 0700, a random name created exclusively, removed
    /// at exit) for the files ONNX Runtime is told to write: profiles, the prime graph.
    /// Nothing is ever written at a predictable path of a shared directory, where another
    /// local user could plant a symlink (overwrite any file) or a FIFO (hang the writer).
    scratch: tempfile::TempDir,
    /// The cap of the CPU arena every session shares (`run-memory-bytes`), when there is one.
    shared_arena: Option<u64>,
}

/// Where a session runs: a device's kind and execution-provider options.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub kind: &'a crate::config::DeviceKind,
    pub options: &'a [(String, String)],
    /// Engine caches (TensorRT) go under here.
    pub cache_dir: Option<&'a Path>,
}

impl Target<'static> {
    /// The CPU execution provider.
    pub fn cpu() -> Target<'static> {
        Target {
            kind: &crate::config::DeviceKind::Cpu,
            options: &[],
            cache_dir: None,
        }
    }
}

/// Which execution provider ran each node, from ORT's profile of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlacement {
    /// Nodes per execution provider.
    pub nodes: std::collections::BTreeMap<String, u64>,
    /// Nodes that ran on the CPU EP while the session's device was another one (first 64).
    pub on_cpu: Vec<String>,
}

/// How to build a model's sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub intra_op_threads: u32,
    /// Let ORT's intra-op threads spin after work (lower latency, burns CPU while idle-ish).
    pub allow_spinning: bool,
    /// Names the session in ORT's log messages (`model:version`).
    pub log_id: String,
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

    /// Pays an accelerator device's one-time set-up with the built-in one-node graph (once per
    /// device; the session is kept). Errors are the device's: the EP cannot be created.
    pub fn prime_device(&self, target: Target<'_>) -> Result<(), RuntimeError> {
        if matches!(target.kind, crate::config::DeviceKind::Cpu) {
            return Ok(());
        }
        let key = format!("{:?}", target.kind);
        let mut primed = self.primed.lock().unwrap_or_else(|e| e.into_inner());
        if primed.contains_key(&key) {
            return Ok(());
        }
        let path = self.scratch.path().join("prime.onnx");
        std::fs::write(&path, PRIME).map_err(|e| RuntimeError::Session {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let opts = SessionOptions {
            intra_op_threads: 1,
            allow_spinning: false,
            log_id: "rxd-probe".into(),
        };
        let made = self.session_on(&path, &opts, target, None);
        let _ = std::fs::remove_file(&path);
        let (mut session, sig) = made?;
        warmup(&mut session, &sig, 1, &Default::default())?;
        primed.insert(key, session);
        Ok(())
    }

    /// Pays ONNX Runtime's one-time costs (kernel registries, allocators, first-session
    /// set-up: about 20 MB of resident memory) with a tiny built-in graph, so that the memory
    /// measured over the first real model's load is that model's own.
    fn prime(&self) {
        let result = Session::builder(&self.env)
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| self.shared_allocator(b))
            .and_then(|mut b| b.commit_from_memory(PRIME))
            .map_err(|e| e.to_string())
            .and_then(|mut session| {
                let sig = Signature::of(&session)?;
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
    ) -> Result<(Session, Signature), RuntimeError> {
        self.session_on(path, opts, Target::cpu(), None)
    }

    /// Creates one session for `path` on `target` and reads its signature. The device's
    /// execution provider must come up: if it cannot (plugin library missing, no adapter, EP
    /// not in this ONNX Runtime build), the error says so — never a silent CPU session.
    /// `profile`: a file prefix; ORT profiles the session's runs until [`node_placement`].
    pub fn session_on(
        &self,
        path: &Path,
        opts: &SessionOptions,
        target: Target<'_>,
        profile: Option<&Path>,
    ) -> Result<(Session, Signature), RuntimeError> {
        use crate::config::DeviceKind;
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
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
        if let Some(prefix) = profile {
            builder = builder.with_profiling(prefix).map_err(|e| sess_err(&e))?;
        }
        builder = match target.kind {
            DeviceKind::Cpu => builder,
            DeviceKind::WebGpu { library, adapter } => {
                let devices = self.webgpu_devices(library).map_err(|e| sess_err(&e))?;
                let count = devices.len();
                let device = devices.into_iter().nth(*adapter as usize).ok_or_else(|| {
                    sess_err(&format!(
                        "the WebGPU plugin offers {count} adapter(s); device-id {adapter} is not one"
                    ))
                })?;
                let options: Vec<(String, String)> = target
                    .options
                    .iter()
                    .map(|(k, v)| (format!("WebGpuExecutionProvider.{k}"), v.clone()))
                    .collect();
                builder
                    .with_devices([device], Some(&options))
                    .map_err(|e| sess_err(&e))?
            }
            DeviceKind::Cuda { id } => {
                let mut ep = ort::ep::CUDA::default().with_device_id(*id as i32);
                // ORT's default, EXHAUSTIVE, times every cuDNN convolution algorithm whenever
                // a session's input shape changes: 0.5–0.7 s per change for YOLOv8n or the
                // PP-OCR classifier on an H200, against ~0.1 s with the heuristic choice. Batch
                // sizes get a session each (`WorkerSessions`), but a new image size (dynamic
                // height/width) still meets the search in the request path. The heuristic
                // choice bounds that; `cudnn_conv_algo_search = "EXHAUSTIVE"` in the device's
                // options brings the search back (with `warmup-dims` so the warmup meets the
                // shapes that will be served).
                if !target
                    .options
                    .iter()
                    .any(|(k, _)| k == "cudnn_conv_algo_search")
                {
                    ep = ep.with_arbitrary_config("cudnn_conv_algo_search", "HEURISTIC");
                }
                for (k, v) in target.options {
                    ep = ep.with_arbitrary_config(k, v);
                }
                builder
                    .with_execution_providers([ep.build().error_on_failure()])
                    .map_err(|e| sess_err(&format!("CUDA execution provider: {e}")))?
            }
            DeviceKind::TensorRt { id } => {
                let mut ep = ort::ep::TensorRT::default().with_device_id(*id as i32);
                if let Some(dir) = target.cache_dir {
                    let dir = dir.join("tensorrt");
                    let _ = std::fs::create_dir_all(&dir);
                    ep = ep
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display());
                }
                for (k, v) in target.options {
                    ep = ep.with_arbitrary_config(k, v);
                }
                builder
                    .with_execution_providers([ep.build().error_on_failure()])
                    .map_err(|e| sess_err(&format!("TensorRT execution provider: {e}")))?
            }
        };
        let session = builder.commit_from_file(path).map_err(|e| sess_err(&e))?;
        let signature = Signature::of(&session).map_err(|message| RuntimeError::Unsupported {
            path: path.to_path_buf(),
            message,
        })?;
        Ok((session, signature))
    }

    /// The WebGPU plugin's devices (adapters), registering the library with the environment
    /// on first use. Errors name the library and what is missing.
    fn webgpu_devices(&self, library: &Path) -> Result<Vec<ort::device::Device<'_>>, String> {
        {
            let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
            let n = plugins.len();
            let entry = plugins.entry(library.to_path_buf()).or_insert_with(|| {
                if !library.is_file() {
                    return Err(format!(
                        "the WebGPU plugin library {} does not exist (set ep-library on the device, \
                         or install it)",
                        library.display()
                    ));
                }
                let name = format!("rxd-webgpu-{n}");
                self.env
                    .register_ep_library(&name, library)
                    .map(|()| name)
                    .map_err(|e| {
                        format!("cannot load the WebGPU plugin {}: {e}", library.display())
                    })
            });
            entry.clone()?;
        }
        let devices: Vec<_> = self
            .env
            .devices()
            .filter(|d| d.ep().ok() == Some("WebGpuExecutionProvider"))
            .collect();
        if devices.is_empty() {
            return Err(
                "the WebGPU plugin found no adapter (no Vulkan device; a software \
                        adapter such as lavapipe is offered only with \
                        ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1)"
                    .into(),
            );
        }
        Ok(devices)
    }
}

/// One Slice node; made by tests/models/make_models.py (slice_first).
const PRIME: &[u8] = include_bytes!("../../assets/prime.onnx");

/// What a device's execution provider looks like from here.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub adapter: Option<String>,
    pub memory_total: Option<u64>,
    pub memory_used: Option<u64>,
}

impl Runtime {
    /// Whether a device's execution provider can come up, and what the driver reports about
    /// it (adapter name, memory) where it does.
    pub fn probe(&self, kind: &crate::config::DeviceKind) -> Result<Probe, String> {
        use crate::config::DeviceKind;
        match kind {
            DeviceKind::Cpu => Ok(Probe::default()),
            DeviceKind::WebGpu { library, adapter } => {
                let devices = self.webgpu_devices(library)?;
                let d = devices.get(*adapter as usize).ok_or_else(|| {
                    format!(
                        "the WebGPU plugin offers {} adapter(s); device-id {adapter} is not one",
                        devices.len()
                    )
                })?;
                let hw = d.hardware_device();
                Ok(Probe {
                    adapter: Some(format!(
                        "{} {:?} (id {:#06x})",
                        hw.vendor().unwrap_or("unknown vendor"),
                        hw.ty(),
                        hw.id()
                    )),
                    ..Probe::default()
                })
            }
            DeviceKind::Cuda { id } | DeviceKind::TensorRt { id } => {
                let gpu = crate::gpu::nvidia_device(*id).ok_or_else(|| {
                    format!("no NVIDIA GPU {id} (NVML unavailable or no such index)")
                })?;
                Ok(Probe {
                    adapter: gpu.name,
                    memory_total: gpu.memory_total_bytes,
                    memory_used: gpu.memory_used_bytes,
                })
            }
        }
    }
}

/// Ends a session's profiling and reads which execution provider ran each node (ORT's
/// profile has one `Node` event per kernel run, with the provider in its args). The profile
/// file is deleted.
pub fn node_placement(session: &mut Session, device_ep: &str) -> Result<NodePlacement, String> {
    let file = session.end_profiling().map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"));
    let _ = std::fs::remove_file(&file);
    parse_profile(&text?, device_ep)
}

/// Counts distinct nodes per provider in an ORT profile (JSON array of trace events).
pub fn parse_profile(text: &str, device_ep: &str) -> Result<NodePlacement, String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("profile: {e}"))?;
    // Node names are not unique (nor always set); the node index is.
    let mut seen: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for e in &events {
        if e.get("cat").and_then(|c| c.as_str()) != Some("Node") {
            continue;
        }
        let Some(name) = e.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some(node) = name.strip_suffix("_kernel_time") else {
            continue;
        };
        let args = e.get("args");
        let Some(p) = args
            .and_then(|a| a.get("provider"))
            .and_then(|p| p.as_str())
        else {
            continue;
        };
        let index = args
            .and_then(|a| a.get("node_index"))
            .and_then(|i| {
                i.as_str()
                    .map(str::to_string)
                    .or_else(|| Some(i.to_string()))
            })
            .unwrap_or_else(|| node.to_string());
        seen.insert(index, (node.to_string(), p.to_string()));
    }
    let mut out = NodePlacement::default();
    for (_, (node, provider)) in seen {
        *out.nodes.entry(provider.clone()).or_default() += 1;
        if provider == "CPUExecutionProvider"
            && device_ep != "CPUExecutionProvider"
            && out.on_cpu.len() < 64
        {
            out.on_cpu.push(node);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_placement_counts_nodes_by_index_per_provider() {
        let profile = r#"[
            {"cat":"Session","name":"model_run","args":{}},
            {"cat":"Node","name":"Conv_fence_before","args":{"node_index":"0","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"0","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"1","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"Conv_kernel_time","args":{"op_name":"Conv","node_index":"1","provider":"WebGpuExecutionProvider"}},
            {"cat":"Node","name":"/model.22/Shape_kernel_time","args":{"op_name":"Shape","node_index":"7","provider":"CPUExecutionProvider"}}
        ]"#;
        let p = parse_profile(profile, "WebGpuExecutionProvider").unwrap();
        assert_eq!(
            p.nodes["WebGpuExecutionProvider"], 2,
            "two distinct nodes, one run twice"
        );
        assert_eq!(p.nodes["CPUExecutionProvider"], 1);
        assert_eq!(p.on_cpu, vec!["/model.22/Shape".to_string()]);
        let cpu = parse_profile(profile, "CPUExecutionProvider").unwrap();
        assert!(cpu.on_cpu.is_empty(), "on a CPU device nothing fell back");
        assert!(parse_profile("not json", "x").is_err());
    }

    #[test]
    fn batches_pad_to_the_smallest_size_that_holds_them() {
        let sizes = [1, 2, 4, 8, 16, 32];
        let got: Vec<u64> = [1, 2, 3, 5, 8, 9, 17, 32]
            .iter()
            .map(|&r| padded_rows(r, &sizes))
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 8, 16, 32, 32]);
        assert_eq!(padded_rows(40, &sizes), 40, "larger than every size: as is");
        assert_eq!(padded_rows(3, &[]), 3, "no sizes: as is");
        assert_eq!(padded_rows(3, &[16]), 16);
    }
}

/// Size given to dynamic dimensions other than the batch dimension when warming up without
/// configured shapes: large enough for the strides of common conv nets.
pub const WARMUP_AUTO_DIM: u64 = 32;

/// Runs `session` once on zero-filled inputs with `rows` in every dynamic first dimension;
/// `dims` gives full shapes for named inputs (its first dimension is replaced by `rows` when
/// the model's is dynamic); other dynamic dimensions get [`WARMUP_AUTO_DIM`]. This makes ORT
/// allocate its arena for that batch size (and compile kernels on GPU providers) before the
/// first client request. Returns the outputs' shapes, in the signature's output order.
pub fn warmup(
    session: &mut Session,
    sig: &Signature,
    rows: u64,
    dims: &std::collections::HashMap<String, Vec<i64>>,
) -> Result<Vec<Vec<u64>>, RuntimeError> {
    let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = zero_inputs(sig, rows, dims)?
        .into_iter()
        .map(|(name, tensor)| (Cow::Owned(name), tensor.into()))
        .collect();
    let outputs = session.run(values).map_err(|e| run_err(&e))?;
    Ok(sig
        .outputs
        .iter()
        .map(|spec| {
            outputs
                .get(spec.name.as_str())
                .and_then(|v| match v.dtype() {
                    ValueType::Tensor { shape, .. } => {
                        Some(shape.iter().map(|&d| d.max(0) as u64).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        })
        .collect())
}

/// Zero-filled inputs of the warmup's shapes at `rows` rows (see [`warmup`]).
pub fn zero_inputs(
    sig: &Signature,
    rows: u64,
    dims: &std::collections::HashMap<String, Vec<i64>>,
) -> Result<Vec<(String, ort::value::DynTensor)>, RuntimeError> {
    let mut values = Vec::with_capacity(sig.inputs.len());
    for spec in &sig.inputs {
        let shape = warmup_shape(spec, rows, dims.get(&spec.name).map(Vec::as_slice));
        let elements = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let len = spec
            .dtype
            .byte_len(elements)
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let zeros = vec![0u8; len as usize];
        let tensor = raw::tensor_from_bytes(element_type_of(spec.dtype), &shape, &zeros)
            .map_err(|e| run_err(&e))?;
        values.push((spec.name.clone(), tensor));
    }
    Ok(values)
}

/// The shape [`warmup`] gives an input at `rows` rows: `rows` in a dynamic first dimension,
/// `given` (model.toml `warmup-dims`) for other dynamic dimensions where it has a positive
/// size, [`WARMUP_AUTO_DIM`] for the rest.
pub fn warmup_shape(spec: &TensorSpec, rows: u64, given: Option<&[i64]>) -> Vec<u64> {
    spec.dims
        .iter()
        .enumerate()
        .map(|(i, &d)| match (i, d, given.and_then(|g| g.get(i))) {
            (0, d, _) if d < 0 => rows,
            (_, d, _) if d >= 0 => d as u64,
            (_, _, Some(&g)) if g > 0 => g as u64,
            _ => WARMUP_AUTO_DIM,
        })
        .collect()
}

/// Statistics of the session's CPU arena as ORT reports them (name, value).
pub fn arena_stats(session: &Session) -> Result<Vec<(String, i64)>, String> {
    raw::arena_stats(session)
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

/// A model's inputs and outputs, and what requests may send: each input's `max_dims` (set by
/// the registry at load, see `validate::max_dims`) and whether inputs may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Inputs with a zero-sized dimension pass validation (model.toml `allow-empty-inputs`).
    pub allow_empty: bool,
}

impl Signature {
    fn of(session: &Session) -> Result<Signature, String> {
        let spec = |o: &ort::value::Outlet, what: &str| -> Result<TensorSpec, String> {
            match o.dtype() {
                ValueType::Tensor {
                    ty,
                    shape,
                    dimension_symbols,
                } => {
                    let dtype = dtype_of(*ty).ok_or_else(|| {
                        format!(
                            "{what} '{}' has element type {ty:?}, which rxd does not serve",
                            o.name()
                        )
                    })?;
                    let dims: Vec<i64> = shape.iter().copied().collect();
                    let dim_names = (0..dims.len())
                        .map(|i| dimension_symbols.get(i).cloned().unwrap_or_default())
                        .collect();
                    Ok(TensorSpec {
                        name: o.name().to_string(),
                        dtype,
                        dims,
                        dim_names,
                        max_dims: Vec::new(),
                        warmup_dims: Vec::new(),
                    })
                }
                other => Err(format!(
                    "{what} '{}' is a {other:?}; only tensor inputs and outputs are served",
                    o.name()
                )),
            }
        };
        Ok(Signature {
            inputs: session
                .inputs()
                .iter()
                .map(|o| spec(o, "input"))
                .collect::<Result<_, _>>()?,
            outputs: session
                .outputs()
                .iter()
                .map(|o| spec(o, "output"))
                .collect::<Result<_, _>>()?,
            allow_empty: false,
        })
    }
}

/// Maps ORT's element type to the wire dtype (`None` for strings and types rxd does not serve).
pub fn dtype_of(t: TensorElementType) -> Option<DType> {
    use TensorElementType as T;
    Some(match t {
        T::Float32 => DType::Float32,
        T::Uint8 => DType::Uint8,
        T::Int8 => DType::Int8,
        T::Uint16 => DType::Uint16,
        T::Int16 => DType::Int16,
        T::Int32 => DType::Int32,
        T::Int64 => DType::Int64,
        T::Bool => DType::Bool,
        T::Float16 => DType::Float16,
        T::Float64 => DType::Float64,
        T::Uint32 => DType::Uint32,
        T::Uint64 => DType::Uint64,
        T::Complex64 => DType::Complex64,
        T::Complex128 => DType::Complex128,
        T::Bfloat16 => DType::Bfloat16,
        T::Float8E4M3FN => DType::Float8e4m3fn,
        T::Float8E4M3FNUZ => DType::Float8e4m3fnuz,
        T::Float8E5M2 => DType::Float8e5m2,
        T::Float8E5M2FNUZ => DType::Float8e5m2fnuz,
        T::Uint4 => DType::Uint4,
        T::Int4 => DType::Int4,
        T::Float4E2M1 => DType::Float4e2m1,
        _ => return None,
    })
}

/// Maps a wire dtype to ORT's element type.
pub fn element_type_of(d: DType) -> TensorElementType {
    use TensorElementType as T;
    match d {
        DType::Float32 => T::Float32,
        DType::Uint8 => T::Uint8,
        DType::Int8 => T::Int8,
        DType::Uint16 => T::Uint16,
        DType::Int16 => T::Int16,
        DType::Int32 => T::Int32,
        DType::Int64 => T::Int64,
        DType::Bool => T::Bool,
        DType::Float16 => T::Float16,
        DType::Float64 => T::Float64,
        DType::Uint32 => T::Uint32,
        DType::Uint64 => T::Uint64,
        DType::Complex64 => T::Complex64,
        DType::Complex128 => T::Complex128,
        DType::Bfloat16 => T::Bfloat16,
        DType::Float8e4m3fn => T::Float8E4M3FN,
        DType::Float8e4m3fnuz => T::Float8E4M3FNUZ,
        DType::Float8e5m2 => T::Float8E5M2,
        DType::Float8e5m2fnuz => T::Float8E5M2FNUZ,
        DType::Uint4 => T::Uint4,
        DType::Int4 => T::Int4,
        DType::Float4e2m1 => T::Float4E2M1,
        _ => T::Undefined,
    }
}

/// A validated input: its bytes match dtype × shape (checked by `validate`).
#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: InputData,
}

/// Where an input's bytes are.
#[derive(Debug)]
pub enum InputData {
    /// Decoded from the frame.
    Inline(Vec<u8>),
    /// In the client's arena (range and alignment checked). The bytes may change under us at
    /// any time; they are only ever handed to ORT as raw memory, never read as Rust data.
    Shared {
        map: Arc<Mapping>,
        offset: u64,
        len: u64,
    },
}

/// Where one output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    /// Back in the response frame.
    Inline,
    /// At this region of the client's arena.
    Region { offset: u64, len: u64 },
    /// Packed into the request's output area.
    Area,
}

/// Where a job's outputs go: one target per wanted output.
#[derive(Debug, Default)]
pub struct Placement {
    pub arena: Option<Arc<Mapping>>,
    pub targets: Vec<OutputTarget>,
    /// The output area (offset, len), when any target is `Area`.
    pub area: Option<(u64, u64)>,
    /// An output that does not fit its region or the rest of the area goes inline instead of
    /// failing the job (`InferRequest::inline_overflow`).
    pub inline_overflow: bool,
}

/// One output of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: OutputData,
}

/// Where an output's bytes were put.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Inline(Vec<u8>),
    /// Written into the client's arena.
    Arena {
        offset: u64,
        len: u64,
    },
}

/// What happens when a job is done. Called exactly once, on the worker thread that ran the
/// job (or on the submitting thread when the job could not be queued). The connection's
/// implementation encodes the response and writes it to the client straight from the worker,
/// so an answer needs no hop back through the async runtime.
pub trait Completion: Send {
    /// True when nobody waits for the result any more (the client is gone): the job is skipped.
    fn is_abandoned(&self) -> bool {
        false
    }
    fn complete(self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>);
}

/// A unit of work for a model's workers.
pub struct Job {
    pub inputs: Vec<InputTensor>,
    /// Output names to return (non-empty, validated).
    pub outputs: Vec<String>,
    pub placement: Placement,
    pub completion: Box<dyn Completion>,
}

/// Jobs that run together as one batch (concatenated along dimension 0), or one job alone.
pub struct Batch {
    pub jobs: Vec<Job>,
    /// Rows of each job (dimension 0 of its inputs), same order.
    pub rows: Vec<u32>,
    /// When each job arrived (for latency metrics), same order.
    pub arrived: Vec<std::time::Instant>,
    /// When the scheduler took a worker for it (the worker is the scheduler's from then on).
    pub dispatched: std::time::Instant,
}

/// Told when a worker finishes a batch (the scheduler, held weakly by the workers).
pub trait BatchListener: Send + Sync {
    /// `compute`: the worker's time on the batch; `occupied`: from dispatch to now — what the
    /// batch cost the scheduler in worker time, hand-over included.
    fn batch_done(
        &self,
        rows: u32,
        compute: std::time::Duration,
        occupied: std::time::Duration,
        arrived: &[std::time::Instant],
    );
}

/// A worker's gather buffers, one per model input, kept (with their capacity) from batch to
/// batch: a batch's inputs are copied once, into memory that was used before, and the batch
/// tensors are built over it (no fresh allocation, page faults or second copy per batch).
#[derive(Debug, Default)]
pub struct Staging {
    buffers: Vec<Vec<u8>>,
}

impl Staging {
    /// Buffer `k`, emptied (its capacity kept).
    fn take(&mut self, k: usize) -> Vec<u8> {
        if self.buffers.len() <= k {
            self.buffers.resize_with(k + 1, Vec::new);
        }
        let mut b = std::mem::take(&mut self.buffers[k]);
        b.clear();
        b
    }

    /// Gives buffer `k` back for the next batch.
    fn put(&mut self, k: usize, b: Vec<u8>) {
        self.buffers[k] = b;
    }
}

/// The sessions of one worker: `main`, and on GPU devices one more session per padded batch
/// size, each run only at that size. ORT's CUDA EP keeps one set of cuDNN plans per Conv node,
/// for the last input shape: a session that alternates between two batch sizes pays a re-plan
/// on every change — 0.5–0.7 s per run for YOLOv8n and the PP-OCR classifier with ORT's
/// default algorithm search, ~0.1 s with the heuristic one, against 1–3 ms at a fixed shape
/// (measured in-process on an H200: `cargo bench --bench cuda_probe`). A session per size
/// never changes shape.
pub struct WorkerSessions {
    pub main: Session,
    /// Sessions by the batch size (rows) they run; batches of other sizes use `main`.
    pub by_rows: Vec<(u64, Session)>,
    /// When ORT's CPU arena gives memory back.
    pub arena: ArenaRelease,
}

impl From<Session> for WorkerSessions {
    fn from(main: Session) -> Self {
        WorkerSessions {
            main,
            by_rows: Vec::new(),
            arena: ArenaRelease::default(),
        }
    }
}

impl WorkerSessions {
    /// The session for a batch of `rows` rows, the arena policy, and whether it is `main`.
    fn for_rows(&mut self, rows: u64) -> (&mut Session, &mut ArenaRelease, bool) {
        match self.by_rows.iter_mut().find(|(r, _)| *r == rows) {
            Some((_, s)) => (s, &mut self.arena, false),
            None => (&mut self.main, &mut self.arena, true),
        }
    }
}

/// Gives back what ORT's CPU arena grew by for runs larger than the warmup's. ORT's arena keeps
/// every block it ever allocated: one detector request with a 1536×1536 image grew the daemon
/// by ~480 MiB for good, memory the budget never saw (a version is accounted at what it holds
/// after its warmup). After a run whose inputs hold more elements than the largest warmup run,
/// once the worker has been idle for [`ARENA_IDLE`], it runs the batch-1 warmup inputs with
/// ORT's `memory.enable_memory_arena_shrinkage` (the arena frees every block no tensor uses
/// when that run ends) and returns freed heap to the kernel. Waiting for idleness keeps a
/// stream of large requests at full speed (shrinking after each run made the PP-OCR detector
/// at 640×640 ~50 % slower: every run faulted its memory in again, BENCHMARKS.md); runs
/// within the warmup shapes change nothing. Without batch-1 warmup inputs (warmup off, or
/// failed at automatic shapes) the large run itself shrinks the arena when it ends (the block
/// holding its outputs stays until the next such run). `warmup-dims` at the shapes a model
/// serves keeps their memory resident and accounted.
pub struct ArenaRelease {
    /// Input elements of the largest warmup run; larger runs make the arena shrink.
    pub keep_elements: u64,
    options: Option<ort::session::RunOptions>,
    /// Zero inputs of the batch-1 warmup (empty when that warmup did not run or failed).
    tidy: Vec<(String, ort::value::DynTensor)>,
    /// A large run happened since the last shrink: shrink once the worker is idle.
    pending: bool,
    /// Whether the first large run was logged.
    logged: bool,
}

/// How long a worker waits, idle, before giving back what a large run grew its arena by.
pub const ARENA_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for ArenaRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaRelease")
            .field("keep_elements", &self.keep_elements)
            .field("tidy", &!self.tidy.is_empty())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Default for ArenaRelease {
    /// Never shrinks.
    fn default() -> Self {
        ArenaRelease::above(u64::MAX, Vec::new())
    }
}

impl ArenaRelease {
    /// Shrinks after runs of more than `keep_elements` input elements; `tidy` are the zero
    /// inputs of the batch-1 warmup, which the session ran successfully.
    pub fn above(keep_elements: u64, tidy: Vec<(String, ort::value::DynTensor)>) -> ArenaRelease {
        ArenaRelease {
            keep_elements,
            options: None,
            tidy,
            pending: false,
            logged: false,
        }
    }

    /// Run options that shrink the arena (made once).
    fn shrink_options(&mut self) -> Option<&ort::session::RunOptions> {
        if self.options.is_none() {
            let made = ort::session::RunOptions::new().and_then(|mut o| {
                o.set("memory.enable_memory_arena_shrinkage", "cpu:0")
                    .map(|()| o)
            });
            match made {
                Ok(o) => self.options = Some(o),
                Err(e) => tracing::warn!("cannot make run options that shrink the arena: {e}"),
            }
        }
        self.options.as_ref()
    }

    /// Notes a run of `elements` input elements about to start; returns run options when the
    /// run itself must shrink the arena (no batch-1 inputs to do it later).
    fn for_run(&mut self, elements: u64) -> Option<&ort::session::RunOptions> {
        if elements <= self.keep_elements {
            return None;
        }
        if !self.logged {
            self.logged = true;
            tracing::info!(
                thread = std::thread::current().name().unwrap_or(""),
                elements,
                warmup = self.keep_elements,
                "a run larger than the warmup's: ORT's arena is given back after such runs \
                 (warmup-dims at the shapes served keeps their memory resident and accounted)"
            );
        }
        if self.tidy.is_empty() {
            return self.shrink_options();
        }
        self.pending = true;
        None
    }

    /// Whether a large run's growth waits to be given back.
    fn pending(&self) -> bool {
        self.pending
    }

    /// Gives a large run's growth back: a batch-1 run that shrinks the arena (nothing is in
    /// use between runs, so every block a larger run added is freed), then freed heap to the
    /// kernel.
    fn tidy(&mut self, session: &mut Session) {
        self.pending = false;
        if self.shrink_options().is_none() {
            return;
        }
        let Some(options) = &self.options else {
            return;
        };
        let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = self
            .tidy
            .iter()
            .map(|(name, t)| (Cow::Borrowed(name.as_str()), t.into()))
            .collect();
        if let Err(e) = session.run_with_options(values, options) {
            tracing::debug!("the batch-1 run that shrinks the arena failed: {e}");
        }
        release_free_memory();
    }
}

/// Input elements of a set of shapes (saturating).
fn elements_of<'a>(shapes: impl IntoIterator<Item = &'a [u64]>) -> u64 {
    shapes
        .into_iter()
        .map(|s| s.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
        .fold(0u64, u64::saturating_add)
}

/// The worker threads of one model version: one session each, all taking batches from one
/// channel. Dropping the pool closes the channel and joins the threads (after they finish
/// what they hold).
pub struct WorkerPool {
    tx: Option<crossbeam_channel::Sender<Batch>>,
    handles: Vec<JoinHandle<()>>,
    /// Per worker: when its current batch started (ms since [`epoch`] + 1), 0 when idle.
    busy_since: Arc<Vec<std::sync::atomic::AtomicU64>>,
}

/// The process's time origin for worker heartbeats.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl WorkerPool {
    /// Starts one worker thread per session. The channel holds at most one batch per worker:
    /// batches are formed by the scheduler only when a worker is free.
    pub fn start(
        label: &str,
        sessions: Vec<WorkerSessions>,
        pad_to: Vec<u32>,
        listener: std::sync::Weak<dyn BatchListener>,
    ) -> WorkerPool {
        let pad_to: Arc<[u32]> = pad_to.into();
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(sessions.len().max(1));
        let busy_since: Arc<Vec<std::sync::atomic::AtomicU64>> =
            Arc::new(sessions.iter().map(|_| Default::default()).collect());
        // Test hook (documented in ARCHITECTURE.md): RXD_TEST_WEDGE=<label prefix> makes the
        // matching workers hang on their first batch, to test the watchdog.
        let wedge = std::env::var("RXD_TEST_WEDGE")
            .ok()
            .is_some_and(|w| !w.is_empty() && label.starts_with(&w));
        let handles = sessions
            .into_iter()
            .enumerate()
            .map(|(i, session)| {
                let rx = rx.clone();
                let listener = listener.clone();
                let busy = busy_since.clone();
                let pad_to = pad_to.clone();
                std::thread::Builder::new()
                    .name(format!("rxd-w-{label}-{i}"))
                    .spawn(move || worker_loop(session, rx, &pad_to, listener, &busy[i], wedge))
                    .expect("spawn worker thread")
            })
            .collect();
        WorkerPool {
            tx: Some(tx),
            handles,
            busy_since,
        }
    }

    /// Hands a batch to a free worker. Fails (returning the batch) only if the workers are
    /// gone or, against the scheduler's accounting, none is free.
    pub fn send(&self, batch: Batch) -> Result<(), Batch> {
        match &self.tx {
            Some(tx) => tx.try_send(batch).map_err(|e| e.into_inner()),
            None => Err(batch),
        }
    }

    pub fn instances(&self) -> usize {
        self.handles.len()
    }

    /// Workers that have been on their current batch for longer than `limit`.
    pub fn stuck(&self, limit: std::time::Duration) -> usize {
        let now = now_ms();
        let limit = limit.as_millis() as u64;
        self.busy_since
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&since| since != 0 && now.saturating_sub(since) > limit)
            .count()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx = None;
        let me = std::thread::current().id();
        for h in self.handles.drain(..) {
            // The last reference may be dropped by a worker itself (it upgrades its listener
            // after each batch): that thread exits on its own once the channel is closed.
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

fn worker_loop(
    mut sessions: WorkerSessions,
    rx: crossbeam_channel::Receiver<Batch>,
    pad_to: &[u32],
    listener: std::sync::Weak<dyn BatchListener>,
    busy: &std::sync::atomic::AtomicU64,
    wedge: bool,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut staging = Staging::default();
    loop {
        // After a run larger than the warmup's, the arena's growth goes back once idle.
        let next = if sessions.arena.pending() {
            match rx.recv_timeout(ARENA_IDLE) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    sessions.arena.tidy(&mut sessions.main);
                    continue;
                }
                other => other.ok(),
            }
        } else {
            rx.recv().ok()
        };
        let Some(mut batch) = next else {
            break;
        };
        let arrived = std::mem::take(&mut batch.arrived);
        let started = std::time::Instant::now();
        busy.store(now_ms(), Relaxed);
        if wedge {
            tracing::warn!("test hook: this worker hangs now");
            loop {
                std::thread::park();
            }
        }
        let rows: u32 = batch.rows.iter().sum();
        let dispatched = batch.dispatched;
        run_batch(&mut sessions, batch, pad_to, &mut staging);
        busy.store(0, Relaxed);
        if let Some(l) = listener.upgrade() {
            l.batch_done(rows, started.elapsed(), dispatched.elapsed(), &arrived);
        }
    }
}

/// The size a batch of `rows` rows runs at: the smallest of `pad_to` that holds it, or its own
/// size when none does (or `pad_to` is empty).
pub fn padded_rows(rows: u64, pad_to: &[u32]) -> u64 {
    pad_to
        .iter()
        .map(|&b| u64::from(b))
        .find(|&b| b >= rows)
        .unwrap_or(rows)
}

/// Runs a batch and completes every job in it.
fn run_batch(sessions: &mut WorkerSessions, batch: Batch, pad_to: &[u32], staging: &mut Staging) {
    let Batch { jobs, rows, .. } = batch;
    let mut live: Vec<(Job, u32)> = Vec::with_capacity(jobs.len());
    for (j, r) in jobs.into_iter().zip(rows) {
        if !j.completion.is_abandoned() {
            live.push((j, r));
            continue;
        }
        // Nobody waits for it: skip the work, still complete it (bookkeeping).
        j.completion.complete(Err(RuntimeError::Abandoned));
    }
    let total: u64 = live.iter().map(|(_, r)| u64::from(*r)).sum();
    let padded = padded_rows(total, pad_to);
    let (session, arena, is_main) = sessions.for_rows(padded);
    let shrunk = match live.len() {
        0 => false,
        1 if padded == total => {
            let (job, _) = live.into_iter().next().expect("one");
            let elements = elements_of(job.inputs.iter().map(|t| t.shape.as_slice()));
            let shrink = arena.for_run(elements);
            let shrunk = shrink.is_some();
            let result = run_one(session, &job, shrink);
            job.completion.complete(result);
            shrunk
        }
        _ => {
            let (jobs, rows): (Vec<Job>, Vec<u32>) = live.into_iter().unzip();
            let (result, shrunk) = run_many(session, &jobs, &rows, padded, staging, arena);
            match result {
                Ok(results) => {
                    for (job, r) in jobs.into_iter().zip(results) {
                        job.completion.complete(r);
                    }
                }
                Err(e) => {
                    for job in jobs {
                        job.completion
                            .complete(Err(RuntimeError::Run(e.to_string())));
                    }
                }
            }
            shrunk
        }
    };
    // A run that shrank the arena itself: its freed heap goes back now that the answers
    // are out. (Sessions per batch size run one shape each; only `main` meets larger ones.)
    if shrunk && is_main {
        release_free_memory();
    }
}

/// A model output's bytes, wherever they are (ORT's buffer, a cache entry).
pub struct View<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: &'a [u8],
}

fn run_err(e: &dyn std::fmt::Display) -> RuntimeError {
    RuntimeError::Run(e.to_string())
}

/// Runs `values` and borrows the outputs named `names` (all of them must exist).
/// With `shrink` (see [`ArenaRelease`]), ORT's arena frees its unused blocks when the run
/// ends.
fn with_outputs<R>(
    session: &mut Session,
    values: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
    names: &[&str],
    shrink: Option<&ort::session::RunOptions>,
    then: impl FnOnce(&[View<'_>]) -> Result<R, RuntimeError>,
) -> Result<R, RuntimeError> {
    let outputs = match shrink {
        Some(options) => session.run_with_options(values, options),
        None => session.run(values),
    }
    .map_err(|e| run_err(&e))?;
    let mut tensors = Vec::with_capacity(names.len());
    for &name in names {
        let value = outputs
            .get(name)
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' missing")))?;
        let tensor = value
            .view()
            .downcast::<ort::value::DynTensorValueType>()
            .map_err(|e| run_err(&e))?;
        tensors.push((name, tensor));
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let ty = *tensor.data_type();
        let dtype = dtype_of(ty)
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' has type {ty:?}")))?;
        views.push(View {
            name,
            dtype,
            shape: tensor.shape().iter().map(|&d| d.max(0) as u64).collect(),
            bytes: raw::tensor_bytes(tensor).map_err(|e| run_err(&e))?,
        });
    }
    then(&views)
}

/// Runs one job: inputs straight from where they are (zero copy from the arena or from the
/// request's inline bytes).
fn run_one(
    session: &mut Session,
    job: &Job,
    shrink: Option<&ort::session::RunOptions>,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(job.inputs.len());
    for t in &job.inputs {
        let ty = element_type_of(t.dtype);
        let value: SessionInputValue<'_> = match &t.data {
            InputData::Inline(bytes) => {
                raw::tensor_over_bytes(bytes, ty, &t.shape).map_err(|e| run_err(&e))?
            }
            InputData::Shared { map, offset, len } => {
                raw::tensor_over_mapping(map, *offset, *len, ty, &t.shape)
                    .map_err(|e| run_err(&e))?
            }
        };
        values.push((Cow::Borrowed(t.name.as_str()), value));
    }
    let names: Vec<&str> = job.outputs.iter().map(String::as_str).collect();
    with_outputs(session, values, &names, shrink, |views| {
        deliver(views, &job.placement)
    })
}

/// Runs several jobs as one batch: one gather copy of the inputs into batch tensors (padded
/// with zero rows up to `padded` rows), one run, then each job's rows of every output are
/// delivered where that job wants them (the padding rows' outputs are dropped).
fn run_many(
    session: &mut Session,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    staging: &mut Staging,
    arena: &mut ArenaRelease,
) -> (Results, bool) {
    let mut gathered: Vec<(Vec<u8>, Vec<u64>)> = Vec::with_capacity(jobs[0].inputs.len());
    let mut shrunk = false;
    let result = run_gathered(
        session,
        jobs,
        rows,
        padded,
        staging,
        &mut gathered,
        arena,
        &mut shrunk,
    );
    for (k, (b, _)) in gathered.into_iter().enumerate() {
        staging.put(k, b);
    }
    (result, shrunk)
}

/// Each job's outputs, or the batch's error.
type Results = Result<Vec<Result<Vec<OutputTensor>, RuntimeError>>, RuntimeError>;

/// [`run_many`]'s work, gathering into `gathered` (buffers from `staging`, returned by the
/// caller whatever happens); `shrunk` says whether the run shrank ORT's arena.
#[allow(clippy::too_many_arguments)]
fn run_gathered(
    session: &mut Session,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    staging: &mut Staging,
    gathered: &mut Vec<(Vec<u8>, Vec<u64>)>,
    arena: &mut ArenaRelease,
    shrunk: &mut bool,
) -> Results {
    let real: u64 = rows.iter().map(|&r| u64::from(r)).sum();
    let total = padded.max(real);
    let first = &jobs[0];
    for (k, t) in first.inputs.iter().enumerate() {
        gathered.push((staging.take(k), Vec::new()));
        let bytes = &mut gathered[k].0;
        for job in jobs {
            let input = job
                .inputs
                .get(k)
                .filter(|i| {
                    i.name == t.name && i.dtype == t.dtype && i.shape.get(1..) == t.shape.get(1..)
                })
                .ok_or_else(|| RuntimeError::Run("incompatible requests in one batch".into()))?;
            match &input.data {
                InputData::Inline(b) => bytes.extend_from_slice(b),
                InputData::Shared { map, offset, len } => {
                    let start = bytes.len();
                    bytes.resize(start + *len as usize, 0);
                    map.copy_out(*offset, &mut bytes[start..])
                        .map_err(|e| RuntimeError::Run(e.to_string()))?;
                }
            }
        }
        if total > real && real > 0 {
            let row = bytes.len() as u64 / real;
            bytes.resize((row * total) as usize, 0);
        }
        let mut shape = t.shape.clone();
        shape[0] = total;
        gathered[k].1 = shape;
    }
    // The batch tensors are built over the gathered buffers (no second copy).
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(gathered.len());
    for (t, (bytes, shape)) in first.inputs.iter().zip(gathered.iter()) {
        let tensor = raw::tensor_over_bytes(bytes, element_type_of(t.dtype), shape)
            .map_err(|e| run_err(&e))?;
        values.push((Cow::Borrowed(t.name.as_str()), tensor));
    }
    // Every output any job wants, in first-seen order.
    let mut names: Vec<&str> = Vec::new();
    for job in jobs {
        for o in &job.outputs {
            if !names.contains(&o.as_str()) {
                names.push(o);
            }
        }
    }
    let elements = elements_of(gathered.iter().map(|(_, shape)| shape.as_slice()));
    let shrink = arena.for_run(elements);
    *shrunk = shrink.is_some();
    with_outputs(session, values, &names, shrink, |views| {
        for v in views {
            if v.shape.first() != Some(&total)
                || !(v.bytes.len() as u64).is_multiple_of(total.max(1))
            {
                return Err(RuntimeError::Run(format!(
                    "output '{}' has shape {:?}, not {total} rows: the model cannot batch",
                    v.name, v.shape
                )));
            }
        }
        let mut start = 0u64;
        let mut results = Vec::with_capacity(jobs.len());
        for (job, &r) in jobs.iter().zip(rows) {
            let r = u64::from(r);
            let mine: Vec<View<'_>> = job
                .outputs
                .iter()
                .map(|name| {
                    let v = views
                        .iter()
                        .find(|v| v.name == name)
                        .expect("collected above");
                    let row_bytes = v.bytes.len() as u64 / total.max(1);
                    let mut shape = v.shape.clone();
                    shape[0] = r;
                    let (a, b) = (
                        (start * row_bytes) as usize,
                        ((start + r) * row_bytes) as usize,
                    );
                    View {
                        name: v.name,
                        dtype: v.dtype,
                        shape,
                        bytes: &v.bytes[a..b],
                    }
                })
                .collect();
            results.push(deliver(&mine, &job.placement));
            start += r;
        }
        Ok(results)
    })
}

/// Puts outputs where the job wants them: checks every region first (no partial writes),
/// then copies into the arena or into inline buffers.
pub fn deliver(
    views: &[View<'_>],
    placement: &Placement,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    let wanted: Vec<String> = views.iter().map(|v| v.name.to_string()).collect();
    let bytes: Vec<&[u8]> = views.iter().map(|v| v.bytes).collect();
    let offsets = place(placement, &wanted, &bytes)?;
    let mut result = Vec::with_capacity(views.len());
    for (v, offset) in views.iter().zip(offsets) {
        let data = match (offset, &placement.arena) {
            (Some(offset), Some(map)) => {
                map.copy_in(offset, v.bytes)
                    .map_err(|e| RuntimeError::Run(e.to_string()))?;
                OutputData::Arena {
                    offset,
                    len: v.bytes.len() as u64,
                }
            }
            _ => OutputData::Inline(v.bytes.to_vec()),
        };
        result.push(OutputTensor {
            name: v.name.to_string(),
            dtype: v.dtype,
            shape: v.shape.clone(),
            data,
        });
    }
    Ok(result)
}

/// Decides where each output goes (`None` = inline) and checks, before anything is written,
/// that every region is large enough: no partial writes. With `inline_overflow`, an output
/// that does not fit its region, or the area after the outputs placed before it, goes inline.
fn place(
    placement: &Placement,
    wanted: &[String],
    bytes: &[&[u8]],
) -> Result<Vec<Option<u64>>, RuntimeError> {
    let mut offsets = Vec::with_capacity(bytes.len());
    let (area_start, area_len) = placement.area.unwrap_or((0, 0));
    let area_end = area_start.saturating_add(area_len);
    let mut cursor = area_start;
    let overflow = placement.inline_overflow;
    for (i, data) in bytes.iter().enumerate() {
        let n = data.len() as u64;
        match placement
            .targets
            .get(i)
            .copied()
            .unwrap_or(OutputTarget::Inline)
        {
            OutputTarget::Inline => offsets.push(None),
            OutputTarget::Region { len, .. } if n > len && overflow => offsets.push(None),
            OutputTarget::Region { offset, len } => {
                if n > len {
                    return Err(RuntimeError::OutputTooSmall {
                        target: format!("the region for output '{}'", wanted[i]),
                        needed: n,
                        available: len,
                    });
                }
                offsets.push(Some(offset));
            }
            OutputTarget::Area => {
                let start = cursor.next_multiple_of(rxd_protocol::OUTPUT_ALIGN);
                let end = start.saturating_add(n);
                if overflow && end > area_end {
                    offsets.push(None);
                    continue;
                }
                cursor = end;
                offsets.push(Some(start));
            }
        }
    }
    let needed = cursor - area_start;
    if needed > area_len {
        return Err(RuntimeError::OutputTooSmall {
            target: "the output area".into(),
            needed,
            available: area_len,
        });
    }
    Ok(offsets)
}

#[cfg(test)]
mod place_tests {
    use super::*;

    fn placement(
        targets: Vec<OutputTarget>,
        area: Option<(u64, u64)>,
        overflow: bool,
    ) -> Placement {
        Placement {
            arena: None,
            targets,
            area,
            inline_overflow: overflow,
        }
    }

    #[test]
    fn outputs_that_do_not_fit_go_inline_only_when_the_request_allows_it() {
        let wanted = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let (a, b, c) = (vec![0u8; 100], vec![0u8; 300], vec![0u8; 10]);
        let bytes: Vec<&[u8]> = vec![&a, &b, &c];
        let area = vec![OutputTarget::Area; 3];
        // An area of 256 bytes holds `a` (at 0) and, after `b` overflows, `c` (at 128).
        let p = placement(area.clone(), Some((1024, 256)), true);
        assert_eq!(
            place(&p, &wanted, &bytes).unwrap(),
            vec![Some(1024), None, Some(1152)]
        );
        let p = placement(area, Some((1024, 256)), false);
        assert!(matches!(
            place(&p, &wanted, &bytes),
            Err(RuntimeError::OutputTooSmall { needed: 458, .. })
        ));
        let region = vec![
            OutputTarget::Region { offset: 0, len: 50 },
            OutputTarget::Region {
                offset: 64,
                len: 300,
            },
            OutputTarget::Inline,
        ];
        let p = placement(region.clone(), None, true);
        assert_eq!(
            place(&p, &wanted, &bytes).unwrap(),
            vec![None, Some(64), None]
        );
        let p = placement(region, None, false);
        assert!(matches!(
            place(&p, &wanted, &bytes),
            Err(RuntimeError::OutputTooSmall { needed: 100, .. })
        ));
    }
}
