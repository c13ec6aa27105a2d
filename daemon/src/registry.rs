//! The model repository on disk and the model versions loaded from it.
//!
//! Layout: `<repository>/<model>/<version>/model.onnx`, versions are positive integers, plus an
//! optional `<repository>/<model>/model.toml` with per-model settings. The registry owns each
//! version's lifecycle state and, for ready versions, the [`LoadedModel`] (signature + worker
//! pool). Invariant: a `LoadedModel` lives as long as any request holds it, so unloading never
//! pulls a model out from under a request: the map drops its `Arc`, the last request's drop
//! closes the queue and the workers exit after finishing it.
//! Boundary: loading blocks (ORT session creation); async callers go through
//! `spawn_blocking`. The registry never touches sockets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rxd_protocol::{ModelInfo, ModelState, ModelSummary};
use serde::Deserialize;

use crate::coalesce::{Coalescer, Route};
use crate::error::RequestError;
use crate::runtime::{Completion, Job, Runtime, SessionOptions, Signature};
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
    /// at most this many input bytes (hashing costs ~1 ms per MB). Default 256 KiB; 0 = off.
    pub coalesce_max_bytes: Option<crate::config::ByteSize>,
    /// Result cache (LRU) size; 0 = off (default). Answers repeats without running.
    pub cache_bytes: Option<crate::config::ByteSize>,
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
}

/// A model version that is ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub signature: Signature,
    scheduler: Arc<Scheduler>,
    pub coalescer: Arc<Coalescer>,
}

impl LoadedModel {
    /// Queues a checked request; `completion` receives the outputs or the error (a full
    /// queue, a passed deadline) exactly once.
    pub fn submit(
        &self,
        checked: Checked,
        completion: Box<dyn Completion>,
        priority: Option<u8>,
        deadline: Option<std::time::Instant>,
    ) {
        let mut inputs = checked.inputs;
        let (completion, placement) = match self.coalescer.route(
            &self.name,
            self.version,
            &mut inputs,
            &checked.outputs,
            completion,
            checked.placement,
        ) {
            Route::Run(c, p) => (c, p),
            // The group wants the bytes back inline; it places them for each member.
            Route::Lead(c) => (c, crate::runtime::Placement::default()),
            Route::Done => return,
        };
        let job = Job {
            inputs,
            outputs: checked.outputs,
            placement,
            completion,
        };
        self.scheduler.submit(job, priority, deadline);
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
}

impl Drop for LoadedModel {
    /// Unloading never drops a request: everything queued runs first.
    fn drop(&mut self) {
        self.scheduler.drain();
    }
}

/// A model can batch when every input and output has rank ≥ 1 and a dynamic first dimension.
pub fn batchable(sig: &Signature) -> bool {
    sig.inputs
        .iter()
        .chain(&sig.outputs)
        .all(|t| t.dims.first() == Some(&-1))
        && !sig.inputs.is_empty()
}

/// A model found on disk: its settings (or why they are bad) and its version files.
type Found = (Result<ModelSettings, String>, BTreeMap<u64, PathBuf>);

struct Version {
    /// Still in the repository at the last scan.
    on_disk: bool,
    path: PathBuf,
    state: ModelState,
    error: Option<String>,
    loaded: Option<Arc<LoadedModel>>,
}

struct Model {
    settings: Result<ModelSettings, String>,
    versions: BTreeMap<u64, Version>,
}

/// The repository and the loaded models.
pub struct Registry {
    root: PathBuf,
    runtime: Arc<Runtime>,
    defaults: Defaults,
    models: RwLock<BTreeMap<String, Model>>,
}

impl Registry {
    pub fn new(root: PathBuf, runtime: Arc<Runtime>, defaults: Defaults) -> Registry {
        Registry {
            root,
            runtime,
            defaults,
            models: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn root(&self) -> &Path {
        &self.root
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
                ver.loaded.is_some() || found.get(name).is_some_and(|f| f.1.contains_key(v))
            });
            !m.versions.is_empty() || found.contains_key(name)
        });
        for (name, (settings, versions)) in found {
            let model = models.entry(name).or_insert_with(|| Model {
                settings: Ok(ModelSettings::default()),
                versions: BTreeMap::new(),
            });
            model.settings = settings;
            for v in model.versions.values_mut() {
                v.on_disk = false;
            }
            for (num, path) in versions {
                model
                    .versions
                    .entry(num)
                    .or_insert(Version {
                        on_disk: true,
                        path,
                        state: ModelState::Available,
                        error: None,
                        loaded: None,
                    })
                    .on_disk = true;
            }
        }
        Ok(())
    }

    /// Scans and loads the latest version of every model (blocking). Failures are recorded in
    /// the model's state; the others still load.
    pub fn load_all_latest(&self) -> std::io::Result<()> {
        self.scan()?;
        let latest: Vec<(String, u64)> = self
            .read()
            .iter()
            .filter_map(|(n, m)| m.versions.keys().next_back().map(|&v| (n.clone(), v)))
            .collect();
        for (name, version) in latest {
            if let Err(e) = self.load(&name, Some(version)) {
                tracing::error!(model = %name, version, "{e}");
            }
        }
        Ok(())
    }

    /// Re-reads the repository (SIGHUP, `rxctl reload`): loads the latest version of every
    /// model that is not ready yet (new models, new versions, re-read model.toml), and only
    /// once that version is ready unloads the model's other versions; models gone from disk
    /// are unloaded. Requests holding an old version finish on it. Blocking.
    pub fn reload(&self) -> std::io::Result<Vec<ModelSummary>> {
        self.scan()?;
        let latest: Vec<(String, Option<u64>)> = self
            .read()
            .iter()
            .map(|(n, m)| {
                let on_disk = m
                    .versions
                    .iter()
                    .filter(|(_, v)| v.on_disk)
                    .map(|(&k, _)| k)
                    .max();
                (n.clone(), on_disk)
            })
            .collect();
        for (name, version) in latest {
            match version {
                Some(v) => {
                    if let Err(e) = self.load(&name, Some(v)) {
                        tracing::error!(model = %name, version = v, "reload: {e}");
                        continue;
                    }
                    let others: Vec<u64> = self.read()[&name]
                        .versions
                        .iter()
                        .filter(|(k, ver)| **k != v && ver.loaded.is_some())
                        .map(|(&k, _)| k)
                        .collect();
                    for old in others {
                        let _ = self.unload(&name, Some(old));
                    }
                }
                None => {
                    let _ = self.unload(&name, None);
                }
            }
        }
        // Forget what is neither on disk nor loaded.
        self.write().retain(|_, m| {
            m.versions.retain(|_, v| v.on_disk || v.loaded.is_some());
            !m.versions.is_empty()
        });
        Ok(self.list())
    }

    /// Loads a version (default: the latest on disk). Blocking.
    pub fn load(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        // Pick the version and mark it loading, under the lock; build sessions outside it.
        let (version, path, settings) =
            {
                let mut models = self.write();
                let model = models
                    .get_mut(name)
                    .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
                let version = match version {
                    Some(v) => v,
                    None => *model
                        .versions
                        .keys()
                        .next_back()
                        .ok_or_else(|| RequestError::UnknownModel(name.into()))?,
                };
                let settings = model.settings.clone();
                let ver = model.versions.get_mut(&version).ok_or_else(|| {
                    RequestError::UnknownVersion {
                        model: name.into(),
                        version,
                    }
                })?;
                match ver.state {
                    ModelState::Ready => return Ok(summary(name, version, ver)),
                    ModelState::Loading | ModelState::Unloading => {
                        return Err(RequestError::NotReady {
                            model: name.into(),
                            version,
                            state: ver.state.name(),
                            detail: None,
                        });
                    }
                    _ => {}
                }
                ver.state = ModelState::Loading;
                ver.error = None;
                (version, ver.path.clone(), settings)
            };

        let result = settings.and_then(|s| self.build(name, version, &path, &s));
        let mut models = self.write();
        let ver = models
            .get_mut(name)
            .and_then(|m| m.versions.get_mut(&version))
            .ok_or_else(|| RequestError::Internal("model vanished while loading".into()))?;
        match result {
            Ok(loaded) => {
                tracing::info!(
                    model = %name,
                    version,
                    instances = loaded.instances(),
                    "model ready"
                );
                ver.loaded = Some(Arc::new(loaded));
                ver.state = ModelState::Ready;
                Ok(summary(name, version, ver))
            }
            Err(message) => {
                ver.state = ModelState::Failed;
                ver.error = Some(message.clone());
                Err(RequestError::LoadFailed {
                    model: name.into(),
                    version,
                    message,
                })
            }
        }
    }

    fn build(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        settings: &ModelSettings,
    ) -> Result<LoadedModel, String> {
        let opts = SessionOptions {
            intra_op_threads: settings
                .intra_op_threads
                .unwrap_or(self.defaults.intra_op_threads),
            allow_spinning: settings.allow_spinning.unwrap_or(false),
        };
        let instances = settings.instances.unwrap_or(1);
        let mut sessions = Vec::new();
        let mut signature = None;
        for _ in 0..instances {
            let (session, sig) = self
                .runtime
                .session(path, &opts)
                .map_err(|e| e.to_string())?;
            sessions.push(session);
            signature = Some(sig);
        }
        let signature = signature.ok_or("no instances")?;
        let sched_settings = settings.scheduler(self.defaults.queue_capacity);
        let scheduler = Scheduler::start(
            &format!("{name}-{version}"),
            sessions,
            sched_settings,
            batchable(&signature),
            settings.default_priority.unwrap_or(0),
        );
        let coalescer = Coalescer::new(
            settings.coalesce_max_bytes.map_or(256 << 10, |b| b.0),
            settings.cache_bytes.map_or(0, |b| b.0),
        );
        Ok(LoadedModel {
            name: name.into(),
            version,
            signature,
            scheduler,
            coalescer,
        })
    }

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
            for v in &versions {
                let ver = model.versions.get_mut(v).expect("listed above");
                taken.extend(ver.loaded.take());
                ver.state = ModelState::Available;
                ver.error = None;
            }
            dropped = taken;
            let shown = versions
                .last()
                .copied()
                .or_else(|| model.versions.keys().next_back().copied())
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            summary(name, shown, &model.versions[&shown])
        };
        // Dropping outside the lock: if no request holds the model, this joins its workers.
        drop(dropped);
        tracing::info!(model = %name, ?version, "model unloaded");
        Ok(result)
    }

    /// The loaded model for a request: the given version, or the highest ready one.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>, RequestError> {
        let models = self.read();
        let model = models
            .get(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
        let (num, ver) = match version {
            Some(v) => (
                v,
                model
                    .versions
                    .get(&v)
                    .ok_or_else(|| RequestError::UnknownVersion {
                        model: name.into(),
                        version: v,
                    })?,
            ),
            None => match model
                .versions
                .iter()
                .rev()
                .find(|(_, v)| v.loaded.is_some())
            {
                Some((&n, v)) => (n, v),
                None => {
                    let (&n, v) = model.versions.iter().next_back().expect("non-empty");
                    (n, v)
                }
            },
        };
        ver.loaded.clone().ok_or_else(|| RequestError::NotReady {
            model: name.into(),
            version: num,
            state: ver.state.name(),
            detail: ver.error.clone(),
        })
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        self.read()
            .iter()
            .flat_map(|(name, m)| {
                m.versions
                    .iter()
                    .map(move |(&v, ver)| summary(name, v, ver))
            })
            .collect()
    }

    pub fn info(&self, name: &str, version: Option<u64>) -> Result<ModelInfo, RequestError> {
        let loaded = self.get(name, version)?;
        let models = self.read();
        let ver = &models[name].versions[&loaded.version];
        Ok(ModelInfo {
            summary: summary(name, loaded.version, ver),
            inputs: loaded.signature.inputs.clone(),
            outputs: loaded.signature.outputs.clone(),
        })
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
}

fn summary(name: &str, version: u64, ver: &Version) -> ModelSummary {
    use std::sync::atomic::Ordering::Relaxed;
    let loaded = ver.loaded.as_ref();
    let stats = loaded.map(|l| &l.scheduler.stats);
    ModelSummary {
        name: name.into(),
        version,
        state: ver.state,
        error: ver.error.clone(),
        instances: loaded.map_or(0, |l| l.instances() as u32),
        device: "cpu".into(),
        batchable: loaded.is_some_and(|l| l.batchable()),
        requests: stats.map_or(0, |s| s.requests.load(Relaxed))
            + loaded.map_or(0, |l| {
                l.coalescer.stats.hits.load(Relaxed) + l.coalescer.stats.coalesced.load(Relaxed)
            }),
        cache_hits: loaded.map_or(0, |l| l.coalescer.stats.hits.load(Relaxed)),
        cache_misses: loaded.map_or(0, |l| l.coalescer.stats.misses.load(Relaxed)),
        cache_bytes: loaded.map_or(0, |l| l.coalescer.cache_bytes()),
        coalesced: loaded.map_or(0, |l| l.coalescer.stats.coalesced.load(Relaxed)),
        batches: stats.map_or(0, |s| s.batches.load(Relaxed)),
        rows: stats.map_or(0, |s| s.rows.load(Relaxed)),
    }
}
