//! From model.toml to a served model: a version's settings become a runtime build (the
//! compressed form first when `compress` asks for it; a weights-only file dequantized at load
//! unless `dequantize-at-load = false`), the built sessions get their input limits
//! (`max-dims`, empty inputs) and become a [`LoadedModel`] with its scheduler and coalescer.
//! Boundary: never touches an ORT session; the runtime builds them.

use super::footprint::{Build, BuildError, LoadJob};
use super::settings::{DEFAULT_COALESCE_MAX, ModelSettings};
use crate::model::{LoadedModel, Serving};
use crate::runtime::{BuildSpec, SessionOptions, Signature, Target, warmup_shape};

impl LoadJob {
    /// Builds a version on `device` with `settings`. Blocking.
    pub(super) fn build(
        &self,
        build: &Build,
        tuning: Result<rxd_protocol::Tuning, String>,
    ) -> Result<LoadedModel, BuildError> {
        let (built, serving) = self.parts(build, tuning)?;
        LoadedModel::start(built, serving).map_err(BuildError::Runtime)
    }

    /// Builds a version's share on another device: its sessions there, as workers to join the
    /// version's scheduler. Blocking.
    pub(super) fn build_share(
        &self,
        build: &Build,
        tuning: Result<rxd_protocol::Tuning, String>,
    ) -> Result<crate::runtime::Crew, BuildError> {
        let (built, serving) = self.parts(build, tuning)?;
        if built.fallback.is_some() {
            // A share runs where it was asked to, or not at all.
            return Err(BuildError::Settings(format!(
                "device '{}': {}",
                build.device,
                built.fallback.unwrap_or_default()
            )));
        }
        let axes = std::sync::Arc::new(built.signature.axes.clone());
        Ok(LoadedModel::crew(
            built.sessions,
            built.pad_to,
            axes,
            &serving,
        ))
    }

    /// Builds the sessions of a version on `device` with `settings`, and what it serves
    /// with besides. Blocking.
    fn parts(
        &self,
        build: &Build,
        tuning: Result<rxd_protocol::Tuning, String>,
    ) -> Result<(crate::runtime::Built, Serving), BuildError> {
        let (name, version, settings, device) = (
            build.name.as_str(),
            build.version,
            &build.settings,
            build.device.as_str(),
        );
        let path = build.path.as_path();
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
                    settings.dequantize_at_load.unwrap_or(true),
                );
                tracing::info!(model = %name, version, "{note}");
                (p, Some(note))
            }
            None => (path.to_path_buf(), None),
        };
        let (bytes, dequantized) = served(&path, settings, name, version);
        // Test hook (ARCHITECTURE.md): RXD_TEST_LOAD_HANG=<model name prefix> makes that
        // model's loads hang here, as a load blocked on a FIFO at its profile path did.
        if self.defaults.hooks.load_hangs(name) {
            tracing::warn!(model = %name, "test hook: this load hangs now");
            loop {
                std::thread::park();
            }
        }
        let dev = self
            .defaults
            .devices
            .iter()
            .find(|d| d.name == device)
            .ok_or_else(|| BuildError::NoDevice(device.into()))?;
        let sched = settings.scheduler(self.defaults.queue_capacity);
        let axes = settings.axes();
        let spec = BuildSpec {
            name,
            version,
            device,
            path: &path,
            bytes: bytes.as_deref(),
            options: SessionOptions {
                intra_op_threads: settings
                    .intra_op_threads
                    .unwrap_or(self.defaults.intra_op_threads),
                allow_spinning: settings.allow_spinning.unwrap_or(false),
                log_id: format!("{name}:{version}"),
                warmup_values: settings.warmup_values.clone().unwrap_or_default(),
            },
            target: Target {
                kind: &dev.kind,
                options: &dev.options,
                cache_dir: Some(&self.defaults.cache_dir),
            },
            cpu_fallback: dev.cpu_fallback || settings.cpu_fallback.unwrap_or(false),
            instances: settings.instances.unwrap_or(1),
            warmup: settings.warmup.unwrap_or(true),
            warmup_dims: settings.warmup_dims.as_ref(),
            batch_sizes: settings.batch_sizes.as_deref(),
            axes: &axes,
            max_batch_rows: sched.max_batch_rows,
            session_per_batch_size: settings.session_per_batch_size.unwrap_or(true),
        };
        let mut built = self.runtime.build(&spec)?;
        built
            .limit(|sig, warm_rows| apply_limits(sig, settings, warm_rows))
            .map_err(BuildError::Settings)?;
        // A fallback runs on the CPU device (when one is configured).
        let actual = match &built.fallback {
            Some(_) => self
                .defaults
                .devices
                .iter()
                .find(|d| d.kind == crate::config::DeviceKind::Cpu)
                .map_or(device, |cpu| cpu.name.as_str()),
            None => device,
        };
        Ok((
            built,
            Serving {
                name: name.into(),
                version,
                device: actual.to_string(),
                cores: self
                    .defaults
                    .devices
                    .iter()
                    .find(|d| d.name == actual)
                    .and_then(|d| d.cores.clone()),
                scheduler: sched,
                default_priority: settings.default_priority.unwrap_or(0),
                coalesce_max_bytes: settings
                    .coalesce_max_bytes
                    .map_or(DEFAULT_COALESCE_MAX, |b| b.0),
                cache_bytes: settings.cache_bytes.map_or(0, |b| b.0),
                metrics: self.metrics.clone(),
                compression,
                not_tuned: tuning.as_ref().err().cloned(),
                dequantized: dequantized.map(Box::new),
                tuning: tuning.ok(),
                epoch: self.epoch,
                wedge: self.defaults.hooks.wedges(&format!("{name}-{version}")),
                fail_runs: self.defaults.hooks.fails_device(actual),
                ort_fails: self.defaults.hooks.fails_in_ort(actual),
                inline_max: self
                    .defaults
                    .hooks
                    .inline_max
                    .unwrap_or(crate::runtime::INLINE_MAX),
                run_limit: self.defaults.run_limit,
                strikes: self.strikes.clone(),
                device_load: self
                    .defaults
                    .devices
                    .iter()
                    .zip(&self.device_loads)
                    .find(|(d, _)| d.name == actual)
                    .map(|(_, l)| l.clone())
                    .unwrap_or_default(),
            },
        ))
    }
}

impl LoadJob {
    /// The layout and batch policy for the settings `build` leaves to tuning, from the cache
    /// or measured now (see `registry::tune`); or why nothing is tuned (model info shows it):
    /// model.toml sets the layout or `tune = false`, the device is not a CPU, the model is
    /// served compressed, its shapes are not known, or the measurement failed (logged; the
    /// defaults serve).
    pub(super) fn tune(&self, build: &Build) -> Result<rxd_protocol::Tuning, String> {
        let s = &build.settings;
        if !s.tune.unwrap_or(self.defaults.tune) {
            return Err("tuning is off (tune = false)".into());
        }
        if s.instances.is_some() || s.intra_op_threads.is_some() {
            return Err("the layout is set (instances or intra-op-threads)".into());
        }
        if s.compress.is_some() {
            return Err("served compressed (compress)".into());
        }
        let dev = self
            .defaults
            .devices
            .iter()
            .find(|d| d.name == build.device)
            .ok_or_else(|| format!("no device named '{}'", build.device))?;
        if dev.kind != crate::config::DeviceKind::Cpu {
            return Err(format!(
                "device '{}' is not a CPU (only CPU devices are tuned)",
                dev.name
            ));
        }
        let cores = self.defaults.intra_op_threads;
        let max_rows = s
            .max_batch_rows
            .unwrap_or(crate::scheduler::policy::Settings::default().max_batch_rows);
        let sizes: Vec<u32> = (0..8)
            .map(|i| 1u32 << i)
            .filter(|&b| b <= max_rows)
            .collect();
        // Measured as it will serve: a weights-only file dequantized, division guarded.
        let (served_bytes, dequantized) = served(&build.path, s, &build.name, build.version);
        // Sessions cost about twice the model each (weights, ORT's copies and arena); they may
        // take half the device's budget, or a quarter of the machine's memory without one.
        let model_bytes = served_bytes.as_ref().map_or_else(
            || std::fs::metadata(&build.path).map_or(0, |m| m.len()),
            |b| b.len() as u64,
        );
        let session_bytes = 2 * model_bytes;
        let limit = dev.budget.map_or_else(|| physical_memory() / 4, |b| b / 2);
        let layouts = super::tune::affordable(crate::runtime::layouts(cores), session_bytes, limit);
        let axes = s.axes();
        let key = super::tune::CacheKey {
            device: &build.device,
            cores,
            layouts: &layouts,
            sizes: &sizes,
            ort: self.runtime.version(),
            dims: s.warmup_dims.as_ref(),
            values: s.warmup_values.as_ref(),
            axes: &axes,
            dequantized: dequantized.is_some(),
        };
        let cache = super::tune::cache_path(&self.defaults.cache_dir, &build.path, &key).ok();
        let remembered = |path: &std::path::Path| {
            let known = self.tunings.lock().unwrap_or_else(|e| e.into_inner());
            known.get(path).cloned()
        };
        if let Some(t) = cache
            .as_deref()
            .filter(|_| !build.retune)
            .and_then(|p| remembered(p).or_else(|| super::tune::read_cache(p)))
        {
            tracing::info!(model = %build.name, version = build.version, "tuning (cached): {}", t.reason);
            return Ok(rxd_protocol::Tuning { cached: true, ..t });
        }
        let started = std::time::Instant::now();
        let no_dims = std::collections::HashMap::new();
        let spec = crate::runtime::TuneSpec {
            path: &build.path,
            bytes: served_bytes.as_deref(),
            target: Target {
                kind: &dev.kind,
                options: &dev.options,
                cache_dir: Some(&self.defaults.cache_dir),
            },
            options: SessionOptions {
                intra_op_threads: cores,
                allow_spinning: s.allow_spinning.unwrap_or(false),
                log_id: format!("{}:{} (tuning)", build.name, build.version),
                warmup_values: s.warmup_values.clone().unwrap_or_default(),
            },
            layouts: &layouts,
            sizes: &sizes,
            warmup_dims: s.warmup_dims.as_ref().unwrap_or(&no_dims),
            axes: &axes,
            budget: TUNE_BUDGET,
        };
        let cells = match self.runtime.measure(&spec) {
            Ok(crate::runtime::Measured::Cells(cells)) => cells,
            Ok(crate::runtime::Measured::Skipped(why)) => {
                tracing::info!(model = %build.name, version = build.version, "not tuned: {why}");
                return Err(why);
            }
            Err(e) => {
                tracing::warn!(model = %build.name, version = build.version, "tuning failed, serving with the defaults: {e}");
                return Err(format!("the measurement failed: {e}"));
            }
        };
        let mut t = super::tune::choose(&cells).ok_or("nothing could be measured")?;
        t.measured_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            model = %build.name,
            version = build.version,
            "tuned in {} ms: {}",
            t.measured_ms,
            t.reason
        );
        if let Some(path) = &cache {
            super::tune::write_cache(path, &t);
            let mut known = self.tunings.lock().unwrap_or_else(|e| e.into_inner());
            known.insert(path.clone(), t.clone());
        }
        Ok(t)
    }
}

/// What a version's sessions are made from: `None` the file at `path` itself, else the
/// model in memory — dequantized at load ([`dequantized`]) and with its integer division
/// guarded against the operands that crash ONNX Runtime (`rxd_compress::guard`: any model
/// whose integer `Div`/`Mod` can see a client's values) — and what dequantizing did.
fn served(
    path: &std::path::Path,
    settings: &ModelSettings,
    name: &str,
    version: u64,
) -> (Option<Vec<u8>>, Option<rxd_protocol::Dequantized>) {
    // Unreadable: the session's own error says so.
    let Ok(file) = std::fs::read(path) else {
        return (None, None);
    };
    let (bytes, dequantized) = dequantized(&file, settings, name, version).unzip();
    let guarded = match rxd_compress::guard::guard_division(bytes.as_deref().unwrap_or(&file)) {
        Ok((rewritten, g)) => {
            if g.guarded > 0 || g.frames > 0 || g.loops > 0 {
                tracing::info!(model = %name, version, "{g}");
            }
            if g.unguarded.is_some() {
                tracing::warn!(
                    model = %name,
                    version,
                    "{g}: a client can crash the daemon through them (see docs/models.md)"
                );
            }
            rewritten
        }
        Err(e) => {
            tracing::debug!(model = %name, version, "division not guarded: {e}");
            None
        }
    };
    (guarded.or(bytes), dequantized)
}

/// Dequantize-at-load: when `file` holds a weights-only compressed form (DequantizeLinear of
/// constant weights in front of float operators) and model.toml does not turn it off
/// (`dequantize-at-load = false`), the float model it stands for — to make the sessions from
/// — and what was done; `None`: the file serves as it is (nothing to fold, a model whose
/// activations are quantized, or the file cannot be read as ONNX: then the session's own
/// error says so).
fn dequantized(
    file: &[u8],
    settings: &ModelSettings,
    name: &str,
    version: u64,
) -> Option<(Vec<u8>, rxd_protocol::Dequantized)> {
    if !settings.dequantize_at_load.unwrap_or(true) {
        return None;
    }
    let (bytes, d) = match rxd_compress::dequant::dequantize_bytes(file) {
        Ok((Some(b), d)) => (b, d),
        Ok((None, d)) => {
            if d.refused.is_some() {
                tracing::debug!(model = %name, version, "{d}");
            }
            return None;
        }
        Err(e) => {
            tracing::debug!(model = %name, version, "not dequantized at load: {e}");
            return None;
        }
    };
    let remaining = rxd_compress::dequant::op_counts(&bytes)
        .ok()
        .and_then(|c| c.get("DequantizeLinear").copied())
        .unwrap_or(0);
    tracing::info!(
        model = %name,
        version,
        "dequantized at load: {d}; {} bytes on disk, {} served",
        file.len(),
        bytes.len()
    );
    let info = rxd_protocol::Dequantized {
        folded: d.folded as u64,
        remaining: remaining as u64,
        file_bytes: file.len() as u64,
        served_bytes: bytes.len() as u64,
    };
    Some((bytes, info))
}

/// The machine's memory in bytes (u64::MAX where the system does not say).
fn physical_memory() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    let get = |v| {
        sysconf(v)
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
    };
    match (get(SysconfVar::_PHYS_PAGES), get(SysconfVar::PAGE_SIZE)) {
        (Some(pages), Some(page)) => pages.saturating_mul(page),
        _ => u64::MAX,
    }
}

/// What measuring a model at load may take at most (session creation included).
pub const TUNE_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

impl Build {
    /// These settings with what tuning chose for the keys they leave unset. The latency
    /// target (the adaptive batch policy) only where no static wait is set either.
    pub(super) fn tuned(&self, t: &rxd_protocol::Tuning) -> Build {
        let mut b = self.clone();
        let s = &mut b.settings;
        s.instances = Some(t.instances);
        s.intra_op_threads = Some(t.threads);
        s.max_batch_rows.get_or_insert(t.max_batch_rows);
        if s.latency_target_ms.is_none() && s.max_queue_delay_us.is_none() {
            s.latency_target_ms = Some(t.latency_target_ms);
        }
        b
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
        return Err(format!("max-dims names '{unknown}', which is not an input"));
    }
    let values = settings.warmup_values.clone().unwrap_or_default();
    if let Some(unknown) = values.keys().find(|k| {
        !sig.inputs
            .iter()
            .any(|s| &s.name == *k && crate::runtime::integer(s.dtype))
    }) {
        return Err(format!(
            "warmup-values names '{unknown}', which is not an input of an integer type"
        ));
    }
    for spec in &sig.inputs {
        if let Some(&v) = values.get(&spec.name)
            && !crate::runtime::fits(spec.dtype, v)
        {
            return Err(format!(
                "warmup-values gives '{}' {v}, which is not a value of its type {}",
                spec.name, spec.dtype
            ));
        }
    }
    let warmup_dims = settings.warmup_dims.clone().unwrap_or_default();
    let mut elements = 0u64;
    let axes = sig.axes.inputs.clone();
    for (spec, axis) in sig.inputs.iter_mut().zip(axes) {
        let given = warmup_dims.get(&spec.name).map(Vec::as_slice);
        let warm = warmup_shape(spec, axis, warm_rows, given);
        elements = elements.saturating_add(warm.iter().fold(1u64, |a, &d| a.saturating_mul(d)));
        spec.max_dims =
            crate::validate::max_dims(spec, &warm, configured.get(&spec.name).map(Vec::as_slice))?;
    }
    sig.allow_empty = settings.allow_empty_inputs.unwrap_or(false);
    Ok(elements)
}
