//! The `rxd` binary: parses flags, validates the configuration, and runs the daemon library.

use std::process::ExitCode;

use clap::Parser;
use rxd::cli::{Cli, Command, ServeOpts};
use rxd::{config, exit};

#[path = "rxd/compress.rs"]
mod compress;

// mimalloc: a request is decoded on the ring poller's (or a connection's) thread and freed on
// a worker's; glibc's frees then fill the worker's cache with the poller's chunks and go back
// under the poller's arena lock, where mimalloc pushes them on the owning page's list. It
// keeps freed pages committed for its purge delay, so a load's footprint is read after
// `runtime::release_free_memory`, which forces a collect.
#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)] // Setting the environment before any thread exists.
fn main() -> ExitCode {
    // Socket activation: read LISTEN_* once, then remove them so children never see them.
    let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    let activation = (num("LISTEN_PID"), num("LISTEN_FDS"));
    // SAFETY: first statements of main; no other thread exists yet, so nothing can read the
    // environment concurrently. ONNX Runtime's PyPI build sends telemetry unless this is set
    // before it loads.
    unsafe {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
    }

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    if let Some(what) = cli.generate {
        let cmd = <Cli as clap::CommandFactory>::command().name("rxd");
        return match rxd_client::generate::generate(what, cmd, "8", &mut std::io::stdout()) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(_) => ExitCode::from(exit::OSERR),
        };
    }
    match cli.command {
        Some(Command::CheckConfig(opts)) => check_config(&opts),
        Some(Command::Compress(opts)) => compress::run(&opts),
        Some(Command::Serve(opts)) => serve(&opts, activation),
        None => serve(&cli.opts, activation),
    }
}

/// Raises the soft limit on open files to the hard one (at most 2^20): systemd's default soft
/// limit, 1024, is what a few hundred connections with their arenas already take, and on
/// kernels that cannot refuse fds sent to the daemon (before 6.16) a peer's fds wait in the
/// fd table to be closed (`closer`). The daemon waits on epoll only, never `select`.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if want > soft {
            match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                Ok(()) => tracing::debug!("open files: soft limit {soft} raised to {want}"),
                Err(e) => tracing::warn!("open files: soft limit {soft} not raised: {e}"),
            }
        }
    }
}

fn check_config(opts: &ServeOpts) -> ExitCode {
    match config::load(opts) {
        Ok(cfg) => {
            println!(
                "configuration OK: socket {}, repository {}, ONNX Runtime {}",
                cfg.socket.display(),
                cfg.model_repository.display(),
                cfg.ort_library.display()
            );
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            for p in &e.0 {
                eprintln!("rxd: config: {p}");
            }
            ExitCode::from(exit::CONFIG)
        }
    }
}

#[allow(unsafe_code)] // Setting MESA_SHADER_CACHE_DIR before any thread exists.
fn serve(opts: &ServeOpts, activation: (Option<u32>, Option<u32>)) -> ExitCode {
    let cfg = match config::load(opts) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.0 {
                eprintln!("rxd: config: {p}");
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    init_logging(&cfg.log_level);
    raise_fd_limit();
    rxd::runtime::fix_heap_thresholds();
    // Mesa compiles shaders for the WebGPU EP's Vulkan pipelines: keep its cache under the
    // daemon's cache directory, so a restart does not recompile for seconds.
    let gpu = cfg
        .devices
        .iter()
        .any(|d| matches!(d.kind, config::DeviceKind::WebGpu { .. }));
    if gpu && std::env::var_os("MESA_SHADER_CACHE_DIR").is_none() {
        let dir = cfg.cache_directory.join("mesa-shader-cache");
        match std::fs::create_dir_all(&dir) {
            // SAFETY: still single-threaded: config loading and the log subscriber start no
            // threads, and nothing has loaded ONNX Runtime or Vulkan yet.
            Ok(()) => unsafe { std::env::set_var("MESA_SHADER_CACHE_DIR", &dir) },
            Err(e) => tracing::warn!("no shader cache in {}: {e}", dir.display()),
        }
    }

    let activated = match rxd_shm::activated_listener(activation.0, activation.1) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("socket activation: {e}");
            return ExitCode::from(exit::OSERR);
        }
    };
    let owns_socket = activated.is_none();
    let bound = match activated {
        Some(l) => {
            tracing::info!("serving on the socket passed by systemd");
            l.set_nonblocking(true)
                .map(|()| l)
                .map_err(|e| rxd::listener::BindError::Io {
                    path: "fd 3".into(),
                    source: e,
                })
        }
        None => rxd::listener::bind(&cfg.socket, cfg.socket_mode),
    };
    let std_listener = match bound {
        Ok(l) => l,
        Err(e @ rxd::listener::BindError::InUse(_)) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::OSERR);
        }
    };
    let socket = cfg.socket.clone();
    let cfg_io_threads = cfg.io_threads as usize;
    let shared = match rxd::prepare(cfg, opts.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            if owns_socket {
                let _ = std::fs::remove_file(&socket);
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg_io_threads)
        .thread_name("rxd-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(exit::OSERR);
        }
    };
    let result = rt.block_on(async {
        let s = shared.clone();
        let shutdown = rxd::shutdown::install(move || s.reload_requested.notify_one())?;
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        rxd::run(shared, listener, shutdown).await
    });
    // A load past its deadline leaves its thread behind (and the blocking task that waited
    // for it returns at the deadline): stopping must not wait for either.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    // A socket passed by systemd belongs to the socket unit: leave its file alone.
    if owns_socket {
        let _ = std::fs::remove_file(&socket);
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(exit::OSERR)
        }
    }
}

/// Logs go to the journal, with structured fields and priorities, when stderr is connected to
/// it (systemd sets `JOURNAL_STREAM` to stderr's device:inode); to stderr otherwise.
fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::new(filter);
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(
                journald
                    .with_syslog_identifier("rxd".into())
                    .with_field_prefix(None)
                    // syslog meanings: info is informational (6), debug and trace are debug (7).
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        error: tracing_journald::Priority::Error,
                        warn: tracing_journald::Priority::Warning,
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        trace: tracing_journald::Priority::Debug,
                    }),
            )
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}
