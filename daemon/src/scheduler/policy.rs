//! The batching policy of one model version, as a state machine without IO: events go in with
//! the current time, actions come out. The driver (`scheduler::mod`) carries them out. Tested
//! with plain unit and property tests and a fake clock.
//!
//! Policy, in order, every time something happens:
//! 1. Requests whose deadline has passed are expired (answered `deadline_exceeded`, never run).
//! 2. While a worker is free and requests wait: the head is the waiting request with the
//!    highest *effective* priority (its priority plus one level per `aging` waited since its
//!    *start*), earliest start first on ties. A request's start is its arrival, unless its
//!    own source (the peer's uid) already has requests queued at its level or above: then it
//!    starts when those are expected to be done (each counts the time a worker takes for it:
//!    per row at the cheapest measured batch size, or per input element where that says more
//!    — a request of 64 times the pixels is 64 times the turn, whatever its rows — shared
//!    over the workers) — a fair share: one source's backlog runs in turn with other sources' requests instead of
//!    ahead of them, and it does not age while it waits its turn. A source's batch that took
//!    more than twice its expected compute (its values, not its size, made it long) moves that
//!    source's waiting requests' starts later by the difference ([`Batcher::charge`]): turns
//!    follow what a source's runs cost, not only their sizes. Starts never go backwards
//!    within a source and level (first come, first served there), and lie at most
//!    `queue_capacity` service times after the arrival. The batch is the head plus other
//!    requests with the same shape key, best first, while the rows fit `max_batch_rows` (a
//!    request with more rows than that runs alone) and the expected compute fits
//!    [`MAX_BATCH_COMPUTE`] (by the time per element: heavy requests batched by rows alone
//!    made runs of 14 s that every other request waited for).
//!
//!    The bound this gives: a request at level `d` that is its source's only one waiting at
//!    `d` or above is overtaken by a request at level `p > d` only if that one starts less
//!    than `(p − d) × aging` after it (the tie goes to the earlier start). So it waits at
//!    most `(p − d) × aging` for the highest level `p` anyone else queues at, plus the time
//!    to run what started before that moment and has not run yet (at most the queue: the
//!    wait it would have had anyway). Which levels peers may use is the dispatcher's rule
//!    (`max-peer-priority`), not the policy's.
//! 3. Run now, or wait for the batch to fill: run if the model is not batchable, the batch
//!    has reached its target rows, or the head has waited its allowed wait; else wake up when
//!    the wait ends. Static mode: target = `max_batch_rows`, wait = `max_queue_delay`.
//!    Adaptive mode (a latency target T is set): the policy keeps a smoothed table of what a
//!    batch of each size has cost a worker (hand-over to free). The chosen size is the
//!    smallest measured one whose cost per row is within 10 % of the lowest, among sizes
//!    whose compute fits T/2 — or, once the head has waited T/2 (behind: catching up is what
//!    brings latency back), the largest within 5 % of the lowest among all sizes (fewer
//!    batches: each also costs hand-over, wake-ups and answers on shared cores, which the
//!    worker's time does not show). The table decides, not a fitted curve: per-row
//!    cost falls with size on GPUs, is flat on some CPUs and U-shaped on others (larger
//!    batches cost more per row), and a controller that grows batches when behind runs away
//!    on the last kind. A backlog runs at the chosen size, so where no size is cheaper each
//!    free worker takes the next request and a burst spreads over all workers; with less
//!    waiting, the batch takes it all. Batches from a backlog probe the neighbours (twice and
//!    half the chosen size): at once if never measured, else one in 16, so the table follows
//!    the machine. The head waits for a fuller batch only if the compute it saves is more
//!    than twice the time the worker would idle waiting (and per row it is ≥ 25 % cheaper),
//!    and the expected arrivals fill it within `T − c(size)`: where batching does not pay
//!    (common on CPUs) it never waits. Waiting never pushes a request past its deadline.
//! 4. A full queue refuses new requests at once (`busy`).
//!
//! Invariants (property-tested): every request is answered exactly once (run, rejected or
//! expired); no batch exceeds `max_batch_rows` unless it is a single request; no request runs
//! after its deadline; every batch shares one shape key; the head of every batch has the
//! highest effective priority among those waiting; a request alone at its level from its
//! source waits at most the bound above behind any stream of higher levels; at one level, a
//! source's backlog does not delay another source's request by more than a turn.
//!
//! Limit: one cost table per model version, so requests of very different shapes (a dynamic
//! image width) share one; turns and batch sizes also use the time per input element,
//! smoothed over all batches, which follows shapes as far as cost is linear in the inputs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Identifies a request inside one scheduler.
pub type ReqId = u64;

/// Batch sizes whose cost per row is within this factor of the lowest count as equally cheap
/// while the target is kept: the smallest of them is chosen (lower latency, and a backlog
/// spreads over the workers).
pub const CHEAP_ENOUGH: f64 = 1.1;

/// Behind (the head has waited half the target): sizes within this factor of the lowest cost
/// per row count as equally cheap and the *largest* of them is chosen. A worker's time is
/// not all a batch costs: hand-over, wake-ups and answers run on cores the load generator
/// and the other workers share, once per batch, so where per-row cost looks flat fewer,
/// larger batches drain a backlog faster (on the 2-core machine, choosing the smallest when
/// behind lost 8 of 9 rounds to "rows 8, wait 2 ms").
pub const CHEAP_ENOUGH_BEHIND: f64 = 1.05;

/// Per-request service time ([`Batcher::units`]).
struct Units {
    per_row: f64,
    per_element: f64,
}

impl Units {
    /// Seconds the workers take for `item`: by rows or by elements, whichever says more.
    fn secs(&self, item: &Item) -> f64 {
        let by_rows = self.per_row * f64::from(item.rows.max(1));
        let by_elements = self.per_element * item.elements as f64;
        by_rows.max(by_elements)
    }
}

/// How fast the time per input element follows new batches (the weight of the newest).
const ELEMENT_SMOOTHING: f64 = 0.2;

/// The most expected compute a batch gathers beyond its head (by the time per element): a
/// batch runs to its end while other requests of the model, any user's, wait; heavy
/// requests batched by rows alone made single runs of 14 s.
pub const MAX_BATCH_COMPUTE: Duration = Duration::from_millis(500);

/// Adaptive mode: one batch in this many run from a backlog is a probe at a neighbouring size
/// (twice or half the chosen one, in turn), so the cost table follows the machine and finds a
/// cheaper size if there is one. A neighbour never measured is probed at once.
pub const PROBE_EVERY: u64 = 16;

/// Per-model batching settings (model.toml; changeable at run time later).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Largest batch in rows (1 = no batching).
    pub max_batch_rows: u32,
    /// Static mode: how long the head may wait for the batch to fill.
    pub max_queue_delay: Duration,
    /// Adaptive mode when set: the latency (queue + compute) to keep.
    pub latency_target: Option<Duration>,
    /// Requests that may wait; more are refused with `busy`.
    pub queue_capacity: usize,
    /// One priority level gained per this much waiting; zero = strict priorities (no aging:
    /// a lower level can starve while higher ones keep arriving).
    pub aging: Duration,
    /// Whether requests may be concatenated along dimension 0.
    pub batchable: bool,
    /// How batches are divided between a spread version's devices.
    pub routing: super::route::Routing,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_batch_rows: 32,
            max_queue_delay: Duration::ZERO,
            latency_target: None,
            queue_capacity: 1024,
            aging: Duration::from_millis(100),
            batchable: true,
            routing: super::route::Routing::default(),
        }
    }
}

/// A waiting request as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: ReqId,
    pub rows: u32,
    /// Requests batch together only with equal keys (same dtypes and dims after the first).
    pub key: u64,
    pub priority: u8,
    pub arrived: Instant,
    pub deadline: Option<Instant>,
    /// Who asked (the peer's uid): sources share a level fairly.
    pub source: u64,
    /// Its inputs' elements in all: what it costs relative to other requests of the model
    /// (a request of 2560² pixels costs 64 of 320², whatever its rows).
    pub elements: u64,
}

/// A queued request and the time its waiting counts from (see the module's rule 2).
#[derive(Debug, Clone)]
struct Waiting {
    item: Item,
    start: Instant,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run these requests as one batch on a free worker (head first).
    Run(Vec<ReqId>),
    /// The queue is full: answer `busy`.
    Reject(ReqId),
    /// The deadline passed before it could run: answer `deadline_exceeded`.
    Expire(ReqId),
    /// Call [`Batcher::tick`] at this time (replaces any earlier wake-up).
    Wake(Instant),
}

/// Measured compute time per batch size: a smoothed time for every size seen, linear in
/// between and beyond. Per-row cost is not assumed to fall with batch size: on a CPU it often
/// does not (and can rise for large batches), so the table decides.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    /// rows → smoothed seconds.
    table: std::collections::BTreeMap<u32, f64>,
}

impl CostModel {
    pub fn record(&mut self, rows: u32, compute: Duration) {
        let t = compute.as_secs_f64();
        self.table
            .entry(rows.max(1))
            .and_modify(|old| *old = 0.7 * *old + 0.3 * t)
            .or_insert(t);
    }

    /// Replaces what was measured for `rows` (a fresh measurement after a long gap: the old
    /// one is not blended in).
    pub fn replace(&mut self, rows: u32, compute: Duration) {
        self.table.insert(rows.max(1), compute.as_secs_f64());
    }

    /// Predicted compute time of a batch of `rows` (`None` before any sample).
    pub fn predict(&self, rows: u32) -> Option<Duration> {
        let rows = rows.max(1);
        if let Some(&t) = self.table.get(&rows) {
            return Some(Duration::from_secs_f64(t));
        }
        let below = self.table.range(..rows).next_back();
        let above = self.table.range(rows..).next();
        let secs = match (below, above) {
            (None, None) => return None,
            // Between two sizes: linear.
            (Some((&a, &ta)), Some((&b, &tb))) => {
                ta + (tb - ta) * f64::from(rows - a) / f64::from(b - a)
            }
            // Beyond the largest (or below the smallest): per-row cost of the nearest size.
            (Some((&a, &ta)), None) => ta * f64::from(rows) / f64::from(a),
            (None, Some((&b, &tb))) => tb * f64::from(rows) / f64::from(b),
        };
        Some(Duration::from_secs_f64(secs.max(0.0)))
    }

    /// The size to run a backlog at: among measured sizes up to `max` whose compute fits
    /// `limit` (all of them when none fits, or without a limit), the smallest whose cost per
    /// row is within [`CHEAP_ENOUGH`] of the lowest — or, `behind`, the largest within
    /// [`CHEAP_ENOUGH_BEHIND`]. `None` before any sample.
    ///
    /// The table decides, not a fitted curve: a line `a + k·b` always predicts a falling cost
    /// per row, but on CPUs it is often flat or U-shaped (on one 16-core Xeon, PP-OCR's
    /// classifier ran 26 % more rows/s in batches of 4 than of 1, and 58 % more than of 32).
    pub fn best(&self, max: u32, limit: Option<Duration>, behind: bool) -> Option<u32> {
        // Passes over the table without allocating: this runs at every scheduling decision.
        let sizes = || self.table.range(..=max.max(1)).map(|(&b, &t)| (b, t));
        let fits = |&(_, t): &(u32, f64)| limit.is_none_or(|l| t <= l.as_secs_f64());
        let any_fits = sizes().any(|p| fits(&p));
        let pool = || sizes().filter(move |p| !any_fits || fits(p));
        let per_row = |&(b, t): &(u32, f64)| t / f64::from(b);
        let low = pool().map(|p| per_row(&p)).fold(f64::INFINITY, f64::min);
        let tolerance = if behind {
            CHEAP_ENOUGH_BEHIND
        } else {
            CHEAP_ENOUGH
        };
        // The table iterates in ascending size.
        let mut cheap = pool().filter(|p| per_row(p) <= low * tolerance);
        if behind {
            cheap.next_back()
        } else {
            cheap.next()
        }
        .map(|(b, _)| b)
    }

    /// Whether a batch of `rows` has been measured.
    pub fn measured(&self, rows: u32) -> bool {
        self.table.contains_key(&rows.max(1))
    }

    /// Predicted seconds per row at batch size `rows`.
    pub fn per_row(&self, rows: u32) -> Option<f64> {
        self.predict(rows)
            .map(|d| d.as_secs_f64() / f64::from(rows.max(1)))
    }
}

/// Arrival rate in rows per second, smoothed.
#[derive(Debug, Clone, Default)]
struct RateEstimator {
    last: Option<Instant>,
    /// Smoothed seconds per row.
    gap: Option<f64>,
}

impl RateEstimator {
    fn observe(&mut self, rows: u32, now: Instant) {
        if let Some(last) = self.last {
            let g = now.saturating_duration_since(last).as_secs_f64() / f64::from(rows.max(1));
            self.gap = Some(match self.gap {
                Some(old) => 0.8 * old + 0.2 * g,
                None => g,
            });
        }
        self.last = Some(now);
    }

    /// Expected time for `rows` more rows to arrive.
    fn time_for(&self, rows: u32) -> Option<Duration> {
        self.gap
            .map(|g| Duration::from_secs_f64((g * f64::from(rows)).min(3600.0)))
    }
}

/// What [`Batcher::plan`] decided for the head.
struct Plan {
    /// Run as soon as the batch has this many rows.
    target: u32,
    /// Never run more rows than this (a single larger request runs alone).
    cap: u32,
    /// Run anyway once this time has come.
    until: Instant,
    /// More waits than this batch takes (paces the probes).
    backlog: bool,
}

/// The policy state of one model version.
#[derive(Debug)]
pub struct Batcher {
    settings: Settings,
    queue: Vec<Waiting>,
    /// Workers in all, busy or free (the fair share divides service time over them).
    workers: usize,
    free_workers: usize,
    /// Workers taken away while busy: the next this many finished batches free nothing.
    retiring: usize,
    cost: CostModel,
    rate: RateEstimator,
    wake: Option<Instant>,
    /// Adaptive mode: batches run from a backlog so far (paces the probes).
    backlog_batches: u64,
    /// A worker's time per input element, smoothed over the batches run (`None` before the
    /// first): what a request's turn and a batch's size are measured in, whatever shapes
    /// the requests have (the cost table is per row).
    per_element: Option<f64>,
}

impl Batcher {
    pub fn new(settings: Settings, workers: usize) -> Batcher {
        Batcher {
            settings,
            queue: Vec::new(),
            workers,
            free_workers: workers,
            retiring: 0,
            cost: CostModel::default(),
            rate: RateEstimator::default(),
            wake: None,
            backlog_batches: 0,
            per_element: None,
        }
    }

    /// A batch of `source`'s alone took its worker `overrun` longer than expected (its values,
    /// not its size, made it long): that source's waiting requests start that much later, so
    /// that its turns follow what its runs cost and not only their sizes — ten requests that
    /// each look light but run for a second no longer all go before another source's one.
    pub fn charge(&mut self, source: u64, overrun: Duration) {
        for w in self.queue.iter_mut().filter(|w| w.item.source == source) {
            w.start += overrun;
        }
    }

    /// A batch of `elements` input elements took a worker `compute`.
    pub fn learn_elements(&mut self, elements: u64, compute: Duration) {
        if elements == 0 {
            return;
        }
        let x = compute.as_secs_f64() / elements as f64;
        self.per_element = Some(match self.per_element {
            Some(p) => p + ELEMENT_SMOOTHING * (x - p),
            None => x,
        });
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// New settings at run time; waiting requests are scheduled under them from the next
    /// event on.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn free_workers(&self) -> usize {
        self.free_workers
    }

    /// The cost model, for status reports.
    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// A request arrives.
    pub fn arrive(&mut self, item: Item, now: Instant) -> Vec<Action> {
        let mut actions = self.hold(item, now);
        actions.extend(self.schedule(now));
        actions
    }

    /// A request arrives and waits, without the queue being looked at, for the next event
    /// ([`Batcher::flush`] when its submitter has more to add): refused only when the queue
    /// is full.
    pub fn hold(&mut self, item: Item, now: Instant) -> Vec<Action> {
        self.rate.observe(item.rows, now);
        let mut actions = Vec::new();
        if self.queue.len() >= self.settings.queue_capacity {
            match self.displaced_by(&item) {
                Some(i) => actions.push(Action::Reject(self.queue.remove(i).item.id)),
                None => return vec![Action::Reject(item.id)],
            }
        }
        let start = self.fair_start(&item);
        self.queue.push(Waiting { item, start });
        actions
    }

    /// Where the queue is full: the request `item` takes the place of, if any — the latest
    /// of the source holding the most places, when that is another source holding at least
    /// two more than `item`'s, at `item`'s priority or below. So one source that fills the
    /// queue cannot keep other sources out (each would be refused `busy` while it keeps it
    /// full): they take places from it until the sources queued hold about as many each,
    /// while a source alone keeps the whole queue. O(queue), only when it is full.
    fn displaced_by(&self, item: &Item) -> Option<usize> {
        let mut held: HashMap<u64, usize> = HashMap::new();
        for w in &self.queue {
            *held.entry(w.item.source).or_default() += 1;
        }
        let mine = held.get(&item.source).copied().unwrap_or(0);
        let (&top, &most) = held.iter().max_by_key(|&(s, n)| (*n, *s))?;
        if top == item.source || most < mine + 2 {
            return None;
        }
        self.queue
            .iter()
            .enumerate()
            .filter(|(_, w)| w.item.source == top && w.item.priority <= item.priority)
            .max_by_key(|(i, w)| (w.item.arrived, *i))
            .map(|(i, _)| i)
    }

    /// Looks at the queue: what was held since the last event is scheduled.
    pub fn flush(&mut self, now: Instant) -> Vec<Action> {
        self.schedule(now)
    }

    /// When `item`'s waiting counts from: its arrival, or, behind requests of its own source
    /// at its level or above, when those are expected to be done — never before the latest
    /// start among them (first come, first served within a source and level).
    fn fair_start(&self, item: &Item) -> Instant {
        let mut ahead = 0u32;
        let mut latest = item.arrived;
        for w in &self.queue {
            if w.item.source == item.source && w.item.priority >= item.priority {
                ahead += 1;
                latest = latest.max(w.start);
            }
        }
        if ahead == 0 {
            return item.arrived;
        }
        let units = self.units();
        let turn: f64 = self
            .queue
            .iter()
            .filter(|w| w.item.source == item.source && w.item.priority >= item.priority)
            .map(|w| units.secs(&w.item))
            .sum();
        // (At most ~30 years: an Instant plus Duration::MAX overflows.)
        let turn = Duration::try_from_secs_f64(turn.min(1e9)).unwrap_or(Duration::ZERO);
        latest.max(item.arrived + turn)
    }

    /// What a request's service time is made of: the cheapest measured cost per row and the
    /// time per input element, each shared over the workers.
    fn units(&self) -> Units {
        let max = self.settings.max_batch_rows.max(1);
        let per_row = self
            .cost
            .best(max, None, true)
            .and_then(|b| self.cost.per_row(b))
            .unwrap_or(0.0);
        let workers = self.workers.max(1) as f64;
        Units {
            per_row: per_row / workers,
            per_element: self.per_element.unwrap_or(0.0) / workers,
        }
    }

    /// Expected time the workers take for `item` in a backlog: by its rows at the cheapest
    /// measured batch size, or by its elements where that says more (requests larger than
    /// those the cost table learnt from), shared over the workers. Zero before anything was
    /// measured (then starts are arrivals: first come, first served).
    #[cfg(test)]
    fn service(&self, item: &Item) -> Duration {
        Duration::try_from_secs_f64(self.units().secs(item)).unwrap_or(Duration::MAX)
    }

    /// A batch of `rows` finished after `compute`; its worker is free again.
    pub fn batch_done(&mut self, rows: u32, compute: Duration, now: Instant) -> Vec<Action> {
        self.cost.record(rows, compute);
        self.worker_free(now)
    }

    /// A batch finished whose cost does not teach the table (it ran on a device other than
    /// the one the table follows); its worker is free again.
    pub fn worker_free(&mut self, now: Instant) -> Vec<Action> {
        if self.retiring > 0 {
            self.retiring -= 1;
        } else {
            self.free_workers += 1;
        }
        self.schedule(now)
    }

    /// Adds workers — scaling instances at run time, or a device's instances joining.
    pub fn add_workers(&mut self, n: usize, now: Instant) -> Vec<Action> {
        self.workers += n;
        self.free_workers += n;
        self.schedule(now)
    }

    /// Takes `n` workers away (a device's instances leaving): free ones at once, busy ones
    /// as their batches finish.
    pub fn retire_workers(&mut self, n: usize) {
        self.workers = self.workers.saturating_sub(n);
        let now_free = self.free_workers.min(n);
        self.free_workers -= now_free;
        self.retiring += n - now_free;
    }

    /// A wake-up asked for earlier has come.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.wake = None;
        self.schedule(now)
    }

    /// Priority plus one level per `aging` waited since the request's start (a start still
    /// ahead has waited nothing).
    fn effective_priority(&self, w: &Waiting, now: Instant) -> u64 {
        if self.settings.aging.is_zero() {
            // Strict priorities: a level never waits behind a lower one.
            return u64::from(w.item.priority);
        }
        let waited = now.saturating_duration_since(w.start);
        let aging = self.settings.aging.as_nanos();
        u64::from(w.item.priority) + (waited.as_nanos() / aging) as u64
    }

    /// `x` goes before `y`: higher effective priority, then earlier start, then earlier id.
    fn before(&self, x: &Waiting, y: &Waiting, now: Instant) -> std::cmp::Ordering {
        self.effective_priority(y, now)
            .cmp(&self.effective_priority(x, now))
            .then(x.start.cmp(&y.start))
            .then(x.item.id.cmp(&y.item.id))
    }

    /// Whether every waiting request has the same priority: then [`Batcher::before`] is the
    /// order of starts (a later start has waited no longer, so its effective priority is no
    /// higher), which needs no clock arithmetic per comparison.
    fn one_level(&self) -> bool {
        let mut levels = self.queue.iter().map(|w| w.item.priority);
        let first = levels.next();
        levels.all(|p| Some(p) == first)
    }

    /// Index of the head: the request that goes before every other.
    fn head(&self, now: Instant) -> Option<usize> {
        if self.one_level() {
            return (0..self.queue.len())
                .min_by_key(|&i| (self.queue[i].start, self.queue[i].item.id));
        }
        (0..self.queue.len()).min_by(|&a, &b| self.before(&self.queue[a], &self.queue[b], now))
    }

    /// Target rows (run when reached), cap (never run more), allowed wait of the head, and
    /// whether the batch runs from a backlog (more waits than one batch takes).
    fn plan(&self, head: &Item, rows_now: u32, now: Instant) -> Plan {
        let s = &self.settings;
        let max = s.max_batch_rows.max(1);
        let (target, cap, wait, backlog) = match s.latency_target {
            None => (max, max, s.max_queue_delay, false),
            Some(t) => {
                // Behind: the head has waited half the target already. The target is at risk
                // either way and catching up is what brings latency back, so the batch size
                // is then the one that drains fastest (lowest cost per row, whatever its
                // compute time) and nothing waits.
                let behind = now.saturating_duration_since(head.arrived) >= t / 2;
                let limit = (!behind).then_some(t / 2);
                let queued: u32 = self
                    .queue
                    .iter()
                    .filter(|w| w.item.key == head.key)
                    .map(|w| w.item.rows)
                    .sum();
                let Some(best) = self.cost.best(max, limit, behind) else {
                    // Nothing measured yet: whatever waits runs together (work-conserving),
                    // which measures a spread of sizes.
                    return Plan {
                        target: max,
                        cap: max,
                        until: now,
                        backlog: false,
                    };
                };
                let backlog = queued > best;
                let cap = if backlog {
                    self.probe(best, max, limit).unwrap_or(best)
                } else {
                    best
                };
                // Waiting idles a worker for the fill time; it pays only if the fuller batch
                // saves clearly more compute than that (twice, against noisy estimates; and
                // per row at least 25 %), and the missing rows are expected within the
                // latency budget. Where batching does not pay (common on CPUs) it never waits.
                let target = best;
                let saving = match (self.cost.per_row(target), self.cost.per_row(rows_now)) {
                    (Some(full), Some(now_cost)) if full < 0.75 * now_cost => {
                        Duration::from_secs_f64((now_cost - full) * f64::from(target) / 2.0)
                    }
                    _ => Duration::ZERO,
                };
                let compute = self.cost.predict(target).unwrap_or_default();
                let budget = t.saturating_sub(compute);
                let missing = target.saturating_sub(rows_now);
                let wait = match self.rate.time_for(missing) {
                    Some(fill) if !behind && fill < saving && fill <= budget => fill,
                    _ => Duration::ZERO,
                };
                (target.min(cap), cap, wait, backlog)
            }
        };
        let mut until = head.arrived + wait;
        // Never wait past a deadline of the batch-to-be (minus its expected compute).
        if let Some(d) = head.deadline {
            let c = self.cost.predict(rows_now.max(1)).unwrap_or_default();
            until = until.min(d.checked_sub(c).unwrap_or(now));
        }
        Plan {
            target: target.max(1),
            cap: cap.max(1),
            until,
            backlog,
        }
    }

    /// The size of this backlog batch if it is a probe: a neighbour of `best` (twice, half)
    /// that was never measured, else every [`PROBE_EVERY`]th backlog batch one of them in
    /// turn. A neighbour must be within `max` and, with a `limit`, predicted to fit it.
    fn probe(&self, best: u32, max: u32, limit: Option<Duration>) -> Option<u32> {
        let allowed = |b: u32| {
            b != best
                && (1..=max).contains(&b)
                && limit.is_none_or(|l| self.cost.predict(b).is_some_and(|c| c <= l))
        };
        let (up, down) = (best.saturating_mul(2).min(max), best / 2);
        if let Some(b) = [up, down]
            .into_iter()
            .find(|&b| allowed(b) && !self.cost.measured(b))
        {
            return Some(b);
        }
        if self.backlog_batches % PROBE_EVERY != PROBE_EVERY - 1 {
            return None;
        }
        let turn = if (self.backlog_batches / PROBE_EVERY).is_multiple_of(2) {
            [up, down]
        } else {
            [down, up]
        };
        turn.into_iter().find(|&b| allowed(b))
    }

    fn schedule(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        // 1. Expire.
        self.queue.retain(|w| {
            let expired = w.item.deadline.is_some_and(|d| d <= now);
            if expired {
                actions.push(Action::Expire(w.item.id));
            }
            !expired
        });
        // 2–3. Fill free workers.
        let mut wake: Option<Instant> = None;
        while self.free_workers > 0 {
            let Some(h) = self.head(now) else { break };
            let head = self.queue[h].item.clone();
            let max = self.settings.max_batch_rows.max(1);
            let mut batch = self.collect(&head, now, max);
            let rows: u32 = batch.iter().map(|&i| self.queue[i].item.rows).sum();
            let run_now = if !self.settings.batchable || max <= 1 {
                true
            } else {
                let plan = self.plan(&head, rows, now);
                if rows > plan.cap {
                    batch = self.collect(&head, now, plan.cap);
                }
                if rows >= plan.target || now >= plan.until {
                    if plan.backlog {
                        self.backlog_batches += 1;
                    }
                    true
                } else {
                    wake = Some(plan.until);
                    false
                }
            };
            if !run_now {
                break;
            }
            let ids: Vec<ReqId> = batch.iter().map(|&i| self.queue[i].item.id).collect();
            self.queue.retain(|w| !ids.contains(&w.item.id));
            self.free_workers -= 1;
            actions.push(Action::Run(ids));
        }
        // Deadlines of waiting requests also need a wake-up.
        let next_deadline = self.queue.iter().filter_map(|w| w.item.deadline).min();
        let next = match (wake, next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(t) = next
            && self.wake != Some(t)
        {
            self.wake = Some(t);
            actions.push(Action::Wake(t));
        }
        actions
    }

    /// Indices of the batch for `head`: head first, then compatible requests best first,
    /// while rows fit `limit`.
    fn collect(&self, head: &Item, now: Instant, limit: u32) -> Vec<usize> {
        let head_idx = self
            .queue
            .iter()
            .position(|w| w.item.id == head.id)
            .expect("head is queued");
        let mut batch = vec![head_idx];
        let max = limit.max(1);
        if !self.settings.batchable || head.rows >= max {
            return batch;
        }
        let mut rest: Vec<usize> = (0..self.queue.len())
            .filter(|&i| i != head_idx && self.queue[i].item.key == head.key)
            .collect();
        if self.one_level() {
            rest.sort_by_key(|&i| (self.queue[i].start, self.queue[i].item.id));
        } else {
            rest.sort_by(|&a, &b| self.before(&self.queue[a], &self.queue[b], now));
        }
        // Nor more work than MAX_BATCH_COMPUTE (the head alone may take more): a batch runs
        // to its end, and everyone else's requests wait for it.
        let budget = self
            .per_element
            .filter(|&p| p > 0.0)
            .map_or(u64::MAX, |p| (MAX_BATCH_COMPUTE.as_secs_f64() / p) as u64);
        let (mut rows, mut elements) = (head.rows, head.elements);
        for i in rest {
            let (r, e) = (self.queue[i].item.rows, self.queue[i].item.elements);
            if rows + r <= max && elements.saturating_add(e) <= budget {
                rows += r;
                elements += e;
                batch.push(i);
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests;
