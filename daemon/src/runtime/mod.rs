//! ONNX Runtime: loading the library, creating sessions, and the worker threads that own them.
//!
//! Nothing outside this module calls ORT. Each model instance is one `Session` owned by one
//! worker thread; connection tasks hand work to workers over a bounded channel and get the
//! answer back on a oneshot. Invariant: `ORT_DISABLE_TELEMETRY=1` is in the environment before
//! [`Runtime::init`] loads the library (the binary's `main` sets it first thing).
//! Boundary: this module knows tensors as (dtype, shape, bytes); it knows nothing about
//! connections, the wire format's framing or the repository layout.

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
#[derive(Debug, thiserror::Error)]
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
}

/// How to build a model's sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub intra_op_threads: u32,
    /// Let ORT's intra-op threads spin after work (lower latency, burns CPU while idle-ish).
    pub allow_spinning: bool,
}

impl Runtime {
    /// Loads the ORT library at `library` (never searches: the config resolved the path).
    pub fn init(library: &Path) -> Result<Runtime, RuntimeError> {
        let lib_err = |message: String| RuntimeError::Library {
            path: library.to_path_buf(),
            message,
        };
        let builder = ort::init_from(library).map_err(|e| lib_err(e.to_string()))?;
        let env = builder
            .with_name("rxd")
            .with_telemetry(false)
            .build()
            .map_err(|e| lib_err(e.to_string()))?;
        let version = version_of(library);
        Ok(Runtime {
            env,
            library: library.to_path_buf(),
            version,
        })
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// ONNX Runtime's version, e.g. `1.31.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Creates one session for `path` and reads its signature.
    pub fn session(
        &self,
        path: &Path,
        opts: &SessionOptions,
    ) -> Result<(Session, Signature), RuntimeError> {
        let sess_err = |e: &dyn std::fmt::Display| RuntimeError::Session {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let session = Session::builder(&self.env)
            .and_then(|b| {
                b.with_intra_threads(opts.intra_op_threads as usize)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| {
                b.with_config_entry(
                    "session.intra_op.allow_spinning",
                    if opts.allow_spinning { "1" } else { "0" },
                )
                .map_err(Into::into)
            })
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| sess_err(&e))?;
        let signature = Signature::of(&session).map_err(|message| RuntimeError::Unsupported {
            path: path.to_path_buf(),
            message,
        })?;
        Ok((session, signature))
    }
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

/// A model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
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

/// The worker threads of one model version: one session each, one shared bounded queue.
pub struct WorkerPool {
    tx: Option<crossbeam_channel::Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts one worker thread per session.
    pub fn start(label: &str, sessions: Vec<Session>, queue_capacity: usize) -> WorkerPool {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue_capacity);
        let handles = sessions
            .into_iter()
            .enumerate()
            .map(|(i, session)| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("rxd-w-{label}-{i}"))
                    .spawn(move || worker_loop(session, rx))
                    .expect("spawn worker thread")
            })
            .collect();
        WorkerPool {
            tx: Some(tx),
            handles,
        }
    }

    /// Queues a job without waiting; when it cannot be queued its completion gets the error
    /// at once (`QueueFull` is backpressure, never a silent drop).
    pub fn submit(&self, job: Job) {
        let Some(tx) = &self.tx else {
            return job.completion.complete(Err(RuntimeError::WorkersGone));
        };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(j)) => {
                j.completion.complete(Err(RuntimeError::QueueFull {
                    capacity: tx.capacity().unwrap_or(0),
                }))
            }
            Err(crossbeam_channel::TrySendError::Disconnected(j)) => {
                j.completion.complete(Err(RuntimeError::WorkersGone))
            }
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }

    pub fn instances(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for WorkerPool {
    /// Closes the queue; workers finish what is queued, drop their sessions and exit.
    fn drop(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker_loop(mut session: Session, rx: crossbeam_channel::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        if job.completion.is_abandoned() {
            // Nobody waits for it: skip the work, still complete it (bookkeeping).
            job.completion.complete(Err(RuntimeError::Abandoned));
            continue;
        }
        let result = run_job(&mut session, &job.inputs, &job.outputs, &job.placement);
        job.completion.complete(result);
    }
}

fn run_job(
    session: &mut Session,
    inputs: &[InputTensor],
    wanted: &[String],
    placement: &Placement,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    let run_err = |e: &dyn std::fmt::Display| RuntimeError::Run(e.to_string());
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
    for t in inputs {
        let ty = element_type_of(t.dtype);
        let value: SessionInputValue<'_> = match &t.data {
            InputData::Inline(bytes) => raw::tensor_from_bytes(ty, &t.shape, bytes)
                .map_err(|e| run_err(&e))?
                .into(),
            InputData::Shared { map, offset, len } => {
                raw::tensor_over_mapping(map, *offset, *len, ty, &t.shape)
                    .map_err(|e| run_err(&e))?
            }
        };
        values.push((Cow::Borrowed(t.name.as_str()), value));
    }
    let outputs = session.run(values).map_err(|e| run_err(&e))?;
    let mut views = Vec::with_capacity(wanted.len());
    for name in wanted {
        let value = outputs
            .get(name.as_str())
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' missing")))?;
        let tensor = value
            .view()
            .downcast::<ort::value::DynTensorValueType>()
            .map_err(|e| run_err(&e))?;
        let ty = *tensor.data_type();
        let dtype = dtype_of(ty)
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' has type {ty:?}")))?;
        let shape: Vec<u64> = tensor.shape().iter().map(|&d| d.max(0) as u64).collect();
        views.push((name, dtype, shape, tensor));
    }
    let mut bytes = Vec::with_capacity(views.len());
    for (_, _, _, tensor) in &views {
        bytes.push(raw::tensor_bytes(tensor).map_err(|e| run_err(&e))?);
    }
    let offsets = place(placement, wanted, &bytes)?;
    let mut result = Vec::with_capacity(views.len());
    for (((name, dtype, shape, _), data), offset) in views.iter().zip(&bytes).zip(offsets) {
        let data = match (offset, &placement.arena) {
            (Some(offset), Some(map)) => {
                map.copy_in(offset, data)
                    .map_err(|e| RuntimeError::Run(e.to_string()))?;
                OutputData::Arena {
                    offset,
                    len: data.len() as u64,
                }
            }
            _ => OutputData::Inline(data.to_vec()),
        };
        result.push(OutputTensor {
            name: (*name).clone(),
            dtype: *dtype,
            shape: shape.clone(),
            data,
        });
    }
    Ok(result)
}

/// Decides where each output goes (`None` = inline) and checks, before anything is written,
/// that every region is large enough: no partial writes.
fn place(
    placement: &Placement,
    wanted: &[String],
    bytes: &[&[u8]],
) -> Result<Vec<Option<u64>>, RuntimeError> {
    let mut offsets = Vec::with_capacity(bytes.len());
    let (area_start, area_len) = placement.area.unwrap_or((0, 0));
    let mut cursor = area_start;
    for (i, data) in bytes.iter().enumerate() {
        let n = data.len() as u64;
        match placement
            .targets
            .get(i)
            .copied()
            .unwrap_or(OutputTarget::Inline)
        {
            OutputTarget::Inline => offsets.push(None),
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
                cursor = start.saturating_add(n);
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
