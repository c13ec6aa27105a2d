//! `rxctl model add` and `rxctl model compress`: admin commands that write a new version into
//! the daemon's repository (the daemon writes it; the client sends the file or the request).

use std::path::PathBuf;

use clap::Subcommand;
use rxd_client::ClientOptions;
use rxd_client::blocking::Client;
use rxd_client::protocol::CompressRequest;

use crate::{Cli, Failure, Target, code, infer, print_json, render};

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Admin: publish a model file into the daemon's repository as a new version (sent through
    /// shared memory, written atomically), then serve it; with --compress, also compress it
    /// into the version after (published only if its accuracy report passes).
    Add(AddArgs),
    /// Admin: compress a repository model into a new version; the daemon evaluates it against
    /// the original with ONNX Runtime and publishes it only if the report passes.
    Compress(CompressArgs),
}

/// `rxctl model add MODEL FILE`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    model: String,
    /// The ONNX model file.
    file: PathBuf,
    /// The version to write (default: one more than the highest on disk).
    #[arg(long)]
    version: Option<u64>,
    /// Then compress it with this strategy (as `rxctl model compress --strategy`).
    #[arg(long, value_name = "STRATEGY")]
    compress: Option<String>,
}

/// `rxctl model compress MODEL`.
#[derive(Debug, clap::Args)]
pub struct CompressArgs {
    #[command(flatten)]
    target: Target,
    /// int8-weights, dynamic-int8, fp16, prune:S, combined with +; or static-int8 (with
    /// --calibration); or auto (the daemon tries them all and publishes the smallest that
    /// passes and is not slower at batch 1; auto:latency the fastest, auto:balanced the
    /// smallest size × latency; without --eval its accuracy is unverified).
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
}

/// `rxctl model add`: the file goes through an arena of its size (inline if the daemon
/// refuses one), then, with `--compress`, the new version is compressed; exits 1 when that
/// did not pass.
pub fn add(cli: &Cli, args: &AddArgs) -> Result<u8, Failure> {
    let file = &args.file;
    let bytes =
        std::fs::read(file).map_err(|e| Failure(code::DATA, format!("{}: {e}", file.display())))?;
    let options = ClientOptions {
        arena_bytes: (bytes.len() as u64).next_multiple_of(4096),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&cli.socket, options)?;
    let published = client.publish(&args.model, args.version, &bytes)?;
    let compressed = match &args.compress {
        Some(strategy) => Some(client.compress(CompressRequest {
            model: args.model.clone(),
            version: Some(published.version),
            strategy: strategy.clone(),
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
        outln!(
            "published {} version {} ({}, {})",
            published.model,
            published.version,
            render::size_text(published.bytes),
            published.summary.state.name()
        );
        if let Some(c) = &compressed {
            out!("{}", c.report);
        }
    }
    Ok(match compressed {
        Some(c) if !c.passed => code::SERVER_ERROR,
        _ => 0,
    })
}

/// `rxctl model compress`: the daemon compresses and evaluates (a progress line meanwhile, on
/// a terminal); exits 1 when the compressed model did not pass.
pub fn compress(cli: &Cli, args: &CompressArgs) -> Result<u8, Failure> {
    let client = cli.connect()?;
    let eval = infer::read_inputs(&args.eval)?;
    let calibration = infer::read_inputs(&args.calibration)?;
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
    let r = client.compress(CompressRequest {
        model: args.target.model.clone(),
        version: args.target.version,
        strategy: args.strategy.clone(),
        calibration,
        calibration_method: args.calibration_method.clone(),
        eval,
        min_top1: args.min_top1,
        min_cosine: args.min_cosine,
        dry_run: args.dry_run,
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = spinner {
        let _ = s.join();
    }
    let r = r?;
    if cli.json {
        print_json(&r);
    } else {
        out!("{}", r.report);
    }
    Ok(if r.passed { 0 } else { code::SERVER_ERROR })
}
