//! Configuration: the TOML file, flag overrides, defaults and validation.
//!
//! Parse → validate → act: [`load`] returns a [`Config`] only when every check passed, and
//! nothing binds a socket or loads a model before that. [`load`] collects every problem it finds
//! (not just the first) so that `rxd check-config` can print them all. This module does no IO
//! beyond reading the file and checking that paths and groups exist.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeOpts;
use rxd_protocol::limits;

/// Where the .deb puts ONNX Runtime's library.
pub const BUNDLED_ORT_LIBRARY: &str = "/usr/lib/rxd/libonnxruntime.so.1.31.1";
pub const DEFAULT_SOCKET: &str = "/run/rxd/rxd.sock";
pub const DEFAULT_REPOSITORY: &str = "/var/lib/rxd/models";
/// Priorities non-admin peers may use: 0..=this. The engine APIs users come from use small
/// levels (`priority=5`); with aging, this also bounds how long a peer's stream can hold back
/// a default-priority request (`priority-aging-ms` × this).
pub const DEFAULT_MAX_PEER_PRIORITY: u8 = 15;

/// The config file as written. Every key is optional; flags override keys of the same name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub model_repository: Option<PathBuf>,
    pub ort_library: Option<PathBuf>,
    pub intra_op_threads: Option<u32>,
    pub io_threads: Option<u32>,
    pub admin_group: Option<String>,
    pub max_connections: Option<u32>,
    /// Connections one non-admin user may hold at once. Default: a quarter of
    /// `max-connections` (at least 1).
    pub max_connections_per_uid: Option<u32>,
    pub max_in_flight: Option<u32>,
    /// Answer bytes a connection may have waiting for its client to read them; beyond it the
    /// socket is not read and further answers are replaced by `unread_answers` errors.
    pub max_unsent_bytes: Option<ByteSize>,
    /// Request bytes the daemon holds at once over all connections (frames being read, and
    /// requests queued or running); a non-admin user may hold at most half.
    pub request_memory_bytes: Option<ByteSize>,
    /// ONNX Runtime's CPU memory — model weights and every run's tensors — in one arena shared
    /// by all sessions and capped at this; a run that needs more fails. Default: half the
    /// machine's memory; 0 = no shared arena (each session grows its own without a cap).
    pub run_memory_bytes: Option<ByteSize>,
    /// A connection must complete its handshake within this.
    pub handshake_timeout_secs: Option<u64>,
    /// A frame whose first bytes arrived must arrive whole within this.
    pub frame_timeout_secs: Option<u64>,
    /// A connection with nothing in flight that sends nothing for this long is closed, and
    /// so is one whose client takes none of its answers for this long. 0 = never.
    pub idle_timeout_secs: Option<u64>,
    pub max_frame_bytes: Option<ByteSize>,
    pub max_arena_bytes: Option<ByteSize>,
    pub arena_total_bytes: Option<ByteSize>,
    /// Largest model file an admin may publish into the repository (`rxctl model add`).
    pub max_publish_bytes: Option<ByteSize>,
    pub queue_capacity: Option<u32>,
    /// Highest request priority a non-admin peer may ask for (default 15).
    pub max_peer_priority: Option<u8>,
    pub shutdown_grace_secs: Option<u64>,
    pub watchdog_stuck_secs: Option<u64>,
    /// Seconds a model load may take before it fails (model.toml `load-timeout-secs`
    /// overrides it per model). Default 300.
    pub load_timeout_secs: Option<u64>,
    pub log_level: Option<String>,
    /// Memory budget of the default (first) device; absent or 0 = unlimited.
    pub memory_budget: Option<ByteSize>,
    /// Devices models are placed on; default: one `cpu` device.
    #[serde(default)]
    pub device: Vec<DeviceConfig>,
    /// Loaded at start: `*` (every model), `model` (its served versions) or `model:version`.
    /// Default `["*"]`.
    pub preload: Option<Vec<String>>,
    /// Load a model that is not resident when a request names it. Default true.
    pub load_on_demand: Option<bool>,
    /// Serve Prometheus' `/metrics` over HTTP on this loopback address (e.g.
    /// "127.0.0.1:9464"). Off by default: the daemon opens no network socket unless asked.
    pub metrics_listen: Option<String>,
    /// Shader and engine caches (Mesa, TensorRT) live here. Default: $CACHE_DIRECTORY (set by
    /// systemd's CacheDirectory=), else /var/cache/rxd.
    pub cache_directory: Option<PathBuf>,
}

/// A `[[device]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceConfig {
    pub name: String,
    /// `cpu` (default), `webgpu`, `cuda` or `tensorrt`.
    pub kind: Option<String>,
    /// Absent or 0 = unlimited.
    pub memory_budget: Option<ByteSize>,
    /// webgpu: the WebGPU plugin EP library (default: the bundled one).
    pub ep_library: Option<PathBuf>,
    /// cuda/tensorrt: the GPU's index; webgpu: the adapter's index among the plugin's devices.
    pub device_id: Option<u32>,
    /// Execution-provider options, as the EP names them (strings).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// When the execution provider cannot be created, run the device's models on the CPU
    /// instead (health says degraded) rather than failing their loads. Default false.
    pub cpu_fallback: Option<bool>,
}

/// Where the .deb puts the WebGPU plugin execution provider.
pub const BUNDLED_WEBGPU_LIBRARY: &str = "/usr/lib/rxd/libonnxruntime_providers_webgpu.so";

pub use crate::runtime::DeviceKind;

/// Test hooks (ARCHITECTURE.md), read from the environment once at start and passed to what
/// they change: `RXD_TEST_LOAD_HANG=<model prefix>` makes those models' loads hang in session
/// creation (the load-deadline test); `RXD_TEST_WEDGE=<model>` makes that model's workers hang
/// on their first batch (the watchdog test).
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    pub load_hang: Option<String>,
    pub wedge: Option<String>,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        TestHooks {
            load_hang: var("RXD_TEST_LOAD_HANG"),
            wedge: var("RXD_TEST_WEDGE"),
        }
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
}

/// The validated configuration in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub model_repository: PathBuf,
    /// Resolved ONNX Runtime library path (flag/config, ORT_DYLIB_PATH, bundled).
    pub ort_library: PathBuf,
    /// Default intra-op threads per instance.
    pub intra_op_threads: u32,
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
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => return Err(format!("unknown size unit '{other}' (use KiB, MiB, GiB)")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("'{s}' is too large"))
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

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![Problem {
            key: "config".into(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    parse_file(&text).map_err(|_| ConfigError(file_problems(&text, path)))
}

/// Every problem of a config file that does not deserialize (serde stops at the first): each
/// top-level key, and each key of each `[[device]]` table, is tried on its own, so a file with
/// three keys of the wrong type gets three problems, each naming its key and line.
fn file_problems(text: &str, path: &Path) -> Vec<Problem> {
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            return vec![Problem {
                key: path.display().to_string(),
                message: format!("not valid TOML: {}", e.to_string().trim_end()),
            }];
        }
    };
    let place = |key: &str| match line_of(text, key) {
        Some(n) => format!("{} line {n}", path.display()),
        None => path.display().to_string(),
    };
    let check = |t: toml::Table| -> Result<(), String> {
        FileConfig::deserialize(t)
            .map(|_| ())
            .map_err(|e| e.message().trim_end().to_string())
    };
    let mut problems = Vec::new();
    for (key, value) in table {
        if let (true, toml::Value::Array(devices)) = (key == "device", &value) {
            for (i, d) in devices.iter().enumerate() {
                let Some(d) = d.as_table() else {
                    problems.push(Problem {
                        key: format!("device[{i}]"),
                        message: format!("{}: a [[device]] must be a table", path.display()),
                    });
                    continue;
                };
                if !d.contains_key("name") {
                    problems.push(Problem {
                        key: format!("device[{i}]"),
                        message: format!("{}: a [[device]] needs a name", path.display()),
                    });
                }
                for (k, v) in d {
                    let mut one = toml::Table::new();
                    one.insert("name".into(), toml::Value::String("x".into()));
                    one.insert(k.clone(), v.clone());
                    let mut t = toml::Table::new();
                    t.insert(
                        "device".into(),
                        toml::Value::Array(vec![toml::Value::Table(one)]),
                    );
                    if let Err(message) = check(t) {
                        problems.push(Problem {
                            key: format!("device[{i}].{k}"),
                            message: format!("{}: {message}", path.display()),
                        });
                    }
                }
            }
            continue;
        }
        let mut t = toml::Table::new();
        t.insert(key.clone(), value);
        if let Err(message) = check(t) {
            problems.push(Problem {
                message: format!("{}: {message}", place(&key)),
                key,
            });
        }
    }
    // In the file's order.
    problems.sort_by_key(|p| line_of(text, &p.key).unwrap_or(usize::MAX));
    if problems.is_empty() {
        // Not a key's own fault (should not happen): say what serde said.
        let message = parse_file(text).err().unwrap_or_default();
        problems.push(Problem {
            key: key_of_toml_error(&message),
            message: format!("{}: {message}", path.display()),
        });
    }
    problems
}

/// The 1-based line where top-level `key` is set (`key = ...`), if it is written plainly.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// Parses config text (no validation).
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// The key named in a toml error ("unknown field `foo`" → "foo"), for the problem's key.
fn key_of_toml_error(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "config".into())
}

/// Merges file and flags, applies defaults and validates. `env_ort` is `ORT_DYLIB_PATH`.
pub fn resolve(
    file: FileConfig,
    opts: &ServeOpts,
    env_ort: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut bad = |key: &str, message: String| {
        problems.push(Problem {
            key: key.into(),
            message,
        })
    };

    let socket = opts
        .socket
        .clone()
        .or(file.socket)
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    if socket.as_os_str().is_empty() {
        bad("socket", "must not be empty".into());
    } else if socket.as_os_str().len() >= 108 {
        bad(
            "socket",
            format!(
                "path is longer than a Unix socket allows (107 bytes): {}",
                socket.display()
            ),
        );
    }

    let mode_text = opts
        .socket_mode
        .clone()
        .or(file.socket_mode)
        .unwrap_or_else(|| "0660".into());
    let socket_mode = match u32::from_str_radix(mode_text.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => m,
        _ => {
            bad(
                "socket-mode",
                format!("'{mode_text}' is not an octal permission mode like 0660"),
            );
            0o660
        }
    };

    let model_repository = opts
        .model_repository
        .clone()
        .or(file.model_repository)
        .unwrap_or_else(|| DEFAULT_REPOSITORY.into());
    if !model_repository.is_dir() {
        bad(
            "model-repository",
            format!("{} is not a directory", model_repository.display()),
        );
    }

    let (ort_library, ort_key) = match (opts.ort_library.clone().or(file.ort_library), env_ort) {
        (Some(p), _) => (p, "ort-library"),
        (None, Some(p)) => (p, "ORT_DYLIB_PATH"),
        (None, None) => (PathBuf::from(BUNDLED_ORT_LIBRARY), "ort-library"),
    };
    if !ort_library.is_file() {
        bad(
            ort_key,
            format!(
                "ONNX Runtime library {} not found; set ort-library in the config, --ort-library, \
                 or ORT_DYLIB_PATH (scripts/fetch-deps puts one in .deps/onnxruntime/)",
                ort_library.display()
            ),
        );
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let intra_op_threads = match opts.intra_op_threads.or(file.intra_op_threads).unwrap_or(0) {
        0 => cores,
        n if n > 1024 => {
            bad("intra-op-threads", format!("{n} is more than 1024"));
            cores
        }
        n => n,
    };

    let io_threads = match opts.io_threads.or(file.io_threads).unwrap_or(1) {
        n @ 1..=64 => n,
        n => {
            bad("io-threads", format!("{n} is out of range 1..=64"));
            1
        }
    };

    let admin_group = opts.admin_group.clone().or(file.admin_group);
    let admin_gid = match &admin_group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            Ok(None) => {
                bad("admin-group", format!("group '{name}' does not exist"));
                None
            }
            Err(e) => {
                bad("admin-group", format!("cannot look up group '{name}': {e}"));
                None
            }
        },
    };

    let mut positive = |key: &str, v: Option<u32>, default: u32, max: u32| match v {
        None => default,
        Some(n) if (1..=max).contains(&n) => n,
        Some(n) => {
            bad(key, format!("{n} is out of range 1..={max}"));
            default
        }
    };
    let max_connections = positive("max-connections", file.max_connections, 256, 65536);
    let max_in_flight = positive(
        "max-in-flight",
        file.max_in_flight,
        limits::DEFAULT_MAX_IN_FLIGHT,
        65536,
    );
    let queue_capacity = positive("queue-capacity", file.queue_capacity, 1024, 1 << 20);
    let max_connections_per_uid = positive(
        "max-connections-per-uid",
        file.max_connections_per_uid,
        (max_connections / 4).max(1),
        max_connections,
    );
    let mut seconds = |key: &str, v: Option<u64>, default: u64| match v {
        None => Duration::from_secs(default),
        Some(n) if (1..=86_400).contains(&n) => Duration::from_secs(n),
        Some(n) => {
            bad(key, format!("{n} is out of range 1..=86400"));
            Duration::from_secs(default)
        }
    };
    let handshake_timeout = seconds("handshake-timeout-secs", file.handshake_timeout_secs, 10);
    let frame_timeout = seconds("frame-timeout-secs", file.frame_timeout_secs, 10);
    let idle_timeout = match file.idle_timeout_secs {
        Some(0) => None,
        v => Some(seconds("idle-timeout-secs", v, 600)),
    };
    let max_peer_priority = file.max_peer_priority.unwrap_or(DEFAULT_MAX_PEER_PRIORITY);

    let max_frame_bytes = match file.max_frame_bytes {
        None => limits::DEFAULT_MAX_FRAME,
        Some(ByteSize(n)) if (4096..=limits::MAX_FRAME_LIMIT).contains(&n) => n,
        Some(ByteSize(n)) => {
            bad(
                "max-frame-bytes",
                format!("{n} is out of range 4KiB..={}", limits::MAX_FRAME_LIMIT),
            );
            limits::DEFAULT_MAX_FRAME
        }
    };

    let max_unsent_bytes = file
        .max_unsent_bytes
        .map_or(limits::DEFAULT_MAX_UNSENT, |b| b.0);
    if max_unsent_bytes < 65536 {
        bad(
            "max-unsent-bytes",
            format!("{max_unsent_bytes} is less than 64KiB"),
        );
    }
    let request_memory_bytes = file.request_memory_bytes.map_or(
        limits::DEFAULT_REQUEST_MEMORY.max(4 * max_frame_bytes),
        |b| b.0,
    );
    if request_memory_bytes < 4 * max_frame_bytes {
        bad(
            "request-memory-bytes",
            format!(
                "{request_memory_bytes} is less than four times max-frame-bytes \
                 ({max_frame_bytes}): a user's quarter must hold one whole frame"
            ),
        );
    }

    let run_memory_bytes = match file.run_memory_bytes {
        Some(ByteSize(0)) => None,
        Some(ByteSize(n)) if n < 64 << 20 => {
            bad(
                "run-memory-bytes",
                format!("{n} is less than 64MiB (0 turns the cap off)"),
            );
            None
        }
        Some(ByteSize(n)) => Some(n),
        None => physical_memory().map(|m| m / 2),
    };

    let max_arena_bytes = file
        .max_arena_bytes
        .map_or(limits::DEFAULT_MAX_ARENA, |b| b.0);
    let arena_total_bytes = file
        .arena_total_bytes
        .map_or(limits::DEFAULT_ARENA_TOTAL.max(2 * max_arena_bytes), |b| {
            b.0
        });
    if arena_total_bytes < 2 * max_arena_bytes {
        bad(
            "arena-total-bytes",
            format!(
                "{arena_total_bytes} is less than twice max-arena-bytes ({max_arena_bytes}): a \
                 user's half must hold one whole arena"
            ),
        );
    }

    let shutdown_grace = Duration::from_secs(file.shutdown_grace_secs.unwrap_or(30));
    let watchdog_stuck = Duration::from_secs(file.watchdog_stuck_secs.unwrap_or(120).max(1));
    let load_timeout = match file.load_timeout_secs {
        None => Duration::from_secs(300),
        Some(n @ 1..=86400) => Duration::from_secs(n),
        Some(n) => {
            bad(
                "load-timeout-secs",
                format!("{n} is out of range 1..=86400"),
            );
            Duration::from_secs(300)
        }
    };
    let log_level = opts
        .log_level
        .clone()
        .or(file.log_level)
        .unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        bad("log-level", format!("'{log_level}' is not a log filter"));
    }

    let mut devices: Vec<Device> = Vec::new();
    for (i, d) in file.device.iter().enumerate() {
        let kind_name = d.kind.clone().unwrap_or_else(|| "cpu".into());
        if rxd_protocol::check_name(&d.name).is_err() {
            bad(
                "device.name",
                format!("'{}' is not a valid device name", d.name),
            );
        } else if devices.iter().any(|o| o.name == d.name) {
            bad(
                "device.name",
                format!("device '{}' is listed twice", d.name),
            );
        }
        let id = d.device_id.unwrap_or(0);
        let kind = match kind_name.as_str() {
            "cpu" => DeviceKind::Cpu,
            // A missing plugin library is not a config error: loads on the device fail (or
            // fall back) with the reason, and the daemon serves everything else.
            "webgpu" => DeviceKind::WebGpu {
                library: d
                    .ep_library
                    .clone()
                    .unwrap_or_else(|| BUNDLED_WEBGPU_LIBRARY.into()),
                adapter: id,
            },
            "cuda" => DeviceKind::Cuda { id },
            "tensorrt" => DeviceKind::TensorRt { id },
            other => {
                bad(
                    "device.kind",
                    format!(
                        "device '{}': kind '{other}' is not one of cpu, webgpu, cuda, tensorrt",
                        d.name
                    ),
                );
                DeviceKind::Cpu
            }
        };
        if d.ep_library.is_some() && !matches!(kind, DeviceKind::WebGpu { .. }) {
            bad(
                "device.ep-library",
                format!("device '{}': ep-library is for webgpu devices", d.name),
            );
        }
        let budget = d.memory_budget.map(|b| b.0).filter(|&b| b > 0);
        // `memory-budget` (or --memory-budget) sets the default device's budget.
        let budget = if i == 0 {
            opts.memory_budget
                .or(file.memory_budget)
                .map(|b| b.0)
                .filter(|&b| b > 0)
                .or(budget)
        } else {
            budget
        };
        devices.push(Device {
            name: d.name.clone(),
            kind,
            budget,
            options: d
                .options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cpu_fallback: d.cpu_fallback.unwrap_or(false),
        });
    }
    if devices.is_empty() {
        devices.push(Device {
            name: "cpu".into(),
            kind: DeviceKind::Cpu,
            options: Vec::new(),
            cpu_fallback: false,
            budget: opts
                .memory_budget
                .or(file.memory_budget)
                .map(|b| b.0)
                .filter(|&b| b > 0),
        });
    }
    let preload = file.preload.unwrap_or_else(|| vec!["*".into()]);
    for p in &preload {
        let (name, version) = p
            .split_once(':')
            .map_or((p.as_str(), None), |(n, v)| (n, Some(v)));
        let name_ok = name == "*" || rxd_protocol::check_name(name).is_ok();
        let version_ok = version.is_none_or(|v| v.parse::<u64>().is_ok_and(|v| v >= 1));
        if !name_ok || !version_ok || (name == "*" && version.is_some()) {
            bad(
                "preload",
                format!("'{p}' is not '*', a model name, or model:version"),
            );
        }
    }
    let load_on_demand = file.load_on_demand.unwrap_or(true);
    let cache_directory = file
        .cache_directory
        .or_else(|| {
            std::env::var_os("CACHE_DIRECTORY")
                .map(PathBuf::from)
                .and_then(|p| std::env::split_paths(&p).next())
        })
        .unwrap_or_else(|| "/var/cache/rxd".into());
    let metrics_listen = match opts.metrics_listen.clone().or(file.metrics_listen) {
        None => None,
        Some(a) if a.is_empty() => None,
        Some(a) => match a.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(addr) => {
                bad(
                    "metrics-listen",
                    format!("{addr} is not a loopback address (127.0.0.1 or ::1)"),
                );
                None
            }
            Err(_) => {
                bad(
                    "metrics-listen",
                    format!("'{a}' is not an address like 127.0.0.1:9464"),
                );
                None
            }
        },
    };

    if !problems.is_empty() {
        return Err(ConfigError(problems));
    }
    Ok(Config {
        socket,
        socket_mode,
        model_repository,
        ort_library,
        intra_op_threads,
        io_threads,
        admin_group,
        admin_gid,
        max_connections,
        max_connections_per_uid,
        max_in_flight,
        max_unsent_bytes,
        request_memory_bytes,
        run_memory_bytes,
        handshake_timeout,
        frame_timeout,
        idle_timeout,
        max_frame_bytes,
        max_arena_bytes,
        arena_total_bytes,
        max_publish_bytes: file
            .max_publish_bytes
            .map_or(crate::publish::DEFAULT_MAX_PUBLISH_BYTES, |b| b.0),
        queue_capacity,
        max_peer_priority,
        shutdown_grace,
        watchdog_stuck,
        load_timeout,
        log_level,
        devices,
        preload,
        load_on_demand,
        metrics_listen,
        cache_directory,
    })
}

/// The machine's physical memory, if the system says.
fn physical_memory() -> Option<u64> {
    use nix::unistd::{SysconfVar, sysconf};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok().flatten()?;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()?;
    u64::try_from(pages)
        .ok()?
        .checked_mul(u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts_with(dir: &Path) -> ServeOpts {
        ServeOpts {
            model_repository: Some(dir.to_path_buf()),
            // Any existing file passes the existence check.
            ort_library: Some(dir.join("lib.so")),
            ..ServeOpts::default()
        }
    }

    #[test]
    fn every_mistyped_key_is_a_problem_of_its_own_with_its_line() {
        let text = "io-threads = \"x\"\nsocket = '/tmp/s'\nmax-connections = \"y\"\n\
                    log-level = 3\nsokcet = 1\n\n[[device]]\nname = \"gpu\"\nkind = 7\n";
        let problems = file_problems(text, Path::new("/etc/rxd/rxd.toml"));
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "io-threads",
                "max-connections",
                "log-level",
                "sokcet",
                "device[0].kind"
            ],
            "{problems:#?}"
        );
        let text: Vec<String> = problems.iter().map(Problem::to_string).collect();
        assert!(
            text[0].starts_with("io-threads: /etc/rxd/rxd.toml line 1: invalid type"),
            "{text:?}"
        );
        assert!(text[1].contains("line 3"), "{text:?}");
        assert!(text.iter().all(|t| !t.contains("config:")), "{text:?}");
        let broken = file_problems("socket = \n", Path::new("/x.toml"));
        assert_eq!(broken.len(), 1);
        assert!(
            broken[0].to_string().starts_with("/x.toml: not valid TOML"),
            "{broken:?}"
        );
    }

    #[test]
    fn unknown_key_is_refused_and_named() {
        let err = parse_file("sokcet = '/tmp/x'\n").unwrap_err();
        assert!(err.contains("sokcet"), "{err}");
        assert_eq!(key_of_toml_error(&err), "sokcet");
    }

    #[test]
    fn a_reload_names_every_changed_key_it_cannot_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lib.so"), b"").unwrap();
        let cfg = |text: &str| resolve(parse_file(text).unwrap(), &opts_with(dir.path()), None);
        let devices = "[[device]]\nname = 'cpu'\nkind = 'cpu'\nmemory-budget = '1GiB'\n\
                       [[device]]\nname = 'cpu2'\nkind = 'cpu'\n";
        let old = cfg(&format!("log-level = 'info'\npreload = ['a']\n{devices}")).unwrap();
        let same = cfg(&format!("log-level = 'info'\npreload = ['a']\n{devices}")).unwrap();
        assert!(old.needs_restart(&same).is_empty());
        // Reloadable: the preload list, load-on-demand, a device's budget.
        let reloadable = cfg(&format!(
            "log-level = 'info'\npreload = ['a', 'b']\nload-on-demand = false\n{}",
            devices.replace("1GiB", "2GiB")
        ))
        .unwrap();
        assert!(
            old.needs_restart(&reloadable).is_empty(),
            "{:?}",
            old.needs_restart(&reloadable)
        );
        let changed = cfg(&format!(
            "log-level = 'debug'\nload-timeout-secs = 5\nrun-memory-bytes = '1GiB'\n\
             preload = ['a']\n{}",
            devices.replace(
                "name = 'cpu2'\nkind = 'cpu'",
                "name = 'cpu2'\nkind = 'cpu'\ncpu-fallback = true"
            )
        ))
        .unwrap();
        assert_eq!(
            old.needs_restart(&changed),
            [
                "device.cpu2",
                "load-timeout-secs",
                "log-level",
                "run-memory-bytes"
            ]
        );
        let reordered = cfg(
            "log-level = 'info'\npreload = ['a']\n[[device]]\nname = 'cpu2'\n\
                             kind = 'cpu'\n[[device]]\nname = 'cpu'\nkind = 'cpu'\n\
                             memory-budget = '1GiB'\n",
        )
        .unwrap();
        assert_eq!(
            old.needs_restart(&reordered),
            ["device"],
            "the default device changed"
        );
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lib.so"), b"").unwrap();
        let file = parse_file("socket = '/tmp/from-file.sock'\nmax-in-flight = 8\n").unwrap();
        let mut opts = opts_with(dir.path());
        opts.socket = Some("/tmp/from-flag.sock".into());
        let cfg = resolve(file, &opts, None).unwrap();
        assert_eq!(cfg.socket, PathBuf::from("/tmp/from-flag.sock"));
        assert_eq!(cfg.max_in_flight, 8);
        assert_eq!(cfg.socket_mode, 0o660);
        assert!(cfg.intra_op_threads >= 1);
    }

    #[test]
    fn every_problem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = parse_file(
            "socket-mode = 'rw'\nmax-connections = 0\nmax-frame-bytes = '1KiB'\nadmin-group = 'no-such-group-rxd'\n",
        )
        .unwrap();
        let mut opts = opts_with(dir.path());
        opts.model_repository = Some(dir.path().join("missing"));
        let err = resolve(file, &opts, None).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "socket-mode",
                "model-repository",
                "ort-library",
                "admin-group",
                "max-connections",
                "max-frame-bytes"
            ]
        );
    }

    #[test]
    fn load_timeout_defaults_to_five_minutes_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lib.so"), b"").unwrap();
        let opts = opts_with(dir.path());
        let cfg = resolve(FileConfig::default(), &opts, None).unwrap();
        assert_eq!(cfg.load_timeout, Duration::from_secs(300));
        assert_eq!(cfg.in_force()["load-timeout-secs"], "300");
        let cfg = resolve(parse_file("load-timeout-secs = 20\n").unwrap(), &opts, None).unwrap();
        assert_eq!(cfg.load_timeout, Duration::from_secs(20));
        let err = resolve(parse_file("load-timeout-secs = 0\n").unwrap(), &opts, None).unwrap_err();
        assert_eq!(err.0[0].key, "load-timeout-secs");
    }

    #[test]
    fn ort_library_resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let env_lib = dir.path().join("env.so");
        std::fs::write(&env_lib, b"").unwrap();
        let mut opts = opts_with(dir.path());
        opts.ort_library = None;
        let cfg = resolve(FileConfig::default(), &opts, Some(env_lib.clone())).unwrap();
        assert_eq!(cfg.ort_library, env_lib);
        // Without flag, config or env, the bundled path is used (and here it is missing).
        let err = resolve(FileConfig::default(), &opts, None).unwrap_err();
        assert!(err.0[0].message.contains(BUNDLED_ORT_LIBRARY));
    }

    #[test]
    fn the_shipped_default_config_parses() {
        let text = include_str!("../../packaging/rxd.toml");
        let file = parse_file(text).unwrap();
        assert!(
            file.socket.is_none(),
            "every key in the shipped file is commented out"
        );
        // Uncommented, every documented key is a real key.
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| !r.starts_with(' ') && r.contains(" = "))
                    .unwrap_or("")
            })
            .map(|l| format!("{}\n", l.split(" #").next().unwrap()))
            .collect();
        let file = parse_file(&uncommented).unwrap();
        assert_eq!(file.max_frame_bytes, Some(ByteSize(80 << 20)));
        assert_eq!(file.socket.as_deref(), Some(Path::new(DEFAULT_SOCKET)));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64 << 10)));
        assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("99999999999999T").is_err());
    }
}
