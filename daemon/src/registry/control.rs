//! Run-time control of loaded versions: settings in force, `configure` (in place for
//! batching, priority and cache; a rebuild beside the running version for instances and
//! device), and persisting changes to model.toml with its comments kept.
//! Boundary: decisions about memory still go through the budget policy.

use std::sync::Arc;

use super::footprint::Build;
use super::report::describe;
use super::scan::model_bytes;
use super::{Held, Key, ModelSettings, Registry, lookup};
use crate::error::RequestError;
use crate::model::LoadedModel;

impl Registry {
    /// Threads per instance by default, and the cores load-time tuning spreads a model over.
    pub fn cores(&self) -> u32 {
        self.cores.load(std::sync::atomic::Ordering::Relaxed).max(1)
    }

    /// Follows the cores the daemon may use (`now`: its CPU affinity and cgroup quota, read by
    /// the caller) when `intra-op-threads` is automatic: on a change, loads from then on use
    /// the new count, and every loaded version that load-time tuning laid out is measured
    /// again and rebuilt (as `rxctl configure --retune` does: the old sessions serve until the
    /// new ones are ready; a version whose rebuild fails keeps serving as it was). Returns the
    /// versions re-tuned. Blocking: tuning measures for up to a few seconds per version.
    pub fn follow_cores(&self, now: u32) -> Vec<(String, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.defaults.follow_cores || now == 0 || self.stopping.load(Relaxed) {
            return Vec::new();
        }
        let before = self.cores.swap(now, Relaxed);
        if before == now {
            return Vec::new();
        }
        let tuned: Vec<(String, u64)> = {
            let models = self.read();
            models
                .iter()
                .flat_map(|(name, m)| {
                    m.versions.iter().filter_map(move |(&v, ver)| {
                        let laid_out = ver.overrides.instances.is_none()
                            && ver.loaded().is_some_and(|l| l.tuning.is_some());
                        laid_out.then(|| (name.clone(), v))
                    })
                })
                .collect()
        };
        tracing::info!(
            "the daemon may now use {now} core(s) (was {before}): re-tuning {} model version(s)",
            tuned.len()
        );
        let mut done = Vec::new();
        for (name, version) in tuned {
            match self.rebuild(&name, version, true) {
                Ok(()) => done.push((name, version)),
                Err(e) => {
                    tracing::warn!(model = %name, version, "re-tuning for {now} core(s) failed: {e}")
                }
            }
        }
        done
    }

    /// The settings in force for a version: model.toml with run-time changes over it (the
    /// live scheduler's where the version is loaded).
    pub fn settings_view(
        &self,
        name: &str,
        version: u64,
    ) -> Result<rxd_protocol::ModelSettingsView, RequestError> {
        let models = self.read();
        let (model, ver) = lookup(&models, name, version)?;
        let merged = model.settings_of(ver);
        Ok(self.view(&merged, ver.loaded().map(|l| &**l)))
    }

    pub(super) fn view(
        &self,
        s: &ModelSettings,
        loaded: Option<&LoadedModel>,
    ) -> rxd_protocol::ModelSettingsView {
        let sched = loaded.map_or_else(
            || s.scheduler(self.defaults.queue_capacity),
            |l| l.scheduler().settings(),
        );
        rxd_protocol::ModelSettingsView {
            instances: loaded.map_or(s.instances.unwrap_or(1), |l| l.instances() as u32),
            max_batch_rows: sched.max_batch_rows,
            max_queue_delay_us: sched.max_queue_delay.as_micros() as u64,
            latency_target_ms: sched.latency_target.map(|t| t.as_secs_f64() * 1e3),
            queue_capacity: sched.queue_capacity as u64,
            default_priority: loaded.map_or(s.default_priority.unwrap_or(0), |l| {
                l.scheduler().default_priority()
            }),
            priority_aging_ms: sched.aging.as_millis() as u64,
            cache_bytes: loaded
                .map_or(s.cache_bytes.map_or(0, |b| b.0), |l| l.coalescer.capacity()),
        }
    }

    /// Run-time changes to a version's settings (admin). Batching, priority and cache
    /// settings apply in place; a change of instances or device rebuilds the version beside
    /// the running one and swaps it in (requests in flight finish on the old one, none is
    /// dropped). Changes are kept across evictions and reloads of the version, and written
    /// to model.toml with `persist`. Blocking.
    pub fn configure(
        &self,
        c: &rxd_protocol::Configure,
    ) -> Result<rxd_protocol::ModelSettingsView, RequestError> {
        let bad = RequestError::Invalid;
        if c.retune && c.instances.is_some() {
            return Err(bad(
                "--retune chooses the instances itself: give one or the other".into(),
            ));
        }
        let change = ModelSettings::of_configure(c);
        change.check().map_err(bad)?;
        if let Some(d) = &c.device
            && !self.defaults.devices.iter().any(|x| &x.name == d)
        {
            return Err(bad(format!("no device named '{d}'")));
        }
        let name = c.model.as_str();
        let (version, merged, loaded, rebuild) = {
            let mut models = self.write();
            let model = models
                .get_mut(name)
                .ok_or_else(|| RequestError::UnknownModel(name.into()))?;
            let version = model.resolve(name, c.version)?;
            let base = model
                .settings
                .clone()
                .map_err(|message| RequestError::LoadFailed {
                    model: name.into(),
                    version,
                    message,
                })?;
            if c.retune {
                if base.instances.is_some() || base.intra_op_threads.is_some() {
                    return Err(bad(format!(
                        "{name}/model.toml sets instances or intra-op-threads: there is nothing to tune"
                    )));
                }
                if !base.tune.unwrap_or(self.defaults.tune) {
                    return Err(bad(format!("tuning is off for '{name}' (tune = false)")));
                }
            }
            let ver = model.version_mut(name, version)?;
            if c.retune {
                if ver.loaded().is_none() {
                    return Err(bad(format!(
                        "'{name}' version {version} is not loaded: it is tuned when it loads"
                    )));
                }
                ver.overrides.instances = None;
            }
            ver.overrides = ver.overrides.merged(&change);
            let merged = base.merged(&ver.overrides);
            let loaded = ver.loaded().cloned();
            let rebuild = loaded.as_ref().is_some_and(|l| {
                c.retune
                    || c.instances.is_some_and(|n| n as usize != l.instances())
                    || c.device.as_ref().is_some_and(|d| *d != l.device)
            });
            (version, merged, loaded, rebuild)
        };
        if let Some(l) = &loaded {
            l.scheduler().update(
                merged.scheduler(self.defaults.queue_capacity),
                merged.default_priority.unwrap_or(0),
            );
            if let Some(b) = c.cache_bytes {
                l.coalescer.set_capacity(b);
            }
            if c.clear_cache {
                l.coalescer.clear();
            }
        }
        drop(loaded);
        if rebuild {
            self.rebuild(name, version, c.retune)?;
        }
        if c.persist {
            self.persist(name, c)
                .map_err(|e| RequestError::Internal(format!("cannot write model.toml: {e}")))?;
        }
        tracing::info!(model = %name, version, "settings changed: {}", changes(c));
        self.settings_view(name, version)
    }

    /// Builds a ready version again with its current settings (other instance count, other
    /// device) beside the running one, then swaps: new requests go to the new one, the old
    /// one finishes what it holds. Over budget: the old one stays and the error says why.
    fn rebuild(&self, name: &str, version: u64, retune: bool) -> Result<(), RequestError> {
        let key: Key = (name.to_string(), version);
        let (path, settings, file_bytes, device) = {
            let models = self.read();
            let (model, ver) = lookup(&models, name, version)?;
            let settings = model.settings_of(ver);
            let current = ver.loaded().map(|l| l.device.clone());
            let device = settings
                .devices
                .as_ref()
                .and_then(|d| d.first().cloned())
                .or(current)
                .unwrap_or_else(|| self.defaults.devices[0].name.clone());
            (ver.path.clone(), settings, model_bytes(&ver.path), device)
        };
        let (built, grew, load_ms) = {
            let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.measured_build(Build {
                name: name.into(),
                version,
                path,
                settings: settings.on_device(&device),
                device: device.clone(),
                retune,
            })
        };
        let new = built.map_err(|e| RequestError::LoadFailed {
            model: name.into(),
            version,
            message: e.to_string(),
        })?;
        let measured = grew.max(file_bytes);
        let mut models = self.write();
        let mut b = self.lock_budget();
        let busy = self.sync_usage(&models, &mut b);
        let dev = b.budget.device_index(&device).unwrap_or(0);
        let pinned = models
            .get(name)
            .and_then(|m| m.versions.get(&version))
            .is_some_and(|v| v.pinned);
        let held = Held::Version(key.clone());
        let previous = b.budget.get(&held);
        let victims = match self.place(&mut b, &key, Some(dev), measured, &busy) {
            Ok(v) => v,
            Err(over) => {
                // Put the old entry back as it was.
                if let Some((old_dev, bytes)) = previous {
                    b.budget.release(&held);
                    let _ =
                        b.budget
                            .admit(held.clone(), bytes, &[old_dev], &|_| true, self.now_ms());
                    let _ = b.budget.settle(&held, bytes, &|_| true);
                    b.budget.set_pinned(&held, pinned);
                }
                drop(b);
                drop(models);
                self.release(vec![Arc::new(new)]);
                return Err(RequestError::OverBudget {
                    message: format!(
                        "'{name}' version {version} rebuilt measures {measured} bytes: {}",
                        describe(&over)
                    ),
                });
            }
        };
        b.budget.set_pinned(&held, pinned);
        drop(b);
        let mut dropped = self.take_victims(&mut models, &victims);
        if let Some(ver) = models
            .get_mut(name)
            .and_then(|m| m.versions.get_mut(&version))
        {
            dropped.extend(self.install(ver, name, version, new, measured, load_ms));
        }
        drop(models);
        tracing::info!(model = %name, version, device = %device, bytes = measured, "rebuilt");
        self.release(dropped);
        self.spread(name, version);
        Ok(())
    }

    /// Writes a configure request's changes into `<repository>/<model>/model.toml`, keeping
    /// its other keys and comments.
    fn persist(&self, name: &str, c: &rxd_protocol::Configure) -> std::io::Result<()> {
        let path = self.root.join(name).join("model.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}")))?;
        let int = |v: u64| toml_edit::value(i64::try_from(v).unwrap_or(i64::MAX));
        if let Some(v) = c.instances {
            doc["instances"] = int(u64::from(v));
        }
        if let Some(v) = c.max_batch_rows {
            doc["max-batch-rows"] = int(u64::from(v));
        }
        if let Some(v) = c.max_queue_delay_us {
            doc["max-queue-delay-us"] = int(v);
        }
        if let Some(v) = c.latency_target_ms {
            doc["latency-target-ms"] = toml_edit::value(v);
        }
        if let Some(v) = c.default_priority {
            doc["default-priority"] = int(u64::from(v));
        }
        if let Some(v) = c.priority_aging_ms {
            doc["priority-aging-ms"] = int(v);
        }
        if let Some(v) = c.cache_bytes {
            doc["cache-bytes"] = match size_text(v) {
                Some(text) => toml_edit::value(text),
                None => int(v),
            };
        }
        if let Some(d) = &c.device {
            let mut a = toml_edit::Array::new();
            a.push(d.as_str());
            doc["devices"] = toml_edit::value(a);
        }
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, doc.to_string())?;
        std::fs::rename(&tmp, &path)
    }
}

/// A byte count as model.toml's users write it (`64MiB`), when it is a whole number of KiB,
/// MiB or GiB.
fn size_text(v: u64) -> Option<String> {
    [(30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|&(shift, _)| v > 0 && v.is_multiple_of(1u64 << shift))
        .map(|(shift, unit)| format!("{}{unit}", v >> shift))
}

/// The settings a configure request changes, for the log: `instances 2, cache-bytes 64MiB`.
fn changes(c: &rxd_protocol::Configure) -> String {
    let mut parts = Vec::new();
    let mut put = |key: &str, v: Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{key} {v}"));
        }
    };
    put("instances", c.instances.map(|v| v.to_string()));
    put("tuning", c.retune.then(|| "measured again".to_string()));
    put("max-batch-rows", c.max_batch_rows.map(|v| v.to_string()));
    put(
        "max-queue-delay-us",
        c.max_queue_delay_us.map(|v| v.to_string()),
    );
    put(
        "latency-target-ms",
        c.latency_target_ms
            .map(|v| if v > 0.0 { v.to_string() } else { "off".into() }),
    );
    put(
        "default-priority",
        c.default_priority.map(|v| v.to_string()),
    );
    put(
        "priority-aging-ms",
        c.priority_aging_ms.map(|v| v.to_string()),
    );
    put(
        "cache-bytes",
        c.cache_bytes
            .map(|v| size_text(v).unwrap_or_else(|| v.to_string())),
    );
    put("device", c.device.clone());
    if c.clear_cache {
        parts.push("cache cleared".into());
    }
    if c.persist {
        parts.push("written to model.toml".into());
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_read_as_settings_and_sizes_as_people_write_them() {
        assert_eq!(size_text(64 << 20).as_deref(), Some("64MiB"));
        assert_eq!(size_text(3 << 30).as_deref(), Some("3GiB"));
        assert_eq!(size_text(1536).as_deref(), None, "1.5 KiB stays a number");
        assert_eq!(size_text(0), None);
        let c = rxd_protocol::Configure {
            model: "digits".into(),
            instances: Some(2),
            cache_bytes: Some(64 << 20),
            latency_target_ms: Some(0.0),
            persist: true,
            ..Default::default()
        };
        assert_eq!(
            changes(&c),
            "instances 2, latency-target-ms off, cache-bytes 64MiB, written to model.toml"
        );
    }
}
