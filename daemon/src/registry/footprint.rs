//! What a version costs: it is built on a thread of its own ([`LoadJob`]) while the registry
//! waits under `load_lock` until the load's deadline, and measured as the resident-set growth
//! over the build — with freed heap returned to the kernel before and after, so the figure is
//! what the model keeps, not the load's transient peak — plus device memory growth where the
//! driver reports it (NVML). The device's one-time set-up is paid before the measurement.
//!
//! The figure accounted (`Registry::finish`) is at least the file size and at least the largest
//! figure measured earlier for the version: a reload after an eviction reuses pages the
//! allocator kept and reads low. ORT's own arena statistics (`TotalAllocated`) are reported
//! beside it and never accounted: they miss most weights. Only loads on a CPU device teach the
//! estimator; on other devices the host memory that grows is largely the driver stack's
//! (shader compilers, Dawn), counted toward the first model that needs it.
//! Boundary: measures; the budget decides what the figure means.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Defaults, ModelSettings, Registry};
use crate::model::LoadedModel;
use crate::runtime::Runtime;

/// A build's outcome: the model (or a share's workers) or why not, the bytes it grew the
/// process (and device) by, and its time in ms.
pub(super) type Measured<T = LoadedModel> = (Result<T, BuildError>, u64, u64);

/// What a measured build makes of the built sessions: a [`LoadedModel`], or the workers of
/// a share on another device.
pub(super) type Make<T> =
    fn(&LoadJob, &Build, Result<rxd_protocol::Tuning, String>) -> Result<T, BuildError>;

/// Why a version could not be built; its text is what a failed load reports.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no device named '{0}'")]
    NoDevice(String),
    /// model.toml asks for something the model does not have.
    #[error("model.toml: {0}")]
    Settings(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("cannot start a load thread: {0}")]
    Thread(std::io::Error),
    #[error("timed out after {} s (load-timeout-secs)", .0.as_secs())]
    TimedOut(Duration),
    #[error("the load thread ended without a result")]
    Vanished,
}

/// A version to build: which, from which file, with what settings, on which device. Owned,
/// so that the build can run on a thread of its own.
#[derive(Debug, Clone)]
pub(super) struct Build {
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
    pub settings: ModelSettings,
    pub device: String,
    /// Tune by measuring, whatever the cache holds (`rxctl configure --retune`).
    pub retune: bool,
}

/// What a load needs, owned, so that it can run on a thread of its own and be left behind
/// when it passes its deadline (see [`Registry::measured_build`]).
pub(super) struct LoadJob {
    pub runtime: Arc<Runtime>,
    pub tunings: super::tune::Remembered,
    pub defaults: Defaults,
    pub metrics: Arc<crate::metrics::ModelMetrics>,
    pub strikes: Arc<crate::runtime::Strikes>,
    pub epoch: Instant,
    /// Per device (`defaults.devices`' order): what its workers record their batches into.
    pub device_loads: Vec<Arc<crate::metrics::DeviceLoad>>,
}

impl Registry {
    /// Runs [`LoadJob::measured_build`] on a thread of its own and waits for it until the
    /// load's deadline (model.toml `load-timeout-secs`, else the daemon's). Call under
    /// `load_lock`. Past the deadline the load fails ("timed out after N s") and the caller
    /// releases the lock and the registry slot as for any failure; the thread is left behind
    /// (detached): it still holds what it was building — sessions, their memory, unaccounted —
    /// and drops it if it ever finishes. Shutdown does not wait for it.
    pub(super) fn measured_build(&self, build: Build) -> Measured {
        self.measured_build_with(build, LoadJob::build)
    }

    /// [`Registry::measured_build`], making what `make` makes of the sessions.
    pub(super) fn measured_build_with<T: Send + 'static>(
        &self,
        build: Build,
        make: Make<T>,
    ) -> Measured<T> {
        let (name, version) = (build.name.clone(), build.version);
        let limit = build
            .settings
            .load_timeout_secs
            .map_or(self.defaults.load_timeout, Duration::from_secs);
        // A device with cores of its own: the load runs on them (ONNX Runtime's intra-op
        // threads, created with the sessions, inherit them), and its models' threads and
        // tuning count them; else the cores the daemon may use now (`Registry::follow_cores`).
        let pinned = self
            .defaults
            .devices
            .iter()
            .find(|d| d.name == build.device)
            .and_then(|d| d.cores.clone());
        let job = LoadJob {
            runtime: self.runtime.clone(),
            tunings: self.tunings.clone(),
            defaults: Defaults {
                intra_op_threads: pinned
                    .as_ref()
                    .map_or_else(|| self.cores(), |c| c.len() as u32),
                ..self.defaults.clone()
            },
            metrics: self.model_metrics(&name, version),
            strikes: self.model_strikes(&name),
            epoch: self.epoch,
            device_loads: self.loads.clone(),
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let started = Instant::now();
        let thread = format!("rxd-load-{name}");
        let device = build.device.clone();
        let spawned = std::thread::Builder::new().name(thread).spawn(move || {
            crate::affinity::pin_for(&device, pinned.as_deref());
            let built = job.measured_build(&build, make);
            // Nobody waits any more (past the deadline): the build is dropped here.
            let _ = tx.send(built);
        });
        if let Err(e) = spawned {
            return (Err(BuildError::Thread(e)), 0, 0);
        }
        let elapsed = || started.elapsed().as_millis() as u64;
        match rx.recv_timeout(limit) {
            Ok(built) => built,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::error!(
                    model = %name,
                    version,
                    "the load did not finish within {} s; its thread is left behind",
                    limit.as_secs()
                );
                (Err(BuildError::TimedOut(limit)), 0, elapsed())
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                (Err(BuildError::Vanished), 0, elapsed())
            }
        }
    }
}

impl LoadJob {
    /// Primes the device, builds the version and measures what it keeps. Runs on the load's
    /// own thread while [`Registry::measured_build`] holds `load_lock`.
    fn measured_build<T>(&self, build: &Build, make: Make<T>) -> Measured<T> {
        let (name, version, device) = (build.name.as_str(), build.version, build.device.as_str());
        self.prime(device);
        // Tuning's own sessions come and go before the footprint's baseline.
        let tuning = self.tune(build);
        let tuned;
        let build = match &tuning {
            Ok(t) => {
                tuned = build.tuned(t);
                &tuned
            }
            Err(_) => build,
        };
        crate::runtime::release_free_memory();
        let rss0 = crate::metrics::resident_bytes();
        let vram0 = self.device_memory_used(device);
        let started = Instant::now();
        let built = make(self, build, tuning);
        if built.is_err() {
            // A load that failed after profiling began leaves ORT's profile behind.
            self.runtime.remove_profiles(name, version);
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
}
