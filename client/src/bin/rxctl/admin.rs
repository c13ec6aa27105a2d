//! Admin commands that change what the daemon serves: `load`, `unload`, `pin`, `unpin`,
//! `reload`, `configure`. The daemon checks that the caller may (exit 77 when not).

use crate::{Cli, Failure, Target, code, render};
use rxd_client::protocol::ModelState;

/// `rxctl configure MODEL [--version V] --SETTING VALUE...`: only the settings given change.
#[derive(Debug, clap::Args)]
pub struct ConfigureArgs {
    #[command(flatten)]
    target: Target,
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
    /// Measure the model again (load-time tuning) and rebuild it with what that chooses.
    #[arg(long)]
    retune: bool,
}

/// Exits 1 when the version did not become ready.
pub fn load(cli: &Cli, t: &Target) -> Result<u8, Failure> {
    let s = cli.connect()?.load(&t.model, t.version)?;
    cli.show(&render::state(&s), &s);
    Ok(if s.state == ModelState::Ready {
        0
    } else {
        code::SERVER_ERROR
    })
}

pub fn reload(cli: &Cli) -> Result<u8, Failure> {
    let models = cli.connect()?.reload()?;
    cli.show(
        &models.iter().map(render::state).collect::<String>(),
        &models,
    );
    Ok(0)
}

/// `rxctl rebalance [MODEL]`.
#[derive(Debug, clap::Args)]
pub struct RebalanceArgs {
    /// The model (default: every model).
    pub model: Option<String>,
}

pub fn rebalance(cli: &Cli, args: &RebalanceArgs) -> Result<u8, Failure> {
    let models = cli.connect()?.rebalance(args.model.as_deref())?;
    cli.show(&render::placed(&models), &models);
    Ok(0)
}

pub fn unload(cli: &Cli, t: &Target) -> Result<u8, Failure> {
    let s = cli.connect()?.unload(&t.model, t.version)?;
    cli.show(&format!("{} unloaded\n", s.name), &s);
    Ok(0)
}

pub fn pin(cli: &Cli, t: &Target) -> Result<u8, Failure> {
    let s = cli.connect()?.pin(&t.model, t.version)?;
    cli.show(&render::pinned(&s), &s);
    Ok(0)
}

pub fn unpin(cli: &Cli, t: &Target) -> Result<u8, Failure> {
    let s = cli.connect()?.unpin(&t.model, t.version)?;
    cli.show(&render::pinned(&s), &s);
    Ok(0)
}

pub fn configure(cli: &Cli, args: &ConfigureArgs) -> Result<u8, Failure> {
    let v = cli.connect()?.configure(rxd_client::protocol::Configure {
        model: args.target.model.clone(),
        version: args.target.version,
        instances: args.instances,
        max_batch_rows: args.max_batch_rows,
        max_queue_delay_us: args.max_queue_delay_us,
        latency_target_ms: args.latency_target_ms,
        default_priority: args.default_priority,
        priority_aging_ms: args.priority_aging_ms,
        cache_bytes: args.cache_bytes,
        clear_cache: args.clear_cache,
        device: args.device.clone(),
        persist: args.persist,
        retune: args.retune,
    })?;
    cli.show(&render::configured(&args.target.model, &v), &v);
    Ok(0)
}
