//! The config file as written: its serde schema (every key optional, unknown keys refused)
//! and, for a file that does not deserialize, every problem named by its key and line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ByteSize, ConfigError, Problem};

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
    /// Measure each model at load over thread layouts and batch sizes and serve with the
    /// best, where its model.toml leaves those settings unset (model.toml `tune` overrides
    /// it per model). Default true.
    pub tune: Option<bool>,
    /// Serve Prometheus' `/metrics` over HTTP on this loopback address (e.g.
    /// "127.0.0.1:9464"). Off by default: the daemon opens no network socket unless asked.
    pub metrics_listen: Option<String>,
    /// Shader and engine caches (Mesa, TensorRT) and load-time tuning's choices live here.
    /// Default: $CACHE_DIRECTORY (set by systemd's CacheDirectory=), else /var/cache/rxd.
    pub cache_directory: Option<PathBuf>,
}

/// A `[[device]]` table's `kind`, as written; serde names the allowed values, with the line,
/// for any other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindName {
    #[default]
    Cpu,
    Webgpu,
    Cuda,
    Tensorrt,
}

/// A `[[device]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceConfig {
    pub name: String,
    /// `cpu` (default), `webgpu`, `cuda` or `tensorrt`.
    pub kind: Option<KindName>,
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
    /// The CPU cores the device's sessions run on: `"0-3,8"` or `[0, 1, 2, 3, 8]`.
    pub cores: Option<CoreList>,
}

/// CPU cores, written as a list (`"0-3,8"`, as `taskset -c` and systemd's `CPUAffinity=`
/// take them) or as an array of numbers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CoreList {
    Text(String),
    Numbers(Vec<u32>),
}

impl CoreList {
    /// The cores, sorted and without repeats, or what is wrong with the list.
    pub fn cores(&self) -> Result<Vec<usize>, String> {
        let mut cores: Vec<usize> = match self {
            CoreList::Numbers(n) => n.iter().map(|&c| c as usize).collect(),
            CoreList::Text(t) => {
                let mut cores = Vec::new();
                for part in t.split(',').map(str::trim) {
                    let number = |s: &str| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("'{part}' is not a core or a range of cores"))
                    };
                    match part.split_once('-') {
                        Some((a, b)) => {
                            let (a, b) = (number(a)?, number(b)?);
                            if a > b {
                                return Err(format!("'{part}' is an empty range"));
                            }
                            cores.extend(a..=b.min(a + MAX_CORE));
                        }
                        None => cores.push(number(part)?),
                    }
                }
                cores
            }
        };
        if let Some(&c) = cores.iter().find(|&&c| c >= MAX_CORE) {
            return Err(format!("core {c} is out of range (0..{MAX_CORE})"));
        }
        cores.sort_unstable();
        cores.dedup();
        if cores.is_empty() {
            return Err("no core listed".into());
        }
        Ok(cores)
    }
}

/// The highest core number a list may name, plus one (what a CPU set holds).
pub const MAX_CORE: usize = 1024;

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
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
pub(super) fn file_problems(text: &str, path: &Path) -> Vec<Problem> {
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
pub(super) fn key_of_toml_error(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "config".into())
}
