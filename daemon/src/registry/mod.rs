//! The model versions found in the repository and their lifecycle under the devices' memory
//! budgets. One file per job:
//! - `settings`: model.toml's typed schema, its one check, version policies, defaults;
//! - `scan`: reading the repository into the map below;
//! - `lifecycle`: a version's state (`Available | Loading(slot) | Ready(model) | Evicted |
//!   Failed(reason)`) and its transitions, pure;
//! - `load`: load orchestration — `demand`/`begin` start a load or join one, `finish` admits
//!   it under the budget, evicts, builds, measures and `place`s it (shared with rebuilds);
//! - `footprint`: building a version on a thread of its own under a deadline and measuring
//!   what it keeps;
//! - `assemble`: model.toml settings into a runtime build and the built sessions into a
//!   [`LoadedModel`];
//! - `reload`: preloads, a rescan's loads and unloads, device budget changes;
//! - `control`: run-time `configure` (in place, or a rebuild beside the running version);
//! - `devices`: each device's probed capabilities and its load, and the float16 placement
//!   rule;
//! - `report`: summaries, devices, metrics and health figures.
//!
//! This file: the registry's state (the map of models and versions, the budget) and the
//! operations that only move versions between states (get, unload, pin).
//! Invariants: a loaded model is an `Arc<LoadedModel>`; unloading or evicting drops the
//! map's reference, requests holding one finish, and the last drop joins the workers; a
//! version with requests queued, running, or between lookup and queueing is never evicted.
//! Lock order: `models`, then `budget`; `load_lock` is never taken while holding either.
//! Boundary: loading blocks (ORT session creation); async callers go through
//! `spawn_blocking`. The registry never touches sockets and never sees an ORT session (the
//! runtime builds them).

mod assemble;
mod control;
mod devices;
mod footprint;
mod lifecycle;
mod load;
mod reload;
mod report;
mod scan;
pub mod settings;
mod spread;
pub mod tune;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use rxd_protocol::{ModelState, ModelSummary};

use crate::budget::{Budget, DeviceSpec, Estimator};
use crate::error::{RequestError, Unready};
use crate::model::LoadedModel;
use crate::runtime::Runtime;

pub use lifecycle::LoadSlot;
pub use load::{Begin, Demand, Ticket};
pub use settings::{Defaults, ModelSettings, VersionPolicy};

type Key = (String, u64);

/// What a device's budget accounts: a version on the device it was loaded on, or its share
/// (instances) on another device (model.toml `spread`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Held {
    Version(Key),
    Share(Key, String),
}

impl Held {
    /// The version it belongs to.
    fn version(&self) -> &Key {
        match self {
            Held::Version(k) | Held::Share(k, _) => k,
        }
    }
}

struct Version {
    /// Still in the repository at the last scan.
    on_disk: bool,
    path: PathBuf,
    state: lifecycle::State<Arc<LoadedModel>>,
    pinned: bool,
    estimated: Option<u64>,
    /// What the budget accounts while it is ready.
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
    /// Its shares on devices other than its model's first (model.toml `spread`): device →
    /// bytes accounted there, from admission on (the instances may still be building).
    shares: BTreeMap<String, u64>,
    /// Times one of its shares was evicted.
    share_evictions: u64,
    /// The last load measured more than its whole device. One such measurement can be other
    /// threads' memory counted in (a footprint is the resident set's growth while serving
    /// goes on): only a second in a row marks the version failed.
    over_measured: bool,
}

impl Version {
    fn new(path: PathBuf) -> Version {
        Version {
            on_disk: true,
            path,
            state: lifecycle::State::default(),
            pinned: false,
            estimated: None,
            measured: None,
            load_ms: None,
            arena: None,
            known: None,
            overrides: ModelSettings::default(),
            loads: 0,
            evictions: 0,
            shares: BTreeMap::new(),
            share_evictions: 0,
            over_measured: false,
        }
    }

    /// The served model, when ready.
    fn loaded(&self) -> Option<&Arc<LoadedModel>> {
        self.state.model()
    }

    /// Requests are queued, running, or hold the model between lookup and queueing.
    fn busy(&self) -> bool {
        self.loaded().is_some_and(LoadedModel::busy)
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
            .unwrap_or_default();
        policy.select(&on_disk)
    }

    /// The highest version the policy serves ([`Model::served`]'s last), without building the
    /// set: asked on every request that names no version.
    fn highest_served(&self) -> Option<u64> {
        let mut on_disk = self
            .versions
            .iter()
            .rev()
            .filter(|(_, v)| v.on_disk)
            .map(|(&k, _)| k);
        let policy = self
            .settings
            .as_ref()
            .ok()
            .and_then(|s| s.version_policy.as_ref());
        let highest = match policy {
            Some(VersionPolicy::Specific(specific)) => on_disk.find(|v| specific.contains(v)),
            _ => on_disk.next(),
        };
        debug_assert_eq!(highest, self.served().last().copied());
        highest
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
            .highest_served()
            .or_else(|| self.versions.keys().next_back().copied())?;
        let state = self.versions.get(&want).map(|v| v.state.kind());
        if state == Some(ModelState::Ready) {
            return Some(want);
        }
        let ready = self
            .versions
            .iter()
            .rev()
            .find(|(_, v)| v.state.kind() == ModelState::Ready)
            .map(|(&k, _)| k);
        match ready {
            Some(r) if state == Some(ModelState::Loading) => Some(r),
            _ => Some(want),
        }
    }

    /// A version of this model, or `unknown_version` naming it.
    fn version(&self, name: &str, version: u64) -> Result<&Version, RequestError> {
        self.versions
            .get(&version)
            .ok_or_else(|| unknown(name, version))
    }

    /// A version of this model, or `unknown_version` naming it.
    fn version_mut(&mut self, name: &str, version: u64) -> Result<&mut Version, RequestError> {
        self.versions
            .get_mut(&version)
            .ok_or_else(|| unknown(name, version))
    }

    /// The settings a version runs with: model.toml (defaults where it is broken) with the
    /// version's run-time changes over it.
    fn settings_of(&self, ver: &Version) -> ModelSettings {
        self.settings
            .clone()
            .unwrap_or_default()
            .merged(&ver.overrides)
    }
}

fn unknown(name: &str, version: u64) -> RequestError {
    RequestError::UnknownVersion {
        model: name.into(),
        version,
    }
}

/// A model and one of its versions, or `unknown_model` / `unknown_version` naming them.
fn lookup<'a>(
    models: &'a BTreeMap<String, Model>,
    name: &str,
    version: u64,
) -> Result<(&'a Model, &'a Version), RequestError> {
    let model = models
        .get(name)
        .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
    Ok((model, model.version(name, version)?))
}

/// Drops what left a scheduler (a lane's workers) on a thread of its own: dropping joins
/// worker threads, which finish what they hold first.
fn drop_aside<T: Send + 'static>(what: T) {
    let spawned = std::thread::Builder::new()
        .name("rxd-drop".into())
        .spawn(move || drop(what));
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to let instances go: {e}");
    }
}

/// Releases a version's entry and every share of it.
fn release_all(budget: &mut Budget<Held>, key: &Key) {
    budget.release(&Held::Version(key.clone()));
    for share in shares_of(budget, key) {
        budget.release(&share);
    }
}

/// The share entries of a version, on every device.
fn shares_of(budget: &Budget<Held>, key: &Key) -> Vec<Held> {
    (0..budget.devices().len())
        .flat_map(|d| budget.device_use(d).residents)
        .map(|(h, ..)| h)
        .filter(|h| matches!(h, Held::Share(k, _) if k == key))
        .collect()
}

struct BudgetState {
    budget: Budget<Held>,
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
    /// Per model name, the users whose runs of it were stopped lately, kept for the daemon's
    /// life (a reload or an eviction does not forget a bar; names are the repository's).
    strikes: Mutex<BTreeMap<String, Arc<crate::runtime::Strikes>>>,
    /// `load-on-demand`, changeable by a config reload.
    on_demand: AtomicBool,
    /// Set when the daemon starts to stop: no load begins, and waiters of loads under way are
    /// answered `shutting_down` (see [`Registry::stop_loading`]).
    stopping: AtomicBool,
    /// Load-time tuning's choices by cache key, for the daemon's life: a cache directory that
    /// cannot be written does not make every reload measure again.
    tunings: tune::Remembered,
    /// Per device (the order of `defaults.devices`): its capabilities, probed once (`None`:
    /// its execution provider did not come up).
    caps: Vec<std::sync::OnceLock<Option<rxd_protocol::Capabilities>>>,
    /// Per device: busy time and rows, recorded by the workers placed there.
    loads: Vec<Arc<crate::metrics::DeviceLoad>>,
    /// When a share of a version could not be placed on a device (it did not fit, or failed
    /// to build): the automatic rebalance leaves that device alone for a while
    /// ([`Registry::place_missing_shares`]).
    share_misses: Mutex<HashMap<(Key, String), Instant>>,
    /// Threads per instance by default, and the cores tuning spreads a model over:
    /// `defaults.intra_op_threads`, then the cores the daemon may use as they change when
    /// `defaults.follow_cores` ([`Registry::follow_cores`]).
    cores: std::sync::atomic::AtomicU32,
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
            strikes: Mutex::new(BTreeMap::new()),
            on_demand: AtomicBool::new(defaults.load_on_demand),
            stopping: AtomicBool::new(false),
            tunings: Default::default(),
            cores: std::sync::atomic::AtomicU32::new(defaults.intra_op_threads),
            share_misses: Mutex::new(HashMap::new()),
            caps: defaults
                .devices
                .iter()
                .map(|_| Default::default())
                .collect(),
            loads: defaults
                .devices
                .iter()
                .map(|_| Default::default())
                .collect(),
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

    /// The metrics of a version (created on first use).
    pub fn model_metrics(&self, name: &str, version: u64) -> Arc<crate::metrics::ModelMetrics> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), version))
            .or_default()
            .clone()
    }

    /// The strikes of a model's users (created on first use).
    pub fn model_strikes(&self, name: &str) -> Arc<crate::runtime::Strikes> {
        self.strikes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Model>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Model>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_budget(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops models outside the registry's locks, serialised with loads (so a load measures
    /// its own growth), and hands the freed memory back to the kernel.
    fn release(&self, models: Vec<Arc<LoadedModel>>) {
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if models.is_empty() {
            return;
        }
        drop(models);
        crate::runtime::release_free_memory();
    }

    /// The loaded model for a request: the given version, or the model's default version.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>, RequestError> {
        let models = self.read();
        let model = models
            .get(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
        let num = model.resolve(name, version)?;
        let ver = model.version(name, num)?;
        ver.loaded().cloned().ok_or_else(|| RequestError::NotReady {
            model: name.into(),
            version: num,
            state: Unready::In(ver.state.kind()),
            detail: ver.state.error().map(str::to_string),
        })
    }

    /// Unloads a version (default: every loaded version). Requests already holding it finish.
    pub fn unload(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        let (dropped, result) = {
            let mut models = self.write();
            let model = models
                .get_mut(name)
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            let versions: Vec<u64> = match version {
                Some(v) => {
                    model.version_mut(name, v)?;
                    vec![v]
                }
                None => model
                    .versions
                    .iter()
                    .filter(|(_, v)| v.loaded().is_some())
                    .map(|(&n, _)| n)
                    .collect(),
            };
            let mut taken = Vec::new();
            let mut b = self.lock_budget();
            for v in &versions {
                let Some(ver) = model.versions.get_mut(v) else {
                    continue;
                };
                if ver.state.kind() == ModelState::Loading {
                    continue;
                }
                taken.extend(ver.state.unload());
                ver.pinned = false;
                ver.measured = None;
                release_all(&mut b.budget, &(name.to_string(), *v));
            }
            drop(b);
            let shown = versions
                .last()
                .copied()
                .or_else(|| model.versions.keys().next_back().copied())
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            (taken, self.summary_of_locked(&models, name, shown))
        };
        // Dropping outside the lock: if no request holds the model, this joins its workers.
        self.release(dropped);
        match version {
            Some(v) => tracing::info!(model = %name, version = v, "model unloaded"),
            None => tracing::info!(model = %name, "model unloaded (every version)"),
        }
        result
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
        models
            .get_mut(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?
            .version_mut(name, version)?
            .pinned = pinned;
        self.lock_budget()
            .budget
            .set_pinned(&Held::Version((name.to_string(), version)), pinned);
        tracing::info!(model = %name, version, pinned, "pin changed");
        self.summary_of_locked(&models, name, version)
    }

    /// The daemon is stopping: no load starts from now on (a request that needs one is
    /// answered `shutting_down`), and every request waiting for a load under way is answered
    /// `shutting_down` now rather than after the load, which may take up to its deadline —
    /// longer than the shutdown grace, which would close its connection unanswered.
    pub fn stop_loading(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let models = self.write();
        for slot in models
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|v| v.state.slot())
        {
            if slot.result().is_none() {
                slot.finish(Err(crate::error::LoadError::ShuttingDown));
            }
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Drops every loaded model and waits for workers (shutdown).
    pub fn unload_all(&self) {
        let taken: Vec<Arc<LoadedModel>> = self
            .write()
            .values_mut()
            .flat_map(|m| m.versions.values_mut())
            .filter_map(|v| v.state.reset())
            .collect();
        drop(taken);
    }
}
