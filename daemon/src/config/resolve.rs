//! Merging the file, the flags and the defaults into the [`Config`] in force, and validating
//! it: every problem collected, each named by its key.

use std::path::PathBuf;
use std::time::Duration;

use rxd_protocol::limits;

use super::host::{Host, System};
use super::*;

/// Merges file and flags, applies defaults and validates against this machine. `env_ort` is
/// `ORT_DYLIB_PATH`.
pub fn resolve(
    file: FileConfig,
    opts: &ServeOpts,
    env_ort: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    resolve_on(&System, file, opts, env_ort)
}

/// [`resolve`], asking `host` about the machine.
pub fn resolve_on(
    host: &dyn Host,
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
    if !host.is_dir(&model_repository) {
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
    if !host.is_file(&ort_library) {
        bad(
            ort_key,
            format!(
                "ONNX Runtime library {} not found; set ort-library in the config, --ort-library, \
                 or ORT_DYLIB_PATH (scripts/fetch-deps puts one in .deps/onnxruntime/)",
                ort_library.display()
            ),
        );
    }

    let cores = host.cores();
    let cores_auto = opts.intra_op_threads.or(file.intra_op_threads).unwrap_or(0) == 0;
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
        Some(name) => match host.group(name) {
            Ok(Some(gid)) => Some(gid),
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
        None => host.physical_memory().map(|m| m / 2),
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
        let kind = match d.kind.unwrap_or_default() {
            KindName::Cpu => DeviceKind::Cpu,
            // A missing plugin library is not a config error: loads on the device fail (or
            // fall back) with the reason, and the daemon serves everything else.
            KindName::Webgpu => DeviceKind::WebGpu {
                library: d
                    .ep_library
                    .clone()
                    .unwrap_or_else(|| BUNDLED_WEBGPU_LIBRARY.into()),
                adapter: id,
            },
            KindName::Cuda => DeviceKind::Cuda { id },
            KindName::Tensorrt => DeviceKind::TensorRt { id },
        };
        if d.ep_library.is_some() && !matches!(kind, DeviceKind::WebGpu { .. }) {
            bad(
                "device.ep-library",
                format!("device '{}': ep-library is for webgpu devices", d.name),
            );
        }
        let cores = match d.cores.as_ref().map(|c| c.cores()) {
            None => None,
            Some(Err(e)) => {
                bad("device.cores", format!("device '{}': {e}", d.name));
                None
            }
            Some(Ok(cores)) => {
                let allowed = host.allowed_cores();
                let missing: Vec<String> = cores
                    .iter()
                    .filter(|c| !allowed.contains(c))
                    .map(usize::to_string)
                    .collect();
                if !missing.is_empty() {
                    bad(
                        "device.cores",
                        format!(
                            "device '{}': rxd may not run on core {} (it may use {})",
                            d.name,
                            missing.join(", "),
                            crate::affinity::show(&allowed)
                        ),
                    );
                }
                Some(cores.into())
            }
        };
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
            cores,
        });
    }
    if devices.is_empty() {
        devices.push(Device {
            name: "cpu".into(),
            kind: DeviceKind::Cpu,
            options: Vec::new(),
            cpu_fallback: false,
            cores: None,
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
        .or_else(|| host.cache_directory())
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
        cores_auto,
        tune: file.tune.unwrap_or(true),
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
