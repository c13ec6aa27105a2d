//! `rxctl`: the command-line client of rxd. Thin: the flags and which command runs here; one
//! module per command group (`show`, `admin`, `model`, `infer`, `bench`, `top`), each command a
//! function taking its own `Args`; what is printed for people is rendered by pure functions
//! (`render`, `top::render`); everything that talks to the daemon is in the library.
//!
//! Exit codes ([`EXIT_CODES`], in `--help` and rxctl(1)): 0 success; 1 the daemon answered
//! with an error; 2 `health` found the daemon unhealthy (or degraded, with `--strict`); 64
//! usage; 65 bad input file; 69 cannot reach the daemon; 70 internal error; 74 cannot write
//! an output file; 77 permission denied (by the daemon, or on its socket).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxd_client::generate::{Generate, generate};
use rxd_client::{ClientError, ClientOptions, blocking::Client};

#[macro_use]
mod out;
mod admin;
mod bench;
mod exit;
mod infer;
mod model;
mod render;
mod show;
mod top;

use exit::{Failure, code};

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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// What the daemon is and serves.
    Status,
    /// Health: healthy, degraded or unhealthy, with reasons. Exits 2 when unhealthy.
    Health(show::HealthArgs),
    /// List model versions, or show one model's signature.
    Models(show::ModelsArgs),
    /// Run a model. Inputs come from .npy files; inputs not given are filled with random data
    /// (floats in [0, 1), integers 0..9) of the shape the daemon warmed the model up with, or
    /// of the shape --dim gives, and the output says which inputs were random.
    Infer(infer::InferArgs),
    /// Load generator: closed-loop concurrency sweep or open-loop rate phases; reports
    /// throughput, latency percentiles, errors by code and the daemon's mean batch size.
    Bench(bench::BenchArgs),
    /// Admin: load a model version (default: the latest on disk).
    Load(Target),
    /// Admin: re-read the model repository (as SIGHUP does).
    Reload,
    /// Admin: unload a model (all loaded versions, or one).
    Unload(Target),
    /// Admin: place resident versions again over the devices their model.toml allows
    /// (`spread`): shares on devices no longer listed or failing leave, missing ones are
    /// added; no request fails.
    Rebalance(admin::RebalanceArgs),
    /// Admin: pin a model version (loads it if needed): never evicted.
    Pin(Target),
    /// Admin: unpin a model version: it may be evicted again.
    Unpin(Target),
    /// Devices: memory budget, used, free, and the models resident on each.
    Devices,
    /// Every metric; `--prometheus` prints Prometheus' text exposition format.
    Metrics(show::MetricsArgs),
    /// Admin: change a model version's settings at run time (only the options given).
    Configure(admin::ConfigureArgs),
    /// Model operations.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Live view: models, req/s, p50/p99, batch size, queue, memory per device, cache hit
    /// rate; refreshed every second; q, Esc or Ctrl-C quits.
    Top(top::TopArgs),
}

/// A model, and a version of it (default: the daemon's choice for the command).
#[derive(Debug, clap::Args)]
struct Target {
    model: String,
    #[arg(long)]
    version: Option<u64>,
}

impl Cli {
    /// A connection without an arena: for commands whose messages are small.
    fn connect(&self) -> Result<Client, ClientError> {
        Client::connect_with(&self.socket, ClientOptions::inline_only())
    }

    /// Prints `text` for people, or, with `--json`, exactly one JSON document.
    fn show<T: serde::Serialize>(&self, text: &str, json: &T) {
        if self.json {
            print_json(json);
        } else {
            out!("{text}");
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { code::USAGE } else { 0 });
        }
    };
    if let Some(what) = cli.generate {
        let cmd = <Cli as clap::CommandFactory>::command().name("rxctl");
        return match generate(what, cmd, "1", &mut std::io::stdout()) {
            Ok(()) => ExitCode::from(0),
            Err(e) => {
                out::exit_if_closed(&e);
                ExitCode::from(code::IO)
            }
        };
    }
    let Some(command) = &cli.command else {
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return ExitCode::from(code::USAGE);
    };
    match run(&cli, command).map_err(|f| exit::with_known_models(&cli, f)) {
        Ok(c) => ExitCode::from(c),
        Err(Failure(c, msg)) => {
            if cli.json {
                let v = serde_json::json!({"error": msg, "exit_code": c});
                outln!("{v}");
            } else {
                eprintln!("rxctl: {msg}");
            }
            ExitCode::from(c)
        }
    }
}

/// Runs one command; its exit code, or why it failed.
fn run(cli: &Cli, command: &Cmd) -> Result<u8, Failure> {
    match command {
        Cmd::Status => show::status(cli),
        Cmd::Health(args) => show::health(cli, args),
        Cmd::Models(args) => show::models(cli, args),
        Cmd::Devices => show::devices(cli),
        Cmd::Metrics(args) => show::metrics(cli, args),
        Cmd::Infer(args) => infer::infer(cli, args),
        Cmd::Bench(args) => bench::bench(cli, args),
        Cmd::Top(args) => top::top(cli, args),
        Cmd::Load(target) => admin::load(cli, target),
        Cmd::Reload => admin::reload(cli),
        Cmd::Unload(target) => admin::unload(cli, target),
        Cmd::Rebalance(args) => admin::rebalance(cli, args),
        Cmd::Pin(target) => admin::pin(cli, target),
        Cmd::Unpin(target) => admin::unpin(cli, target),
        Cmd::Configure(args) => admin::configure(cli, args),
        Cmd::Model(model::ModelCmd::Add(args)) => model::add(cli, args),
        Cmd::Model(model::ModelCmd::Compress(args)) => model::compress(cli, args),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => outln!("{text}"),
        Err(e) => eprintln!("rxctl: cannot print JSON: {e}"),
    }
}
