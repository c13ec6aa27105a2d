//! `rxctl top`: a live view of the daemon's metrics in the terminal (alternate screen, raw
//! mode, redrawn every interval), quitting cleanly on q, Esc or Ctrl-C. Plain text lines, so
//! it works over ssh and in any terminal that understands cursor movement; `render` is also
//! what `rxctl metrics` prints.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use rxd_client::ClientOptions;
use rxd_client::blocking::Client;
use rxd_client::protocol::MetricsReport;

use crate::render::size_text as size;
use crate::{Cli, Failure, code};

/// `rxctl top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Refresh interval in ms.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

/// `rxctl top`: refuses `--json` (`metrics` gives the figures as JSON), then runs the view.
pub fn top(cli: &Cli, args: &TopArgs) -> Result<u8, Failure> {
    if cli.json {
        return Err(Failure(
            code::USAGE,
            "rxctl top is a live view; `rxctl --json metrics` gives its figures as JSON".into(),
        ));
    }
    run(
        &cli.socket,
        Duration::from_millis(args.interval_ms.max(100)),
    )
    .map(|()| 0)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The view as lines of at most `width` characters, at most `height` lines. `prev` (the last
/// report and the time since) gives the process CPU share; `live` adds how to quit.
pub fn render(
    m: &MetricsReport,
    prev: Option<(&MetricsReport, Duration)>,
    width: usize,
    height: usize,
    live: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let cpu = match (prev, m.process.cpu_seconds) {
        (Some((p, dt)), Some(now)) if dt.as_secs_f64() > 0.0 => p
            .process
            .cpu_seconds
            .map(|before| format!("{:.0}%", (now - before) / dt.as_secs_f64() * 100.0)),
        _ => None,
    };
    lines.push(format!(
        "rxd: up {:.0} s, {} connections, {} in flight, {} requests, RSS {}, CPU {}{}",
        m.uptime_ms as f64 / 1000.0,
        m.connections_open,
        m.in_flight,
        m.requests_total,
        m.process.rss_bytes.map_or("-".into(), size),
        cpu.unwrap_or_else(|| "-".into()),
        if live { "   (q quits)" } else { "" },
    ));
    lines.push(String::new());
    lines.push(format!(
        "{:<20} {:>3} {:<8} {:<6} {:>4} {:>9} {:>8} {:>7} {:>8} {:>8} {:>6} {:>11} {:>10} {:>6}",
        "MODEL",
        "VER",
        "STATE",
        "DEVICE",
        "INST",
        "OK",
        "REQ/S",
        "ERR/S",
        "P50 ms",
        "P99 ms",
        "BATCH",
        "QUEUE",
        "MEMORY",
        "CACHE"
    ));
    for x in &m.models {
        let rate = x
            .rates
            .iter()
            .find(|r| r.window_s == 10)
            .or(x.rates.first());
        lines.push(format!(
            "{:<20} {:>3} {:<8} {:<6} {:>4} {:>9} {:>8} {:>7} {:>8} {:>8} {:>6} {:>11} {:>10} {:>6}",
            x.name,
            x.version,
            x.state.name(),
            x.device,
            x.instances,
            x.outcomes.get("ok").copied().unwrap_or(0),
            opt(rate.map(|r| r.requests_per_s), 1),
            opt(rate.map(|r| r.errors_per_s), 1),
            opt(x.total.recent.p50, 2),
            opt(x.total.recent.p99, 2),
            opt(x.batch_rows.recent.mean, 1),
            format!("{}/{}", x.queue_depth, x.queue_capacity),
            x.memory_bytes.map_or("-".into(), size),
            x.cache_hit_rate
                .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "{:<12} {:>10} {:>10} {:>10} {:>5} {:>9} {:>6}  MODELS (least recently used first)",
        "DEVICE", "BUDGET", "USED", "FREE", "BUSY", "ROWS/S", "QUEUE"
    ));
    for d in &m.devices {
        let load = d.load.as_ref();
        lines.push(format!(
            "{:<12} {:>10} {:>10} {:>10} {:>5} {:>9} {:>6}  {}",
            d.name,
            d.budget_bytes.map_or("unlimited".into(), size),
            size(d.used_bytes),
            d.free_bytes.map_or("-".into(), size),
            load.map_or("-".into(), |l| format!("{:.0}%", l.busy_ratio * 100.0)),
            opt(load.map(|l| l.rows_per_s), 1),
            load.map_or("-".into(), |l| l.queue_depth.to_string()),
            d.models.join(", ")
        ));
    }
    if m.gpus.is_empty() {
        lines.push("GPUs: none visible".into());
    }
    for g in &m.gpus {
        lines.push(format!(
            "GPU {} {}: busy {}, memory {} of {}",
            g.id,
            g.name.as_deref().unwrap_or(""),
            g.utilization
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            g.memory_used_bytes.map_or("-".into(), size),
            g.memory_total_bytes.map_or("-".into(), size),
        ));
    }
    if !m.errors.is_empty() {
        let e: Vec<String> = m.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.push(format!("errors: {}", e.join(", ")));
    }
    lines.truncate(height);
    for l in &mut lines {
        if l.chars().count() > width {
            *l = l.chars().take(width).collect();
        }
    }
    lines
}

/// Restores the terminal however `run` ends.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let s = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(s)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// Runs the live view until q, Esc or Ctrl-C.
fn run(socket: &Path, interval: Duration) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure(
            code::USAGE,
            "rxctl top is a live view and needs a terminal; `rxctl metrics` prints the same \
             figures once (`rxctl --json metrics` as JSON)"
                .into(),
        ));
    }
    let client = Client::connect_with(socket, ClientOptions::inline_only())?;
    let io = |e: std::io::Error| Failure(code::IO, format!("terminal: {e}"));
    let _screen = Screen::enter().map_err(io)?;
    let mut prev: Option<(MetricsReport, Instant)> = None;
    loop {
        let report = client.metrics()?;
        let (w, h) = terminal::size().unwrap_or((120, 40));
        let lines = render(
            &report,
            prev.as_ref().map(|(p, t)| (p, t.elapsed())),
            w as usize,
            h as usize,
            true,
        );
        let mut out = std::io::stdout();
        let _ = queue!(
            out,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        );
        for (i, l) in lines.iter().enumerate() {
            let _ = queue!(out, cursor::MoveTo(0, i as u16));
            let _ = write!(out, "{l}");
        }
        let _ = out.flush();
        prev = Some((report, Instant::now()));
        let until = Instant::now() + interval;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if event::poll(left).map_err(io)?
                && let Event::Key(k) = event::read().map_err(io)?
                && k.kind != KeyEventKind::Release
            {
                let quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL));
                if quit {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(cpu_seconds: f64) -> MetricsReport {
        let latency = |p50: f64, p99: f64| {
            json!({"recent": {"count": 4, "mean": p50, "p50": p50, "p99": p99},
                   "count": 4, "sum": 1.0, "buckets": []})
        };
        let model = json!({
                "name": "digits", "version": 1, "state": "ready", "device": "cpu",
                "instances": 2, "queue_depth": 0, "queue_capacity": 64,
                "outcomes": {"ok": 38}, "batches": 10, "rows": 38,
                "rates": [{"window_s": 1, "requests_per_s": 9.0, "errors_per_s": 0.0,
                           "batches_per_s": 2.0, "rows_per_s": 9.0},
                          {"window_s": 10, "requests_per_s": 3.5, "errors_per_s": 0.5,
                           "batches_per_s": 1.0, "rows_per_s": 3.5}],
                "queue": latency(0.1, 0.2), "compute": latency(1.0, 2.0),
                "total": latency(1.25, 2.5), "batch_rows": latency(3.8, 4.0),
                "cache_hits": 1, "cache_misses": 3, "cache_hit_rate": 0.25,
                "cache_bytes": 0, "coalesced": 0, "memory_bytes": 1_048_576, "loads": 1,
                "load_failures": 0, "evictions": 0, "load_seconds_total": 0.5,
                "settings": {"instances": 2, "max_batch_rows": 8, "max_queue_delay_us": 0,
                             "queue_capacity": 64, "default_priority": 0,
                             "priority_aging_ms": 0, "cache_bytes": 0},
        });
        serde_json::from_value(json!({
            "uptime_ms": 12_000, "requests_total": 40, "errors": {"busy": 2},
            "process": {"rss_bytes": 3_145_728, "cpu_seconds": cpu_seconds},
            "connections_open": 1, "connections_total": 3, "in_flight": 0,
            "models": [model],
            "devices": [{"name": "cpu", "kind": "cpu", "used_bytes": 1_048_576,
                         "models": ["digits"],
                         "load": {"busy_ratio": 0.425, "rows_per_s": 3.5, "window_s": 10.0,
                                  "queue_depth": 2, "busy_seconds_total": 4.0,
                                  "rows_total": 38, "batches_total": 10}}],
        }))
        .unwrap()
    }

    #[test]
    fn the_view_has_a_row_per_model_and_device_and_the_cpu_share_since_the_last_report() {
        let lines = render(
            &report(2.0),
            Some((&report(1.5), Duration::from_secs(1))),
            200,
            100,
            true,
        );
        assert_eq!(
            lines[0],
            "rxd: up 12 s, 1 connections, 0 in flight, 40 requests, RSS 3.0 MiB, CPU 50%   \
             (q quits)"
        );
        assert!(lines[2].starts_with("MODEL"), "{lines:#?}");
        // The 10 s rate, recent percentiles, queue of capacity, memory and cache hits.
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "digits", "1", "ready", "cpu", "2", "38", "3.5", "0.5", "1.25", "2.50", "3.8",
                "0/64", "1.0", "MiB", "25%"
            ],
            "{lines:#?}"
        );
        assert!(lines[5].starts_with("DEVICE"), "{lines:#?}");
        let device: Vec<&str> = lines[6].split_whitespace().collect();
        assert_eq!(
            device,
            [
                "cpu",
                "unlimited",
                "1.0",
                "MiB",
                "-",
                "42%",
                "3.5",
                "2",
                "digits"
            ],
            "{lines:#?}"
        );
        assert_eq!(lines[7], "GPUs: none visible");
        assert_eq!(lines[8], "errors: busy 2");
        assert_eq!(lines.len(), 9, "{lines:#?}");
    }

    #[test]
    fn the_view_fits_the_terminal_and_says_quit_only_when_live() {
        let lines = render(&report(1.0), None, 30, 4, false);
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.chars().count() <= 30), "{lines:#?}");
        assert_eq!(lines[0], "rxd: up 12 s, 1 connections, 0");
        assert!(lines[0].len() <= 30 && !lines.concat().contains("quits"));
    }
}
