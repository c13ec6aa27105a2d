//! Load orchestration: a request or an admin demands a version; the first one starts its load
//! ([`Ticket`]) and the others wait on its slot; [`Registry::finish`] carries the load out —
//! admission under the budget (evicting least-recently-used idle models), building and
//! measuring it alone under `load_lock`, then [`Registry::place`] accounts the measured
//! footprint (shared with rebuilds) — and every waiter learns the outcome. Also preloads,
//! reloads and budget changes, which are made of loads, unloads and evictions.
//! Boundary: decisions about memory come from `budget`; building and measuring from
//! `footprint`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use rxd_protocol::{ModelState, ModelSummary};

use super::footprint::Build;
use super::lifecycle::{Idle, LoadSlot};
use super::report::describe;
use super::scan::{FileStamp, model_bytes};
use super::{BudgetState, Held, Key, Model, ModelSettings, Registry, Version};
use crate::budget::OverBudget;
use crate::error::{LoadError, RequestError, Unready};
use crate::model::LoadedModel;

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

/// What `begin` decided.
pub enum Begin {
    Ready(Arc<LoadedModel>),
    Wait(Arc<LoadSlot>),
    Start(Box<Ticket>),
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
    /// Started by a (non-admin) user's request: versions used within [`SPARE_RECENT_MS`] are
    /// not evicted for it (a user cannot make the daemon swap out the models other users are
    /// using by asking for others in turn; it is answered `over_budget` instead).
    spare_recent: bool,
    served: bool,
    /// Where the load started from: a refusal by the budget goes back there.
    from: Idle,
}

impl Drop for Ticket {
    /// A ticket dropped without [`Registry::finish`] (a panicked or cancelled load thread)
    /// must not leave waiters hanging.
    fn drop(&mut self) {
        if self.slot.result().is_none() {
            self.slot.finish(Err(LoadError::Abandoned));
        }
    }
}

/// How a load ended without a model.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// It cannot be built (bad settings, bad model, timeout): failed until its files change.
    Broken,
    /// The budget refused it; `never`: it is larger than every budget it may use.
    OverBudget { never: bool },
}

/// The device a load was admitted to and the models evicted for it.
type Admitted = (String, Vec<Arc<LoadedModel>>);

/// Errors of a load that [`Registry::fail`] has already logged.
pub(super) fn logged_by_fail(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::LoadFailed { .. } | RequestError::OverBudget { .. }
    )
}

/// How recently a version must have been used to be spared by a load a user's request
/// started (`Ticket::spare_recent`).
pub const SPARE_RECENT_MS: u64 = 10_000;

impl Registry {
    /// Loads a version (default: the model's default version), evicting least-recently-used
    /// idle models if its device's budget needs room; waits for a load already in progress.
    /// Blocking.
    pub fn load(&self, name: &str, version: Option<u64>) -> Result<ModelSummary, RequestError> {
        self.load_with(name, version, false)
    }

    pub(super) fn load_with(
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

    /// [`Registry::load`] for a request: a load it starts is handed to `run` (which carries
    /// it out with [`Registry::finish`] elsewhere) and waited for like any other, so that
    /// the request is answered when the daemon stops ([`Registry::stop_loading`]) however
    /// long the load itself still takes. Blocking.
    pub fn load_for_request(
        &self,
        name: &str,
        version: Option<u64>,
        run: impl FnOnce(Box<Ticket>),
    ) -> Result<ModelSummary, RequestError> {
        let slot = match self.begin(name, version, false)? {
            Begin::Ready(l) => return self.summary_of(name, l.version),
            Begin::Start(ticket) => {
                let slot = ticket.slot.clone();
                run(ticket);
                slot
            }
            Begin::Wait(slot) => slot,
        };
        slot.wait_blocking()?;
        let loaded = self.get(name, version)?;
        self.summary_of(name, loaded.version)
    }

    /// Starts loading a version unless it is ready or already loading.
    pub fn begin(
        &self,
        name: &str,
        version: Option<u64>,
        no_evict: bool,
    ) -> Result<Begin, RequestError> {
        self.begin_gated(name, version, no_evict, &|| Ok(false))
    }

    /// [`Registry::begin`], asking `may_load` before a load would start.
    fn begin_gated(
        &self,
        name: &str,
        version: Option<u64>,
        no_evict: bool,
        may_load: &dyn Fn() -> Result<bool, RequestError>,
    ) -> Result<Begin, RequestError> {
        let mut models = self.write();
        let model = models
            .get_mut(name)
            .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
        let version = model.resolve(name, version)?;
        let served = model.served().contains(&version);
        let settings = model.settings.clone();
        let ver = model.version_mut(name, version)?;
        if let Some(m) = ver.state.model() {
            return Ok(Begin::Ready(m.clone()));
        }
        if !ver.state.abandoned()
            && let Some(slot) = ver.state.slot()
        {
            return Ok(Begin::Wait(slot.clone()));
        }
        // Checked under the models lock, which `stop_loading` takes after setting it: a load
        // either began before (and its waiters are told) or does not begin.
        if self.stopping() {
            return Err(RequestError::ShuttingDown);
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
            Ok(s) => s.merged(&ver.overrides),
            Err(message) => {
                ver.state.fail(message.clone(), FileStamp::of(&ver.path));
                return Err(RequestError::LoadFailed {
                    model: name.into(),
                    version,
                    message,
                });
            }
        };
        let spare_recent = may_load()?;
        let file_bytes = model_bytes(&ver.path);
        let slot = Arc::new(LoadSlot::default());
        let Some(from) = ver.state.start(slot.clone()) else {
            // Not reached: it was neither ready nor loading above, under the same lock.
            return Err(RequestError::Internal(
                "the version changed state under the registry's lock".into(),
            ));
        };
        Ok(Begin::Start(Box::new(Ticket {
            name: name.into(),
            version,
            path: ver.path.clone(),
            settings,
            slot,
            file_bytes,
            no_evict,
            spare_recent,
            served,
            from,
        })))
    }

    /// For an inference: the ready version, or the load to wait for (started if needed and
    /// loading on demand is on).
    pub fn demand(&self, name: &str, version: Option<u64>) -> Result<Demand, RequestError> {
        self.demand_gated(name, version, &|| Ok(false))
    }

    /// [`Registry::demand`], where `may_load` decides whether this request may start a load
    /// (it is asked only when one would start: not for a model ready or already loading), and
    /// whether that load must spare versions used recently (`Ok(true)`: a user's request).
    pub fn demand_gated(
        &self,
        name: &str,
        version: Option<u64>,
        may_load: &dyn Fn() -> Result<bool, RequestError>,
    ) -> Result<Demand, RequestError> {
        match self.get(name, version) {
            Ok(l) => return Ok(Demand::Ready(l)),
            // A broken model is not retried on every request; `rxctl load` retries it.
            Err(
                e @ RequestError::NotReady {
                    state: Unready::In(ModelState::Failed),
                    ..
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
                    state: Unready::NotServed,
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
        let (name, version) = (key.0.as_str(), key.1);
        let spare_recent = ticket.spare_recent;
        // Outside the locks: the devices' probe (done at start; here for embedders that skip
        // it) and, only where some device has no float16, reading the model file for it.
        self.probe_devices();
        let float16 = self.some_device_lacks_float16().then(|| {
            crate::capability::float16_need(&ticket.path, ticket.settings.compress.as_deref())
        });
        let float16 = float16.flatten();
        // A weights-only file dequantized at load takes its float weights' room: estimated
        // from the file (read outside the locks; a float model is only searched through).
        let s = &ticket.settings;
        let dequantized = (s.compress.is_none() && s.dequantize_at_load.unwrap_or(true))
            .then(|| crate::capability::dequantized_bytes(&ticket.path, ticket.file_bytes))
            .flatten();
        let (device, victims) = {
            let mut models = self.write();
            match self.admit(&mut models, &ticket, float16.as_deref(), dequantized) {
                Ok(admitted) => admitted,
                Err((failure, message)) => {
                    return Err(self.fail(&mut models, ticket, failure, message));
                }
            }
        };

        // Session creation and warmup, measured alone.
        let (built, grew, load_ms) = {
            let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
            drop(victims);
            self.measured_build(Build {
                name: name.into(),
                version,
                path: ticket.path.clone(),
                settings: ticket.settings.on_device(&device),
                device: device.clone(),
                retune: false,
            })
        };
        let loaded = match built {
            Ok(l) => l,
            Err(e) => {
                let mut models = self.write();
                self.lock_budget()
                    .budget
                    .release(&Held::Version(key.clone()));
                return Err(self.fail(&mut models, ticket, Failure::Broken, e.to_string()));
            }
        };
        // Weights are resident at least once, even when freed pages were reused; and a load
        // partly reuses pages the allocator kept from models it freed (a reload after an
        // eviction, or another version of the same file), so it reads low: a version is
        // accounted at the largest footprint measured for it or for its file — what
        // admission counted on. (A peer loading copies of a model in turn once had each
        // measured at a fifth of its size, and more of them resident than the budget holds.)
        let real = std::fs::canonicalize(&ticket.path).ok();
        // A weights-only file dequantized at load holds its float weights: at least those.
        let weights = loaded
            .dequantized
            .as_ref()
            .map_or(ticket.file_bytes, |d| d.served_bytes);

        // Final accounting.
        let mut models = self.write();
        let mut b = self.lock_budget();
        let known = models
            .get(name)
            .and_then(|m| m.versions.get(&version))
            .and_then(|v| v.known);
        let of_file = real.as_ref().and_then(|r| b.files.get(r).copied());
        let measured = grew
            .max(weights)
            .max(known.unwrap_or(0))
            .max(of_file.unwrap_or(0));
        let busy = self.unevictable(&models, &mut b, spare_recent);
        let dev = b.budget.device_index(&loaded.device);
        match self.place(&mut b, &key, dev, measured, &busy) {
            Ok(evict) => {
                // GPU loads measure host memory of a driver stack (shader JIT, Dawn), not the
                // model: only CPU loads teach the estimator.
                let on_cpu =
                    self.defaults.devices.iter().any(|d| {
                        d.name == loaded.device && d.kind == crate::config::DeviceKind::Cpu
                    });
                if on_cpu {
                    // Of the model as served: a dequantized file's float size, not its own.
                    b.estimator.learn(weights, measured);
                    if let Some(real) = real {
                        b.files.insert(real, measured);
                    }
                }
                drop(b);
                let victims = self.take_victims(&mut models, &evict);
                let pin = ticket.served && ticket.settings.pinned.unwrap_or(false);
                let mut replaced = None;
                if let Some(ver) = models
                    .get_mut(name)
                    .and_then(|m| m.versions.get_mut(&version))
                {
                    replaced = self.install(ver, name, version, loaded, measured, load_ms);
                    if let Some(m) = ver.state.model() {
                        ticket.slot.hold(m.clone());
                    }
                    ver.pinned |= pin;
                    if ver.pinned {
                        self.lock_budget()
                            .budget
                            .set_pinned(&Held::Version(key.clone()), true);
                    }
                }
                let summary = self.summary_of_locked(&models, name, version);
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
                if !victims.is_empty() || replaced.is_some() {
                    self.release(victims.into_iter().chain(replaced).collect());
                }
                ticket.slot.finish(Ok(()));
                // Requests are served from here on; shares on other devices join as built.
                self.spread(name, version);
                self.summary_of(name, version).or(summary)
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
                let e = self.fail(&mut models, ticket, Failure::OverBudget { never }, message);
                drop(models);
                self.release(vec![Arc::new(loaded)]);
                Err(e)
            }
        }
    }

    /// Admission: the device a starting load goes to and the victims to evict for it (taken
    /// from the map, dropped by the caller), or why it cannot be admitted.
    /// `float16`: why the model computes in float16, if it does (devices without float16
    /// are not candidates); `dequantized`: what a weights-only file holds once dequantized at
    /// load (it stands for the file in the estimate).
    fn admit(
        &self,
        models: &mut std::collections::BTreeMap<String, Model>,
        ticket: &Ticket,
        float16: Option<&str>,
        dequantized: Option<u64>,
    ) -> Result<Admitted, (Failure, String)> {
        let (name, version) = (ticket.name.as_str(), ticket.version);
        let key: Key = (ticket.name.clone(), version);
        let mut b = self.lock_budget();
        // A version measured before (evicted since) is known; others are estimated.
        let known = models
            .get(name)
            .and_then(|m| m.versions.get(&version))
            .and_then(|v| v.known)
            .or_else(|| {
                let real = std::fs::canonicalize(&ticket.path).ok()?;
                b.files.get(&real).copied()
            });
        let weights = dequantized.unwrap_or(ticket.file_bytes);
        let estimate = known.unwrap_or_else(|| b.estimator.estimate(weights));
        let busy = self.unevictable(models, &mut b, ticket.spare_recent);
        let mut candidates = self
            .candidates(&ticket.settings, &b)
            .map_err(|message| (Failure::Broken, message))?;
        if let Some(why) = float16 {
            candidates = self
                .float16_candidates(&b, candidates, why)
                .map_err(|m| (Failure::Broken, format!("'{name}' version {version}: {m}")))?;
        }
        let now = self.now_ms();
        let is_busy = |h: &Held| ticket.no_evict || busy.contains(h.version());
        // An estimate is a guess: when it cannot fit but the weights alone (a hard lower
        // bound) can, try with that; the measured figure settles it after loading.
        let floor = weights.min(estimate);
        let admitted = b
            .budget
            .admit(
                Held::Version(key.clone()),
                estimate,
                &candidates,
                &is_busy,
                now,
            )
            .or_else(|_| {
                b.budget.admit(
                    Held::Version(key.clone()),
                    floor,
                    &candidates,
                    &is_busy,
                    now,
                )
            });
        let adm = admitted.map_err(|over| {
            // Larger than every budget it may use: it can never load.
            let all: Vec<usize> = (0..b.budget.devices().len()).collect();
            let never = if candidates.is_empty() {
                &all
            } else {
                &candidates
            }
            .iter()
            .all(|&d| b.budget.devices()[d].budget < floor);
            let message = format!(
                "'{name}' version {version} does not fit the memory budget: {}",
                describe(&over)
            );
            (Failure::OverBudget { never }, message)
        })?;
        if let Some(v) = models
            .get_mut(name)
            .and_then(|m| m.versions.get_mut(&version))
        {
            v.estimated = Some(estimate);
        }
        let device = b.budget.devices()[adm.device].name.clone();
        drop(b);
        Ok((device, self.take_victims(models, &adm.evict)))
    }

    /// Accounts a built version at its measured footprint on device `dev` (where it was built:
    /// the CPU after a fallback, another device after a rebuild), moving its entry there first
    /// if the budget holds it elsewhere, then settling the measured figure. Returns the
    /// victims to evict; over budget, the version's entry is gone from the budget and the
    /// error says what holds the device. Shared by loads and rebuilds.
    pub(super) fn place(
        &self,
        b: &mut BudgetState,
        key: &Key,
        dev: Option<usize>,
        measured: u64,
        busy: &HashSet<Key>,
    ) -> Result<Vec<Held>, OverBudget<Held>> {
        let is_busy = |h: &Held| busy.contains(h.version());
        let held = Held::Version(key.clone());
        let mut evict = Vec::new();
        if let Some(dev) = dev
            && b.budget.get(&held).map(|(d, _)| d) != Some(dev)
        {
            // Admitted at the smaller of what it held and what it measured: `settle` then
            // decides with the measured figure.
            let bytes = b
                .budget
                .release(&held)
                .map_or(measured, |was| was.min(measured));
            evict = b
                .budget
                .admit(held.clone(), bytes, &[dev], &is_busy, self.now_ms())?
                .evict;
        }
        evict.extend(b.budget.settle(&held, measured, &is_busy)?);
        Ok(evict)
    }

    /// Ends a load that did not make it: sets the version's state and error, tells the
    /// waiters, and returns the error for the caller.
    fn fail(
        &self,
        models: &mut std::collections::BTreeMap<String, Model>,
        ticket: Box<Ticket>,
        failure: Failure,
        message: String,
    ) -> RequestError {
        let (name, version) = (ticket.name.clone(), ticket.version);
        crate::metrics::Metrics::inc(&self.model_metrics(&name, version).load_failures);
        if let Some(ver) = models
            .get_mut(&name)
            .and_then(|m| m.versions.get_mut(&version))
        {
            let files = FileStamp::of(&ver.path);
            match failure {
                Failure::Broken | Failure::OverBudget { never: true } => {
                    ver.state.fail(message.clone(), files);
                }
                Failure::OverBudget { never: false } => {
                    ver.state.refuse(ticket.from, message.clone(), files);
                }
            }
        }
        // The one log line of a failed load (callers do not log it again).
        tracing::warn!(model = %name, version, "load failed: {message}");
        let err = match failure {
            Failure::OverBudget { .. } => LoadError::OverBudget { message },
            Failure::Broken => LoadError::Failed {
                model: name,
                version,
                message,
            },
        };
        ticket.slot.finish(Err(err.clone()));
        err.into()
    }

    /// [`Registry::sync_usage`], and the versions a load may not evict: the busy ones, and,
    /// for a load a user's request started (`spare_recent`), those used within
    /// [`SPARE_RECENT_MS`].
    fn unevictable(
        &self,
        models: &std::collections::BTreeMap<String, Model>,
        b: &mut BudgetState,
        spare_recent: bool,
    ) -> HashSet<Key> {
        let mut keep = self.sync_usage(models, b);
        if spare_recent {
            let since = self.now_ms().saturating_sub(SPARE_RECENT_MS);
            keep.extend(
                models
                    .iter()
                    .flat_map(|(n, m)| m.versions.iter().map(move |(&v, ver)| (n, v, ver)))
                    .filter(|(.., ver)| ver.loaded().is_some_and(|l| l.last_used() >= since))
                    .map(|(n, v, _)| (n.clone(), v)),
            );
        }
        keep
    }

    /// Pushes each resident model's last use into the policy (for its shares too), releases
    /// share entries whose version is no longer resident or no longer holds that share, and
    /// returns the busy versions.
    pub(super) fn sync_usage(
        &self,
        models: &std::collections::BTreeMap<String, Model>,
        b: &mut BudgetState,
    ) -> HashSet<Key> {
        let mut busy = HashSet::new();
        for (n, m) in models {
            for (&v, ver) in &m.versions {
                let key = (n.clone(), v);
                if let Some(l) = ver.loaded() {
                    b.budget.touch(&Held::Version(key.clone()), l.last_used());
                    for dev in ver.shares.keys() {
                        b.budget
                            .touch(&Held::Share(key.clone(), dev.clone()), l.last_used());
                    }
                }
                if ver.busy() {
                    busy.insert(key);
                }
            }
        }
        let stale: Vec<Held> = (0..b.budget.devices().len())
            .flat_map(|d| b.budget.device_use(d).residents)
            .filter_map(|(h, ..)| match &h {
                Held::Share((n, v), dev) => {
                    let ver = models.get(n).and_then(|m| m.versions.get(v));
                    let holds = ver
                        .is_some_and(|ver| ver.loaded().is_some() && ver.shares.contains_key(dev));
                    (!holds).then_some(h)
                }
                Held::Version(_) => None,
            })
            .collect();
        for h in stale {
            b.budget.release(&h);
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
    /// locks). A share's victim is its device's instances only: they leave the version's
    /// scheduler (finishing what they hold, on a thread of their own) and the version keeps
    /// serving on its other devices.
    pub(super) fn take_victims(
        &self,
        models: &mut std::collections::BTreeMap<String, Model>,
        victims: &[Held],
    ) -> Vec<Arc<LoadedModel>> {
        let mut out = Vec::new();
        for h in victims {
            let (n, v) = h.version();
            let Some(ver) = models.get_mut(n).and_then(|m| m.versions.get_mut(v)) else {
                continue;
            };
            match h {
                Held::Version(_) => {
                    out.extend(ver.state.evict());
                    ver.evictions += 1;
                    ver.shares.clear();
                    crate::metrics::Metrics::inc(&self.model_metrics(n, *v).evictions);
                    ver.measured = None;
                    tracing::info!(model = %n, version = v, "evicted (least recently used)");
                }
                Held::Share(_, dev) => {
                    ver.shares.remove(dev);
                    ver.share_evictions += 1;
                    if let Some(pool) = ver.loaded().and_then(|l| l.scheduler().remove_lane(dev)) {
                        super::drop_aside(pool);
                    }
                    tracing::info!(
                        model = %n,
                        version = v,
                        device = %dev,
                        "its instances on the device evicted (least recently used); it serves \
                         on its other devices"
                    );
                }
            }
        }
        out
    }

    /// Makes `loaded` the version's resident model with its measured footprint; returns the
    /// model it replaces (a rebuild), if any.
    pub(super) fn install(
        &self,
        ver: &mut Version,
        name: &str,
        version: u64,
        loaded: LoadedModel,
        measured: u64,
        load_ms: u64,
    ) -> Option<Arc<LoadedModel>> {
        ver.arena = loaded.arena_bytes;
        // A new model has its first device's instances only (shares are added after).
        ver.shares.clear();
        let old = ver.state.ready(Arc::new(loaded));
        ver.measured = Some(measured);
        ver.known = Some(measured);
        ver.load_ms = Some(load_ms);
        ver.loads += 1;
        ver.over_measured = false;
        let m = self.model_metrics(name, version);
        crate::metrics::Metrics::inc(&m.loads);
        m.load_us
            .fetch_add(load_ms * 1000, std::sync::atomic::Ordering::Relaxed);
        old
    }
}
