//! The model repository on disk, the model versions loaded from it, and their lifecycle under
//! the devices' memory budgets.
//!
//! Layout: `<repository>/<model>/<version>/model.onnx`, versions are positive integers, plus an
//! optional `<repository>/<model>/model.toml` with per-model settings (including the version
//! policy: which versions are served). The registry owns each version's lifecycle state
//! (available, loading, ready, unloading, evicted, failed) and, for ready versions, the
//! [`LoadedModel`] (signature + worker pool). Admission and eviction decisions come from the
//! pure [`crate::budget`] policy; the registry carries them out and measures what each model
//! really costs (resident-set growth over session creation + warmup, loads serialised so the
//! figure is the model's own).
//! Invariants: a `LoadedModel` lives as long as any request holds it, so unloading or evicting
//! never pulls a model out from under a request; a model with requests queued, running, or
//! between lookup and queueing is never chosen for eviction; concurrent demands for one cold
//! version share one load (a [`LoadSlot`]). Lock order: `models`, then `budget`; `load_lock`
//! is never taken while holding either.
//! Boundary: loading blocks (ORT session creation); async callers go through
//! `spawn_blocking`. The registry never touches sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use rxd_protocol::{DeviceSummary, ErrorCode, ModelInfo, ModelState, ModelSummary, WireError};
use serde::Deserialize;

use crate::budget::{Budget, DeviceSpec, Estimator};
use crate::config::Device;

use crate::coalesce::Coalescer;
use crate::error::RequestError;
use crate::runtime::{Completion, Runtime, SessionOptions, Signature};
use crate::scheduler::Scheduler;
use crate::validate::Checked;

/// `model.toml`: per-model settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelSettings {
    /// Sessions (worker threads) serving the model; default 1.
    pub instances: Option<u32>,
    /// Intra-op threads per instance; default: the daemon's `intra-op-threads`.
    pub intra_op_threads: Option<u32>,
    /// Requests that may wait for a worker before new ones get `busy`.
    pub queue_capacity: Option<u32>,
    /// Let ORT threads spin between runs (lower latency, more idle CPU). Default false.
    pub allow_spinning: Option<bool>,
    /// Largest batch in rows for models with a dynamic first dimension (1 = no batching).
    /// Default 32.
    pub max_batch_rows: Option<u32>,
    /// Batch sizes a batch is padded up to (with zero rows, whose outputs are dropped), e.g.
    /// `[1, 2, 4, 8, 16, 32]`; each is warmed up at load. GPU execution providers pick (and
    /// cuDNN searches for) kernels per input shape, which costs up to seconds the first time
    /// a batch size is seen: padding to a few warmed sizes keeps that out of the request path.
    /// Default on CUDA/TensorRT devices: the powers of two up to max-batch-rows, and
    /// max-batch-rows; elsewhere none (`[]`: batches run at their own size).
    pub batch_sizes: Option<Vec<u32>>,
    /// On GPU devices, one session per batch size in `batch-sizes` (each only ever sees its
    /// own shape: ORT's CUDA EP re-plans every convolution when a session's input shape
    /// changes, ~0.1–0.7 s per change). Costs a session's device memory per size. Default
    /// true; false runs every size on one session.
    pub session_per_batch_size: Option<bool>,
    /// Static batching: how long a request may wait for its batch to fill, in µs. Default 0:
    /// batches form only from requests that arrive while the workers are busy.
    pub max_queue_delay_us: Option<u64>,
    /// Adaptive batching: the latency (queue + compute) to keep, in ms. When set, batch size
    /// and wait follow the measured compute time and arrival rate.
    pub latency_target_ms: Option<f64>,
    /// Priority of requests that do not give one (0–255). Default 0.
    pub default_priority: Option<u8>,
    /// A waiting request gains one priority level per this many ms (no starvation). Default 100.
    pub priority_aging_ms: Option<u64>,
    /// Identical requests in flight at once run once and share the answer, for requests with
    /// at most this many input bytes (hashing costs ~1 ms per MB, and arena inputs are copied
    /// before hashing). Default 16 KiB; 0 = off.
    pub coalesce_max_bytes: Option<crate::config::ByteSize>,
    /// Result cache (LRU) size; 0 = off (default). Answers repeats without running.
    pub cache_bytes: Option<crate::config::ByteSize>,
    /// Which versions on disk are served: `"latest"` (default), `{ latest = N }`, `"all"`,
    /// `{ specific = [1, 3] }`.
    pub version_policy: Option<VersionPolicy>,
    /// Served versions stay resident once loaded: never evicted.
    pub pinned: Option<bool>,
    /// Devices to place it on, in order of preference (default: the one with most free budget).
    pub devices: Option<Vec<String>>,
    /// Run the model on zero inputs (at batch 1 and at max-batch-rows) before it is ready, so
    /// that the first request does not pay for allocation and the measured footprint includes
    /// the arena of the largest batch. Default true.
    pub warmup: Option<bool>,
    /// Shapes for warmup inputs whose dimensions are dynamic (other than the batch dimension),
    /// e.g. `{ x = [1, 3, 48, 320] }`. Without it such dimensions get 32 and a failing warmup
    /// is only logged; with it a failing warmup fails the load.
    pub warmup_dims: Option<HashMap<String, Vec<i64>>>,
    /// When its device's execution provider cannot be created, run on the CPU instead
    /// (health: degraded) rather than failing. Default: the device's `cpu-fallback`.
    pub cpu_fallback: Option<bool>,
    /// The largest size each input dimension may have in a request, by input name, e.g.
    /// `{ x = [8, 3, 1280, 1280] }` (0 or -1: the default for that dimension). Default for a
    /// dynamic dimension: 8 × its largest warmup size, at least 2048 (`validate::max_dims`).
    /// Larger requests are refused with `tensor_too_large` before they reach ONNX Runtime.
    pub max_dims: Option<HashMap<String, Vec<i64>>>,
    /// Let inputs with a zero-sized dimension through validation. Default false: ONNX
    /// Runtime's kernels abort the whole process on some (Silero VAD's LSTM on a zero batch).
    pub allow_empty_inputs: Option<bool>,
    /// Seconds a load (session creation, compression, warmup) may take before it fails with
    /// `load_failed`; default: the daemon's `load-timeout-secs`.
    pub load_timeout_secs: Option<u64>,
    /// Serve a compressed form of the model (`int8-weights`, `dynamic-int8`, `fp16`,
    /// `prune:S`, joined with `+`): compressed when loaded (cached in the cache directory),
    /// checked against the original on random inputs, used only if it agrees (cosine and
    /// top-1 ≥ 0.99); otherwise the original serves and the summary says why.
    pub compress: Option<String>,
}

impl ModelSettings {
    /// `self` with every key that `over` sets replaced (run-time changes over model.toml).
    pub fn merged(&self, over: &ModelSettings) -> ModelSettings {
        macro_rules! pick {
            ($($f:ident),*) => {
                ModelSettings { $($f: over.$f.clone().or_else(|| self.$f.clone()),)* }
            };
        }
        pick!(
            instances,
            intra_op_threads,
            queue_capacity,
            allow_spinning,
            max_batch_rows,
            batch_sizes,
            session_per_batch_size,
            max_queue_delay_us,
            latency_target_ms,
            default_priority,
            priority_aging_ms,
            coalesce_max_bytes,
            cache_bytes,
            version_policy,
            pinned,
            devices,
            warmup,
            warmup_dims,
            cpu_fallback,
            compress,
            max_dims,
            allow_empty_inputs,
            load_timeout_secs
        )
    }
}

/// Default `coalesce-max-bytes`: small requests, where identical ones are common and hashing
/// is cheap.
pub const DEFAULT_COALESCE_MAX: u64 = 16 << 10;

/// Which versions of a model are served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum VersionPolicy {
    /// `"latest"` or `"all"`.
    Named(String),
    Latest {
        latest: u32,
    },
    Specific {
        specific: Vec<u64>,
    },
}

impl VersionPolicy {
    /// The served versions among `on_disk`.
    pub fn select(&self, on_disk: &BTreeSet<u64>) -> BTreeSet<u64> {
        match self {
            VersionPolicy::Named(n) if n == "all" => on_disk.clone(),
            VersionPolicy::Named(_) => on_disk.iter().next_back().copied().into_iter().collect(),
            VersionPolicy::Latest { latest } => on_disk
                .iter()
                .rev()
                .take(*latest as usize)
                .copied()
                .collect(),
            VersionPolicy::Specific { specific } => specific
                .iter()
                .filter(|v| on_disk.contains(v))
                .copied()
                .collect(),
        }
    }
}

impl ModelSettings {
    /// The scheduler settings these give, with the daemon's queue capacity as default.
    pub fn scheduler(&self, default_queue: u32) -> crate::scheduler::policy::Settings {
        let d = crate::scheduler::policy::Settings::default();
        crate::scheduler::policy::Settings {
            max_batch_rows: self.max_batch_rows.unwrap_or(d.max_batch_rows).max(1),
            max_queue_delay: self
                .max_queue_delay_us
                .map_or(d.max_queue_delay, std::time::Duration::from_micros),
            latency_target: self
                .latency_target_ms
                .filter(|&t| t > 0.0)
                .map(|t| std::time::Duration::from_secs_f64(t / 1000.0)),
            queue_capacity: self.queue_capacity.unwrap_or(default_queue) as usize,
            aging: self
                .priority_aging_ms
                .map_or(d.aging, std::time::Duration::from_millis),
            batchable: true,
        }
    }
}

impl ModelSettings {
    fn read(model_dir: &Path) -> Result<ModelSettings, String> {
        let path = model_dir.join("model.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let s: ModelSettings =
                    toml::from_str(&text).map_err(|e| format!("model.toml: {e}"))?;
                if s.instances.is_some_and(|n| !(1..=64).contains(&n)) {
                    return Err("model.toml: instances must be 1..=64".into());
                }
                if s.queue_capacity == Some(0) {
                    return Err("model.toml: queue-capacity must be at least 1".into());
                }
                if s.load_timeout_secs == Some(0) {
                    return Err("model.toml: load-timeout-secs must be at least 1".into());
                }
                match &s.version_policy {
                    Some(VersionPolicy::Named(n)) if n != "latest" && n != "all" => {
                        return Err(format!(
                            "model.toml: version-policy '{n}' is not \"latest\", \"all\", \
                             {{ latest = N }} or {{ specific = [..] }}"
                        ));
                    }
                    Some(VersionPolicy::Latest { latest: 0 }) => {
                        return Err("model.toml: version-policy latest must be at least 1".into());
                    }
                    _ => {}
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelSettings::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// Daemon-wide defaults the registry applies.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub intra_op_threads: u32,
    pub queue_capacity: u32,
    /// Devices, the default one first.
    pub devices: Vec<Device>,
    /// Load a non-resident model when a request names it.
    pub load_on_demand: bool,
    /// Where engine caches go.
    pub cache_dir: PathBuf,
    /// How long a load may take (model.toml `load-timeout-secs` overrides it per model).
    pub load_timeout: std::time::Duration,
}

/// The batch sizes a model's batches are padded up to: the configured list (sorted, without
/// sizes above max-batch-rows or zero), or by default on an NVIDIA device (CUDA, TensorRT) the
/// powers of two up to max-batch-rows and max-batch-rows itself; none for a model that cannot
/// batch.
pub fn batch_sizes(
    configured: Option<&[u32]>,
    batchable: bool,
    max_batch_rows: u32,
    on_gpu: bool,
) -> Vec<u32> {
    if !batchable || max_batch_rows <= 1 {
        return Vec::new();
    }
    let mut sizes: Vec<u32> = match configured {
        Some(list) => list
            .iter()
            .copied()
            .filter(|&b| (1..=max_batch_rows).contains(&b))
            .collect(),
        None if on_gpu => (0..u32::BITS)
            .map(|k| 1u32 << k)
            .take_while(|&b| b < max_batch_rows)
            .chain([max_batch_rows])
            .collect(),
        None => Vec::new(),
    };
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// A model version that is ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub signature: Signature,
    /// The device it runs on (the CPU device when it fell back).
    pub device: String,
    /// The execution provider its sessions were created for.
    pub ep: &'static str,
    /// Why it runs on the CPU instead of its device, when it fell back.
    pub fallback: Option<String>,
    /// Which execution provider ran each node (from the profiled warmup).
    pub placement: Option<crate::runtime::NodePlacement>,
    scheduler: Arc<Scheduler>,
    pub coalescer: Arc<Coalescer>,
    /// Milliseconds since the registry's epoch when a request last used it (LRU order).
    last_used: AtomicU64,
    epoch: Instant,
    /// ORT's CPU arena after warmup (`TotalAllocated` summed over instances), if reported.
    pub arena_bytes: Option<u64>,
    /// Kept for the daemon's life, shared with every load of this version.
    pub metrics: Arc<crate::metrics::ModelMetrics>,
    /// What a model.toml `compress` strategy did (served compressed, or why not).
    pub compression: Option<String>,
}

impl LoadedModel {
    /// Queues a checked request; `completion` receives the outputs or the error (a full
    /// queue, a passed deadline) exactly once.
    pub fn submit(
        self: &Arc<Self>,
        checked: Checked,
        completion: Box<dyn Completion>,
        terms: crate::scheduler::Terms,
    ) {
        self.last_used
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.coalescer.submit(
            &self.name,
            self.version,
            &self.scheduler,
            checked,
            completion,
            terms,
            self.clone(),
        );
    }

    pub fn instances(&self) -> usize {
        self.scheduler.instances()
    }

    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Whether requests are batched (every input and output has a dynamic first dimension).
    pub fn batchable(&self) -> bool {
        batchable(&self.signature)
    }

    fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

impl Drop for LoadedModel {
    /// Unloading never drops a request: everything queued runs first.
    fn drop(&mut self) {
        self.scheduler.drain();
    }
}

/// Errors of a load that [`Registry::fail`] has already logged.
fn logged_by_fail(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::LoadFailed { .. } | RequestError::OverBudget { .. }
    )
}

/// A model can batch when every input and output has rank ≥ 1 and a dynamic first dimension.
pub fn batchable(sig: &Signature) -> bool {
    sig.inputs
        .iter()
        .chain(&sig.outputs)
        .all(|t| t.dims.first() == Some(&-1))
        && !sig.inputs.is_empty()
}

/// One load in progress: every request that needs the version waits on it, so concurrent
/// demands for a cold model trigger one load.
#[derive(Default)]
pub struct LoadSlot {
    done: Mutex<Option<Result<(), WireError>>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
    /// The model the load made, held as long as anyone holds the slot: while its waiters
    /// have not queued their requests yet, the model counts as busy (see `Version::busy`),
    /// so the next load cannot evict it from under them.
    made: Mutex<Option<Arc<LoadedModel>>>,
}

impl LoadSlot {
    fn hold(&self, model: Arc<LoadedModel>) {
        *self.made.lock().unwrap_or_else(|e| e.into_inner()) = Some(model);
    }

    fn finish(&self, result: Result<(), WireError>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    fn result(&self) -> Option<Result<(), WireError>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (blocking) until the load is over.
    pub fn wait_blocking(&self) -> Result<(), WireError> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = done.clone() {
                return r;
            }
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits (async) until the load is over.
    pub async fn wait(&self) -> Result<(), WireError> {
        loop {
            // Registered before the check, so a finish in between still wakes us.
            let notified = self.notify.notified();
            if let Some(r) = self.result() {
                return r;
            }
            notified.await;
        }
    }
}

/// What a lookup found.
pub enum Demand {
    Ready(Arc<LoadedModel>),
    /// Not resident: wait for `slot`; when `start` is given, the caller runs that load
    /// (blocking, off the async threads) with [`Registry::finish`].
    Cold {
        slot: Arc<LoadSlot>,
        start: Option<Box<Ticket>>,
    },
}

/// The right to carry out one load that [`Registry::begin`] started.
pub struct Ticket {
    name: String,
    version: u64,
    path: PathBuf,
    settings: ModelSettings,
    slot: Arc<LoadSlot>,
    file_bytes: u64,
    /// Preloads never evict anything.
    no_evict: bool,
    served: bool,
    was: ModelState,
}

impl Drop for Ticket {
    /// A ticket dropped without [`Registry::finish`] (a panicked or cancelled load thread)
    /// must not leave waiters hanging.
    fn drop(&mut self) {
        if self.slot.result().is_none() {
            self.slot.finish(Err(WireError::new(
                ErrorCode::Internal,
                "the load was abandoned",
            )));
        }
    }
}

/// What `begin` decided.
pub enum Begin {
    Ready(Arc<LoadedModel>),
    Wait(Arc<LoadSlot>),
    Start(Box<Ticket>),
}

/// A model found on disk: its settings (or why they are bad) and its version files.
type Found = (Result<ModelSettings, String>, BTreeMap<u64, PathBuf>);

type Key = (String, u64);

struct Version {
    /// Still in the repository at the last scan.
    on_disk: bool,
    path: PathBuf,
    state: ModelState,
    error: Option<String>,
    loaded: Option<Arc<LoadedModel>>,
    slot: Option<Arc<LoadSlot>>,
    pinned: bool,
    estimated: Option<u64>,
    measured: Option<u64>,
    load_ms: Option<u64>,
    /// ORT's CPU arena after warmup (`TotalAllocated`, all instances).
    arena: Option<u64>,
    /// The last measured footprint, kept across evictions: the next load's estimate.
    known: Option<u64>,
    /// Settings changed at run time (`configure`), over model.toml; kept across reloads of
    /// this version.
    overrides: ModelSettings,
    loads: u64,
    evictions: u64,
    /// The last load measured more than its whole device. One such measurement can be other
    /// threads' memory counted in (a footprint is the resident set's growth while serving
    /// goes on): only a second in a row marks the version failed.
    over_measured: bool,
    /// For a failed version: its files as they were when it failed. A rescan that finds them
    /// changed (put back, replaced, model.toml edited) makes it available again.
    failed_files: Option<FileStamp>,
}

/// What identifies a version's files: model.onnx (symlinks followed) and model.toml, each by
/// device, inode, size and modification time; `None` parts are missing files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    model: Option<(u64, u64, u64, i64, i64)>,
    settings: Option<(u64, u64, u64, i64, i64)>,
}

impl FileStamp {
    fn of(model: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        };
        let toml = model
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("model.toml"));
        FileStamp {
            model: stamp(model),
            settings: toml.as_deref().and_then(stamp),
        }
    }
}

impl Version {
    fn new(path: PathBuf) -> Version {
        Version {
            on_disk: true,
            path,
            state: ModelState::Available,
            error: None,
            loaded: None,
            slot: None,
            pinned: false,
            estimated: None,
            measured: None,
            load_ms: None,
            arena: None,
            known: None,
            overrides: ModelSettings::default(),
            loads: 0,
            evictions: 0,
            failed_files: None,
            over_measured: false,
        }
    }

    /// Requests are queued, running, or hold the model between lookup and queueing.
    fn busy(&self) -> bool {
        self.loaded
            .as_ref()
            .is_some_and(|l| Arc::strong_count(l) > 1 || l.scheduler.busy())
    }
}

struct Model {
    settings: Result<ModelSettings, String>,
    versions: BTreeMap<u64, Version>,
}

impl Model {
    /// Versions the policy serves, among those on disk.
    fn served(&self) -> BTreeSet<u64> {
        let on_disk: BTreeSet<u64> = self
            .versions
            .iter()
            .filter(|(_, v)| v.on_disk)
            .map(|(&k, _)| k)
            .collect();
        let policy = self
            .settings
            .as_ref()
            .ok()
            .and_then(|s| s.version_policy.clone())
            .unwrap_or(VersionPolicy::Named("latest".into()));
        policy.select(&on_disk)
    }

    /// `version`, or the default one when none is named.
    fn resolve(&self, name: &str, version: Option<u64>) -> Result<u64, RequestError> {
        match version {
            Some(v) => Ok(v),
            None => self
                .default_version()
                .ok_or_else(|| RequestError::UnknownModel(name.into())),
        }
    }

    /// The version a request without one gets: the highest served version; while that one is
    /// loading (a reload), the highest ready version keeps serving.
    fn default_version(&self) -> Option<u64> {
        let want = self
            .served()
            .last()
            .copied()
            .or_else(|| self.versions.keys().next_back().copied())?;
        if self.versions[&want].state == ModelState::Ready {
            return Some(want);
        }
        let ready = self
            .versions
            .iter()
            .rev()
            .find(|(_, v)| v.state == ModelState::Ready)
            .map(|(&k, _)| k);
        match ready {
            Some(r) if self.versions[&want].state == ModelState::Loading => Some(r),
            _ => Some(want),
        }
    }
}

struct BudgetState {
    budget: Budget<Key>,
    estimator: Estimator,
    /// The last CPU footprint measured for a model file (by its real path): another version
    /// or model name linking the same file costs the same.
    files: HashMap<PathBuf, u64>,
}

/// The repository and the loaded models.
pub struct Registry {
    root: PathBuf,
    runtime: Arc<Runtime>,
    defaults: Defaults,
    models: RwLock<BTreeMap<String, Model>>,
    budget: Mutex<BudgetState>,
    /// Serialises session creation and model teardown, so that the resident-set growth
    /// measured over a load is that model's own.
    load_lock: Mutex<()>,
    epoch: Instant,
    /// Per-version metrics, kept for the daemon's life.
    metrics: Mutex<BTreeMap<Key, Arc<crate::metrics::ModelMetrics>>>,
    /// `load-on-demand`, changeable by a config reload.
    on_demand: std::sync::atomic::AtomicBool,
}

impl Registry {
    pub fn new(root: PathBuf, runtime: Arc<Runtime>, defaults: Defaults) -> Registry {
        let specs = defaults
            .devices
            .iter()
            .map(|d| DeviceSpec {
                name: d.name.clone(),
                budget: d.budget.unwrap_or(u64::MAX),
                tier: u8::from(d.kind == crate::config::DeviceKind::Cpu),
            })
            .collect();
        Registry {
            root,
            runtime,
            models: RwLock::new(BTreeMap::new()),
            budget: Mutex::new(BudgetState {
                budget: Budget::new(specs),
                estimator: Estimator::default(),
                files: HashMap::new(),
            }),
            load_lock: Mutex::new(()),
            epoch: Instant::now(),
            metrics: Mutex::new(BTreeMap::new()),
            on_demand: std::sync::atomic::AtomicBool::new(defaults.load_on_demand),
            defaults,
        }
    }

    /// Whether a request for a non-resident version loads it.
    pub fn load_on_demand(&self) -> bool {
        self.on_demand.load(Ordering::Relaxed)
    }

    pub fn set_load_on_demand(&self, on: bool) {
        self.on_demand.store(on, Ordering::Relaxed);
    }

    /// A device's budget in force.
    pub fn device_budget(&self, name: &str) -> Option<u64> {
        let b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let i = b.budget.device_index(name)?;
        Some(b.budget.devices()[i].budget)
    }

    /// Changes a device's memory budget (config reload): least-recently-used idle models are
    /// evicted to fit under a smaller one; if pinned or busy models hold more than it, the
    /// budget stays as it was and the error says what holds the device.
    pub fn set_device_budget(&self, name: &str, budget: Option<u64>) -> Result<(), String> {
        let mut models = self.write();
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let d = b
            .budget
            .device_index(name)
            .ok_or_else(|| format!("no device '{name}'"))?;
        let busy = self.sync_usage(&models, &mut b);
        let victims = b
            .budget
            .set_budget(d, budget.unwrap_or(u64::MAX), &|k| busy.contains(k))
            .map_err(|over| {
                format!(
                    "device '{name}' keeps its budget: a budget of {} cannot hold what is pinned \
                     or busy there ({})",
                    mib(budget.unwrap_or(u64::MAX)),
                    describe(&over)
                )
            })?;
        drop(b);
        let dropped = self.take_victims(&mut models, &victims);
        drop(models);
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        release(dropped);
        Ok(())
    }

    /// The metrics of a version (created on first use).
    pub fn model_metrics(&self, name: &str, version: u64) -> Arc<crate::metrics::ModelMetrics> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), version))
            .or_default()
            .clone()
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reads the repository: new models and versions are added as `available`, settings are
    /// re-read. Versions that vanished from disk and are not loaded are forgotten.
    pub fn scan(&self) -> std::io::Result<()> {
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let dir = entry.path();
            let mut versions = BTreeMap::new();
            for v in std::fs::read_dir(&dir)? {
                let v = v?;
                let Some(num) = v
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|&n| n >= 1)
                else {
                    continue;
                };
                let file = v.path().join("model.onnx");
                if file.is_file() {
                    versions.insert(num, file);
                }
            }
            if versions.is_empty() {
                tracing::warn!(model = %name, "no <version>/model.onnx in {}", dir.display());
                continue;
            }
            found.insert(name, (ModelSettings::read(&dir), versions));
        }
        let mut models = self.write();
        for (name, m) in models.iter_mut() {
            if !found.contains_key(name) {
                for v in m.versions.values_mut() {
                    v.on_disk = false;
                }
            }
        }
        models.retain(|name, m| {
            m.versions.retain(|v, ver| {
                ver.loaded.is_some()
                    || ver.state == ModelState::Loading
                    || found.get(name).is_some_and(|f| f.1.contains_key(v))
            });
            !m.versions.is_empty() || found.contains_key(name)
        });
        for (name, (settings, versions)) in found {
            let model = models.entry(name.clone()).or_insert_with(|| Model {
                settings: Ok(ModelSettings::default()),
                versions: BTreeMap::new(),
            });
            model.settings = settings;
            for v in model.versions.values_mut() {
                v.on_disk = false;
            }
            for (num, path) in versions {
                let ver = model
                    .versions
                    .entry(num)
                    .or_insert_with(|| Version::new(path));
                ver.on_disk = true;
                // A version that failed is not retried on every request, but its files coming
                // back or changing (a model removed and put back, fixed, or its model.toml
                // edited) makes it available again.
                if ver.state == ModelState::Failed
                    && ver.failed_files.as_ref() != Some(&FileStamp::of(&ver.path))
                {
                    tracing::info!(model = %name, version = num, "its files changed: available again");
                    ver.state = ModelState::Available;
                    ver.error = None;
                    ver.failed_files = None;
                }
            }
        }
        Ok(())
    }

    /// Scans and loads the preload list (`*`, `model`, `model:version`; blocking). Preloads
    /// never evict each other: one that does not fit stays available (loaded on demand).
    /// Failures are recorded in the version's state; the others still load.
    pub fn preload(&self, list: &[String]) -> std::io::Result<()> {
        self.scan()?;
        let mut targets: Vec<(String, u64)> = Vec::new();
        {
            let models = self.read();
            for item in list {
                let (name, version) = match item.split_once(':') {
                    Some((n, v)) => (n, v.parse::<u64>().ok()),
                    None => (item.as_str(), None),
                };
                for (n, m) in models.iter().filter(|(n, _)| name == "*" || *n == name) {
                    match version {
                        Some(v) => targets.push((n.clone(), v)),
                        None => targets.extend(m.served().into_iter().map(|v| (n.clone(), v))),
                    }
                }
                if name != "*" && !models.contains_key(name) {
                    tracing::warn!(model = %name, "preload: no such model in the repository");
                }
            }
        }
        let mut seen = HashSet::new();
        targets.retain(|t| seen.insert(t.clone()));
        for (name, version) in targets {
            if let Err(e) = self.load_with(&name, Some(version), true)
                && !logged_by_fail(&e)
            {
                tracing::error!(model = %name, version, "{e}");
            }
        }
        Ok(())
    }

    /// Re-reads the repository (SIGHUP, `rxctl reload`). For every model with a version
    /// resident (or loading), the served versions are loaded, and only once the default one is
    /// ready are the versions no longer served unloaded (they finish what they hold); models
    /// gone from disk are unloaded. Models never loaded stay available. Blocking.
    pub fn reload(&self) -> std::io::Result<Vec<ModelSummary>> {
        self.scan()?;
        let plan: Vec<(String, BTreeSet<u64>, bool)> = self
            .read()
            .iter()
            .map(|(n, m)| {
                let resident = m
                    .versions
                    .values()
                    .any(|v| v.loaded.is_some() || v.state == ModelState::Loading);
                (n.clone(), m.served(), resident)
            })
            .collect();
        for (name, served, resident) in plan {
            if served.is_empty() {
                let _ = self.unload(&name, None);
                continue;
            }
            if !resident {
                continue;
            }
            let mut ok = true;
            for &v in served.iter().rev() {
                if let Err(e) = self.load(&name, Some(v)) {
                    if !logged_by_fail(&e) {
                        tracing::error!(model = %name, version = v, "reload: {e}");
                    }
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            let stale: Vec<u64> = self.read()[&name]
                .versions
                .iter()
                .filter(|(k, ver)| !served.contains(k) && ver.loaded.is_some())
                .map(|(&k, _)| k)
                .collect();
            for old in stale {
                let _ = self.unload(&name, Some(old));
            }
        }
        // Forget what is neither on disk nor loaded.
        self.write().retain(|_, m| {
            m.versions
                .retain(|_, v| v.on_disk || v.loaded.is_some() || v.state == ModelState::Loading);
            !m.versions.is_empty()
        });
        Ok(self.list())
    }

    /// Loads a version (default: the model's default version), evicting least-recently-used
    /// idle models if its device's budget needs room; waits for a load already in progress.
    /// Blocking.
    pub fn load(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        self.load_with(name, version, false)
    }

    fn load_with(
        &self,
        name: &str,
        version: Option<u64>,
        no_evict: bool,
    ) -> Result<ModelSummary, RequestError> {
        let loaded = match self.begin(name, version, no_evict)? {
            Begin::Ready(l) => l,
            Begin::Start(ticket) => return self.finish(ticket),
            Begin::Wait(slot) => {
                slot.wait_blocking()?;
                self.get(name, version)?
            }
        };
        self.summary_of(name, loaded.version)
    }

    /// Starts loading a version unless it is ready or already loading.
    pub fn begin(
        &self,
        name: &str,
        version: Option<u64>,
        no_evict: bool,
    ) -> Result<Begin, RequestError> {
        self.begin_gated(name, version, no_evict, &|| Ok(()))
    }

    /// [`Registry::begin`], asking `may_load` before a load would start.
    fn begin_gated(
        &self,
        name: &str,
        version: Option<u64>,
        no_evict: bool,
        may_load: &dyn Fn() -> Result<(), RequestError>,
    ) -> Result<Begin, RequestError> {
        let mut models = self.write();
        let model = models
            .get_mut(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
        let version = model.resolve(name, version)?;
        let served = model.served().contains(&version);
        let settings = model.settings.clone();
        let ver = model
            .versions
            .get_mut(&version)
            .ok_or_else(|| RequestError::UnknownVersion {
                model: name.into(),
                version,
            })?;
        match ver.state {
            ModelState::Ready => {
                return Ok(Begin::Ready(ver.loaded.clone().expect("ready has a model")));
            }
            ModelState::Loading => {
                let slot = ver.slot.clone().expect("loading has a slot");
                // A finished load leaves `Loading` before it tells its slot; a slot told while
                // the state is still `Loading` is a ticket dropped unfinished (its thread
                // panicked): start again rather than answer every request with its error.
                if slot.result().is_none() {
                    return Ok(Begin::Wait(slot));
                }
                ver.state = ModelState::Available;
                ver.slot = None;
            }
            ModelState::Unloading => {
                return Err(RequestError::NotReady {
                    model: name.into(),
                    version,
                    state: ver.state.name(),
                    detail: None,
                });
            }
            _ => {}
        }
        // A version whose file is gone (removed since the last scan, or by a reload under
        // way) is not loaded: that would only mark it failed, and keep it so once the file is
        // back. The next rescan forgets it or finds it again.
        if !ver.path.is_file() {
            ver.on_disk = false;
            return Err(RequestError::UnknownVersion {
                model: name.into(),
                version,
            });
        }
        let settings = match settings {
            Ok(s) => Ok(s.merged(&ver.overrides)),
            Err(e) => Err(e),
        };
        let settings = match settings {
            Ok(s) => s,
            Err(message) => {
                ver.state = ModelState::Failed;
                ver.error = Some(message.clone());
                ver.failed_files = Some(FileStamp::of(&ver.path));
                return Err(RequestError::LoadFailed {
                    model: name.into(),
                    version,
                    message,
                });
            }
        };
        may_load()?;
        let file_bytes = model_bytes(&ver.path);
        let slot = Arc::new(LoadSlot::default());
        let was = ver.state;
        ver.state = ModelState::Loading;
        ver.error = None;
        ver.slot = Some(slot.clone());
        Ok(Begin::Start(Box::new(Ticket {
            name: name.into(),
            version,
            path: ver.path.clone(),
            settings,
            slot,
            file_bytes,
            no_evict,
            served,
            was,
        })))
    }

    /// For an inference: the ready version, or the load to wait for (started if needed and
    /// loading on demand is on).
    pub fn demand(&self, name: &str, version: Option<u64>) -> Result<Demand, RequestError> {
        self.demand_gated(name, version, &|| Ok(()))
    }

    /// [`Registry::demand`], where `may_load` decides whether this request may start a load
    /// (it is asked only when one would start: not for a model ready or already loading).
    pub fn demand_gated(
        &self,
        name: &str,
        version: Option<u64>,
        may_load: &dyn Fn() -> Result<(), RequestError>,
    ) -> Result<Demand, RequestError> {
        match self.get(name, version) {
            Ok(l) => return Ok(Demand::Ready(l)),
            // A broken model is not retried on every request; `rxctl load` retries it.
            Err(
                e @ RequestError::NotReady {
                    state: "failed", ..
                },
            ) => return Err(e),
            Err(e @ RequestError::NotReady { .. }) if !self.load_on_demand() => {
                return Err(e);
            }
            Err(RequestError::NotReady { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(v) = version {
            let models = self.read();
            if let Some(m) = models.get(name)
                && m.versions.get(&v).is_some_and(|ver| ver.on_disk)
                && !m.served().contains(&v)
            {
                return Err(RequestError::NotReady {
                    model: name.into(),
                    version: v,
                    state: "not served",
                    detail: Some(
                        "the model's version-policy does not serve it (an admin can `rxctl load` it)"
                            .into(),
                    ),
                });
            }
        }
        match self.begin_gated(name, version, false, may_load)? {
            Begin::Ready(l) => Ok(Demand::Ready(l)),
            Begin::Wait(slot) => Ok(Demand::Cold { slot, start: None }),
            Begin::Start(t) => Ok(Demand::Cold {
                slot: t.slot.clone(),
                start: Some(t),
            }),
        }
    }

    /// Carries out a load that `begin` started: admission under the budget (evicting
    /// least-recently-used idle models), session creation and warmup, measurement, and the
    /// final accounting. Every waiter learns the outcome. Blocking.
    pub fn finish(&self, ticket: Box<Ticket>) -> Result<ModelSummary, RequestError> {
        let key: Key = (ticket.name.clone(), ticket.version);
        let owned_name = ticket.name.clone();
        let (name, version) = (owned_name.as_str(), ticket.version);
        // Admission.
        let (device, victims) = {
            let mut models = self.write();
            let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            // A version measured before (evicted since) is known; others are estimated.
            let known = models
                .get(name)
                .and_then(|m| m.versions.get(&version))
                .and_then(|v| v.known)
                .or_else(|| {
                    let real = std::fs::canonicalize(&ticket.path).ok()?;
                    b.files.get(&real).copied()
                });
            let estimate = known.unwrap_or_else(|| b.estimator.estimate(ticket.file_bytes));
            let busy = self.sync_usage(&models, &mut b);
            let candidates = match self.candidates(&ticket.settings, &b) {
                Ok(c) => c,
                Err(message) => {
                    drop(b);
                    return Err(self.fail(&mut models, ticket, ModelState::Failed, message, None));
                }
            };
            let now = self.now_ms();
            let is_busy = |k: &Key| ticket.no_evict || busy.contains(k);
            // An estimate is a guess: when it cannot fit but the weights alone (a hard lower
            // bound) can, try with that; the measured figure settles it after loading.
            let floor = ticket.file_bytes.min(estimate);
            let admitted = b
                .budget
                .admit(key.clone(), estimate, &candidates, &is_busy, now)
                .or_else(|_| {
                    b.budget
                        .admit(key.clone(), floor, &candidates, &is_busy, now)
                });
            let adm = match admitted {
                Ok(adm) => adm,
                Err(over) => {
                    // Larger than every budget it may use: it can never load.
                    let never = candidates_or_all(&candidates, b.budget.devices().len())
                        .iter()
                        .all(|&d| b.budget.devices()[d].budget < floor);
                    drop(b);
                    let state = if never {
                        ModelState::Failed
                    } else {
                        ticket.was
                    };
                    let message = format!(
                        "'{name}' version {version} does not fit the memory budget: {}",
                        describe(&over)
                    );
                    return Err(self.fail(
                        &mut models,
                        ticket,
                        state,
                        message,
                        Some(ErrorCode::OverBudget),
                    ));
                }
            };
            if let Some(v) = models
                .get_mut(name)
                .and_then(|m| m.versions.get_mut(&version))
            {
                v.estimated = Some(estimate);
            }
            let device = b.budget.devices()[adm.device].name.clone();
            drop(b);
            (device, self.take_victims(&mut models, &adm.evict))
        };

        // Session creation and warmup, measured alone.
        let (built, grew, load_ms) = {
            let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
            drop(victims);
            self.measured_build(name, version, &ticket.path, &ticket.settings, &device)
        };
        let loaded = match built {
            Ok(l) => l,
            Err(message) => {
                let mut models = self.write();
                self.budget
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .budget
                    .release(&key);
                return Err(self.fail(&mut models, ticket, ModelState::Failed, message, None));
            }
        };
        // Weights are resident at least once, even when freed pages were reused; and a reload
        // after an eviction partly reuses pages the allocator kept from the last time, so it
        // reads low: a version is accounted at the largest footprint measured for it.
        let known = self
            .read()
            .get(name)
            .and_then(|m| m.versions.get(&version))
            .and_then(|v| v.known);
        let measured = grew.max(ticket.file_bytes).max(known.unwrap_or(0));

        // Final accounting.
        let mut models = self.write();
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let busy = self.sync_usage(&models, &mut b);
        // Fell back to the CPU: account it there, not on the device it was admitted to.
        let moved = match b.budget.device_index(&loaded.device) {
            Some(idx) if loaded.device != device => {
                let estimate = b.budget.release(&key).unwrap_or(measured);
                b.budget
                    .admit(
                        key.clone(),
                        estimate,
                        &[idx],
                        &|k| busy.contains(k),
                        self.now_ms(),
                    )
                    .map(|adm| adm.evict)
            }
            _ => Ok(Vec::new()),
        };
        let settled = moved.and_then(|mut evict| {
            b.budget
                .settle(&key, measured, &|k| busy.contains(k))
                .map(|more| {
                    evict.extend(more);
                    evict
                })
        });
        match settled {
            Ok(evict) => {
                // GPU loads measure host memory of a driver stack (shader JIT, Dawn), not the
                // model: only CPU loads teach the estimator.
                let on_cpu =
                    self.defaults.devices.iter().any(|d| {
                        d.name == loaded.device && d.kind == crate::config::DeviceKind::Cpu
                    });
                if on_cpu {
                    b.estimator.learn(ticket.file_bytes, measured);
                    if let Ok(real) = std::fs::canonicalize(&ticket.path) {
                        b.files.insert(real, measured);
                    }
                }
                drop(b);
                let victims = self.take_victims(&mut models, &evict);
                let pin = ticket.served && ticket.settings.pinned.unwrap_or(false);
                let ver = models
                    .get_mut(name)
                    .and_then(|m| m.versions.get_mut(&version))
                    .expect("a loading version stays in the map");
                self.install(ver, name, version, loaded, measured, load_ms);
                ticket
                    .slot
                    .hold(ver.loaded.clone().expect("installed a model"));
                ver.slot = None;
                ver.pinned |= pin;
                if ver.pinned {
                    self.budget
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .budget
                        .set_pinned(&key, true);
                }
                let summary = self.summary_locked(&models, name, version);
                drop(models);
                tracing::info!(
                    model = %name,
                    version,
                    device = %device,
                    bytes = measured,
                    load_ms,
                    evicted = victims.len(),
                    "model ready"
                );
                if !victims.is_empty() {
                    let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
                    release(victims);
                }
                ticket.slot.finish(Ok(()));
                Ok(summary)
            }
            Err(over) => {
                drop(b);
                let message = format!(
                    "'{name}' version {version} measured {measured} bytes after loading, more \
                     than its device can hold: {}",
                    describe(&over)
                );
                // More than the whole device: it can never load there — certain when its
                // weights alone are, and taken as so after two measurements in a row.
                let whole = over.devices.iter().all(|d| d.budget < measured);
                let weights = over.devices.iter().all(|d| d.budget < ticket.file_bytes);
                let again = models
                    .get_mut(name)
                    .and_then(|m| m.versions.get_mut(&version))
                    .is_some_and(|v| std::mem::replace(&mut v.over_measured, whole));
                let never = weights || (whole && again);
                let state = if never {
                    ModelState::Failed
                } else {
                    ticket.was
                };
                let e = self.fail(
                    &mut models,
                    ticket,
                    state,
                    message,
                    Some(ErrorCode::OverBudget),
                );
                drop(models);
                let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
                release(vec![Arc::new(loaded)]);
                Err(e)
            }
        }
    }

    /// Ends a load that did not make it: sets the version's state and error, tells the
    /// waiters, and returns the error for the caller.
    fn fail(
        &self,
        models: &mut BTreeMap<String, Model>,
        ticket: Box<Ticket>,
        state: ModelState,
        message: String,
        code: Option<ErrorCode>,
    ) -> RequestError {
        let (name, version) = (ticket.name.clone(), ticket.version);
        crate::metrics::Metrics::inc(&self.model_metrics(&name, version).load_failures);
        if let Some(ver) = models
            .get_mut(&name)
            .and_then(|m| m.versions.get_mut(&version))
        {
            ver.state = if state == ModelState::Loading {
                ModelState::Available
            } else {
                state
            };
            ver.error = Some(message.clone());
            ver.slot = None;
            if ver.state == ModelState::Failed {
                ver.failed_files = Some(FileStamp::of(&ver.path));
            }
        }
        // The one log line of a failed load (callers do not log it again).
        tracing::warn!(model = %name, version, "load failed: {message}");
        let err = match code {
            Some(ErrorCode::OverBudget) => RequestError::OverBudget { message },
            _ => RequestError::LoadFailed {
                model: name,
                version,
                message,
            },
        };
        ticket.slot.finish(Err(err.to_wire()));
        err
    }

    /// Pushes each resident model's last use into the policy and returns the busy ones.
    fn sync_usage(&self, models: &BTreeMap<String, Model>, b: &mut BudgetState) -> HashSet<Key> {
        let mut busy = HashSet::new();
        for (n, m) in models {
            for (&v, ver) in &m.versions {
                let key = (n.clone(), v);
                if let Some(l) = &ver.loaded {
                    b.budget.touch(&key, l.last_used());
                }
                if ver.busy() {
                    busy.insert(key);
                }
            }
        }
        busy
    }

    /// Device indices a model may go to, from its `devices` preference.
    fn candidates(&self, settings: &ModelSettings, b: &BudgetState) -> Result<Vec<usize>, String> {
        match &settings.devices {
            None => Ok(Vec::new()),
            Some(names) => names
                .iter()
                .map(|n| {
                    b.budget
                        .device_index(n)
                        .ok_or_else(|| format!("model.toml: no device named '{n}'"))
                })
                .collect(),
        }
    }

    /// Marks the victims evicted and takes their models (dropped by the caller, outside the
    /// locks).
    fn take_victims(
        &self,
        models: &mut BTreeMap<String, Model>,
        victims: &[Key],
    ) -> Vec<Arc<LoadedModel>> {
        let mut out = Vec::new();
        for (n, v) in victims {
            if let Some(ver) = models.get_mut(n).and_then(|m| m.versions.get_mut(v)) {
                out.extend(ver.loaded.take());
                ver.state = ModelState::Evicted;
                ver.evictions += 1;
                crate::metrics::Metrics::inc(&self.model_metrics(n, *v).evictions);
                ver.measured = None;
                tracing::info!(model = %n, version = v, "evicted (least recently used)");
            }
        }
        out
    }

    /// Runs [`LoadJob::measured_build`] on a thread of its own and waits for it until the
    /// load's deadline (model.toml `load-timeout-secs`, else the daemon's). Call under
    /// `load_lock`. Past the deadline the load fails ("timed out after N s") and the caller
    /// releases the lock and the registry slot as for any failure; the thread is left behind
    /// (detached): it still holds what it was building — sessions, their memory, unaccounted —
    /// and drops it if it ever finishes. Shutdown does not wait for it.
    fn measured_build(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        settings: &ModelSettings,
        device: &str,
    ) -> (Result<LoadedModel, String>, u64, u64) {
        let limit = settings
            .load_timeout_secs
            .map_or(self.defaults.load_timeout, std::time::Duration::from_secs);
        let job = LoadJob {
            runtime: self.runtime.clone(),
            defaults: self.defaults.clone(),
            metrics: self.model_metrics(name, version),
            epoch: self.epoch,
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (name_, path_, settings_, device_) = (
            name.to_string(),
            path.to_path_buf(),
            settings.clone(),
            device.to_string(),
        );
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name(format!("rxd-load-{name}"))
            .spawn(move || {
                let built = job.measured_build(&name_, version, &path_, &settings_, &device_);
                // Nobody waits any more (past the deadline): the build is dropped here.
                let _ = tx.send(built);
            });
        if let Err(e) = spawned {
            return (Err(format!("cannot start a load thread: {e}")), 0, 0);
        }
        match rx.recv_timeout(limit) {
            Ok(built) => built,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::error!(
                    model = %name,
                    version,
                    "the load did not finish within {} s; its thread is left behind",
                    limit.as_secs()
                );
                (
                    Err(format!(
                        "timed out after {} s (load-timeout-secs)",
                        limit.as_secs()
                    )),
                    0,
                    started.elapsed().as_millis() as u64,
                )
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => (
                Err("the load thread ended without a result".into()),
                0,
                started.elapsed().as_millis() as u64,
            ),
        }
    }

    /// Makes `loaded` the version's resident model with its measured footprint; returns the
    /// model it replaces (a rebuild), if any.
    fn install(
        &self,
        ver: &mut Version,
        name: &str,
        version: u64,
        loaded: LoadedModel,
        measured: u64,
        load_ms: u64,
    ) -> Option<Arc<LoadedModel>> {
        ver.arena = loaded.arena_bytes;
        let old = ver.loaded.replace(Arc::new(loaded));
        ver.state = ModelState::Ready;
        ver.measured = Some(measured);
        ver.known = Some(measured);
        ver.load_ms = Some(load_ms);
        ver.loads += 1;
        ver.over_measured = false;
        let m = self.model_metrics(name, version);
        crate::metrics::Metrics::inc(&m.loads);
        m.load_us.fetch_add(load_ms * 1000, Ordering::Relaxed);
        old
    }
}

/// What a load needs, owned, so that it can run on a thread of its own and be left behind
/// when it passes its deadline (see [`Registry::measured_build`]).
struct LoadJob {
    runtime: Arc<Runtime>,
    defaults: Defaults,
    metrics: Arc<crate::metrics::ModelMetrics>,
    epoch: Instant,
}

impl LoadJob {
    /// Primes the device, builds the version and measures what it keeps: resident-set growth
    /// with freed heap returned to the kernel before and after (so the difference is what the
    /// model keeps, not the load's transient peak or reuse of someone else's pages), plus
    /// device memory growth where the driver reports it (NVML). Runs on the load's own thread
    /// while [`Registry::measured_build`] holds `load_lock`. Returns the build, the bytes it
    /// grew by, and its time in ms.
    fn measured_build(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        settings: &ModelSettings,
        device: &str,
    ) -> (Result<LoadedModel, String>, u64, u64) {
        self.prime(device);
        crate::runtime::release_free_memory();
        let rss0 = crate::metrics::resident_bytes();
        let vram0 = self.device_memory_used(device);
        let started = Instant::now();
        let built = self.build(name, version, path, settings, device);
        if built.is_err() {
            // A load that failed after profiling began leaves ORT's profile behind.
            self.remove_profiles(name, version);
        }
        let load_ms = started.elapsed().as_millis() as u64;
        crate::runtime::release_free_memory();
        let rss1 = crate::metrics::resident_bytes();
        let vram1 = self.device_memory_used(device);
        let growth = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        (built, growth(rss0, rss1) + growth(vram0, vram1), load_ms)
    }

    /// Removes what ORT's profiler wrote for this version in the private directory.
    fn remove_profiles(&self, name: &str, version: u64) {
        let prefix = format!("profile-{name}-{version}_");
        let dir = self.runtime.scratch_dir();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Memory in use on a device as its driver reports it (NVIDIA through NVML); `None` for the
    /// CPU and where nothing reports it (WebGPU on lavapipe uses host memory, counted by RSS).
    fn device_memory_used(&self, device: &str) -> Option<u64> {
        let dev = self.defaults.devices.iter().find(|d| d.name == device)?;
        match dev.kind {
            crate::config::DeviceKind::Cuda { id } | crate::config::DeviceKind::TensorRt { id } => {
                crate::gpu::nvidia_device(id)?.memory_used_bytes
            }
            _ => None,
        }
    }

    /// Pays the device's one-time set-up before a measured load (a failure shows up again,
    /// with its fallback rules, when the model's own session is created).
    fn prime(&self, device: &str) {
        if let Some(dev) = self.defaults.devices.iter().find(|d| d.name == device) {
            let target = crate::runtime::Target {
                kind: &dev.kind,
                options: &dev.options,
                cache_dir: Some(&self.defaults.cache_dir),
            };
            if let Err(e) = self.runtime.prime_device(target) {
                tracing::debug!(device, "priming the device failed: {e}");
            }
        }
    }

    fn build(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        settings: &ModelSettings,
        device: &str,
    ) -> Result<LoadedModel, String> {
        // A `compress` strategy in model.toml: load the compressed form when it passes.
        let (path, compression) = match &settings.compress {
            Some(strategy) => {
                let (p, note) = crate::compression::prepare(
                    &self.runtime,
                    &self.defaults.cache_dir,
                    name,
                    version,
                    path,
                    strategy,
                );
                tracing::info!(model = %name, version, "{note}");
                (p, Some(note))
            }
            None => (path.to_path_buf(), None),
        };
        let path = path.as_path();
        // Test hook (ARCHITECTURE.md): RXD_TEST_LOAD_HANG=<model name prefix> makes that
        // model's loads hang here, as a load blocked on a FIFO at its profile path did.
        if std::env::var("RXD_TEST_LOAD_HANG")
            .ok()
            .is_some_and(|p| !p.is_empty() && name.starts_with(&p))
        {
            tracing::warn!(model = %name, "test hook: this load hangs now");
            loop {
                std::thread::park();
            }
        }
        let opts = SessionOptions {
            intra_op_threads: settings
                .intra_op_threads
                .unwrap_or(self.defaults.intra_op_threads),
            allow_spinning: settings.allow_spinning.unwrap_or(false),
            log_id: format!("{name}:{version}"),
        };
        let instances = settings.instances.unwrap_or(1);
        let sched_settings = settings.scheduler(self.defaults.queue_capacity);
        let dev = self
            .defaults
            .devices
            .iter()
            .find(|d| d.name == device)
            .ok_or_else(|| format!("no device named '{device}'"))?;
        let target = crate::runtime::Target {
            kind: &dev.kind,
            options: &dev.options,
            cache_dir: Some(&self.defaults.cache_dir),
        };
        let warm = settings.warmup.unwrap_or(true);
        // The first instance's warmup is profiled to learn which EP runs each node.
        // In the daemon's private directory: never at a predictable path of a shared one.
        let profile = self
            .runtime
            .scratch_dir()
            .join(format!("profile-{name}-{version}"));
        let mut actual = device.to_string();
        let mut target_now = target;
        let mut fallback: Option<String> = None;
        let mut placement = None;
        let mut sessions = Vec::new();
        let mut signature = None;
        let mut arena: Option<u64> = None;
        let mut pad_to: Vec<u32> = Vec::new();
        let warmup_dims = settings.warmup_dims.clone().unwrap_or_default();
        // Whether the batch-1 warmup ran: its inputs then shrink the arena after large runs.
        let mut warm_one = warm;
        // The outputs' shapes in the first instance's batch-1 warmup.
        let mut warmed_outputs: Option<Vec<Vec<u64>>> = None;
        for i in 0..instances {
            let prof = (i == 0 && warm).then_some(profile.as_path());
            let created = self.runtime.session_on(path, &opts, target_now, prof);
            let (mut session, sig) = match created {
                Ok(s) => s,
                Err(e)
                    if i == 0
                        && dev.kind != crate::config::DeviceKind::Cpu
                        && (dev.cpu_fallback || settings.cpu_fallback.unwrap_or(false)) =>
                {
                    // Allowed to fall back: run on the CPU, and say so (health: degraded).
                    let why = format!("{} is unavailable: {e}", dev.kind.ep());
                    tracing::warn!(model = %name, version, device, "running on the CPU: {why}");
                    fallback = Some(why);
                    target_now = crate::runtime::Target::cpu();
                    if let Some(cpu) = self
                        .defaults
                        .devices
                        .iter()
                        .find(|d| d.kind == crate::config::DeviceKind::Cpu)
                    {
                        actual = cpu.name.clone();
                    }
                    self.runtime
                        .session_on(path, &opts, target_now, prof)
                        .map_err(|e| e.to_string())?
                }
                Err(e) => return Err(e.to_string()),
            };
            // The shape-change cost these avoid was measured on ORT's CUDA EP (and TensorRT
            // builds an engine per shape); the CPU and WebGPU keep batches at their own size.
            let nvidia = matches!(
                target_now.kind,
                crate::config::DeviceKind::Cuda { .. } | crate::config::DeviceKind::TensorRt { .. }
            );
            if i == 0 {
                pad_to = batch_sizes(
                    settings.batch_sizes.as_deref(),
                    batchable(&sig),
                    sched_settings.max_batch_rows,
                    nvidia,
                );
            }
            let per_size = settings.session_per_batch_size.unwrap_or(true)
                && *target_now.kind != crate::config::DeviceKind::Cpu
                && pad_to.iter().any(|&b| b > 1);
            // Zero inputs at `rows` rows: the outputs' shapes, or None (logged) when it fails
            // with automatic shapes; with configured warmup-dims a failure fails the load.
            let warm_at = |session: &mut ort::session::Session,
                           rows: u64|
             -> Result<Option<Vec<Vec<u64>>>, String> {
                match crate::runtime::warmup(session, &sig, rows, &warmup_dims) {
                    Ok(shapes) => Ok(Some(shapes)),
                    Err(e) if settings.warmup_dims.is_some() => {
                        Err(format!("warmup at batch {rows} failed: {e}"))
                    }
                    Err(e) => {
                        tracing::warn!(
                            model = %name,
                            version,
                            "warmup at batch {rows} with automatic shapes failed (set \
                             warmup-dims in model.toml): {e}"
                        );
                        Ok(None)
                    }
                }
            };
            if warm {
                // With a session per batch size, `main` only ever runs batch 1 (and sizes above
                // the largest): warming it at others would leave it planned for the wrong shape.
                let mut sizes = vec![1u64];
                if !per_size {
                    if batchable(&sig) && sched_settings.max_batch_rows > 1 {
                        sizes.push(u64::from(sched_settings.max_batch_rows));
                    }
                    sizes.extend(pad_to.iter().map(|&b| u64::from(b)));
                }
                sizes.sort_unstable();
                sizes.dedup();
                for rows in sizes {
                    match warm_at(&mut session, rows)? {
                        Some(shapes) if rows == 1 && i == 0 => warmed_outputs = Some(shapes),
                        Some(_) => {}
                        None => {
                            warm_one &= rows > 1;
                            break;
                        }
                    }
                }
            }
            if prof.is_some() {
                match crate::runtime::node_placement(&mut session, target_now.kind.ep()) {
                    Ok(p) => {
                        let nodes: Vec<String> = p
                            .nodes
                            .iter()
                            .map(|(ep, n)| format!("{n} on {ep}"))
                            .collect();
                        tracing::info!(model = %name, version, "nodes: {}", nodes.join(", "));
                        placement = Some(p);
                    }
                    Err(e) => tracing::warn!(model = %name, version, "no node placement: {e}"),
                }
            }
            match crate::runtime::arena_stats(&session) {
                Ok(stats) => {
                    tracing::debug!(model = %name, version, ?stats, "ORT arena after warmup");
                    if let Some((_, v)) = stats.iter().find(|(k, _)| k == "TotalAllocated") {
                        *arena.get_or_insert(0) += (*v).max(0) as u64;
                    }
                }
                Err(e) => tracing::debug!(model = %name, version, "no ORT arena statistics: {e}"),
            }
            // On a GPU, a session per padded batch size (see `WorkerSessions`), each warmed at
            // its size; `main` serves batch size 1 and any size above the largest.
            let mut worker = crate::runtime::WorkerSessions::from(session);
            if per_size {
                for &rows in pad_to.iter().filter(|&&b| b > 1) {
                    let (mut extra, _) = self
                        .runtime
                        .session_on(path, &opts, target_now, None)
                        .map_err(|e| e.to_string())?;
                    if warm {
                        let _ = warm_at(&mut extra, u64::from(rows))?;
                    }
                    worker.by_rows.push((u64::from(rows), extra));
                }
            }
            sessions.push(worker);
            signature = Some(sig);
        }
        let mut signature = signature.ok_or("no instances")?;
        // The largest batch any warmup ran (or would run, with warmup off).
        let warm_rows = pad_to
            .iter()
            .map(|&b| u64::from(b))
            .chain([1])
            .chain(
                (batchable(&signature) && sched_settings.max_batch_rows > 1)
                    .then_some(u64::from(sched_settings.max_batch_rows)),
            )
            .max()
            .unwrap_or(1);
        let keep = apply_limits(&mut signature, settings, warm_rows)?;
        if let (true, Some(outputs)) = (warm_one, warmed_outputs) {
            record_warmup_shapes(&mut signature, &warmup_dims, outputs);
        }
        for worker in &mut sessions {
            let tidy = if warm_one {
                crate::runtime::zero_inputs(&signature, 1, &warmup_dims).unwrap_or_default()
            } else {
                Vec::new()
            };
            worker.arena = crate::runtime::ArenaRelease::above(keep, tidy);
        }
        let scheduler = Scheduler::start(
            &format!("{name}-{version}"),
            sessions,
            sched_settings,
            pad_to,
            batchable(&signature),
            settings.default_priority.unwrap_or(0),
            self.metrics.clone(),
        );
        let coalescer = Coalescer::new(
            settings
                .coalesce_max_bytes
                .map_or(DEFAULT_COALESCE_MAX, |b| b.0),
            settings.cache_bytes.map_or(0, |b| b.0),
        );
        Ok(LoadedModel {
            name: name.into(),
            version,
            signature,
            device: actual,
            ep: target_now.kind.ep(),
            fallback,
            placement,
            scheduler,
            coalescer,
            last_used: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            epoch: self.epoch,
            arena_bytes: arena,
            metrics: self.metrics.clone(),
            compression,
        })
    }
}

impl Registry {
    /// Unloads a version (default: every loaded version). Requests already holding it finish.
    pub fn unload(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        let dropped;
        let result = {
            let mut models = self.write();
            let model = models
                .get_mut(name)
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            let versions: Vec<u64> = match version {
                Some(v) if model.versions.contains_key(&v) => vec![v],
                Some(v) => {
                    return Err(RequestError::UnknownVersion {
                        model: name.into(),
                        version: v,
                    });
                }
                None => model
                    .versions
                    .iter()
                    .filter(|(_, v)| v.loaded.is_some())
                    .map(|(&n, _)| n)
                    .collect(),
            };
            let mut taken = Vec::new();
            let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            for v in &versions {
                let ver = model.versions.get_mut(v).expect("listed above");
                if ver.state == ModelState::Loading {
                    continue;
                }
                taken.extend(ver.loaded.take());
                ver.state = ModelState::Available;
                ver.error = None;
                ver.pinned = false;
                ver.measured = None;
                b.budget.release(&(name.to_string(), *v));
            }
            drop(b);
            dropped = taken;
            let shown = versions
                .last()
                .copied()
                .or_else(|| model.versions.keys().next_back().copied())
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            self.summary_locked(&models, name, shown)
        };
        // Dropping outside the lock: if no request holds the model, this joins its workers.
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        release(dropped);
        match version {
            Some(v) => tracing::info!(model = %name, version = v, "model unloaded"),
            None => tracing::info!(model = %name, "model unloaded (every version)"),
        }
        Ok(result)
    }

    /// Pins a version (loading it first if needed): never evicted. Blocking.
    pub fn pin(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        let s = self.load(name, version)?;
        self.set_pinned(name, s.version, true)
    }

    /// Unpins a version: it may be evicted again.
    pub fn unpin(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        let version = match version {
            Some(v) => v,
            None => self
                .read()
                .get(name)
                .and_then(Model::default_version)
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?,
        };
        self.set_pinned(name, version, false)
    }

    fn set_pinned(
        &self,
        name: &str,
        version: u64,
        pinned: bool,
    ) -> Result<ModelSummary, RequestError> {
        let mut models = self.write();
        let ver = models
            .get_mut(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?
            .versions
            .get_mut(&version)
            .ok_or_else(|| RequestError::UnknownVersion {
                model: name.into(),
                version,
            })?;
        ver.pinned = pinned;
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .budget
            .set_pinned(&(name.to_string(), version), pinned);
        tracing::info!(model = %name, version, pinned, "pin changed");
        Ok(self.summary_locked(&models, name, version))
    }

    /// The loaded model for a request: the given version, or the model's default version.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>, RequestError> {
        let models = self.read();
        let model = models
            .get(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
        let num = model.resolve(name, version)?;
        let ver = model
            .versions
            .get(&num)
            .ok_or_else(|| RequestError::UnknownVersion {
                model: name.into(),
                version: num,
            })?;
        ver.loaded.clone().ok_or_else(|| RequestError::NotReady {
            model: name.into(),
            version: num,
            state: ver.state.name(),
            detail: ver.error.clone(),
        })
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        let models = self.read();
        models
            .iter()
            .flat_map(|(name, m)| {
                m.versions
                    .keys()
                    .map(|&v| self.summary_locked(&models, name, v))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn summary_of(&self, name: &str, version: u64) -> Result<ModelSummary, RequestError> {
        let models = self.read();
        if !models
            .get(name)
            .is_some_and(|m| m.versions.contains_key(&version))
        {
            return Err(RequestError::UnknownVersion {
                model: name.into(),
                version,
            });
        }
        Ok(self.summary_locked(&models, name, version))
    }

    pub fn info(&self, name: &str, version: Option<u64>) -> Result<ModelInfo, RequestError> {
        let loaded = self.get(name, version)?;
        let models = self.read();
        let summary = self.summary_locked(&models, name, loaded.version);
        drop(models);
        Ok(ModelInfo {
            summary,
            inputs: loaded.signature.inputs.clone(),
            outputs: loaded.signature.outputs.clone(),
            settings: self.settings_view(name, loaded.version).ok(),
        })
    }

    /// Every device: budget, use, and resident versions (least recently used first).
    pub fn devices(&self) -> Vec<DeviceSummary> {
        let models = self.read();
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        self.sync_usage(&models, &mut b);
        let mut out = Vec::new();
        for (i, dev) in self.defaults.devices.iter().enumerate() {
            let probe = self.runtime.probe(&dev.kind);
            let u = b.budget.device_use(i);
            // The budget in force (a config reload may have changed it).
            let live = Some(u.budget).filter(|&b| b != u64::MAX);
            let mut residents: Vec<(u64, String)> = u
                .residents
                .iter()
                .map(|((n, v), ..)| {
                    let last = models
                        .get(n)
                        .and_then(|m| m.versions.get(v))
                        .and_then(|ver| ver.loaded.as_ref())
                        .map_or(u64::MAX, |l| l.last_used());
                    (last, format!("{n}:{v}"))
                })
                .collect();
            residents.sort();
            out.push(DeviceSummary {
                name: dev.name.clone(),
                kind: dev.kind.name().into(),
                ep: dev.kind.ep().into(),
                adapter: probe.as_ref().ok().and_then(|p| p.adapter.clone()),
                error: probe.as_ref().err().cloned(),
                memory_total_bytes: probe.as_ref().ok().and_then(|p| p.memory_total),
                memory_used_bytes: probe.as_ref().ok().and_then(|p| p.memory_used),
                budget_bytes: live,
                used_bytes: u.used,
                free_bytes: live.map(|b| b.saturating_sub(u.used)),
                models: residents.into_iter().map(|(_, n)| n).collect(),
            });
        }
        out
    }

    /// Models with a worker stuck on one batch for longer than `limit`.
    pub fn stuck(&self, limit: std::time::Duration) -> Vec<String> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions.iter().filter_map(move |(v, ver)| {
                    let l = ver.loaded.as_ref()?;
                    (l.scheduler.stuck_workers(limit) > 0).then(|| format!("{name} v{v}"))
                })
            })
            .collect()
    }

    /// (ready, failed) version counts.
    pub fn counts(&self) -> (u32, u32) {
        let models = self.read();
        let mut ready = 0;
        let mut failed = 0;
        for ver in models.values().flat_map(|m| m.versions.values()) {
            match ver.state {
                ModelState::Ready => ready += 1,
                ModelState::Failed => failed += 1,
                _ => {}
            }
        }
        (ready, failed)
    }

    /// Drops every loaded model and waits for workers (shutdown).
    pub fn unload_all(&self) {
        let taken: Vec<Arc<LoadedModel>> = self
            .write()
            .values_mut()
            .flat_map(|m| m.versions.values_mut())
            .filter_map(|v| {
                v.state = ModelState::Available;
                v.loaded.take()
            })
            .collect();
        drop(taken);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Model>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Model>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    fn summary_locked(
        &self,
        models: &BTreeMap<String, Model>,
        name: &str,
        version: u64,
    ) -> ModelSummary {
        let model = &models[name];
        let ver = &model.versions[&version];
        let now = self.now_ms();
        let loaded = ver.loaded.as_ref();
        let stats = loaded.map(|l| &l.scheduler.stats);
        let memory_bytes = match ver.state {
            ModelState::Ready => ver.measured,
            ModelState::Loading => ver.estimated,
            _ => None,
        };
        ModelSummary {
            name: name.into(),
            version,
            state: ver.state,
            error: ver.error.clone(),
            instances: loaded.map_or(0, |l| l.instances() as u32),
            device: loaded.map_or_else(String::new, |l| l.device.clone()),
            batchable: loaded.is_some_and(|l| l.batchable()),
            requests: stats.map_or(0, |s| s.requests.load(Ordering::Relaxed))
                + loaded.map_or(0, |l| {
                    l.coalescer.stats.hits.load(Ordering::Relaxed)
                        + l.coalescer.stats.coalesced.load(Ordering::Relaxed)
                }),
            cache_hits: loaded.map_or(0, |l| l.coalescer.stats.hits.load(Ordering::Relaxed)),
            cache_misses: loaded.map_or(0, |l| l.coalescer.stats.misses.load(Ordering::Relaxed)),
            cache_bytes: loaded.map_or(0, |l| l.coalescer.cache_bytes()),
            coalesced: loaded.map_or(0, |l| l.coalescer.stats.coalesced.load(Ordering::Relaxed)),
            batches: stats.map_or(0, |s| s.batches.load(Ordering::Relaxed)),
            rows: stats.map_or(0, |s| s.rows.load(Ordering::Relaxed)),
            padded_rows: stats.map_or(0, |s| s.padded_rows.load(Ordering::Relaxed)),
            batch_sizes: loaded.map_or_else(Vec::new, |l| l.scheduler.batch_sizes().to_vec()),
            pinned: ver.pinned,
            ep: loaded.map(|l| l.ep.to_string()),
            fallback: loaded.and_then(|l| l.fallback.clone()),
            compression: loaded.and_then(|l| l.compression.clone()),
            node_placement: loaded
                .and_then(|l| l.placement.as_ref())
                .map(|p| p.nodes.clone())
                .unwrap_or_default(),
            nodes_on_cpu: loaded
                .and_then(|l| l.placement.as_ref())
                .map(|p| p.on_cpu.clone())
                .unwrap_or_default(),
            served: model.served().contains(&version),
            memory_bytes,
            estimated_bytes: ver.estimated,
            load_ms: ver.load_ms,
            arena_bytes: ver.arena,
            loads: ver.loads,
            idle_ms: loaded.map(|l| now.saturating_sub(l.last_used())),
            evictions: ver.evictions,
        }
    }
}

/// Sets what requests to `sig` may send (each input's `max_dims`, empty inputs allowed or
/// not) from model.toml and the warmup shapes at `warm_rows` rows, and returns the input
/// elements of that warmup run: runs larger than it give their arena growth back
/// ([`crate::runtime::ArenaRelease`]).
fn apply_limits(
    sig: &mut Signature,
    settings: &ModelSettings,
    warm_rows: u64,
) -> Result<u64, String> {
    let configured = settings.max_dims.clone().unwrap_or_default();
    if let Some(unknown) = configured
        .keys()
        .find(|k| !sig.inputs.iter().any(|s| &s.name == *k))
    {
        return Err(format!(
            "model.toml: max-dims names '{unknown}', which is not an input"
        ));
    }
    let warmup_dims = settings.warmup_dims.clone().unwrap_or_default();
    let mut elements = 0u64;
    for spec in &mut sig.inputs {
        let given = warmup_dims.get(&spec.name).map(Vec::as_slice);
        let warm = crate::runtime::warmup_shape(spec, warm_rows, given);
        elements = elements.saturating_add(warm.iter().fold(1u64, |a, &d| a.saturating_mul(d)));
        spec.max_dims =
            crate::validate::max_dims(spec, &warm, configured.get(&spec.name).map(Vec::as_slice))
                .map_err(|e| format!("model.toml: {e}"))?;
    }
    sig.allow_empty = settings.allow_empty_inputs.unwrap_or(false);
    Ok(elements)
}

/// Records the shapes of the batch-1 warmup in the signature (`model_info` shows them), so
/// that clients generating inputs use a shape the model runs with.
fn record_warmup_shapes(
    sig: &mut Signature,
    warmup_dims: &HashMap<String, Vec<i64>>,
    outputs: Vec<Vec<u64>>,
) {
    for spec in &mut sig.inputs {
        let given = warmup_dims.get(&spec.name).map(Vec::as_slice);
        spec.warmup_dims = crate::runtime::warmup_shape(spec, 1, given);
    }
    for (spec, shape) in sig.outputs.iter_mut().zip(outputs) {
        spec.warmup_dims = shape;
    }
}

/// Drops models (joining their workers once their last request is done) and hands the freed
/// memory back to the kernel.
fn release(models: Vec<Arc<LoadedModel>>) {
    if models.is_empty() {
        return;
    }
    drop(models);
    crate::runtime::release_free_memory();
}

/// Bytes of a version on disk: `model.onnx` plus external data files beside it.
fn model_bytes(model: &Path) -> u64 {
    let Some(dir) = model.parent() else {
        return 0;
    };
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name() != "model.toml")
                // Following symlinks: repositories often link model files.
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn candidates_or_all(candidates: &[usize], n: usize) -> Vec<usize> {
    if candidates.is_empty() {
        (0..n).collect()
    } else {
        candidates.to_vec()
    }
}

/// The policy's refusal in words: each device's budget and use and what is resident.
fn describe(over: &crate::budget::OverBudget<Key>) -> String {
    let mut parts = Vec::new();
    for d in &over.devices {
        let residents: Vec<String> = d
            .residents
            .iter()
            .map(|((n, v), bytes, pinned, loading)| {
                let why = if *pinned {
                    ", pinned"
                } else if *loading {
                    ", loading"
                } else {
                    ""
                };
                format!("{n}:{v} ({}{why})", mib(*bytes))
            })
            .collect();
        parts.push(format!(
            "device '{}' has a budget of {} with {} used{}",
            d.name,
            mib(d.budget),
            mib(d.used),
            if residents.is_empty() {
                String::new()
            } else {
                format!(" by {}", residents.join(", "))
            }
        ));
    }
    format!("needs {}; {}", mib(over.need), parts.join("; "))
}

fn mib(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

mod control;
mod report;

#[cfg(test)]
mod batch_size_tests {
    use super::batch_sizes;

    #[test]
    fn gpu_devices_pad_to_powers_of_two_and_the_cpu_does_not() {
        assert_eq!(batch_sizes(None, true, 32, true), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(batch_sizes(None, true, 12, true), vec![1, 2, 4, 8, 12]);
        assert!(batch_sizes(None, true, 32, false).is_empty());
        assert!(
            batch_sizes(None, false, 32, true).is_empty(),
            "cannot batch"
        );
        assert!(batch_sizes(None, true, 1, true).is_empty(), "no batching");
        assert_eq!(
            batch_sizes(Some(&[16, 0, 4, 64, 4]), true, 32, false),
            vec![4, 16],
            "configured: sorted, deduplicated, within 1..=max-batch-rows"
        );
        assert!(
            batch_sizes(Some(&[]), true, 32, true).is_empty(),
            "[] turns it off"
        );
    }
}
