//! `rxctl`: the command-line client of rxd. Thin: flags here, everything else in the library.
//!
//! Exit codes ([`EXIT_CODES`], in `--help` and rxctl(1)): 0 success; 1 the daemon answered
//! with an error; 2 `health` found the daemon unhealthy (or degraded, with `--strict`); 64
//! usage; 65 bad input file; 69 cannot reach the daemon; 70 internal error; 74 cannot write
//! an output file; 77 permission denied (by the daemon, or on its socket).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxd_client::protocol::{HealthState, ModelState, TensorSpec};
use rxd_client::{ClientError, ClientOptions, ErrorCode, blocking::Client};

/// What rxctl exits with.
const EXIT_CODES: &str = "Exit codes: 0 ok; 1 the daemon answered with an error; 2 unhealthy \
(health; also degraded with --strict); 64 usage; 65 an input file cannot be read; 69 the daemon \
cannot be reached; 70 internal error; 74 an output file cannot be written; 77 permission \
denied (an admin command, or the socket: members of the daemon's group, rxd for the packaged \
service, may use it). With --json every command prints exactly one JSON document on stdout, \
errors as {\"error\", \"exit_code\"}.";

/// Command-line client for rxd, the local inference daemon.
#[derive(Debug, Parser)]
#[command(
    name = "rxctl",
    version,
    about = "rxctl — command-line client for rxd, the local inference daemon",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Daemon socket.
    #[arg(long, global = true, env = "RXD_SOCKET", default_value = rxd_client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Print a man page or a shell completion script generated from these definitions.
    #[arg(long, value_enum, hide = true, value_name = "WHAT")]
    generate: Option<Generate>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Generate {
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
}

fn generate(what: Generate) -> std::io::Result<()> {
    use clap_complete::Shell;
    let mut cmd = <Cli as clap::CommandFactory>::command().name("rxctl");
    let out = &mut std::io::stdout();
    let shell = match what {
        Generate::Man => return clap_mangen::Man::new(cmd).render(out),
        Generate::CompleteBash => Shell::Bash,
        Generate::CompleteZsh => Shell::Zsh,
        Generate::CompleteFish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "rxctl", out);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// What the daemon is and serves.
    Status,
    /// Health: healthy, degraded or unhealthy, with reasons. Exits 2 when unhealthy.
    Health {
        /// Also exit 2 when degraded.
        #[arg(long)]
        strict: bool,
    },
    /// List model versions, or show one model's signature.
    Models {
        model: Option<String>,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Run a model. Inputs come from .npy files; inputs not given are filled with random data
    /// (floats in [0, 1), integers 0..9) of the shape the daemon warmed the model up with, or
    /// of the shape --dim gives, and the output says which inputs were random.
    Infer {
        model: String,
        #[arg(long)]
        version: Option<u64>,
        /// NAME=FILE.npy, once per input.
        #[arg(long = "input", short = 'i', value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// Shape of a generated input, e.g. images=1x3x320x320 (default: the model's warmup
        /// shape, `rxctl models MODEL` shows it; without one, dynamic dimensions are 1).
        #[arg(long = "dim", value_name = "NAME=AxBx..")]
        dims: Vec<String>,
        /// Write each output to DIR/NAME.npy (created if missing). In NAME, every character
        /// but ASCII letters, digits, _ - and . (and a leading .) becomes %XX, so each output
        /// is one file inside DIR: save_infer_model/scale_0.tmp_1 →
        /// save_infer_model%2Fscale_0.tmp_1.npy.
        #[arg(long, short = 'o', value_name = "DIR")]
        output_dir: Option<PathBuf>,
        /// Only these outputs (default: all).
        #[arg(long = "output", value_name = "NAME")]
        outputs: Vec<String>,
        /// Seed for generated inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Load generator: closed-loop concurrency sweep or open-loop rate phases; reports
    /// throughput, latency percentiles, errors by code and the daemon's mean batch size.
    Bench {
        model: String,
        /// Connections, each with one request in flight; a list sweeps (1,8,32).
        #[arg(long, short = 'c', value_delimiter = ',', default_value = "1", value_parser = positive)]
        concurrency: Vec<usize>,
        /// Open loop instead: RATE:SECONDS phases, e.g. 50:5,400:5,50:5 (requests/s).
        #[arg(long, value_name = "RATE:SECS,...")]
        rate: Option<String>,
        /// Seconds per closed-loop run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Stop a closed-loop run after exactly this many requests (or --duration).
        #[arg(long)]
        requests: Option<u64>,
        /// Seconds of warm-up before measuring (its requests are not in the figures; the
        /// daemon's metrics count them, and the report says how many there were).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// NAME=FILE.npy inputs; others are generated (random, of the model's warmup shape).
        #[arg(long = "input", short = 'i', value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// Shape of a generated input, e.g. images=1x3x320x320 (as for `rxctl infer`).
        #[arg(long = "dim", value_name = "NAME=AxBx..")]
        dims: Vec<String>,
        /// Rows (first dimension) of generated inputs where it is dynamic (default: the
        /// generated shape's).
        #[arg(long)]
        rows: Option<u64>,
        /// Send tensors inline instead of through the shared-memory arena.
        #[arg(long)]
        inline: bool,
        /// Per-request deadline in ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Send identical inputs in every request. By default each request differs in the
        /// lowest bits of the largest float input's first elements, so that the daemon's
        /// result cache and coalescing do not answer without running the model.
        #[arg(long)]
        same_input: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Admin: load a model version (default: the latest on disk).
    Load {
        model: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Admin: re-read the model repository (as SIGHUP does).
    Reload,
    /// Admin: unload a model (all loaded versions, or one).
    Unload {
        model: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Admin: pin a model version (loads it if needed): never evicted.
    Pin {
        model: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Admin: unpin a model version: it may be evicted again.
    Unpin {
        model: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Devices: memory budget, used, free, and the models resident on each.
    Devices,
    /// Every metric; `--prometheus` prints Prometheus' text exposition format.
    Metrics {
        #[arg(long)]
        prometheus: bool,
    },
    /// Admin: change a model version's settings at run time (only the options given).
    Configure {
        model: String,
        #[arg(long)]
        version: Option<u64>,
        /// Sessions (worker threads); workers are added or retired without dropping requests.
        #[arg(long)]
        instances: Option<u32>,
        #[arg(long)]
        max_batch_rows: Option<u32>,
        #[arg(long)]
        max_queue_delay_us: Option<u64>,
        /// Adaptive batching target; 0 turns it off.
        #[arg(long)]
        latency_target_ms: Option<f64>,
        #[arg(long)]
        default_priority: Option<u8>,
        /// Priority mode: one level gained per this many ms waited; 0 = strict priorities.
        #[arg(long)]
        priority_aging_ms: Option<u64>,
        /// Result cache size (e.g. 64MiB); 0 turns the cache off.
        #[arg(long, value_parser = rxd_protocol::units::parse_size)]
        cache_bytes: Option<u64>,
        /// Empty the result cache.
        #[arg(long)]
        clear_cache: bool,
        /// Move the version to this device (it is rebuilt there).
        #[arg(long)]
        device: Option<String>,
        /// Also write the changes to the model's model.toml.
        #[arg(long)]
        persist: bool,
    },
    /// Model operations.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Live view: models, req/s, p50/p99, batch size, queue, memory per device, cache hit
    /// rate; refreshed every second; q, Esc or Ctrl-C quits.
    Top {
        /// Refresh interval in ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCmd {
    /// Admin: publish a model file into the daemon's repository as a new version (sent through
    /// shared memory, written atomically), then serve it; with --compress, also compress it
    /// into the version after (published only if its accuracy report passes).
    Add {
        model: String,
        /// The ONNX model file.
        file: PathBuf,
        /// The version to write (default: one more than the highest on disk).
        #[arg(long)]
        version: Option<u64>,
        /// Then compress it with this strategy (as `rxctl model compress --strategy`).
        #[arg(long, value_name = "STRATEGY")]
        compress: Option<String>,
    },
    /// Admin: compress a repository model into a new version; the daemon evaluates it against
    /// the original with ONNX Runtime and publishes it only if the report passes.
    Compress {
        model: String,
        #[arg(long)]
        version: Option<u64>,
        /// int8-weights, dynamic-int8, fp16, prune:S, combined with +; or static-int8 (with
        /// --calibration).
        #[arg(long, default_value = "int8-weights")]
        strategy: String,
        /// static-int8: calibration inputs NAME=FILE.npy (a batch of real inputs).
        #[arg(long = "calibration", value_name = "NAME=FILE")]
        calibration: Vec<String>,
        /// static-int8: activation ranges, percentile:P (default percentile:99.99) or minmax.
        #[arg(long)]
        calibration_method: Option<String>,
        /// Evaluation inputs NAME=FILE.npy (default: random inputs of the model's shapes).
        #[arg(long = "eval", short = 'i', value_name = "NAME=FILE")]
        eval: Vec<String>,
        #[arg(long)]
        min_top1: Option<f64>,
        #[arg(long)]
        min_cosine: Option<f64>,
        /// Report only; publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive number")),
    }
}

#[path = "rxctl/bench.rs"]
mod bench;
#[path = "rxctl/infer.rs"]
mod infer;
#[path = "rxctl/top.rs"]
mod top;

mod code {
    pub const SERVER_ERROR: u8 = 1;
    pub const UNHEALTHY: u8 = 2;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const IO: u8 = 74;
    pub const NOPERM: u8 = 77;
}

struct Failure(u8, String);

/// `rxctl model add`: the file goes through an arena of its size (inline if the daemon
/// refuses one), then, with `compress`, the new version is compressed.
fn model_add(
    cli: &Cli,
    model: &str,
    file: &std::path::Path,
    version: Option<u64>,
    compress: Option<&str>,
) -> Result<u8, Failure> {
    let bytes =
        std::fs::read(file).map_err(|e| Failure(code::DATA, format!("{}: {e}", file.display())))?;
    let options = ClientOptions {
        arena_bytes: (bytes.len() as u64).next_multiple_of(4096),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&cli.socket, options)?;
    let published = client.publish(model, version, &bytes)?;
    let compressed = match compress {
        Some(strategy) => Some(client.compress(rxd_client::protocol::CompressRequest {
            model: model.into(),
            version: Some(published.version),
            strategy: strategy.into(),
            calibration: Vec::new(),
            calibration_method: None,
            eval: Vec::new(),
            min_top1: None,
            min_cosine: None,
            dry_run: false,
        })?),
        None => None,
    };
    if cli.json {
        print_json(&serde_json::json!({ "publish": published, "compress": compressed }));
    } else {
        println!(
            "published {} version {} ({}, {})",
            published.model,
            published.version,
            size_text(published.bytes),
            published.summary.state.name()
        );
        if let Some(c) = &compressed {
            print!("{}", c.report);
        }
    }
    Ok(match compressed {
        Some(c) if !c.passed => code::SERVER_ERROR,
        _ => 0,
    })
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match &e {
            ClientError::Connect { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Failure(
                    code::NOPERM,
                    format!(
                        "cannot connect to {path}: permission denied. Members of the daemon's \
                         group may use its socket; for the packaged service that is group rxd: \
                         `sudo usermod -aG rxd \"$USER\"`, then log in again ({source})"
                    ),
                )
            }
            ClientError::Connect { .. } | ClientError::Handshake(_) | ClientError::Closed(_) => {
                Failure(code::UNAVAILABLE, e.to_string())
            }
            ClientError::Server(w) if w.kind() == Some(ErrorCode::PermissionDenied) => {
                Failure(code::NOPERM, e.to_string())
            }
            _ => Failure(code::SERVER_ERROR, e.to_string()),
        }
    }
}

/// An `unknown_model` error with the models the daemon does serve.
fn with_known_models(cli: &Cli, f: Failure) -> Failure {
    let unknown = format!("{} (", ErrorCode::UnknownModel.name());
    if f.0 != code::SERVER_ERROR || !f.1.starts_with(&unknown) {
        return f;
    }
    let names: std::collections::BTreeSet<String> =
        Client::connect_with(&cli.socket, ClientOptions::inline_only())
            .and_then(|c| c.list_models())
            .map(|l| l.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
    if names.is_empty() {
        return f;
    }
    let names: Vec<String> = names.into_iter().collect();
    Failure(
        f.0,
        format!("{}; the daemon serves: {}", f.1, names.join(", ")),
    )
}

fn main() -> ExitCode {
    rxd_shm::default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { code::USAGE } else { 0 });
        }
    };
    if let Some(what) = cli.generate {
        return ExitCode::from(if generate(what).is_ok() { 0 } else { code::IO });
    }
    let Some(command) = &cli.command else {
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return ExitCode::from(code::USAGE);
    };
    match run(&cli, command).map_err(|f| with_known_models(&cli, f)) {
        Ok(c) => ExitCode::from(c),
        Err(Failure(c, msg)) => {
            if cli.json {
                let v = serde_json::json!({"error": msg, "exit_code": c});
                println!("{v}");
            } else {
                eprintln!("rxctl: {msg}");
            }
            ExitCode::from(c)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("rxctl: cannot print JSON: {e}"),
    }
}

fn run(cli: &Cli, command: &Cmd) -> Result<u8, Failure> {
    if let Cmd::Infer { .. } = command {
        return infer::infer(cli, command);
    }
    if let Cmd::Bench { .. } = command {
        return bench::bench(cli, command);
    }
    if let Cmd::Top { interval_ms } = command {
        if cli.json {
            return Err(Failure(
                code::USAGE,
                "rxctl top is a live view; `rxctl --json metrics` gives its figures as JSON".into(),
            ));
        }
        return top::run(
            &cli.socket,
            std::time::Duration::from_millis((*interval_ms).max(100)),
        )
        .map(|()| 0);
    }
    if let (Cmd::Metrics { prometheus: true }, true) = (command, cli.json) {
        return Err(Failure(
            code::USAGE,
            "--prometheus prints Prometheus' text format, --json one JSON document: choose one"
                .into(),
        ));
    }
    let client = Client::connect_with(&cli.socket, ClientOptions::inline_only())?;
    match command {
        Cmd::Status => {
            let s = client.status()?;
            if cli.json {
                print_json(&s);
            } else {
                println!("{} (protocol {}), pid {}", s.server, s.protocol, s.pid);
                println!("uptime:       {:.1} s", s.uptime_ms as f64 / 1000.0);
                println!("socket:       {}", s.socket);
                println!("repository:   {}", s.model_repository);
                println!("onnxruntime:  {} ({})", s.ort_version, s.ort_library);
                println!("threads:      {} intra-op per instance", s.intra_op_threads);
                println!(
                    "models:       {} ready, {} failed",
                    s.models_ready, s.models_failed
                );
                println!(
                    "requests:     {} total, {} failed, {} in flight; {} connections",
                    s.requests_total, s.requests_failed, s.in_flight, s.connections
                );
                println!("configuration in force:");
                for (k, v) in &s.config {
                    println!("  {k} = {v}");
                }
            }
            Ok(0)
        }
        Cmd::Health { strict } => {
            let h = client.health()?;
            if cli.json {
                print_json(&h);
            } else {
                println!(
                    "{} ({} model versions ready, {} can serve; {} workers, {} queued; \
                     models use {}, process {}; GPU {})",
                    h.state.name(),
                    h.models_loaded,
                    h.models_servable,
                    h.workers,
                    h.queue_size,
                    size_text(h.models_memory_bytes),
                    h.rss_bytes.map_or("?".into(), size_text),
                    if h.gpu_available { "available" } else { "none" }
                );
                for r in &h.reasons {
                    println!("  - {r}");
                }
                if let Some(e) = &h.last_error {
                    println!("last error: {e}");
                }
            }
            let bad =
                h.state == HealthState::Unhealthy || (*strict && h.state == HealthState::Degraded);
            Ok(if bad { code::UNHEALTHY } else { 0 })
        }
        Cmd::Models { model: None, .. } => {
            let models = client.list_models()?;
            if cli.json {
                print_json(&models);
            } else {
                println!(
                    "{:<24} {:>7}  {:<9} {:<6} {:>9} {:>10}  {:<6} ERROR",
                    "MODEL", "VERSION", "STATE", "SERVED", "INSTANCES", "MEMORY", "DEVICE"
                );
                for m in &models {
                    let served = match (m.served, m.pinned) {
                        (_, true) => "pinned",
                        (true, _) => "yes",
                        _ => "no",
                    };
                    println!(
                        "{:<24} {:>7}  {:<9} {:<6} {:>9} {:>10}  {:<6} {}",
                        m.name,
                        m.version,
                        m.state.name(),
                        served,
                        m.instances,
                        m.memory_bytes.map(size_text).unwrap_or_default(),
                        m.device,
                        m.error.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Models {
            model: Some(name),
            version,
        } => {
            let info = client.model_info(name, *version)?;
            if cli.json {
                print_json(&info);
            } else {
                let s = &info.summary;
                println!(
                    "{} version {}: {} on {}, {} instance(s){}",
                    s.name,
                    s.version,
                    s.state.name(),
                    s.device,
                    s.instances,
                    if s.pinned { ", pinned" } else { "" }
                );
                if let Some(b) = s.memory_bytes {
                    println!(
                        "memory: {} measured ({} estimated), loaded and warmed up in {} ms, \
                         evicted {} time(s)",
                        size_text(b),
                        s.estimated_bytes
                            .map(size_text)
                            .unwrap_or_else(|| "not".into()),
                        s.load_ms.unwrap_or(0),
                        s.evictions
                    );
                }
                if let Some(ep) = &s.ep {
                    let nodes: Vec<String> = s
                        .node_placement
                        .iter()
                        .map(|(ep, n)| format!("{n} on {ep}"))
                        .collect();
                    println!(
                        "execution provider: {ep}{}",
                        if nodes.is_empty() {
                            String::new()
                        } else {
                            format!("; nodes: {}", nodes.join(", "))
                        }
                    );
                    if !s.nodes_on_cpu.is_empty() {
                        println!("nodes on the CPU: {}", s.nodes_on_cpu.join(", "));
                    }
                }
                if !s.batch_sizes.is_empty() {
                    let sizes: Vec<String> = s.batch_sizes.iter().map(u32::to_string).collect();
                    println!(
                        "batches padded to {} rows ({} rows of padding run, {} real rows)",
                        sizes.join("/"),
                        s.padded_rows,
                        s.rows
                    );
                }
                if let Some(f) = &s.fallback {
                    println!("FALLBACK: runs on the CPU: {f}");
                }
                if let Some(c) = &s.compression {
                    println!("compression: {c}");
                }
                if let Some(v) = &info.settings {
                    println!(
                        "settings: max-batch-rows {}, max-queue-delay-us {}, latency-target-ms {}, \
                         queue-capacity {}, default-priority {}, priority-aging-ms {}, cache-bytes {}",
                        v.max_batch_rows,
                        v.max_queue_delay_us,
                        v.latency_target_ms.map_or("off".into(), |t| format!("{t}")),
                        v.queue_capacity,
                        v.default_priority,
                        v.priority_aging_ms,
                        cache_text(v.cache_bytes)
                    );
                }
                println!("inputs:");
                for t in &info.inputs {
                    println!("  {}", spec_text(t));
                }
                println!("outputs:");
                for t in &info.outputs {
                    println!("  {}", spec_text(t));
                }
            }
            Ok(0)
        }
        Cmd::Infer { .. } | Cmd::Bench { .. } | Cmd::Top { .. } => {
            unreachable!("handled above")
        }
        Cmd::Load { model, version } => {
            let s = client.load(model, *version)?;
            if cli.json {
                print_json(&s);
            } else {
                println!("{} version {}: {}", s.name, s.version, s.state.name());
            }
            Ok(if s.state == ModelState::Ready {
                0
            } else {
                code::SERVER_ERROR
            })
        }
        Cmd::Reload => {
            let models = client.reload()?;
            if cli.json {
                print_json(&models);
            } else {
                for m in &models {
                    println!("{} version {}: {}", m.name, m.version, m.state.name());
                }
            }
            Ok(0)
        }
        Cmd::Pin { model, version } | Cmd::Unpin { model, version } => {
            let s = if matches!(command, Cmd::Pin { .. }) {
                client.pin(model, *version)?
            } else {
                client.unpin(model, *version)?
            };
            if cli.json {
                print_json(&s);
            } else {
                println!(
                    "{} version {}: {}{}",
                    s.name,
                    s.version,
                    s.state.name(),
                    if s.pinned { ", pinned" } else { ", not pinned" }
                );
            }
            Ok(0)
        }
        Cmd::Metrics { prometheus } => {
            let m = client.metrics()?;
            if *prometheus {
                print!("{}", rxd_protocol::metrics::prometheus(&m));
            } else if cli.json {
                print_json(&m);
            } else {
                print!("{}", top::render(&m, None, 200, 1000, false).join("\n"));
                println!();
            }
            Ok(0)
        }
        Cmd::Configure {
            model,
            version,
            instances,
            max_batch_rows,
            max_queue_delay_us,
            latency_target_ms,
            default_priority,
            priority_aging_ms,
            cache_bytes,
            clear_cache,
            device,
            persist,
        } => {
            let v = client.configure(rxd_client::protocol::Configure {
                model: model.clone(),
                version: *version,
                instances: *instances,
                max_batch_rows: *max_batch_rows,
                max_queue_delay_us: *max_queue_delay_us,
                latency_target_ms: *latency_target_ms,
                default_priority: *default_priority,
                priority_aging_ms: *priority_aging_ms,
                cache_bytes: *cache_bytes,
                clear_cache: *clear_cache,
                device: device.clone(),
                persist: *persist,
            })?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "{model}: instances {}, max-batch-rows {}, max-queue-delay-us {}, \
                     latency-target-ms {}, queue-capacity {}, default-priority {}, \
                     priority-aging-ms {}{}, cache-bytes {}",
                    v.instances,
                    v.max_batch_rows,
                    v.max_queue_delay_us,
                    v.latency_target_ms.map_or("off".into(), |t| format!("{t}")),
                    v.queue_capacity,
                    v.default_priority,
                    v.priority_aging_ms,
                    if v.priority_aging_ms == 0 {
                        " (strict)"
                    } else {
                        ""
                    },
                    cache_text(v.cache_bytes)
                );
            }
            Ok(0)
        }
        Cmd::Model(ModelCmd::Add {
            model,
            file,
            version,
            compress,
        }) => model_add(cli, model, file, *version, compress.as_deref()),
        Cmd::Model(ModelCmd::Compress {
            model,
            version,
            strategy,
            calibration,
            calibration_method,
            eval,
            min_top1,
            min_cosine,
            dry_run,
        }) => {
            let eval = infer::read_inputs(eval)?;
            let calibration = infer::read_inputs(calibration)?;
            // A progress line while the daemon compresses and evaluates (on a terminal).
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let spinner = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let done = done.clone();
                std::thread::spawn(move || {
                    let t = std::time::Instant::now();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        eprint!(
                            "\rcompressing and evaluating… {:.0} s",
                            t.elapsed().as_secs_f64()
                        );
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    eprint!("\r\x1b[K");
                })
            });
            let r = client.compress(rxd_client::protocol::CompressRequest {
                model: model.clone(),
                version: *version,
                strategy: strategy.clone(),
                calibration,
                calibration_method: calibration_method.clone(),
                eval,
                min_top1: *min_top1,
                min_cosine: *min_cosine,
                dry_run: *dry_run,
            });
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(s) = spinner {
                let _ = s.join();
            }
            let r = r?;
            if cli.json {
                print_json(&r);
            } else {
                print!("{}", r.report);
            }
            Ok(if r.passed { 0 } else { code::SERVER_ERROR })
        }
        Cmd::Devices => {
            let devices = client.devices()?;
            if cli.json {
                print_json(&devices);
            } else {
                println!(
                    "{:<12} {:<8} {:>10} {:>10} {:>10} {:>10}  MODELS (least recently used first)",
                    "DEVICE", "KIND", "BUDGET", "USED", "FREE", "DEV MEM"
                );
                for d in &devices {
                    println!(
                        "{:<12} {:<8} {:>10} {:>10} {:>10} {:>10}  {}",
                        d.name,
                        d.kind,
                        d.budget_bytes.map_or("unlimited".into(), size_text),
                        size_text(d.used_bytes),
                        d.free_bytes.map_or("-".into(), size_text),
                        match (d.memory_used_bytes, d.memory_total_bytes) {
                            (Some(u), Some(t)) => format!("{}/{}", size_text(u), size_text(t)),
                            _ => "-".into(),
                        },
                        d.models.join(", ")
                    );
                    println!(
                        "  {}{}{}",
                        d.ep,
                        d.adapter
                            .as_deref()
                            .map(|a| format!(" on {a}"))
                            .unwrap_or_default(),
                        d.error
                            .as_deref()
                            .map(|e| format!("; unusable: {e}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Cmd::Unload { model, version } => {
            let s = client.unload(model, *version)?;
            if cli.json {
                print_json(&s);
            } else {
                println!("{} unloaded", s.name);
            }
            Ok(0)
        }
    }
}

/// A cache size for people: `off`, or `64.0 MiB`.
fn cache_text(bytes: u64) -> String {
    if bytes == 0 {
        "off".into()
    } else {
        size_text(bytes)
    }
}

/// Bytes for people: `12.3 MiB`.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn spec_text(t: &TensorSpec) -> String {
    let list = |v: &[u64]| {
        let parts: Vec<String> = v.iter().map(u64::to_string).collect();
        format!("[{}]", parts.join(", "))
    };
    let mut text = format!("{:<24} {:<8} {}", t.name, t.dtype.name(), t.dims_text());
    if !t.warmup_dims.is_empty() {
        text.push_str(&format!("  warmup {}", list(&t.warmup_dims)));
    }
    if !t.max_dims.is_empty() {
        text.push_str(&format!("  at most {}", list(&t.max_dims)));
    }
    text
}
