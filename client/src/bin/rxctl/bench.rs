//! `rxctl bench`: flags to a [`rxd_client::bench::Load`], a progress line on a terminal, and
//! the report as a table or JSON.

use std::fmt::Write;

use crate::infer::{generate, generated_text, parse_dims, read_inputs};
use crate::{Cli, Failure, code, print_json};

/// `rxctl bench MODEL`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
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
}

fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive number")),
    }
}

pub fn bench(cli: &Cli, args: &BenchArgs) -> Result<u8, Failure> {
    let BenchArgs {
        model,
        concurrency,
        rate,
        duration,
        requests,
        warmup,
        inputs,
        dims,
        rows,
        inline,
        timeout_ms,
        same_input,
        seed,
    } = args;
    let phases: Vec<(f64, f64)> = match rate {
        None => Vec::new(),
        Some(text) => text
            .split(',')
            .map(|p| {
                let (r, s) = p.split_once(':').unwrap_or((p, "5"));
                match (r.trim().parse::<f64>(), s.trim().parse::<f64>()) {
                    (Ok(r), Ok(s)) if r > 0.0 && s > 0.0 => Ok((r, s)),
                    _ => Err(Failure(
                        code::USAGE,
                        format!("--rate phase '{p}' is not RATE:SECONDS"),
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
    };
    let mut given = read_inputs(inputs)?;
    let dims = parse_dims(dims)?;
    let info = cli.connect()?.model_info(model, None)?;
    let generated = generate(&info, &mut given, &dims, *rows, *seed)?;
    if !cli.json
        && let Some(text) = generated_text(&generated)
    {
        outln!("{text}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure(code::SERVER_ERROR, e.to_string()))?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let levels: Vec<usize> = if phases.is_empty() {
        concurrency.clone()
    } else {
        vec![concurrency[0]]
    };
    let mut reports = Vec::new();
    for &c in &levels {
        let load = rxd_client::bench::Load {
            socket: cli.socket.clone(),
            model: model.clone(),
            inputs: given.clone(),
            concurrency: c,
            rate_phases: phases.clone(),
            duration: std::time::Duration::from_secs_f64(*duration),
            requests: *requests,
            warmup: std::time::Duration::from_secs_f64(*warmup),
            arena: !inline,
            timeout_ms: *timeout_ms,
            same_input: *same_input,
        };
        let total: f64 = if phases.is_empty() {
            *duration
        } else {
            phases.iter().map(|p| p.1).sum()
        };
        let report = rt.block_on(rxd_client::bench::run(&load, move |n, t| {
            if tty {
                let width = 30usize;
                let filled = ((t.as_secs_f64() / total).min(1.0) * width as f64) as usize;
                eprint!(
                    "\r  c={c:<4} [{}{}] {:>5.1}/{total:.0} s  {n} requests ",
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    t.as_secs_f64()
                );
            }
        }));
        if tty {
            eprint!("\r{}\r", " ".repeat(72));
        }
        reports.push(report?);
    }
    if cli.json {
        let mut doc = if reports.len() == 1 {
            serde_json::to_value(&reports[0])
        } else {
            serde_json::to_value(&reports).map(|runs| serde_json::json!({ "runs": runs }))
        }
        .map_err(|e| Failure(code::SOFTWARE, e.to_string()))?;
        if let Some(map) = doc.as_object_mut() {
            map.insert(
                "generated_inputs".into(),
                serde_json::to_value(&generated).unwrap_or_default(),
            );
        }
        print_json(&doc);
    } else {
        out!("{}", table(&reports));
    }
    Ok(if reports.iter().all(|r| r.errors.is_empty()) {
        0
    } else {
        code::SERVER_ERROR
    })
}

/// The report as a table, with what it means below it.
pub fn table(reports: &[rxd_client::bench::Report]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}  ERRORS",
        "CONC", "REQ/S", "P50 ms", "P90 ms", "P95 ms", "P99 ms", "BATCH", "CACHED"
    );
    for r in reports {
        let errors: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            o,
            "{:>6} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7.2} {:>6.0}%  {}",
            r.concurrency,
            r.throughput_per_s,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p95,
            r.latency_ms.p99,
            r.mean_batch_size,
            r.answered_without_running() * 100.0,
            errors.join(" ")
        );
        for p in &r.phases {
            let _ = writeln!(
                o,
                "       phase: offered {:>8.1}/s  achieved {:>8.1}/s  p99 {:>8.2} ms",
                p.offered_per_s, p.throughput_per_s, p.latency_ms.p99
            );
        }
    }
    let Some(first) = reports.first() else {
        return o;
    };
    let warm: Vec<String> = reports
        .iter()
        .map(|r| format!("{} requests in {:.1} s", r.warmup_requests, r.warmup_s))
        .collect();
    let _ = writeln!(
        o,
        "warm-up before each run: {} (not in the figures above; the daemon's metrics count them)",
        warm.join(", ")
    );
    let _ = match (&first.varied_input, first.same_input) {
        (_, true) => writeln!(
            o,
            "inputs: identical in every request (--same-input): the daemon's result cache and \
             coalescing may answer them without running the model"
        ),
        (Some(name), false) => writeln!(
            o,
            "inputs: each request differs in the lowest bits of the first elements of '{name}' \
             (--same-input sends identical ones)"
        ),
        (None, false) => writeln!(
            o,
            "inputs: no float input to vary, so every request is identical: the daemon's result \
             cache and coalescing may answer them without running the model"
        ),
    };
    if reports.iter().any(|r| r.answered_without_running() > 0.0) {
        let _ = writeln!(
            o,
            "CACHED: requests the daemon answered from its result cache or by joining an \
             identical request in flight (during the run, all clients of the model)"
        );
    }
    let mut shown = std::collections::BTreeSet::new();
    for r in reports {
        for (code, message) in &r.error_messages {
            if shown.insert(code.clone()) {
                let _ = writeln!(o, "first error: {message}");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxd_client::bench::{Latency, PhaseReport, Report};

    fn report(concurrency: usize) -> Report {
        let latency = Latency {
            p50: 1.0,
            p90: 1.5,
            p95: 2.0,
            p99: 3.0,
            mean: 1.1,
            max: 4.0,
        };
        Report {
            model: "digits".into(),
            concurrency,
            offered_per_s: None,
            arena: true,
            same_input: false,
            varied_input: Some("input".into()),
            warmup_requests: 7,
            warmup_s: 1.0,
            duration_s: 5.0,
            requests: 100,
            ok: 99,
            throughput_per_s: 20.0,
            latency_ms: latency.clone(),
            errors: [("busy".to_string(), 1)].into(),
            error_messages: [("busy".to_string(), "busy (queue full)".to_string())].into(),
            mean_batch_size: 1.5,
            cache_hits: 10,
            coalesced: 0,
            phases: vec![PhaseReport {
                offered_per_s: 25.0,
                throughput_per_s: 20.0,
                latency_ms: latency,
            }],
        }
    }

    #[test]
    fn the_table_has_a_row_per_run_and_says_what_the_figures_mean() {
        let text = table(&[report(1), report(8)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "  CONC      REQ/S    P50 ms    P90 ms    P95 ms    P99 ms   BATCH  CACHED  ERRORS"
        );
        assert_eq!(
            lines[1],
            "     1       20.0      1.00      1.50      2.00      3.00    1.50     10%  busy=1"
        );
        assert_eq!(
            lines[2],
            "       phase: offered     25.0/s  achieved     20.0/s  p99     3.00 ms"
        );
        assert!(lines[3].starts_with("     8 "), "{text}");
        assert_eq!(
            lines[5],
            "warm-up before each run: 7 requests in 1.0 s, 7 requests in 1.0 s (not in the \
             figures above; the daemon's metrics count them)"
        );
        assert!(lines[6].contains("first elements of 'input'"), "{text}");
        assert!(lines[7].starts_with("CACHED: "), "{text}");
        // Each error code's first message once, however many runs had it.
        assert_eq!(lines[8], "first error: busy (queue full)");
        assert_eq!(lines.len(), 9, "{text}");
    }

    #[test]
    fn no_runs_is_the_header_alone() {
        assert_eq!(table(&[]).lines().count(), 1);
    }
}
