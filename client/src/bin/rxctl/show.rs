//! What the daemon is and holds: `status`, `health`, `models`, `devices`, `metrics`. Each asks
//! once and prints the reply, as text from `render` or as JSON; none changes the daemon.

use rxd_client::protocol::HealthState;

use crate::{Cli, Failure, code, render, top};

/// `rxctl health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Also exit 2 when degraded.
    #[arg(long)]
    strict: bool,
}

/// `rxctl models [MODEL]`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    model: Option<String>,
    #[arg(long)]
    version: Option<u64>,
}

/// `rxctl metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    #[arg(long)]
    prometheus: bool,
}

pub fn status(cli: &Cli) -> Result<u8, Failure> {
    let s = cli.connect()?.status()?;
    cli.show(&render::status(&s), &s);
    Ok(0)
}

/// Exits 2 when unhealthy (or degraded, with `--strict`).
pub fn health(cli: &Cli, args: &HealthArgs) -> Result<u8, Failure> {
    let h = cli.connect()?.health()?;
    cli.show(&render::health(&h), &h);
    let bad =
        h.state == HealthState::Unhealthy || (args.strict && h.state == HealthState::Degraded);
    Ok(if bad { code::UNHEALTHY } else { 0 })
}

/// Every model version, or one model's signature.
pub fn models(cli: &Cli, args: &ModelsArgs) -> Result<u8, Failure> {
    match &args.model {
        None => {
            let models = cli.connect()?.list_models()?;
            cli.show(&render::models(&models), &models);
        }
        Some(name) => {
            let info = cli.connect()?.model_info(name, args.version)?;
            cli.show(&render::model_info(&info), &info);
        }
    }
    Ok(0)
}

pub fn devices(cli: &Cli) -> Result<u8, Failure> {
    let devices = cli.connect()?.devices()?;
    cli.show(&render::devices(&devices), &devices);
    Ok(0)
}

/// The figures `top` shows, once; or Prometheus' text format.
pub fn metrics(cli: &Cli, args: &MetricsArgs) -> Result<u8, Failure> {
    if args.prometheus && cli.json {
        return Err(Failure(
            code::USAGE,
            "--prometheus prints Prometheus' text format, --json one JSON document: choose one"
                .into(),
        ));
    }
    let m = cli.connect()?.metrics()?;
    if args.prometheus {
        out!("{}", rxd_protocol::metrics::prometheus(&m));
    } else {
        cli.show(
            &(top::render(&m, None, 200, 1000, false).join("\n") + "\n"),
            &m,
        );
    }
    Ok(0)
}
