//! Which device a batch runs on, when a version has instances on several devices ("lanes"):
//! a pure function of what each lane is expected to take ([`choose`]), and the per-lane
//! bookkeeping it reads ([`Lane`]: its measured cost per batch size and the work already
//! handed to it).
//!
//! Rule: a batch goes to the lane expected to *finish* it first. A lane's expected finish is
//! the time until one of its workers is free — zero while it has fewer batches than workers,
//! else the expected work it holds, less what its running batches have done since they
//! started, shared over its workers — plus what a batch of this size
//! costs on it (its own measured [`CostModel`]; a lane that has run fewer than [`WARM_RUNS`]
//! batches is assumed to cost what the cheapest measured lane does, so that every lane gets
//! measured past its cold first runs — those take ten times the steady cost on a CPU — but it
//! is given a batch only while no warm lane is idle). Finishes
//! within [`TIE`] of each other are a tie, won by the lane that was handed fewer batches, so
//! equal devices share the work evenly. A device ten times slower thus gets a batch only when
//! the fast device's queue would make the batch finish later there; an idle fast device never
//! waits behind a slow one. Lanes that are draining (evicted) or failed are not candidates.
//!
//! A lane being tried — not warm yet, or probed — holds at most one batch per worker, and the
//! scheduler gives it one request of the batch formed, sending the rest to the lane expected
//! to finish them first: a device far slower than assumed costs one request its speed, not a
//! batch of them.
//!
//! Probes: a cost measured once (a first run after a cold start, a device busy with something
//! else for a moment) would keep a lane out for good if it were never measured again. So a
//! lane with a free worker that has had no batch for [`PROBE_AFTER`] times how much slower it
//! is expected to be than the best lane (200 ms for an equal device, 9 s for one 45 times
//! slower; at most [`PROBE_MAX`]) takes the next batch while the best lane has work queued,
//! whatever it is expected to cost, and that measurement replaces the old one. With nothing
//! queued there is no probe: another device could not help, and an idle fast device is never
//! made to wait. A slow device's probes thus cost about as much of the fast device's time
//! as one of its batches, once per [`PROBE_AFTER`]: far below one request in a hundred.
//!
//! Reserve ([`reserve`]): the policy hands out one batch per worker it counts, and a batch
//! routed to a lane whose workers are all busy queues there. A lane far slower than the
//! fastest would get no batch by the rule above even with its own slots' batches queued on
//! the fast lane — yet while its workers count, the policy forms those extra batches early,
//! cutting the load into smaller batches that wait on the fast lane (a CPU beside a device 20
//! times slower ran mean batches of 3.5 rows instead of 4, and served 12 % fewer requests).
//! Such a lane is held in reserve: its workers leave the policy's count, it still takes
//! probes (and is measured afresh by them), and it counts again when it measures fast enough,
//! or when no faster lane is usable.
//! Boundary: no IO, no clock of its own; the scheduler's driver keeps the lanes.

use std::time::{Duration, Instant};

use super::policy::CostModel;

/// Finishes within this factor of the earliest count as a tie.
pub const TIE: f64 = 1.05;

/// A lane with a free worker takes a batch it finishes within this factor of the earliest
/// finish on a lane that has work queued.
pub const IDLE_TIE: f64 = 1.25;

/// Batches a lane runs before its own measurements count (until then each measurement
/// replaces the last, and routing assumes it as fast as the cheapest lane).
pub const WARM_RUNS: u64 = 8;

/// A lane with a free worker and no batch for this long, times how much slower than the best
/// lane it is expected to be, takes the next one (a probe).
pub const PROBE_AFTER: Duration = Duration::from_millis(200);

/// The longest a lane goes without a probe.
pub const PROBE_MAX: Duration = Duration::from_secs(30);

/// A measured lane is held in reserve when a batch costs it more than this factor times
/// `2 + its workers / the fastest lane's workers` times what it costs the fastest lane. That
/// sum is the finish routing expects on the fastest lane when every slot is taken and this
/// lane's batches are the ones queued there (a running batch to finish, then the queue shared
/// over the workers, then the batch itself); the factor is [`IDLE_TIE`], the margin by which
/// a free lane still takes a batch. Past it, routing gives the lane no batch but probes, and
/// its slots only queue batches on the fastest lane.
pub const RESERVE_AT: f64 = IDLE_TIE;

/// A lane in reserve counts again once it measures within this factor (instead of
/// [`RESERVE_AT`]; the gap keeps a lane near the line from flapping).
pub const RESERVE_UNTIL: f64 = 1.0;

/// How batches are divided between lanes (model.toml `route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// [`choose`]: the lane expected to finish the batch first.
    #[default]
    ExpectedFinish,
    /// [`round_robin`]: each usable lane in turn, whatever it costs.
    RoundRobin,
}

/// What [`choose`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub lane: usize,
    /// The batch is a probe: its measurement replaces the lane's.
    pub probe: bool,
}

/// After a run on a lane fails, it takes no batch for this long; then it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the router knows of one lane (a device's instances of one version).
#[derive(Debug, Clone)]
pub struct Lane {
    /// The device's name.
    pub device: String,
    /// Its worker threads (instances).
    pub workers: usize,
    /// Batches handed to it and not finished.
    pub outstanding: usize,
    /// Expected compute of those batches, by this lane's cost table.
    pub backlog: Duration,
    /// When its workers last started a batch (their running batches have done the work
    /// since then).
    pub since: Option<Instant>,
    /// Batches handed to it since it started.
    pub handed: u64,
    /// When it was last handed a batch.
    pub last: Option<Instant>,
    /// Its measured compute per batch size.
    pub cost: CostModel,
    /// Batches it ran and measured.
    pub runs: u64,
    /// Evicted: it finishes what it holds and takes nothing new.
    pub draining: bool,
    /// Its runs failed: no batch before this time.
    pub failed_until: Option<Instant>,
}

impl Lane {
    pub fn new(device: String, workers: usize) -> Lane {
        Lane {
            device,
            workers,
            outstanding: 0,
            backlog: Duration::ZERO,
            since: None,
            handed: 0,
            last: None,
            cost: CostModel::default(),
            runs: 0,
            draining: false,
            failed_until: None,
        }
    }

    /// Whether it may take a batch at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        !self.draining && self.workers > 0 && self.failed_until.is_none_or(|t| t <= now)
    }

    /// Whether it has run enough batches for its own measurements to count.
    pub fn warm(&self) -> bool {
        self.runs >= WARM_RUNS
    }

    /// Its expected compute for a batch of `rows` (`None` while it is not warm).
    pub fn predict(&self, rows: u32) -> Option<Duration> {
        if !self.warm() {
            return None;
        }
        self.cost.predict(rows)
    }

    /// Learns what a batch of `rows` took; `fresh`: the measurement replaces the last (a
    /// probe after a long gap).
    pub fn learn(&mut self, rows: u32, took: Duration, fresh: bool) {
        if fresh || !self.warm() {
            self.cost.replace(rows, took);
        } else {
            self.cost.record(rows, took);
        }
        self.runs += 1;
    }

    /// Whether its next batch may be a probe: it has a free worker and has had no batch for
    /// `after`.
    pub fn probe_due(&self, now: Instant, after: Duration) -> bool {
        self.outstanding < self.workers
            && self
                .last
                .is_some_and(|t| now.saturating_duration_since(t) >= after)
    }

    /// Expected time until one of its workers is free.
    pub fn wait(&self, now: Instant) -> Duration {
        if self.outstanding < self.workers {
            return Duration::ZERO;
        }
        let running = self.outstanding.min(self.workers) as u32;
        let done = self
            .since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            * running;
        self.backlog.saturating_sub(done) / self.workers.max(1) as u32
    }

    /// Counts a batch of expected cost `cost` handed to it at `now`.
    pub fn hand(&mut self, cost: Duration, now: Instant) {
        if self.outstanding < self.workers {
            // A free worker starts it now.
            self.since = Some(now);
        }
        self.outstanding += 1;
        self.handed += 1;
        self.backlog += cost;
        self.last = Some(now);
    }

    /// Counts a batch of expected cost `cost` finished (or handed back) at `now`.
    pub fn finish(&mut self, cost: Duration, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.backlog = self.backlog.saturating_sub(cost);
        if self.outstanding == 0 {
            // Estimates made as the table changed do not add up exactly: none left over.
            self.backlog = Duration::ZERO;
        }
        if self.outstanding >= self.workers {
            // The worker takes the next batch it holds.
            self.since = Some(now);
        }
    }
}

/// The lane expected to finish a batch of `rows` first (see the module's rule), or `None`
/// when no lane is usable at `now`.
pub fn choose(lanes: &[Lane], rows: u32, now: Instant) -> Option<Choice> {
    // A lane not warm yet is assumed as fast as the cheapest warm one.
    let fallback = lanes
        .iter()
        .filter_map(|l| l.predict(rows))
        .min()
        .unwrap_or(Duration::ZERO);
    let cost = |l: &Lane| l.predict(rows).unwrap_or(fallback);
    // A lane not warm yet holds at most one batch per worker: its speed is a guess until it
    // has run, and a device forty times slower than the guess must not queue up work.
    let trusted = |l: &Lane| l.warm() || l.outstanding < l.workers;
    let candidates = |strict: bool| -> Vec<(usize, Duration)> {
        lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.usable(now) && (!strict || trusted(l)))
            .map(|(i, l)| (i, l.wait(now) + cost(l)))
            .collect()
    };
    let mut finishes = candidates(true);
    if finishes.is_empty() {
        finishes = candidates(false);
    }
    let earliest = finishes.iter().map(|&(_, f)| f).min()?;
    let tie = earliest.mul_f64(TIE);
    let best = finishes
        .iter()
        .filter(|&&(_, f)| f <= tie)
        .min_by_key(|&&(i, f)| (lanes[i].handed, f, i))
        .map(|&(i, _)| i)?;
    // A lane not warm yet is tried only while the warm ones have work queued: an idle warm
    // lane takes the batch rather than one whose speed is unknown.
    let warm = |i: usize| lanes[i].warm();
    let idle_warm = finishes
        .iter()
        .filter(|&&(i, _)| warm(i) && lanes[i].wait(now).is_zero())
        .min_by_key(|&&(i, f)| (f, i))
        .map(|&(i, _)| i);
    let finish = |i: usize| finishes.iter().find(|&&(j, _)| j == i).map(|&(_, f)| f);
    let best = match idle_warm {
        Some(i) if !warm(best) => i,
        // A measured lane with a free worker takes the batch when it finishes it within
        // IDLE_TIE of a lane that has work queued: the policy hands out one batch per worker
        // in all, so a batch queued behind another leaves the free worker idle until a slot
        // frees — two equal devices whose measurements differ by noise would share the work
        // unevenly.
        Some(i)
            if !lanes[best].wait(now).is_zero()
                && finish(i) <= finish(best).map(|f| f.mul_f64(IDLE_TIE)) =>
        {
            i
        }
        _ => best,
    };
    // Probes only while the best lane has work queued: with nothing waiting another device
    // cannot help, and a probe would only add its latency.
    if !lanes[best].wait(now).is_zero() {
        let base = cost(&lanes[best]).as_secs_f64().max(1e-6);
        let probe = lanes.iter().position(|l| {
            let slower = (cost(l).as_secs_f64() / base).max(1.0);
            let after = PROBE_AFTER.mul_f64(slower).min(PROBE_MAX);
            l.usable(now) && l.probe_due(now, after)
        });
        if let Some(lane) = probe {
            return Some(Choice { lane, probe: true });
        }
    }
    Some(Choice {
        lane: best,
        probe: false,
    })
}

/// Which lanes are held in reserve for batches of `rows` (see the module's rule), given each
/// lane and whether it is in reserve now. Only measured, usable lanes can be: one not warm
/// yet is being measured, a failed or draining one is out of the count already — and the
/// fastest usable lane never is, so some lane always counts while one is usable.
pub fn reserve(lanes: &[(&Lane, bool)], rows: u32, now: Instant) -> Vec<bool> {
    let cost = |l: &Lane| l.usable(now).then(|| l.predict(rows)).flatten();
    let fastest = lanes
        .iter()
        .filter_map(|&(l, _)| cost(l).map(|c| (c, l.workers)))
        .min_by_key(|&(c, _)| c);
    lanes
        .iter()
        .map(|&(l, now_in)| match (cost(l), fastest) {
            (Some(c), Some((best, best_workers))) => {
                let queued = 2.0 + l.workers as f64 / best_workers.max(1) as f64;
                let at = if now_in { RESERVE_UNTIL } else { RESERVE_AT };
                c.as_secs_f64() > at * queued * best.as_secs_f64()
            }
            _ => false,
        })
        .collect()
}

/// The next usable lane in turn (by the batches handed out so far), or `None` when no lane
/// is usable at `now`. Blind to cost: a device ten times slower gets as many batches as a
/// fast one. Kept to measure [`choose`] against (what other servers do).
pub fn round_robin(lanes: &[Lane], now: Instant) -> Option<Choice> {
    let usable: Vec<usize> = (0..lanes.len()).filter(|&i| lanes[i].usable(now)).collect();
    if usable.is_empty() {
        return None;
    }
    let turn: u64 = lanes.iter().map(|l| l.handed).sum();
    Some(Choice {
        lane: usable[(turn % usable.len() as u64) as usize],
        probe: false,
    })
}

/// The lane for a batch of `rows` by `routing`.
pub fn pick(routing: Routing, lanes: &[Lane], rows: u32, now: Instant) -> Option<Choice> {
    match routing {
        Routing::ExpectedFinish => choose(lanes, rows, now),
        Routing::RoundRobin => round_robin(lanes, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane chosen, or `None`.
    fn pick(lanes: &[Lane], rows: u32, now: Instant) -> Option<usize> {
        choose(lanes, rows, now).map(|c| c.lane)
    }

    fn lane(name: &str, workers: usize, cost_ms: f64) -> Lane {
        let mut l = Lane::new(name.into(), workers);
        for _ in 0..WARM_RUNS {
            for rows in [1, 8] {
                l.learn(
                    rows,
                    Duration::from_secs_f64(cost_ms * f64::from(rows) / 1e3),
                    false,
                );
            }
        }
        l
    }

    /// A closed loop on simulated time: `clients` each send a batch of one row, wait for it
    /// and send again. Returns batches per lane and the slowest answer.
    fn simulate(lanes: Vec<Lane>, clients: usize, batches: usize) -> (Vec<u64>, Duration) {
        simulate_by(Routing::ExpectedFinish, lanes, clients, batches)
    }

    /// [`simulate`] with `routing`; also returns the simulated time the batches took.
    fn simulate_by(
        routing: Routing,
        lanes: Vec<Lane>,
        clients: usize,
        batches: usize,
    ) -> (Vec<u64>, Duration) {
        let (handed, worst, _) = simulate_timed(routing, lanes, clients, batches);
        (handed, worst)
    }

    fn simulate_timed(
        routing: Routing,
        mut lanes: Vec<Lane>,
        clients: usize,
        batches: usize,
    ) -> (Vec<u64>, Duration, Duration) {
        let t0 = Instant::now();
        // Per lane: when each worker is next free.
        let mut free: Vec<Vec<Duration>> = lanes
            .iter()
            .map(|l| vec![Duration::ZERO; l.workers])
            .collect();
        // Per lane: the finish times of what it holds.
        let mut held: Vec<Vec<Duration>> = lanes.iter().map(|_| Vec::new()).collect();
        let mut ready = vec![Duration::ZERO; clients];
        let mut worst = Duration::ZERO;
        for _ in 0..batches {
            // The client ready first sends next.
            let (c, &now) = ready
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| **t)
                .expect("clients");
            for ((l, h), f) in lanes.iter_mut().zip(held.iter_mut()).zip(&free) {
                h.retain(|&f| f > now);
                l.outstanding = h.len();
                // The work it still holds: each worker's time until free.
                l.backlog = f.iter().map(|&f| f.saturating_sub(now)).sum();
            }
            let i = super::pick(routing, &lanes, 1, t0 + now)
                .expect("a lane")
                .lane;
            let cost = lanes[i].predict(1).expect("measured");
            let w = (0..free[i].len())
                .min_by_key(|&w| free[i][w])
                .expect("a worker");
            let start = free[i][w].max(now);
            let done = start + cost;
            free[i][w] = done;
            held[i].push(done);
            lanes[i].handed += 1;
            worst = worst.max(done - now);
            ready[c] = done;
        }
        let end = free.iter().flatten().copied().max().unwrap_or_default();
        (lanes.iter().map(|l| l.handed).collect(), worst, end)
    }

    #[test]
    fn a_free_device_a_little_slower_takes_the_batch_rather_than_queue_it_on_a_busy_one() {
        let now = Instant::now();
        let at = now + Duration::from_micros(700);
        let mut lanes = vec![lane("busy", 1, 1.0), lane("free", 1, 1.5)];
        lanes[0].hand(Duration::from_millis(1), now);
        // Queued behind the busy lane's batch (0.3 ms left) it would finish at 1.3 ms, on the
        // free lane at 1.5 ms: within IDLE_TIE, the free lane takes it ...
        assert_eq!(pick(&lanes, 1, at), Some(1));
        // ... and a free lane slower than that waits its turn.
        let mut lanes = vec![lane("busy", 1, 1.0), lane("slow", 1, 1.7)];
        lanes[0].hand(Duration::from_millis(1), now);
        assert_eq!(pick(&lanes, 1, at), Some(0));
    }

    #[test]
    fn a_lane_not_warm_holds_one_batch_per_worker() {
        let now = Instant::now();
        let mut lanes = vec![lane("fast", 1, 1.0), Lane::new("new".into(), 1)];
        // The fast lane has work queued: the new lane, assumed as fast, takes a batch ...
        lanes[0].hand(Duration::from_millis(3), now);
        lanes[0].hand(Duration::from_millis(1), now);
        assert_eq!(pick(&lanes, 1, now), Some(1));
        lanes[1].hand(Duration::from_millis(1), now);
        // ... and no second while it has not answered the first, however long ago it was
        // handed (its guessed cost is long spent).
        let later = now + Duration::from_millis(50);
        assert_eq!(pick(&lanes, 1, later), Some(0));
        // Once warm, its measured cost decides alone.
        for _ in 0..WARM_RUNS {
            lanes[1].learn(1, Duration::from_millis(1), false);
        }
        assert_eq!(pick(&lanes, 1, later), Some(1));
    }

    #[test]
    fn round_robin_takes_turns_over_usable_lanes() {
        let now = Instant::now();
        let mut lanes = vec![lane("a", 1, 1.0), lane("b", 1, 10.0), lane("c", 1, 1.0)];
        lanes[2].draining = true;
        let mut order = Vec::new();
        for _ in 0..4 {
            let i = round_robin(&lanes, now).expect("a lane").lane;
            lanes[i].handed += 1;
            order.push(i);
        }
        assert_eq!(
            order,
            [0, 1, 0, 1],
            "the slow lane in turn, the draining one never"
        );
        lanes[0].draining = true;
        lanes[1].draining = true;
        assert_eq!(round_robin(&lanes, now), None);
    }

    #[test]
    fn on_unequal_devices_expected_finish_beats_round_robin_on_throughput_and_latency() {
        let devices = || vec![lane("fast", 1, 1.0), lane("slow", 1, 10.0)];
        let (rr_handed, rr_worst, rr_time) =
            simulate_timed(Routing::RoundRobin, devices(), 8, 2000);
        let (ef_handed, ef_worst, ef_time) =
            simulate_timed(Routing::ExpectedFinish, devices(), 8, 2000);
        assert!(
            rr_handed[1] >= 900,
            "round robin: half to the slow device {rr_handed:?}"
        );
        assert!(
            ef_handed[1] < rr_handed[1] / 2,
            "{ef_handed:?} against {rr_handed:?}"
        );
        assert!(
            ef_time < rr_time.mul_f64(0.7),
            "{ef_time:?} against {rr_time:?}"
        );
        assert!(ef_worst <= rr_worst, "{ef_worst:?} against {rr_worst:?}");
    }

    #[test]
    fn equal_devices_share_the_work_about_evenly() {
        let (handed, _) = simulate(vec![lane("a", 1, 1.0), lane("b", 1, 1.0)], 8, 1000);
        let (a, b) = (handed[0] as f64, handed[1] as f64);
        assert!((a - b).abs() / (a + b) < 0.05, "{handed:?}");
    }

    #[test]
    fn equal_idle_devices_alternate() {
        let now = Instant::now();
        let mut lanes = vec![lane("a", 1, 1.0), lane("b", 1, 1.0)];
        let first = choose(&lanes, 1, now).expect("a lane").lane;
        lanes[first].handed += 1;
        let second = choose(&lanes, 1, now).expect("a lane").lane;
        assert_ne!(first, second);
    }

    #[test]
    fn an_idle_fast_device_never_waits_behind_a_slow_one() {
        let now = Instant::now();
        let mut lanes = vec![lane("slow", 1, 10.0), lane("fast", 1, 1.0)];
        // The slow one was handed far fewer batches: the count does not matter.
        lanes[1].handed = 1000;
        assert_eq!(pick(&lanes, 1, now), Some(1));
        assert_eq!(pick(&lanes, 8, now), Some(1));
        // Busy but about to be free, the fast one still finishes first.
        lanes[1].outstanding = 1;
        lanes[1].backlog = Duration::from_millis(5);
        assert_eq!(pick(&lanes, 1, now), Some(1));
    }

    #[test]
    fn a_ten_times_slower_device_gets_work_only_when_the_fast_queue_is_longer() {
        let now = Instant::now();
        let mut lanes = vec![lane("fast", 1, 1.0), lane("slow", 1, 10.0)];
        for queued in 0..20u32 {
            lanes[0].outstanding = queued as usize;
            lanes[0].backlog = Duration::from_millis(u64::from(queued));
            // The free slow lane finishes at 10 ms, the fast one after its queue at
            // `queued + 1`: the slow one takes the batch once that is within IDLE_TIE.
            let expected = if 10.0 <= f64::from(queued + 1) * IDLE_TIE {
                1
            } else {
                0
            };
            assert_eq!(pick(&lanes, 1, now), Some(expected), "{queued} queued");
        }
    }

    #[test]
    fn under_load_a_slow_device_takes_a_small_share_without_raising_the_worst_latency() {
        // 4 clients: the fast device alone answers each within 4 ms; the slow one (10 ms a
        // batch) helps only where that is not later.
        let (alone, worst_alone) = simulate(vec![lane("fast", 1, 1.0)], 4, 2000);
        let (both, worst_both) =
            simulate(vec![lane("fast", 1, 1.0), lane("slow", 1, 10.0)], 4, 2000);
        assert_eq!(alone, vec![2000]);
        assert_eq!(
            both,
            vec![2000, 0],
            "the fast one alone finishes every batch first"
        );
        assert!(
            worst_both <= worst_alone,
            "{worst_both:?} > {worst_alone:?}"
        );
        // 12 clients: the fast queue is long enough for the slow device to help.
        let (both, worst_both) =
            simulate(vec![lane("fast", 1, 1.0), lane("slow", 1, 10.0)], 12, 2000);
        let (_, worst_alone) = simulate(vec![lane("fast", 1, 1.0)], 12, 2000);
        let slow_share = both[1] as f64 / 2000.0;
        assert!(slow_share > 0.0 && slow_share < 0.15, "{both:?}");
        assert!(
            worst_both <= worst_alone,
            "{worst_both:?} > {worst_alone:?}"
        );
    }

    #[test]
    fn an_unmeasured_lane_is_assumed_as_fast_as_the_cheapest_once_work_queues() {
        let now = Instant::now();
        let mut lanes = vec![lane("a", 1, 1.0), Lane::new("b".into(), 1)];
        lanes[0].handed = 5;
        // The warm lane idle: it takes the batch.
        assert_eq!(pick(&lanes, 1, now), Some(0));
        // The warm lane busy: the new one is tried (assumed as fast).
        lanes[0].outstanding = 1;
        lanes[0].backlog = Duration::from_micros(500);
        assert_eq!(pick(&lanes, 1, now), Some(1));
    }

    #[test]
    fn a_lane_is_assumed_fast_until_warm_and_its_cold_runs_do_not_stick() {
        let now = Instant::now();
        let mut lanes = vec![lane("a", 1, 1.0), Lane::new("b".into(), 1)];
        lanes[0].handed = 100;
        // Its first run was cold (twenty times the steady cost): still assumed as fast.
        lanes[1].learn(1, Duration::from_millis(20), false);
        lanes[1].handed = 1;
        lanes[0].outstanding = 1;
        lanes[0].backlog = Duration::from_micros(500);
        assert_eq!(pick(&lanes, 1, now), Some(1));
        for _ in 1..WARM_RUNS {
            lanes[1].learn(1, Duration::from_millis(1), false);
        }
        assert_eq!(lanes[1].predict(1), Some(Duration::from_millis(1)));
    }

    #[test]
    fn a_lane_passed_over_is_probed_while_work_queues_later_the_slower_it_is() {
        let now = Instant::now();
        let mut lanes = vec![lane("fast", 1, 1.0), lane("slow", 1, 10.0)];
        lanes[1].last = Some(now);
        // The fast lane has work queued.
        lanes[0].outstanding = 1;
        lanes[0].backlog = Duration::from_millis(1);
        assert_eq!(pick(&lanes, 1, now), Some(0));
        // Ten times slower: probed after ten times PROBE_AFTER, not before.
        assert_eq!(pick(&lanes, 1, now + PROBE_AFTER), Some(0));
        let later = now + PROBE_AFTER * 10;
        assert_eq!(
            choose(&lanes, 1, later),
            Some(Choice {
                lane: 1,
                probe: true
            })
        );
        // The fast lane idle: no probe, the batch is not made to wait.
        lanes[0].outstanding = 0;
        assert_eq!(pick(&lanes, 1, later), Some(0));
        lanes[0].outstanding = 1;
        // A busy lane is not probed.
        lanes[1].outstanding = 1;
        assert_eq!(pick(&lanes, 1, later), Some(0));
        lanes[1].outstanding = 0;
        // Probed just now: not again.
        lanes[1].hand(Duration::from_millis(10), later);
        lanes[1].finish(Duration::from_millis(10), later);
        assert_eq!(pick(&lanes, 1, later), Some(0));
    }

    #[test]
    fn draining_and_failed_lanes_take_nothing_until_their_retry() {
        let now = Instant::now();
        let mut lanes = vec![lane("a", 1, 1.0), lane("b", 1, 1.0)];
        lanes[0].draining = true;
        lanes[1].failed_until = Some(now + RETRY_AFTER);
        assert_eq!(pick(&lanes, 1, now), None);
        assert_eq!(pick(&lanes, 1, now + RETRY_AFTER), Some(1));
    }

    /// Whether each lane is held in reserve, from none in reserve, for batches of one row.
    fn held(lanes: &[Lane], now: Instant) -> Vec<bool> {
        let views: Vec<(&Lane, bool)> = lanes.iter().map(|l| (l, false)).collect();
        reserve(&views, 1, now)
    }

    #[test]
    fn a_lane_is_held_in_reserve_only_where_routing_would_give_it_nothing_but_queueing() {
        // A closed loop with one client per worker counted (the policy's slots: one batch
        // each): a lane held in reserve would get no batch with its slots counted; the
        // fastest lane never is held, and at forty times slower every shape is.
        let now = Instant::now();
        for fast in [1, 2, 4] {
            for slow in [1, 2, 4] {
                for ratio in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 40.0] {
                    let lanes = vec![lane("fast", fast, 1.0), lane("slow", slow, ratio)];
                    let h = held(&lanes, now);
                    let (handed, _) = simulate(lanes, fast + slow, 2000);
                    let share = handed[1] as f64 / 2000.0;
                    let case = format!("{fast} + {slow} workers, {ratio} times slower: {share}");
                    assert!(!h[0], "{case}");
                    assert!(!h[1] || share < 0.01, "{case}");
                    assert!(h[1] || ratio < 40.0, "{case}");
                }
            }
        }
    }

    #[test]
    fn reserve_has_a_gap_and_spares_lanes_being_measured_and_the_last_usable_one() {
        let now = Instant::now();
        // One worker beside two: held past 1.25 * 2.5 = 3.125 times slower, back within 2.5.
        let lanes = [lane("fast", 2, 1.0), lane("slow", 1, 3.0)];
        assert_eq!(held(&lanes, now), [false, false]);
        let views: Vec<(&Lane, bool)> = lanes.iter().map(|l| (l, true)).collect();
        assert_eq!(
            reserve(&views, 1, now),
            [false, true],
            "in reserve, it stays"
        );
        let lanes = [lane("fast", 2, 1.0), lane("slow", 1, 2.4)];
        let views: Vec<(&Lane, bool)> = lanes.iter().map(|l| (l, true)).collect();
        assert_eq!(
            reserve(&views, 1, now),
            [false, false],
            "within 2.5, it is back"
        );
        // Not warm yet: it is being measured.
        let mut lanes = vec![lane("fast", 2, 1.0), Lane::new("new".into(), 1)];
        lanes[1].learn(1, Duration::from_millis(50), false);
        assert_eq!(held(&lanes, now), [false, false]);
        // The fast lane failed or draining: the slow one is all there is.
        let mut lanes = vec![lane("fast", 2, 1.0), lane("slow", 1, 40.0)];
        assert_eq!(held(&lanes, now), [false, true]);
        lanes[0].failed_until = Some(now + RETRY_AFTER);
        assert_eq!(held(&lanes, now), [false, false]);
        lanes[0].failed_until = None;
        lanes[0].draining = true;
        assert_eq!(held(&lanes, now), [false, false]);
        // Equal lanes: none.
        assert_eq!(
            held(&[lane("a", 1, 1.0), lane("b", 1, 1.0)], now),
            [false, false]
        );
    }
}
