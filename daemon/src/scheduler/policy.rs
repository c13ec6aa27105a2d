//! The batching policy of one model version, as a state machine without IO: events go in with
//! the current time, actions come out. The driver (`scheduler::mod`) carries them out. Tested
//! with plain unit and property tests and a fake clock.
//!
//! Policy, in order, every time something happens:
//! 1. Requests whose deadline has passed are expired (answered `deadline_exceeded`, never run).
//! 2. While a worker is free and requests wait: the head is the waiting request with the
//!    highest *effective* priority (its priority plus one level per `aging` waited — so a
//!    low-priority request waits at most `aging × (levels between)` behind a stream of higher
//!    ones), oldest first on ties. The batch is the head plus other requests with the same
//!    shape key, best first, while the rows fit `max_batch_rows` (a request with more rows
//!    than that runs alone).
//! 3. Run now, or wait for the batch to fill: run if the model is not batchable, the batch
//!    has reached its target rows, or the head has waited its allowed wait; else wake up when
//!    the wait ends. Static mode: target = `max_batch_rows`, wait = `max_queue_delay`.
//!    Adaptive mode (a latency target T is set): the policy keeps a smoothed table of what a
//!    batch of each size has cost a worker (hand-over to free) and a least-squares line
//!    through it. The cap is the largest batch predicted within T/2 (whatever is queued runs
//!    together up to it: work-conserving, and it keeps measuring sizes); with several
//!    workers and a flat per-row cost (a 1/W share of the backlog within 10 % per row of the
//!    whole) a batch takes only its share, so a burst runs on all workers at once; once the
//!    head has waited T/2 the cap is `max_batch_rows` and nothing waits (drain: catching up
//!    is what brings latency back). The target is the
//!    measured size with the lowest cost per row within T/2; the head waits for it only if
//!    the compute it saves is more than twice the time the worker would idle waiting (and per
//!    row it is ≥ 25 % cheaper), and the expected arrivals fill it within `T − c(target)`:
//!    where batching does not pay (common on CPUs) it never waits. Waiting never pushes a
//!    request past its deadline.
//! 4. A full queue refuses new requests at once (`busy`).
//!
//! Invariants (property-tested): every request is answered exactly once (run, rejected or
//! expired); no batch exceeds `max_batch_rows` unless it is a single request; no request runs
//! after its deadline; every batch shares one shape key; the head of every batch has the
//! highest effective priority among those waiting.

use std::time::{Duration, Instant};

/// Identifies a request inside one scheduler.
pub type ReqId = u64;

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

    /// Batch sizes measured so far.
    pub fn sizes(&self) -> impl Iterator<Item = u32> + '_ {
        self.table.keys().copied()
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

    /// Least-squares line `c(b) = a + k·b` through the table (one point per size), for
    /// decisions that must not follow one noisy size; `None` below two sizes.
    pub fn linear(&self, rows: u32) -> Option<Duration> {
        let n = self.table.len() as f64;
        if self.table.len() < 2 {
            return self.predict(rows);
        }
        let (sx, sy) = self
            .table
            .iter()
            .fold((0.0, 0.0), |(a, b), (&x, &y)| (a + f64::from(x), b + y));
        let (mx, my) = (sx / n, sy / n);
        let (sxx, sxy) = self.table.iter().fold((0.0, 0.0), |(a, b), (&x, &y)| {
            let dx = f64::from(x) - mx;
            (a + dx * dx, b + dx * (y - my))
        });
        let k = (sxy / sxx).max(0.0);
        let a = (my - k * mx).max(0.0);
        Some(Duration::from_secs_f64(a + k * f64::from(rows)))
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

/// The policy state of one model version.
#[derive(Debug)]
pub struct Batcher {
    settings: Settings,
    queue: Vec<Item>,
    /// Workers in all, busy or not (the adaptive mode splits a backlog over them).
    workers: usize,
    free_workers: usize,
    cost: CostModel,
    rate: RateEstimator,
    wake: Option<Instant>,
}

impl Batcher {
    pub fn new(settings: Settings, workers: usize) -> Batcher {
        Batcher {
            settings,
            queue: Vec::new(),
            workers,
            free_workers: workers,
            cost: CostModel::default(),
            rate: RateEstimator::default(),
            wake: None,
        }
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
        self.rate.observe(item.rows, now);
        if self.queue.len() >= self.settings.queue_capacity {
            let mut actions = vec![Action::Reject(item.id)];
            actions.extend(self.schedule(now));
            return actions;
        }
        self.queue.push(item);
        self.schedule(now)
    }

    /// A batch of `rows` finished after `compute`; its worker is free again.
    pub fn batch_done(&mut self, rows: u32, compute: Duration, now: Instant) -> Vec<Action> {
        self.cost.record(rows, compute);
        self.free_workers += 1;
        self.schedule(now)
    }

    /// Adds (or, negative, removes) workers — scaling instances at run time.
    pub fn add_workers(&mut self, n: usize, now: Instant) -> Vec<Action> {
        self.workers += n;
        self.free_workers += n;
        self.schedule(now)
    }

    /// A wake-up asked for earlier has come.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.wake = None;
        self.schedule(now)
    }

    fn effective_priority(&self, item: &Item, now: Instant) -> u64 {
        if self.settings.aging.is_zero() {
            // Strict priorities: a level never waits behind a lower one.
            return u64::from(item.priority);
        }
        let waited = now.saturating_duration_since(item.arrived);
        let aging = self.settings.aging.as_nanos();
        u64::from(item.priority) + (waited.as_nanos() / aging) as u64
    }

    /// Index of the head: highest effective priority, then earliest arrival.
    fn head(&self, now: Instant) -> Option<usize> {
        (0..self.queue.len()).max_by(|&a, &b| {
            let (x, y) = (&self.queue[a], &self.queue[b]);
            self.effective_priority(x, now)
                .cmp(&self.effective_priority(y, now))
                .then(y.arrived.cmp(&x.arrived))
                .then(y.id.cmp(&x.id))
        })
    }

    /// Target rows (run when reached), cap (never run more) and allowed wait of the head.
    fn plan(&self, head: &Item, rows_now: u32, now: Instant) -> (u32, u32, Instant) {
        let s = &self.settings;
        let max = s.max_batch_rows.max(1);
        let (target, cap, wait) = match s.latency_target {
            None => (max, max, s.max_queue_delay),
            Some(t) => {
                let per_row_line = |b: u32| {
                    self.cost
                        .linear(b)
                        .map(|c| c.as_secs_f64() / f64::from(b.max(1)))
                };
                // Fits: the largest batch whose compute (on the least-squares line) fits half
                // the target; until something is measured, `max`.
                let fits = (1..=max)
                    .rev()
                    .find(|&b| self.cost.linear(b).is_none_or(|c| c <= t / 2))
                    .unwrap_or(1);
                // Behind (the head has waited half the target already): the cap is lifted to
                // `max` and nothing waits — the target is at risk either way, and catching up
                // is what brings latency back. This does not trust the cost line: on a
                // loaded machine one slow measurement can make it predict that only small
                // batches fit, and a controller that believed it fell behind for good (one
                // bench round at 2 s p99). Where per-row cost is flat the split below still
                // spreads the backlog over the workers.
                let behind = now.saturating_duration_since(head.arrived) >= t / 2;
                let fits = if behind { max } else { fits };
                // Several workers and a backlog: where per-row cost is flat (a 1/W share of
                // the backlog costs within 10 % per row of one batch of it), this batch takes
                // only its share, so a burst runs on all workers at once instead of as one
                // long batch on one. Where larger batches are clearly cheaper per row, one
                // batch takes it all. The share grows with the backlog, so larger sizes keep
                // being measured.
                let queued: u32 = self
                    .queue
                    .iter()
                    .filter(|i| i.key == head.key)
                    .map(|i| i.rows)
                    .sum();
                let whole = queued.min(fits);
                let share = queued.div_ceil(self.workers.max(1) as u32).max(1);
                let cap = match (per_row_line(share), per_row_line(whole)) {
                    (Some(ps), Some(pw)) if share < whole && ps <= 1.1 * pw => share,
                    _ => fits,
                };
                // Target: among measured sizes whose compute fits half the latency target, the
                // one with the lowest cost per row (smallest on ties); until something is
                // measured, whatever is queued (work-conserving).
                let target = self
                    .cost
                    .sizes()
                    .filter(|&b| b <= max && self.cost.predict(b).is_some_and(|c| c <= t / 2))
                    .min_by(|&a, &b| {
                        let (ca, cb) = (self.cost.per_row(a), self.cost.per_row(b));
                        ca.partial_cmp(&cb)
                            .unwrap_or(std::cmp::Ordering::Equal)
                            .then(a.cmp(&b))
                    })
                    .unwrap_or(max);
                // Waiting idles a worker for the fill time; it pays only if the fuller batch
                // saves clearly more compute than that (twice, against noisy estimates; and
                // per row at least 25 %), and the missing rows are expected within the
                // latency budget.
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
                (target.min(cap), cap, wait)
            }
        };
        let mut until = head.arrived + wait;
        // Never wait past a deadline of the batch-to-be (minus its expected compute).
        if let Some(d) = head.deadline {
            let c = self.cost.predict(rows_now.max(1)).unwrap_or_default();
            until = until.min(d.checked_sub(c).unwrap_or(now));
        }
        (target.max(1), cap.max(1), until)
    }

    fn schedule(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        // 1. Expire.
        self.queue.retain(|i| {
            let expired = i.deadline.is_some_and(|d| d <= now);
            if expired {
                actions.push(Action::Expire(i.id));
            }
            !expired
        });
        // 2–3. Fill free workers.
        let mut wake: Option<Instant> = None;
        while self.free_workers > 0 {
            let Some(h) = self.head(now) else { break };
            let head = self.queue[h].clone();
            let max = self.settings.max_batch_rows.max(1);
            let mut batch = self.collect(&head, now, max);
            let rows: u32 = batch.iter().map(|&i| self.queue[i].rows).sum();
            let run_now = if !self.settings.batchable || max <= 1 {
                true
            } else {
                let (target, cap, until) = self.plan(&head, rows, now);
                if rows > cap {
                    batch = self.collect(&head, now, cap);
                }
                if rows >= target || now >= until {
                    true
                } else {
                    wake = Some(until);
                    false
                }
            };
            if !run_now {
                break;
            }
            let ids: Vec<ReqId> = batch.iter().map(|&i| self.queue[i].id).collect();
            self.queue.retain(|it| !ids.contains(&it.id));
            self.free_workers -= 1;
            actions.push(Action::Run(ids));
        }
        // Deadlines of waiting requests also need a wake-up.
        let next_deadline = self.queue.iter().filter_map(|i| i.deadline).min();
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
            .position(|i| i.id == head.id)
            .expect("head is queued");
        let mut batch = vec![head_idx];
        let max = limit.max(1);
        if !self.settings.batchable || head.rows >= max {
            return batch;
        }
        let mut rest: Vec<usize> = (0..self.queue.len())
            .filter(|&i| i != head_idx && self.queue[i].key == head.key)
            .collect();
        rest.sort_by(|&a, &b| {
            let (x, y) = (&self.queue[a], &self.queue[b]);
            self.effective_priority(y, now)
                .cmp(&self.effective_priority(x, now))
                .then(x.arrived.cmp(&y.arrived))
                .then(x.id.cmp(&y.id))
        });
        let mut rows = head.rows;
        for i in rest {
            let r = self.queue[i].rows;
            if rows + r <= max {
                rows += r;
                batch.push(i);
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests;
