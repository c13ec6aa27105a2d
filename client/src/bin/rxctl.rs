//! `rxctl`: the command-line client of rxd. Thin: flags here, everything else in the library.
//!
//! Exit codes ([`EXIT_CODES`], in `--help` and rxctl(1)): 0 success; 1 the daemon answered
//! with an error; 2 `health` found the daemon unhealthy (or degraded, with `--strict`); 64
//! usage; 65 bad input file; 69 cannot reach the daemon; 70 internal error; 74 cannot write
//! an output file; 77 permission denied (by the daemon, or on its socket).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxd_client::protocol::{HealthState, ModelState};
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
        /// Rows (first dimension) of generated inputs (default: the generated shape's); only
        /// for a model whose every input has a dynamic first dimension.
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
#[path = "rxctl/render.rs"]
mod render;
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
            render::size_text(published.bytes),
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
    let connect = || Client::connect_with(&cli.socket, ClientOptions::inline_only());
    // Text for people, or exactly one JSON document.
    let show = |text: String, json: &dyn erased::Json| {
        if cli.json {
            json.print();
        } else {
            print!("{text}");
        }
    };
    match command {
        Cmd::Infer { .. } => infer::infer(cli, command),
        Cmd::Bench { .. } => bench::bench(cli, command),
        Cmd::Top { interval_ms } => {
            if cli.json {
                return Err(Failure(
                    code::USAGE,
                    "rxctl top is a live view; `rxctl --json metrics` gives its figures as JSON"
                        .into(),
                ));
            }
            top::run(
                &cli.socket,
                std::time::Duration::from_millis((*interval_ms).max(100)),
            )
            .map(|()| 0)
        }
        Cmd::Status => {
            let s = connect()?.status()?;
            show(render::status(&s), &s);
            Ok(0)
        }
        Cmd::Health { strict } => {
            let h = connect()?.health()?;
            show(render::health(&h), &h);
            let bad =
                h.state == HealthState::Unhealthy || (*strict && h.state == HealthState::Degraded);
            Ok(if bad { code::UNHEALTHY } else { 0 })
        }
        Cmd::Models { model: None, .. } => {
            let models = connect()?.list_models()?;
            show(render::models(&models), &models);
            Ok(0)
        }
        Cmd::Models {
            model: Some(name),
            version,
        } => {
            let info = connect()?.model_info(name, *version)?;
            show(render::model_info(&info), &info);
            Ok(0)
        }
        Cmd::Load { model, version } => {
            let s = connect()?.load(model, *version)?;
            show(render::state(&s), &s);
            Ok(if s.state == ModelState::Ready {
                0
            } else {
                code::SERVER_ERROR
            })
        }
        Cmd::Reload => {
            let models = connect()?.reload()?;
            show(models.iter().map(render::state).collect(), &models);
            Ok(0)
        }
        Cmd::Pin { model, version } => {
            let s = connect()?.pin(model, *version)?;
            show(render::pinned(&s), &s);
            Ok(0)
        }
        Cmd::Unpin { model, version } => {
            let s = connect()?.unpin(model, *version)?;
            show(render::pinned(&s), &s);
            Ok(0)
        }
        Cmd::Metrics { prometheus } => {
            if *prometheus && cli.json {
                return Err(Failure(
                    code::USAGE,
                    "--prometheus prints Prometheus' text format, --json one JSON document: \
                     choose one"
                        .into(),
                ));
            }
            let m = connect()?.metrics()?;
            if *prometheus {
                print!("{}", rxd_protocol::metrics::prometheus(&m));
            } else {
                show(
                    top::render(&m, None, 200, 1000, false).join("\n") + "\n",
                    &m,
                );
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
            let v = connect()?.configure(rxd_client::protocol::Configure {
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
            show(render::configured(model, &v), &v);
            Ok(0)
        }
        Cmd::Model(ModelCmd::Add {
            model,
            file,
            version,
            compress,
        }) => model_add(cli, model, file, *version, compress.as_deref()),
        Cmd::Model(ModelCmd::Compress { .. }) => compress(cli, command, &connect()?),
        Cmd::Devices => {
            let devices = connect()?.devices()?;
            show(render::devices(&devices), &devices);
            Ok(0)
        }
        Cmd::Unload { model, version } => {
            let s = connect()?.unload(model, *version)?;
            show(format!("{} unloaded\n", s.name), &s);
            Ok(0)
        }
    }
}

/// `rxctl model compress`: the daemon compresses and evaluates (a progress line meanwhile, on
/// a terminal); exits 1 when the compressed model did not pass.
fn compress(cli: &Cli, command: &Cmd, client: &Client) -> Result<u8, Failure> {
    let Cmd::Model(ModelCmd::Compress {
        model,
        version,
        strategy,
        calibration,
        calibration_method,
        eval,
        min_top1,
        min_cosine,
        dry_run,
    }) = command
    else {
        return Err(Failure(code::SOFTWARE, "not a compress command".into()));
    };
    let eval = infer::read_inputs(eval)?;
    let calibration = infer::read_inputs(calibration)?;
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

mod erased {
    /// A value printed as JSON, whatever its type.
    pub trait Json {
        fn print(&self);
    }

    impl<T: serde::Serialize> Json for T {
        fn print(&self) {
            super::print_json(self);
        }
    }
}
