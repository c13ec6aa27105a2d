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
        "{:<12} {:>10} {:>10} {:>10}  MODELS (least recently used first)",
        "DEVICE", "BUDGET", "USED", "FREE"
    ));
    for d in &m.devices {
        lines.push(format!(
            "{:<12} {:>10} {:>10} {:>10}  {}",
            d.name,
            d.budget_bytes.map_or("unlimited".into(), size),
            size(d.used_bytes),
            d.free_bytes.map_or("-".into(), size),
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
