//! Shares: a version's instances on devices other than the one it was loaded on (model.toml
//! `spread = true` with several `devices`). After a version is ready, [`Registry::spread`]
//! gives it a share on each other listed device: admitted on that device's budget at the
//! footprint the version measured (evicting nothing: a share only takes free room), built and
//! measured like a load under `load_lock`, settled at what it measured, and joined to the
//! version's scheduler as a lane. A share that does not fit, or fails to build, is left out
//! (logged); the version serves on the devices it has. The budget may later evict a share
//! alone (`take_victims`): the version keeps serving on its other devices.
//! [`Registry::rebalance`] places a version again over its allowed devices: shares on devices
//! no longer listed (or failing) leave, missing ones are added; `rxctl rebalance` and every
//! reload (budgets may have grown) run it. Every few seconds
//! [`Registry::place_missing_shares`] adds, by itself, the shares that fit now (memory freed
//! by an unload or an eviction, a device whose runs failed that works again); load is the
//! router's to balance, batch by batch.
//! Boundary: decisions about memory come from `budget`; the routing between lanes is the
//! scheduler's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rxd_protocol::ModelSummary;

use super::footprint::{Build, LoadJob};
use super::report::describe;
use super::{Held, Key, Registry};
use crate::error::RequestError;
use crate::model::LoadedModel;

/// How long the automatic rebalance leaves a device alone after a version's share could not
/// be placed there (it did not fit, or its build failed): a device without room is asked again
/// at this pace, not at every check, and a share whose build fails is not rebuilt over and over.
pub const SHARE_RETRY: Duration = Duration::from_secs(30);

impl Registry {
    /// Gives every resident version that is spread over several devices the shares it lacks
    /// on devices that can take them now: room freed by an unload or an eviction, a device
    /// whose runs failed and now succeed (a failing device keeps its share; the router tries
    /// it again by itself). A device that could not take a version's share is tried again
    /// only after [`SHARE_RETRY`]. Returns the shares added. Blocking (each share is a
    /// build); called every few seconds (`supervise::spawn_housekeeping`).
    pub fn place_missing_shares(&self) -> Vec<(String, u64, String)> {
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Vec::new();
        }
        let now = Instant::now();
        let mut added = Vec::new();
        for (name, version) in self.resident_versions(None) {
            let Some((loaded, want)) = self.spread_plan(&name, version) else {
                continue;
            };
            let have = loaded.scheduler().devices();
            let failing = failing_devices(&loaded);
            let key: Key = (name.clone(), version);
            for device in want
                .iter()
                .filter(|d| !have.contains(d) && !failing.contains(d))
            {
                let slot = (key.clone(), device.clone());
                {
                    let mut misses = self.share_misses.lock().unwrap_or_else(|e| e.into_inner());
                    misses.retain(|_, at| now.saturating_duration_since(*at) < SHARE_RETRY);
                    if misses.contains_key(&slot) {
                        continue;
                    }
                }
                match self.add_share(&loaded, device) {
                    Ok(()) => {
                        tracing::info!(model = %name, version, device = %device, "rebalance: a share joins the device");
                        added.push((name.clone(), version, device.clone()));
                    }
                    Err(e) => {
                        tracing::debug!(model = %name, version, device = %device, "no share on the device yet: {e}");
                        self.share_misses
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(slot, Instant::now());
                    }
                }
            }
        }
        added
    }

    /// The resident versions of model `name` (of every model without one).
    fn resident_versions(&self, name: Option<&str>) -> Vec<(String, u64)> {
        self.read()
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .flat_map(|(n, m)| {
                m.versions
                    .iter()
                    .filter(|(_, v)| v.loaded().is_some())
                    .map(|(&v, _)| (n.clone(), v))
            })
            .collect()
    }

    /// Gives a ready version a share on each device its settings spread it to and it lacks.
    /// Blocking (each share is a build). Problems are logged, not returned: the version
    /// serves on the devices it has.
    pub(super) fn spread(&self, name: &str, version: u64) {
        self.spread_except(name, version, &[]);
    }

    /// [`Registry::spread`], leaving out the devices in `except`.
    fn spread_except(&self, name: &str, version: u64, except: &[String]) {
        let Some((loaded, want)) = self.spread_plan(name, version) else {
            return;
        };
        let have = loaded.scheduler().devices();
        for device in want
            .iter()
            .filter(|d| !have.contains(d) && !except.contains(d))
        {
            if let Err(e) = self.add_share(&loaded, device) {
                tracing::warn!(
                    model = %name,
                    version,
                    device = %device,
                    "no share on the device: {e}"
                );
            }
        }
    }

    /// The ready model and the devices its settings spread it over (`None`: not ready, or
    /// not spread).
    fn spread_plan(&self, name: &str, version: u64) -> Option<(Arc<LoadedModel>, Vec<String>)> {
        let models = self.read();
        let model = models.get(name)?;
        let ver = model.versions.get(&version)?;
        let loaded = ver.loaded()?.clone();
        let settings = model.settings_of(ver);
        let want = match (settings.spread, settings.devices) {
            (Some(true), Some(devices)) => devices,
            _ => Vec::new(),
        };
        Some((loaded, want))
    }

    /// Admits, builds and joins one share of `loaded` on `device`.
    fn add_share(&self, loaded: &Arc<LoadedModel>, device: &str) -> Result<(), String> {
        let (name, version) = (loaded.name.clone(), loaded.version);
        let key: Key = (name.clone(), version);
        let held = Held::Share(key.clone(), device.to_string());
        // Admission at what the version measured where it loaded: nothing is evicted.
        let (path, settings, bytes) = {
            let mut models = self.write();
            let ver = models
                .get(&name)
                .and_then(|m| m.versions.get(&version))
                .ok_or("the version is gone")?;
            if !ver.loaded().is_some_and(|l| Arc::ptr_eq(l, loaded)) {
                return Err("the version was unloaded or replaced".into());
            }
            let bytes = ver.measured.unwrap_or(0);
            let settings = models
                .get(&name)
                .map(|m| m.settings_of(ver))
                .unwrap_or_default();
            let path = ver.path.clone();
            let mut b = self.lock_budget();
            self.sync_usage(&models, &mut b);
            let dev = b
                .budget
                .device_index(device)
                .ok_or_else(|| format!("no device named '{device}'"))?;
            b.budget
                .admit(held.clone(), bytes, &[dev], &|_| true, self.now_ms())
                .map_err(|over| format!("it does not fit: {}", describe(&over)))?;
            drop(b);
            if let Some(ver) = models
                .get_mut(&name)
                .and_then(|m| m.versions.get_mut(&version))
            {
                ver.shares.insert(device.to_string(), bytes);
            }
            (path, settings, bytes)
        };
        let (built, grew, load_ms) = {
            let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.measured_build_with(
                Build {
                    name: name.clone(),
                    version,
                    path,
                    settings: settings.on_device(device),
                    device: device.to_string(),
                    retune: false,
                },
                LoadJob::build_share,
            )
        };
        let forget = |why: String| {
            let mut models = self.write();
            if let Some(ver) = models
                .get_mut(&name)
                .and_then(|m| m.versions.get_mut(&version))
            {
                ver.shares.remove(device);
            }
            self.lock_budget().budget.release(&held);
            why
        };
        let crew = built.map_err(|e| forget(e.to_string()))?;
        let measured = grew.max(bytes);
        // Settled and joined under the models lock, so that an eviction of the share (which
        // takes that lock) finds it either not yet joined or joined.
        let joined = {
            let mut models = self.write();
            let mut b = self.lock_budget();
            let ver = models
                .get_mut(&name)
                .and_then(|m| m.versions.get_mut(&version))
                .filter(|v| {
                    v.shares.contains_key(device)
                        && v.loaded().is_some_and(|l| Arc::ptr_eq(l, loaded))
                });
            match ver {
                None => Err("the version was unloaded or replaced, or the share evicted".into()),
                Some(ver) => match b.budget.settle(&held, measured, &|_| true) {
                    Err(over) => Err(format!("it measured {measured} bytes: {}", describe(&over))),
                    Ok(_) => {
                        drop(b);
                        ver.shares.insert(device.to_string(), measured);
                        loaded.scheduler().add_lane(crew).map_err(|e| e.to_string())
                    }
                },
            }
        };
        joined.map_err(forget)?;
        tracing::info!(
            model = %name,
            version,
            device = %device,
            bytes = measured,
            load_ms,
            "a share of the model ready on the device"
        );
        Ok(())
    }

    /// Places a model's resident versions again over the devices their settings allow: a
    /// share on a device no longer listed (or whose runs fail) leaves, a missing share is
    /// added. Requests are never failed: a leaving share finishes what it holds, and the
    /// version serves on its other devices meanwhile. Blocking.
    pub fn rebalance(&self, name: Option<&str>) -> Result<Vec<ModelSummary>, RequestError> {
        if let Some(n) = name
            && !self.read().contains_key(n)
        {
            return Err(RequestError::UnknownModel(n.into()));
        }
        let mut out = Vec::new();
        for (n, v) in self.resident_versions(name) {
            if let Some((loaded, want)) = self.spread_plan(&n, v) {
                let failing = failing_devices(&loaded);
                // The device it loaded on holds the version itself: it stays.
                for device in loaded.scheduler().devices() {
                    let listed = want.contains(&device);
                    if device != loaded.device
                        && (!listed || failing.contains(&device))
                        && let Some(pool) = loaded.scheduler().remove_lane(&device)
                    {
                        super::drop_aside(pool);
                        let mut models = self.write();
                        if let Some(ver) = models.get_mut(&n).and_then(|m| m.versions.get_mut(&v)) {
                            ver.shares.remove(&device);
                        }
                        let mut b = self.lock_budget();
                        self.sync_usage(&models, &mut b);
                        tracing::info!(model = %n, version = v, device = %device, "rebalance: the share leaves the device");
                    }
                }
                drop(loaded);
                // A failing device is not given a new share at once: it is tried again later.
                self.spread_except(&n, v, &failing);
            }
            out.push(self.summary_of(&n, v)?);
        }
        Ok(out)
    }
}

/// The devices whose runs of `loaded` fail.
fn failing_devices(loaded: &LoadedModel) -> Vec<String> {
    loaded
        .scheduler()
        .failing_devices()
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}
