//! Configuration: the TOML file, flag overrides, defaults and validation.
//!
//! Parse → validate → act: [`load`] returns a [`Config`] only when every check passed, and
//! nothing binds a socket or loads a model before that. [`load`] collects every problem it finds
//! (not just the first) so that `rxd check-config` can print them all. This module does no IO
//! beyond reading the file and checking that paths and groups exist.
//!
//! Layout: `file` is the file's schema (serde) and its problems named by key and line;
//! `resolve` merges file, flags and defaults and validates, asking [`Host`] about the machine;
//! this module holds what is in force ([`Config`]) and what a reload may change.

mod file;
mod host;
mod resolve;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeOpts;

use file::read_file;
pub use file::{DeviceConfig, FileConfig, KindName, parse_file};
pub use host::{Host, System};
pub use resolve::{resolve, resolve_on};

/// Where the .deb puts ONNX Runtime's library.
pub const BUNDLED_ORT_LIBRARY: &str = "/usr/lib/rxd/libonnxruntime.so.1.31.1";
pub const DEFAULT_SOCKET: &str = "/run/rxd/rxd.sock";
pub const DEFAULT_REPOSITORY: &str = "/var/lib/rxd/models";
/// Priorities non-admin peers may use: 0..=this. The engine APIs users come from use small
/// levels (`priority=5`); with aging, this also bounds how long a peer's stream can hold back
/// a default-priority request (`priority-aging-ms` × this).
pub const DEFAULT_MAX_PEER_PRIORITY: u8 = 15;

/// Where the .deb puts the WebGPU plugin execution provider.
pub const BUNDLED_WEBGPU_LIBRARY: &str = "/usr/lib/rxd/libonnxruntime_providers_webgpu.so";

pub use crate::runtime::DeviceKind;

/// Test hooks (ARCHITECTURE.md), read from the environment once at start and passed to what
/// they change: `RXD_TEST_LOAD_HANG=<model prefix>` makes those models' loads hang in session
/// creation (the load-deadline test); `RXD_TEST_WEDGE=<model>` makes that model's workers hang
/// on their first batch (the watchdog test); `RXD_TEST_NO_FLOAT16=<device,...>` makes those
/// devices' capability probe find no float16 (the float16 placement test);
/// `RXD_TEST_FAIL_DEVICE=<device,...>` makes every run on those devices fail (the failing
/// device test: its batches are handed back unrun to be retried elsewhere); a device written
/// `ort:<device>` there fails inside ONNX Runtime instead (each run is given an input the
/// model does not have), through the path a real execution provider's failure takes;
/// `RXD_TEST_INLINE_MAX_US=<µs>` raises the longest expected run of a batch that the ring
/// poller runs itself (a debug build's own part of a batch is many times slower than a
/// release build's, and counts in that expectation: the test of that path raises it).
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    pub load_hang: Option<String>,
    pub wedge: Option<String>,
    /// Devices (names, comma-separated) whose workers fail every run.
    pub fail_device: Option<String>,
    /// Devices (names, comma-separated) whose capability probe reports no float16, as a
    /// Polaris GPU's would: float16 placement is tested without such a GPU.
    pub no_float16: Option<String>,
    /// The light-batch bound in place of `runtime::INLINE_MAX`.
    pub inline_max: Option<std::time::Duration>,
    /// Accepted connections keep `SO_PASSRIGHTS` on: fds a peer sends reach the daemon, as
    /// on a kernel without the option (before 6.16), to test what it does with them.
    pub pass_fds: bool,
    /// The first closes of each user's fds on the closer threads (as many as it may have
    /// under way, `closer::PER_USER_THREADS`) take this long: closes that hang, as a FUSE
    /// file's or a lingering socket's would, without the race of making them hang for real.
    pub close_delay: Option<std::time::Duration>,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        TestHooks {
            load_hang: var("RXD_TEST_LOAD_HANG"),
            wedge: var("RXD_TEST_WEDGE"),
            fail_device: var("RXD_TEST_FAIL_DEVICE"),
            no_float16: var("RXD_TEST_NO_FLOAT16"),
            inline_max: var("RXD_TEST_INLINE_MAX_US")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_micros),
            pass_fds: var("RXD_TEST_PASS_FDS").is_some(),
            close_delay: var("RXD_TEST_CLOSE_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
        }
    }

    /// Whether device `name`'s probe is made to find no float16.
    pub fn hides_float16(&self, name: &str) -> bool {
        self.no_float16
            .as_ref()
            .is_some_and(|l| l.split(',').any(|d| d.trim() == name))
    }

    /// Whether every run on device `name` fails (handed back unrun).
    pub fn fails_device(&self, name: &str) -> bool {
        self.fail_device
            .as_ref()
            .is_some_and(|l| l.split(',').any(|d| d.trim() == name))
    }

    /// Whether every run on device `name` fails inside ONNX Runtime.
    pub fn fails_in_ort(&self, name: &str) -> bool {
        self.fail_device.as_ref().is_some_and(|l| {
            l.split(',')
                .any(|d| d.trim().strip_prefix("ort:") == Some(name))
        })
    }

    /// Whether loads of `model` hang.
    pub fn load_hangs(&self, model: &str) -> bool {
        self.load_hang
            .as_ref()
            .is_some_and(|p| model.starts_with(p))
    }

    /// Whether the workers of `label` (`model-version`) hang on their first batch.
    pub fn wedges(&self, label: &str) -> bool {
        self.wedge.as_ref().is_some_and(|w| label.starts_with(w))
    }
}

/// A device in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub kind: DeviceKind,
    /// `None` = unlimited.
    pub budget: Option<u64>,
    pub options: Vec<(String, String)>,
    pub cpu_fallback: bool,
    /// The cores its sessions' threads run on (`cores`); `None`: wherever the daemon may run.
    pub cores: Option<std::sync::Arc<[usize]>>,
}

/// The validated configuration in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub model_repository: PathBuf,
    /// Resolved ONNX Runtime library path (flag/config, ORT_DYLIB_PATH, bundled).
    pub ort_library: PathBuf,
    /// Default intra-op threads per instance; the cores a tuned model's layout spreads over.
    pub intra_op_threads: u32,
    /// `intra-op-threads` was left automatic (0 or unset): the daemon follows the cores it
    /// may use when they change (`supervise::spawn_core_watch`).
    pub cores_auto: bool,
    /// Load-time tuning, where model.toml does not say (`tune`).
    pub tune: bool,
    /// Threads of the async runtime that reads sockets (model workers are separate).
    pub io_threads: u32,
    pub admin_group: Option<String>,
    pub admin_gid: Option<u32>,
    pub max_connections: u32,
    pub max_connections_per_uid: u32,
    pub max_in_flight: u32,
    pub max_unsent_bytes: u64,
    pub request_memory_bytes: u64,
    /// `None`: no shared arena.
    pub run_memory_bytes: Option<u64>,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    /// `None` = never.
    pub idle_timeout: Option<Duration>,
    pub max_frame_bytes: u64,
    /// Largest shared-memory arena one connection may have (0 = arenas disabled).
    pub max_arena_bytes: u64,
    /// Total of all connections' arenas.
    pub arena_total_bytes: u64,
    /// Largest model file `publish` accepts.
    pub max_publish_bytes: u64,
    /// Default queue capacity per model (requests waiting for a worker).
    pub queue_capacity: u32,
    /// Non-admin peers may ask for priorities `0..=max_peer_priority`; higher is refused.
    pub max_peer_priority: u8,
    pub shutdown_grace: Duration,
    /// A worker on one batch for longer than this is stuck: health says so and the systemd
    /// watchdog pings stop.
    pub watchdog_stuck: Duration,
    /// A load (session creation, compression, warmup) that takes longer fails; its thread is
    /// left behind, so no load can hold the registry or shutdown.
    pub load_timeout: Duration,
    pub log_level: String,
    /// Devices, the default one first.
    pub devices: Vec<Device>,
    pub preload: Vec<String>,
    pub load_on_demand: bool,
    /// Loopback address of the optional `/metrics` listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where shader and engine caches go (created on first use).
    pub cache_directory: PathBuf,
}

impl Config {
    /// The configuration in force, by config key, for `status`.
    pub fn in_force(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("socket", self.socket.display().to_string());
        put("socket-mode", format!("{:04o}", self.socket_mode));
        put(
            "model-repository",
            self.model_repository.display().to_string(),
        );
        put("ort-library", self.ort_library.display().to_string());
        put(
            "run-memory-bytes",
            self.run_memory_bytes
                .map_or_else(|| "unlimited".into(), |b| b.to_string()),
        );
        put("intra-op-threads", self.intra_op_threads.to_string());
        put("tune", self.tune.to_string());
        put("io-threads", self.io_threads.to_string());
        put("admin-group", self.admin_group.clone().unwrap_or_default());
        put("max-connections", self.max_connections.to_string());
        put(
            "max-connections-per-uid",
            self.max_connections_per_uid.to_string(),
        );
        put("max-in-flight", self.max_in_flight.to_string());
        put("max-unsent-bytes", self.max_unsent_bytes.to_string());
        put(
            "request-memory-bytes",
            self.request_memory_bytes.to_string(),
        );
        put(
            "handshake-timeout-secs",
            self.handshake_timeout.as_secs().to_string(),
        );
        put(
            "frame-timeout-secs",
            self.frame_timeout.as_secs().to_string(),
        );
        put(
            "idle-timeout-secs",
            self.idle_timeout.map_or(0, |d| d.as_secs()).to_string(),
        );
        put("max-frame-bytes", self.max_frame_bytes.to_string());
        put("max-arena-bytes", self.max_arena_bytes.to_string());
        put("arena-total-bytes", self.arena_total_bytes.to_string());
        put("max-publish-bytes", self.max_publish_bytes.to_string());
        put("queue-capacity", self.queue_capacity.to_string());
        put("max-peer-priority", self.max_peer_priority.to_string());
        put(
            "shutdown-grace-secs",
            self.shutdown_grace.as_secs().to_string(),
        );
        put(
            "watchdog-stuck-secs",
            self.watchdog_stuck.as_secs().to_string(),
        );
        put("load-timeout-secs", self.load_timeout.as_secs().to_string());
        put("log-level", self.log_level.clone());
        put("preload", self.preload.join(","));
        put("load-on-demand", self.load_on_demand.to_string());
        put(
            "cache-directory",
            self.cache_directory.display().to_string(),
        );
        put(
            "metrics-listen",
            self.metrics_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
        );
        for d in &self.devices {
            put(
                &format!("device.{}", d.name),
                format!(
                    "kind={}{}",
                    d.kind.name(),
                    match &d.kind {
                        DeviceKind::WebGpu { library, adapter } => {
                            format!(" ep-library={} adapter={adapter}", library.display())
                        }
                        DeviceKind::Cuda { id } | DeviceKind::TensorRt { id } => {
                            format!(" device-id={id}")
                        }
                        DeviceKind::Cpu => String::new(),
                    }
                ) + &d
                    .options
                    .iter()
                    .map(|(k, v)| format!(" {k}={v}"))
                    .collect::<String>()
                    + if d.cpu_fallback { " cpu-fallback" } else { "" },
            );
        }
        m
    }

    /// The keys whose values differ between `self` and `new` that a reload cannot apply
    /// (every key of [`Config::in_force`] but [`RELOADABLE`]): they take effect after a
    /// restart.
    pub fn needs_restart(&self, new: &Config) -> Vec<String> {
        let (was, now) = (self.in_force(), new.in_force());
        let mut keys: Vec<String> = was
            .keys()
            .chain(now.keys())
            .filter(|k| !RELOADABLE.contains(&k.as_str()) && was.get(*k) != now.get(*k))
            .cloned()
            .collect();
        // The first device is the default one: an order changed is a change.
        let names = |c: &Config| c.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        if names(self) != names(new) {
            keys.push("device".into());
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// The keys of [`Config::in_force`] that a reload applies while serving (with each device's
/// `memory-budget`, which is not among them); a change to any other takes a restart.
pub const RELOADABLE: &[&str] = &["preload", "load-on-demand"];

/// One thing wrong with the configuration, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A size in bytes, written as an integer or a string with a unit (`512MiB`, `2G`, `64k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        rxd_protocol::units::parse_size(s).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Reads the file named by `opts.config` (if any), applies flags, validates.
pub fn load(opts: &ServeOpts) -> Result<Config, ConfigError> {
    let file = match &opts.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    resolve(
        file,
        opts,
        std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
    )
}
