//! What the daemon measures: global counters behind `status` and `health` (lock-free atomics;
//! the last error behind a mutex that only the error path takes), per-model-version metrics
//! (outcomes by code, queue/compute/total latency and batch-size distributions kept by
//! hdrhistogram, per-second rates over the last minute), and the process's figures from /proc.
//! Boundary: recording only; the report is assembled by `report::metrics` and rendered by
//! the protocol crate.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rxd_protocol::ErrorCode;
use rxd_protocol::metrics::{Latency, ProcessMetrics, Rate, Summary};

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_failed: AtomicU64,
    pub in_flight: AtomicU64,
    /// Error answers by code.
    pub errors: ErrorCounts,
    last_error: Mutex<Option<LastError>>,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Counts a failed request and keeps it as the last error. `model` names the model the
    /// request reached, if it reached one (never a name only the client typed).
    pub fn record_error(&self, code: u16, message: String, model: Option<&str>) {
        Metrics::inc(&self.requests_failed);
        self.errors.add(code);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastError {
            code,
            model: model.map(str::to_string),
            message,
        });
    }

    /// The last error, as `admin` may see it: the whole message for an admin; for anyone
    /// else only its code and model — a message can carry another client's input names,
    /// shapes or paths.
    pub fn last_error(&self, admin: bool) -> Option<String> {
        let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let e = last.as_ref()?;
        if admin {
            return Some(e.message.clone());
        }
        let code = rxd_protocol::ErrorCode::from_u16(e.code)
            .map_or_else(|| format!("error {}", e.code), |c| c.to_string());
        Some(match &e.model {
            Some(m) => format!("{code} (model '{m}')"),
            None => code,
        })
    }
}

/// The last failed request.
#[derive(Debug)]
struct LastError {
    code: u16,
    model: Option<String>,
    message: String,
}

/// The process's resident set size in bytes (`/proc/self/statm`), if readable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(pages * page)
}

/// Error codes as counter slots: every known code, then one for codes this build does not know.
const SLOTS: usize = ErrorCode::ALL.len() + 2;

fn slot(code: u16) -> usize {
    ErrorCode::ALL
        .iter()
        .position(|c| c.as_u16() == code)
        .unwrap_or(if code == ErrorCode::Internal.as_u16() {
            SLOTS - 2
        } else {
            SLOTS - 1
        })
}

fn slot_name(i: usize) -> String {
    match i {
        i if i < ErrorCode::ALL.len() => ErrorCode::ALL[i].name().into(),
        i if i == SLOTS - 2 => ErrorCode::Internal.name().into(),
        _ => "unknown".into(),
    }
}

/// Counts of answers by error code.
#[derive(Debug)]
pub struct ErrorCounts([AtomicU64; SLOTS]);

impl Default for ErrorCounts {
    fn default() -> Self {
        ErrorCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl ErrorCounts {
    pub fn add(&self, code: u16) {
        self.0[slot(code)].fetch_add(1, Ordering::Relaxed);
    }

    /// Non-zero counts by error name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .map(|(i, n)| (slot_name(i), n))
            .collect()
    }
}

/// Bucket bounds for durations (seconds) in the Prometheus histograms.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Bucket bounds for rows per batch.
const ROWS_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// The recent window: two histograms, each covering this long, reported together.
const RECENT: Duration = Duration::from_secs(10);

/// One distribution: cumulative (for Prometheus: exact counts per bucket, count, sum) and recent
/// (for people: percentiles over the last 10–20 s, kept by hdrhistogram at two significant
/// figures), in integer units (µs for durations, rows for batch sizes).
/// Recording is O(buckets) with no allocation; a report clones one small histogram (about
/// 45 KB), so building metrics stays cheap while workers record under the same lock.
struct Dist {
    /// Bucket upper bounds in the report's units (`le`) and in recording units.
    bounds: &'static [f64],
    limits: Vec<u64>,
    /// Observations ≤ each limit (not cumulative: one bucket per observation).
    counts: Vec<u64>,
    count: u64,
    recent: [Histogram<u64>; 2],
    rotated: Instant,
    /// Exact sum of every observation.
    sum: u64,
}

impl Dist {
    /// `sum_scale` converts recording units to the bounds' units (1e-6: µs → seconds).
    fn new(bounds: &'static [f64], sum_scale: f64) -> Dist {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
        let limits: Vec<u64> = bounds
            .iter()
            .map(|&le| (le / sum_scale).floor() as u64)
            .collect();
        Dist {
            bounds,
            counts: vec![0; limits.len()],
            limits,
            count: 0,
            recent: [h(), h()],
            rotated: Instant::now(),
            sum: 0,
        }
    }

    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.rotated);
        if age >= RECENT * 2 {
            self.recent[0].reset();
            self.recent[1].reset();
            self.rotated = now;
        } else if age >= RECENT {
            self.recent.swap(0, 1);
            self.recent[1].reset();
            self.rotated = now;
        }
    }

    fn record(&mut self, v: u64, now: Instant) {
        self.rotate(now);
        let v = v.max(1);
        if let Some(i) = self.limits.iter().position(|&l| v <= l) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.recent[1].saturating_record(v);
        self.sum = self.sum.saturating_add(v);
    }

    /// The report: `scale` converts units to the recent summary's (ms for µs: 1e-3) and
    /// `sum_scale` to the cumulative sum's and bucket bounds' (seconds for µs: 1e-6).
    fn report(&mut self, scale: f64, sum_scale: f64) -> Latency {
        self.rotate(Instant::now());
        let mut recent = self.recent[0].clone();
        let _ = recent.add(&self.recent[1]);
        let q = |p: f64| (recent.value_at_quantile(p) as f64) * scale;
        let summary = if recent.is_empty() {
            Summary::default()
        } else {
            Summary {
                count: recent.len(),
                mean: Some(recent.mean() * scale),
                p50: Some(q(0.50)),
                p95: Some(q(0.95)),
                p99: Some(q(0.99)),
                max: Some(recent.max() as f64 * scale),
            }
        };
        let mut below = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&le, &n)| {
                below += n;
                (le, below)
            })
            .collect();
        Latency {
            recent: summary,
            count: self.count,
            sum: self.sum as f64 * sum_scale,
            buckets,
        }
    }
}

/// Per-second counts over the last minute, for rates over 1, 10 and 60 s.
struct Window {
    start: Instant,
    /// (second since start, requests, errors, batches, rows)
    slots: [(u64, [u64; 4]); 64],
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            slots: [(u64::MAX, [0; 4]); 64],
        }
    }

    fn add(&mut self, what: usize, n: u64, now: Instant) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let slot = &mut self.slots[(sec % 64) as usize];
        if slot.0 != sec {
            *slot = (sec, [0; 4]);
        }
        slot.1[what] += n;
    }

    fn rates(&self, now: Instant) -> Vec<Rate> {
        let elapsed = now.saturating_duration_since(self.start).as_secs();
        [1u64, 10, 60]
            .into_iter()
            .map(|w| {
                // Complete seconds only: [elapsed - w, elapsed).
                let from = elapsed.saturating_sub(w);
                let span = (elapsed - from).max(1) as f64;
                let mut sums = [0u64; 4];
                for (sec, counts) in &self.slots {
                    if *sec >= from && *sec < elapsed {
                        for (s, c) in sums.iter_mut().zip(counts) {
                            *s += c;
                        }
                    }
                }
                Rate {
                    window_s: w,
                    requests_per_s: sums[0] as f64 / span,
                    errors_per_s: sums[1] as f64 / span,
                    batches_per_s: sums[2] as f64 / span,
                    rows_per_s: sums[3] as f64 / span,
                }
            })
            .collect()
    }
}

struct Dists {
    queue: Dist,
    compute: Dist,
    total: Dist,
    rows: Dist,
    window: Window,
}

/// The metrics of one model version, kept for the daemon's life (they survive evictions and
/// reloads of the same version). Recording takes one short mutex per batch (`record_queue` when
/// it is handed to a worker, `record_batch` when it is done); a successful answer touches
/// atomics only, and is added to the per-second window by the next lock holder (the answers of
/// a batch are recorded just before its `record_batch`); errors take the mutex at once.
pub struct ModelMetrics {
    pub ok: AtomicU64,
    /// Successful answers not yet added to the per-second window.
    unwindowed_ok: AtomicU64,
    pub errors: ErrorCounts,
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub load_us: AtomicU64,
    dists: Mutex<Dists>,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            ok: AtomicU64::new(0),
            unwindowed_ok: AtomicU64::new(0),
            errors: ErrorCounts::default(),
            loads: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            load_us: AtomicU64::new(0),
            dists: Mutex::new(Dists {
                queue: Dist::new(&SECONDS_BUCKETS, 1e-6),
                compute: Dist::new(&SECONDS_BUCKETS, 1e-6),
                total: Dist::new(&SECONDS_BUCKETS, 1e-6),
                rows: Dist::new(&ROWS_BUCKETS, 1.0),
                window: Window::new(),
            }),
        }
    }
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelMetrics")
            .field("ok", &self.ok)
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl ModelMetrics {
    /// The distributions, with the answers recorded since the last holder added to the window
    /// (as of `now`).
    fn dists(&self, now: Instant) -> std::sync::MutexGuard<'_, Dists> {
        let mut d = self.dists.lock().unwrap_or_else(|e| e.into_inner());
        let ok = self.unwindowed_ok.swap(0, Ordering::Relaxed);
        if ok > 0 {
            d.window.add(0, ok, now);
        }
        d
    }

    /// Requests leaving the queue for a worker at `now`, having waited `waits`.
    pub fn record_queue(&self, now: Instant, waits: impl Iterator<Item = Duration>) {
        let mut d = self.dists(now);
        for w in waits {
            d.queue.record(micros(w), now);
        }
    }

    /// A batch of `rows` ran for `compute` and was done at `now`; its requests had arrived
    /// at `arrived`.
    pub fn record_batch(&self, rows: u32, compute: Duration, arrived: &[Instant], now: Instant) {
        let mut d = self.dists(now);
        d.compute.record(micros(compute), now);
        d.rows.record(u64::from(rows), now);
        for a in arrived {
            d.total
                .record(micros(now.saturating_duration_since(*a)), now);
        }
        d.window.add(2, 1, now);
        d.window.add(3, u64::from(rows), now);
    }

    /// A request to this version was answered: `None` = ok, else the error code.
    /// Lock-free for a success (see [`ModelMetrics`]).
    pub fn record_outcome(&self, error: Option<u16>) {
        let Some(code) = error else {
            Metrics::inc(&self.ok);
            self.unwindowed_ok.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.errors.add(code);
        let now = Instant::now();
        let mut d = self.dists(now);
        d.window.add(0, 1, now);
        d.window.add(1, 1, now);
    }

    /// Answers by outcome (`ok` and error names).
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let mut m = self.errors.snapshot();
        let ok = Metrics::get(&self.ok);
        if ok > 0 {
            m.insert("ok".into(), ok);
        }
        m
    }

    /// (queue, compute, total, batch rows, rates) as reported.
    pub fn report(&self) -> (Latency, Latency, Latency, Latency, Vec<Rate>) {
        let mut d = self.dists(Instant::now());
        let queue = d.queue.report(1e-3, 1e-6);
        let compute = d.compute.report(1e-3, 1e-6);
        let total = d.total.report(1e-3, 1e-6);
        let rows = d.rows.report(1.0, 1.0);
        let rates = d.window.rates(Instant::now());
        (queue, compute, total, rows, rates)
    }
}

/// The daemon process: resident memory, CPU time, threads, open fds (from /proc).
pub fn process() -> ProcessMetrics {
    // Reading /proc costs tens of µs per call: a flood of metrics requests reads it at most
    // once per period.
    static SAMPLE: Sampled<ProcessMetrics> = Sampled::new(SAMPLE_PERIOD);
    SAMPLE.get(process_now)
}

/// How stale process and GPU figures may be (they are sampled, not read per request).
pub const SAMPLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// A value read at most once per `every`; callers in between get the last reading.
pub struct Sampled<T> {
    every: std::time::Duration,
    last: Mutex<Option<(std::time::Instant, T)>>,
}

impl<T: Clone> Sampled<T> {
    pub const fn new(every: std::time::Duration) -> Sampled<T> {
        Sampled {
            every,
            last: Mutex::new(None),
        }
    }

    pub fn get(&self, read: impl FnOnce() -> T) -> T {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, v)) if at.elapsed() < self.every => v.clone(),
            _ => {
                let v = read();
                *last = Some((std::time::Instant::now(), v.clone()));
                v
            }
        }
    }
}

fn process_now() -> ProcessMetrics {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64;
    // utime and stime are fields 14 and 15 of /proc/PID/stat: 12 and 13 after the name.
    let cpu = match (fields.get(11), fields.get(12)) {
        (Some(u), Some(s)) => match (u.parse::<u64>(), s.parse::<u64>()) {
            (Ok(u), Ok(s)) => Some((u + s) as f64 / tick),
            _ => None,
        },
        _ => None,
    };
    let threads = fields.get(17).and_then(|t| t.parse().ok());
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    ProcessMetrics {
        rss_bytes: resident_bytes(),
        cpu_seconds: cpu,
        threads,
        open_fds,
    }
}

/// How busy one device is. Its workers record each batch with a few atomic operations (no
/// lock, no allocation, no clock read of its own: the worker's batch timestamps are passed
/// in); reports read the counters and keep a short history of readings under a mutex that
/// only they take, to turn totals into figures over a recent window.
///
/// Busy time is the union of the workers' batches: the device is busy while at least one of
/// its workers runs a batch (a GPU's utilisation is counted the same way), so the ratio stays
/// within 0–1 however many workers share the device.
#[derive(Debug)]
pub struct DeviceLoad {
    epoch: Instant,
    /// Workers on the device running a batch now.
    running: AtomicU64,
    /// Nanoseconds since `epoch` at which the current busy stretch began (while `running > 0`).
    since: AtomicU64,
    /// Nanoseconds of busy stretches that have ended.
    busy_ns: AtomicU64,
    rows: AtomicU64,
    batches: AtomicU64,
    /// Readings taken by reports: (ns since `epoch`, busy ns, rows), oldest first.
    history: Mutex<std::collections::VecDeque<(u64, u64, u64)>>,
}

/// The window device figures cover when reports come at least this often.
pub const DEVICE_WINDOW: Duration = Duration::from_secs(10);
/// Reports closer together than this do not add a reading (a flood of metrics requests keeps
/// the history short).
const READING_EVERY: Duration = Duration::from_millis(100);

impl Default for DeviceLoad {
    fn default() -> Self {
        DeviceLoad {
            epoch: Instant::now(),
            running: AtomicU64::new(0),
            since: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            history: Mutex::new(std::collections::VecDeque::from([(0, 0, 0)])),
        }
    }
}

impl DeviceLoad {
    fn ns(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.epoch);
        d.as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// A worker on the device starts a batch at `at`.
    pub fn begin(&self, at: Instant) {
        // The first worker in starts the stretch. Nobody ends it before this store: its end
        // needs this worker's own decrement.
        if self.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.since.store(self.ns(at), Ordering::Release);
        }
    }

    /// A worker on the device ended a batch of `rows` rows at `at`.
    pub fn end(&self, at: Instant, rows: u32) {
        self.rows.fetch_add(u64::from(rows), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        // Read before leaving: while this worker counts as running, no new stretch can begin,
        // so `since` is this stretch's start.
        let since = self.since.load(Ordering::Acquire);
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.busy_ns
                .fetch_add(self.ns(at).saturating_sub(since), Ordering::Relaxed);
        }
    }

    /// Busy nanoseconds up to `now`, the stretch under way included.
    fn busy_at(&self, now: u64) -> u64 {
        let ended = self.busy_ns.load(Ordering::Relaxed);
        if self.running.load(Ordering::Acquire) > 0 {
            let since = self.since.load(Ordering::Acquire);
            ended + now.saturating_sub(since)
        } else {
            ended
        }
    }

    /// The device's figures now, with `queue_depth` requests waiting for its models.
    pub fn report(&self, queue_depth: u64) -> rxd_protocol::DeviceLoad {
        self.report_at(Instant::now(), queue_depth)
    }

    fn report_at(&self, at: Instant, queue_depth: u64) -> rxd_protocol::DeviceLoad {
        let now = self.ns(at);
        let busy = self.busy_at(now);
        let rows = self.rows.load(Ordering::Relaxed);
        let (t0, busy0, rows0) = {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            let cutoff = now.saturating_sub(DEVICE_WINDOW.as_nanos() as u64);
            // Keep the newest reading at or before the window's start, and the ones after.
            while h.len() >= 2 && h[1].0 <= cutoff {
                h.pop_front();
            }
            let base = h.front().copied().unwrap_or((0, 0, 0));
            if h.back()
                .is_none_or(|b| now.saturating_sub(b.0) >= READING_EVERY.as_nanos() as u64)
            {
                h.push_back((now, busy, rows));
            }
            base
        };
        let window = now.saturating_sub(t0);
        let secs = window as f64 / 1e9;
        let (busy_ratio, rows_per_s) = if window == 0 {
            (0.0, 0.0)
        } else {
            (
                (busy.saturating_sub(busy0) as f64 / window as f64).clamp(0.0, 1.0),
                rows.saturating_sub(rows0) as f64 / secs,
            )
        };
        rxd_protocol::DeviceLoad {
            busy_ratio,
            rows_per_s,
            window_s: secs,
            queue_depth,
            busy_seconds_total: busy as f64 / 1e9,
            rows_total: rows,
            batches_total: self.batches.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_report_percentiles_and_cumulative_buckets() {
        let m = ModelMetrics::default();
        let t0 = Instant::now();
        let arrived: Vec<Instant> = (0..4).map(|_| t0).collect();
        m.record_batch(4, Duration::from_millis(2), &arrived, Instant::now());
        m.record_queue(
            Instant::now(),
            [1u64, 2, 3, 1000].into_iter().map(Duration::from_millis),
        );
        m.record_outcome(None);
        m.record_outcome(Some(ErrorCode::Busy.as_u16()));
        let (queue, compute, _, rows, rates) = m.report();
        assert_eq!(queue.count, 4);
        assert_eq!(queue.recent.count, 4);
        let p50 = queue.recent.p50.unwrap();
        assert!((1.9..=2.1).contains(&p50), "{p50}");
        assert!(queue.recent.max.unwrap() >= 999.0);
        assert!((queue.sum - 1.006).abs() < 1e-9, "{}", queue.sum);
        // Cumulative: 3 requests waited ≤ 5 ms, all 4 ≤ 1 s.
        let at = |le: f64| queue.buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.005), 3);
        assert_eq!(at(1.0), 4);
        assert_eq!(at(0.0005), 0);
        assert_eq!(compute.count, 1);
        assert_eq!(rows.buckets.iter().find(|b| b.0 == 4.0).unwrap().1, 1);
        assert_eq!(rows.buckets.iter().find(|b| b.0 == 2.0).unwrap().1, 0);
        let outcomes = m.outcomes();
        assert_eq!(outcomes["ok"], 1);
        assert_eq!(outcomes["busy"], 1);
        assert_eq!(rates.len(), 3);
    }

    #[test]
    fn every_code_has_its_own_slot() {
        let c = ErrorCounts::default();
        for code in ErrorCode::ALL {
            c.add(code.as_u16());
        }
        c.add(ErrorCode::Internal.as_u16());
        c.add(999);
        let s = c.snapshot();
        assert_eq!(s.len(), ErrorCode::ALL.len() + 2);
        assert!(s.values().all(|&n| n == 1));
        assert_eq!(s["unknown"], 1);
    }

    #[test]
    fn process_figures_come_from_proc() {
        let p = process();
        assert!(p.rss_bytes.unwrap() > 1 << 20);
        assert!(p.threads.unwrap() >= 1);
        assert!(p.open_fds.unwrap() >= 3);
        assert!(p.cpu_seconds.unwrap() >= 0.0);
    }

    #[test]
    fn device_busy_is_the_union_of_its_workers_batches_over_a_recent_window() {
        let d = DeviceLoad::default();
        let t = |ms: u64| d.epoch + Duration::from_millis(ms);
        // Two workers overlapping: busy from 1000 to 4000 ms (3 s), not 4 s.
        d.begin(t(1000));
        d.begin(t(2000));
        d.end(t(3000), 2);
        d.end(t(4000), 3);
        // Idle, then one batch under way at the report (counted up to the report's time).
        d.begin(t(9000));
        let r = d.report_at(t(10_000), 7);
        assert_eq!(r.rows_total, 5);
        assert_eq!(r.batches_total, 2);
        assert_eq!(r.queue_depth, 7);
        assert!((r.busy_seconds_total - 4.0).abs() < 1e-6, "{r:?}");
        assert!((r.window_s - 10.0).abs() < 1e-6, "{r:?}");
        assert!((r.busy_ratio - 0.4).abs() < 1e-6, "{r:?}");
        assert!((r.rows_per_s - 0.5).abs() < 1e-6, "{r:?}");
        d.end(t(11_000), 1);
        // Reports every second: the window is the last 10 s, so the ratio falls back towards
        // 0 once idle, and reaches it when the whole window is idle.
        let mut last = r;
        for s in 12..=22 {
            last = d.report_at(t(s * 1000), 0);
        }
        assert!((last.window_s - 10.0).abs() < 1e-6, "{last:?}");
        assert_eq!(last.busy_ratio, 0.0, "{last:?}");
        assert_eq!(last.rows_per_s, 0.0, "{last:?}");
        assert!((last.busy_seconds_total - 5.0).abs() < 1e-6, "{last:?}");
        // A report long after the last one covers the time since it.
        let late = d.report_at(t(60_000), 0);
        assert!((late.window_s - 38.0).abs() < 1e-6, "{late:?}");
    }

    #[test]
    fn device_readings_are_not_kept_for_reports_closer_than_the_reading_period() {
        let d = DeviceLoad::default();
        for i in 0..10_000u64 {
            d.report_at(d.epoch + Duration::from_micros(i * 10), 0);
        }
        let kept = d.history.lock().unwrap().len();
        assert!(kept <= 3, "{kept}");
    }

    /// What recording costs a worker per batch, alone and with a second worker of the same
    /// device recording at the same time (the atomics' cache line shared). Run in release for
    /// figures: `cargo test -p rxd --lib --release -- --ignored --nocapture device_load_cost`.
    #[test]
    #[ignore = "a timing; run in release"]
    fn device_load_cost_per_batch() {
        const N: u32 = 2_000_000;
        let d = std::sync::Arc::new(DeviceLoad::default());
        let run = |d: &DeviceLoad| {
            let t = Instant::now();
            let started = Instant::now();
            for _ in 0..N {
                d.begin(started);
                d.end(started, 1);
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        };
        let alone = run(&d);
        let other = d.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let rival = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                other.begin(Instant::now());
                other.end(Instant::now(), 1);
            }
        });
        let shared = run(&d);
        stop.store(true, Ordering::Relaxed);
        rival.join().unwrap();
        println!("DeviceLoad begin+end: {alone:.1} ns alone, {shared:.1} ns with a rival worker");
        assert!(alone < 1000.0 && shared < 5000.0, "{alone} {shared}");
        assert_eq!(d.running.load(Ordering::Relaxed), 0);
    }
}
