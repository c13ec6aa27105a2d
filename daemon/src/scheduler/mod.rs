//! Scheduling requests of one model version onto its workers: the pure batching policy
//! ([`policy`]) and the driver ([`Scheduler`]) that carries out its actions.
//!
//! The driver has no thread of its own: whoever produces an event drives it inline, under one
//! mutex — the connection that submits a request, the worker that finishes a batch (and so
//! may pick up the next one at once), or the shared timer thread for delayed batches and
//! deadlines. A request that finds an idle worker and no reason to wait goes to it directly,
//! so batching costs nothing at low load.
//!
//! A version may have workers on several devices, one *lane* each (model.toml `spread`): the
//! policy counts the workers of every lane together, and each batch it forms goes to the lane
//! expected to finish it first ([`route`]). The policy's cost table learns from the lane that
//! is cheapest for the batch's size; each lane keeps its own for routing. A lane can leave (its
//! device's share evicted: it finishes what it holds, takes nothing new) and, when a device
//! fails its runs (a test hook), the batches it hands back are routed once more to another
//! lane while it rests for [`route::RETRY_AFTER`], after which it is tried again.
//! Invariants: every submitted job is completed exactly once (run, `busy`, or
//! `deadline_exceeded`); completions run outside the lock; the policy forms a batch only when
//! it counted a worker free, over all lanes.

pub mod policy;
pub mod route;
pub mod timer;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::runtime::{
    Axes, Axis, Batch, BatchListener, Finished, InputData, Job, RuntimeError, WorkerPool,
};
use policy::{Action, Batcher, Item, ReqId, Settings};
use route::Lane;

/// The terms a request is queued under: how urgent it is and who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Terms {
    /// `None`: the model's default priority.
    pub priority: Option<u8>,
    /// Answer `deadline_exceeded` instead of running after it.
    pub deadline: Option<Instant>,
    /// Who asked (the peer's uid): sources share a priority level fairly.
    pub source: u64,
    /// A non-admin asked: its runs are stopped past the model's run limit.
    pub bounded: bool,
}

/// Counters of one model version.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    /// Zero rows added to reach a configured batch size.
    pub padded_rows: AtomicU64,
}

/// The largest shared input (see `runtime::Axis::Shared`) whose requests batch together.
pub const SHARED_MAX_BYTES: usize = 4096;

struct State {
    batcher: Batcher,
    /// Waiting jobs: the job, its rows, when it arrived.
    pending: HashMap<ReqId, (Job, u32, Instant)>,
    next_id: ReqId,
    running: usize,
    /// Per lane (index = lane id, never reused): what routing knows of it.
    lanes: Vec<LaneState>,
    /// Rows of the batch last finished on the cheapest lane for its size: the size lanes
    /// are compared at to hold one in reserve.
    recent_rows: u32,
}

/// A lane as the driver keeps it: the router's view and the counts reports show.
struct LaneState {
    lane: Lane,
    /// Rows run on it.
    rows: u64,
    /// Its workers are out of the policy's count (failed, resting until its retry).
    resting: bool,
    /// Its workers are out of the policy's count: it is far slower than the fastest lane
    /// (`route::reserve`).
    reserve: bool,
    /// Its last run failed and none has succeeded since (health names the device).
    failing: Option<String>,
    /// The batch it was last handed is a probe: its cost replaces the table's.
    probe: bool,
}

/// One lane in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneReport {
    pub device: String,
    pub instances: usize,
    pub batches: u64,
    pub rows: u64,
    /// `serving`, `draining` or `failed`.
    pub state: &'static str,
    /// Why its last run failed, while it has not run one since.
    pub error: Option<String>,
}

/// Holds the submissions a thread makes until it drops the plug, then schedules each
/// scheduler they went to once: a thread that takes several requests in one go (the ring
/// poller's round) hands the policy all of them together, so that they can share a batch and
/// a worker's wake-up, instead of the first going alone to an idle worker, which sleeps again
/// before the next arrives. A request waits at most for the rest of its submitter's go.
/// Plugs nest: the outermost one flushes.
///
/// A plug started with `run_light` also lets its thread run, when it flushes, one light batch
/// per scheduler itself (`WorkerPool::run_here`: a CPU batch expected to take at most
/// `INLINE_MAX`) instead of waking a worker for it — the ring poller's, whose rounds are
/// what a light model's requests wait on anyway.
pub struct Plug {
    outermost: bool,
    run_light: bool,
    /// Not `Send`: the held schedulers are the thread's own.
    _thread: std::marker::PhantomData<*const ()>,
}

thread_local! {
    /// `Some` while this thread holds a plug: the schedulers submitted to under it.
    static PLUGGED: std::cell::RefCell<Option<Vec<Arc<Scheduler>>>> =
        const { std::cell::RefCell::new(None) };
    /// While a plug flushes one scheduler: its next light batch may run on this thread.
    static RUN_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Plug {
    pub fn start(run_light: bool) -> Plug {
        let outermost = PLUGGED.with_borrow_mut(|p| {
            let first = p.is_none();
            if first {
                *p = Some(Vec::new());
            }
            first
        });
        Plug {
            outermost,
            run_light,
            _thread: std::marker::PhantomData,
        }
    }

    /// Whether a submission to `sched` on this thread is held, noting the scheduler to flush.
    fn hold(sched: &Scheduler) -> bool {
        PLUGGED.with_borrow_mut(|p| {
            let Some(held) = p else {
                return false;
            };
            if !held.iter().any(|s| std::ptr::eq(Arc::as_ptr(s), sched)) {
                // A scheduler being dropped cannot be held; it schedules at once.
                let Some(me) = sched.me.upgrade() else {
                    return false;
                };
                held.push(me);
            }
            true
        })
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        // Taken out first: flushing completes jobs, whose completions may submit again.
        let held = PLUGGED.with_borrow_mut(Option::take).unwrap_or_default();
        for s in held {
            RUN_HERE.set(self.run_light);
            s.flush();
            RUN_HERE.set(false);
        }
    }
}

/// The scheduler of one model version: policy state, waiting jobs, and the worker pool.
pub struct Scheduler {
    me: Weak<Scheduler>,
    /// Batch sizes the workers pad batches up to (for the `padded_rows` count).
    pad_to: Vec<u32>,
    state: Mutex<State>,
    idle: Condvar,
    /// Threads waiting on `idle` ([`Scheduler::drain`]): a `Condvar` notification is a system
    /// call even when nobody waits, so it is made only when somebody does (it was two per
    /// request: after the submission and after the batch).
    draining: std::sync::atomic::AtomicUsize,
    /// Per lane: its workers (taken out when it leaves; dropped by the caller).
    pools: RwLock<Vec<Option<Arc<WorkerPool>>>>,
    batchable: bool,
    /// Where each input's rows are.
    axes: Arc<Axes>,
    /// Hashes shape keys with this process's own random keys, so that no client can make two
    /// different requests share a key on purpose.
    keys: std::hash::RandomState,
    default_priority: std::sync::atomic::AtomicU8,
    /// The lowest time per input element a batch has taken (f64 bits; 0: none yet), read
    /// without the lock by [`Scheduler::expected_compute`].
    least_per_element: AtomicU64,
    pub stats: Stats,
    metrics: Arc<crate::metrics::ModelMetrics>,
}

impl Scheduler {
    /// Starts the workers (one per session) and returns the scheduler feeding them, or why a
    /// worker could not start.
    pub fn start(
        crew: crate::runtime::Crew,
        mut settings: Settings,
        batchable: bool,
        default_priority: u8,
        metrics: Arc<crate::metrics::ModelMetrics>,
    ) -> Result<Arc<Scheduler>, crate::runtime::RuntimeError> {
        settings.batchable = batchable && settings.max_batch_rows > 1;
        let device = crew.device.clone();
        let workers = crew.sessions.len();
        let axes = crew.axes.clone();
        let sched = Arc::new_cyclic(|me| Scheduler {
            me: me.clone(),
            state: Mutex::new(State {
                batcher: Batcher::new(settings, workers),
                pending: HashMap::new(),
                next_id: 1,
                running: 0,
                lanes: vec![LaneState::new(device, workers)],
                recent_rows: 1,
            }),
            idle: Condvar::new(),
            draining: std::sync::atomic::AtomicUsize::new(0),
            pools: RwLock::new(Vec::new()),
            batchable,
            axes,
            keys: std::hash::RandomState::new(),
            pad_to: crew.pad_to.clone(),
            default_priority: std::sync::atomic::AtomicU8::new(default_priority),
            least_per_element: AtomicU64::new(0),
            stats: Stats::default(),
            metrics,
        });
        let listener: Weak<dyn BatchListener> = sched.me.clone();
        let mut crew = crew;
        crew.lane = 0;
        let pool = WorkerPool::start(crew, listener)?;
        sched.write_pools().push(Some(Arc::new(pool)));
        Ok(sched)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_pools(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Arc<WorkerPool>>>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pools(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Option<Arc<WorkerPool>>>> {
        self.pools.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Workers of the first lane (the device the version was loaded on): the `instances`
    /// setting in force.
    pub fn instances(&self) -> usize {
        self.read_pools()
            .first()
            .and_then(Option::as_ref)
            .map_or(0, |p| p.instances())
    }

    /// Workers on every lane still serving.
    pub fn all_instances(&self) -> usize {
        self.read_pools()
            .iter()
            .flatten()
            .map(|p| p.instances())
            .sum()
    }

    /// Adds a lane: `crew`'s workers on another device, which take batches from now on.
    /// Fails when a worker thread cannot start, or when the device already has a lane here.
    pub fn add_lane(&self, mut crew: crate::runtime::Crew) -> Result<(), RuntimeError> {
        let mut pools = self.write_pools();
        let mut st = self.lock();
        if st
            .lanes
            .iter()
            .zip(pools.iter())
            .any(|(l, p)| p.is_some() && l.lane.device == crew.device)
        {
            return Err(RuntimeError::Threads(format!(
                "the version already has instances on '{}'",
                crew.device
            )));
        }
        let id = st.lanes.len();
        crew.lane = id;
        let workers = crew.sessions.len();
        let device = crew.device.clone();
        let listener: Weak<dyn BatchListener> = self.me.clone();
        let pool = WorkerPool::start(crew, listener)?;
        pools.push(Some(Arc::new(pool)));
        st.lanes.push(LaneState::new(device, workers));
        drop(pools);
        let now = Instant::now();
        let actions = st.batcher.add_workers(workers, now);
        self.act(st, actions, now);
        Ok(())
    }

    /// Takes the lane on `device` out: it takes no new batch and its workers (returned, for
    /// the caller to drop outside its locks: dropping joins them) finish what they hold.
    /// `None` when the device has no lane here, or it is the last one serving.
    pub fn remove_lane(&self, device: &str) -> Option<Arc<WorkerPool>> {
        let mut pools = self.write_pools();
        let mut st = self.lock();
        let serving = pools.iter().filter(|p| p.is_some()).count();
        let i = st
            .lanes
            .iter()
            .zip(pools.iter())
            .position(|(l, p)| p.is_some() && l.lane.device == device)?;
        if serving < 2 {
            return None;
        }
        let pool = pools[i].take();
        let l = &mut st.lanes[i];
        l.lane.draining = true;
        let workers = if l.resting || l.reserve {
            0
        } else {
            l.lane.workers
        };
        st.batcher.retire_workers(workers);
        drop(st);
        drop(pools);
        // The lane leaving may have been the only one counted: one held in reserve comes back.
        self.act(self.lock(), Vec::new(), Instant::now());
        pool
    }

    /// The devices of the lanes serving, first lane first.
    pub fn devices(&self) -> Vec<String> {
        let pools = self.read_pools();
        let st = self.lock();
        st.lanes
            .iter()
            .zip(pools.iter())
            .filter(|(_, p)| p.is_some())
            .map(|(l, _)| l.lane.device.clone())
            .collect()
    }

    /// Every lane that still serves or holds batches.
    pub fn lanes(&self) -> Vec<LaneReport> {
        let pools = self.read_pools();
        let st = self.lock();
        st.lanes
            .iter()
            .zip(pools.iter())
            .filter(|(l, p)| p.is_some() || l.lane.outstanding > 0)
            .map(|(l, p)| LaneReport {
                device: l.lane.device.clone(),
                instances: p.as_ref().map_or(0, |p| p.instances()),
                batches: l.lane.handed,
                rows: l.rows,
                state: if p.is_none() {
                    "draining"
                } else if l.failing.is_some() {
                    "failed"
                } else {
                    "serving"
                },
                error: l.failing.clone(),
            })
            .collect()
    }

    /// Devices whose last run here failed (and none has succeeded since), with why.
    pub fn failing_devices(&self) -> Vec<(String, String)> {
        self.lock()
            .lanes
            .iter()
            .filter_map(|l| Some((l.lane.device.clone(), l.failing.clone()?)))
            .collect()
    }

    /// Requests waiting for a worker, and how many may wait.
    pub fn queue(&self) -> (usize, usize) {
        let st = self.lock();
        (st.pending.len(), st.batcher.settings().queue_capacity)
    }

    /// The policy settings in force.
    pub fn settings(&self) -> Settings {
        self.lock().batcher.settings().clone()
    }

    /// The batch sizes batches are padded up to (empty: none).
    pub fn batch_sizes(&self) -> &[u32] {
        &self.pad_to
    }

    /// Changes the batching settings and default priority at run time.
    pub fn update(&self, mut settings: Settings, default_priority: u8) {
        settings.batchable = self.batchable && settings.max_batch_rows > 1;
        self.default_priority
            .store(default_priority, Ordering::Relaxed);
        let mut st = self.lock();
        st.batcher.set_settings(settings);
        // Let the policy look at the queue under the new settings now.
        let now = Instant::now();
        let actions = st.batcher.tick(now);
        self.act(st, actions, now);
    }

    pub fn default_priority(&self) -> u8 {
        self.default_priority.load(Ordering::Relaxed)
    }

    /// Requests are queued or running.
    pub fn busy(&self) -> bool {
        let st = self.lock();
        !st.pending.is_empty() || st.running > 0
    }

    /// Workers stuck on one batch for longer than `limit` (liveness check).
    pub fn stuck_workers(&self, limit: Duration) -> usize {
        self.read_pools()
            .iter()
            .flatten()
            .map(|p| p.stuck(limit))
            .sum()
    }

    /// The least a request of `elements` input elements is expected to take a worker, at the
    /// lowest time per element any batch has taken (`None` before the first): low rather than
    /// high, so that no request's cost, high by its values, makes others' look higher.
    pub fn expected_compute(&self, elements: u64) -> Option<Duration> {
        let least = f64::from_bits(self.least_per_element.load(Ordering::Relaxed));
        (least > 0.0)
            .then(|| Duration::try_from_secs_f64(least * elements as f64).unwrap_or(Duration::MAX))
    }

    /// Queues a job under `terms`.
    pub fn submit(&self, mut job: Job, terms: Terms) {
        self.own_shared_inputs(&mut job);
        let held = Plug::hold(self);
        let now = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let (rows, key) = self.rows_and_key(&job, id);
        let item = Item {
            id,
            rows,
            key,
            priority: terms
                .priority
                .unwrap_or(self.default_priority.load(Ordering::Relaxed)),
            arrived: now,
            deadline: terms.deadline,
            source: terms.source,
            elements: crate::runtime::input_elements(&job.inputs),
        };
        st.pending.insert(id, (job, rows, now));
        let actions = if held {
            st.batcher.hold(item, now)
        } else {
            st.batcher.arrive(item, now)
        };
        // Held, and not refused: the plug's flush acts for the whole round.
        if held && actions.is_empty() {
            return;
        }
        self.act(st, actions, now);
    }

    /// Schedules what a [`Plug`] held.
    fn flush(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let actions = st.batcher.flush(now);
        self.act(st, actions, now);
    }

    /// Copies small shared inputs (one value for the whole batch, such as a sample rate) that
    /// lie in the client's arena into the request: the copy is what is compared and what runs,
    /// so such requests batch as those carrying the value inline do (arena bytes may change
    /// after a comparison, so they never batch from there).
    fn own_shared_inputs(&self, job: &mut Job) {
        if !self.batchable {
            return;
        }
        for (k, t) in job.inputs.iter_mut().enumerate() {
            let InputData::Shared { map, offset, len } = &t.data else {
                continue;
            };
            if !matches!(self.axes.input(k), Axis::Shared) || *len > SHARED_MAX_BYTES as u64 {
                continue;
            }
            if let Ok(own) = map.read_out(*offset, *len) {
                t.data = InputData::Inline(own);
            }
        }
    }

    /// Rows (equal across inputs, along each input's rows dimension) and the shape key of a
    /// job: jobs with the same key have the same shapes but for their rows and the same value
    /// of every shared input. Jobs that cannot batch get a key of their own.
    fn rows_and_key(&self, job: &Job, id: ReqId) -> (u32, u64) {
        use std::hash::BuildHasher;
        let alone = (1, u64::MAX - id);
        if !self.batchable {
            return alone;
        }
        let mut rows = None;
        let mut h = self.keys.build_hasher();
        for (k, t) in job.inputs.iter().enumerate() {
            t.name.hash(&mut h);
            t.dtype.hash(&mut h);
            match self.axes.input(k) {
                Axis::Rows(a) => {
                    let Some(&r) = t.shape.get(a) else {
                        return alone;
                    };
                    if *rows.get_or_insert(r) != r {
                        return alone;
                    }
                    t.shape[..a].hash(&mut h);
                    t.shape[a + 1..].hash(&mut h);
                }
                // A shared value batches only from the request's own bytes (arena bytes may
                // change after they were compared), and only a small one.
                Axis::Shared => match &t.data {
                    InputData::Inline(b) if b.len() <= SHARED_MAX_BYTES => {
                        t.shape.hash(&mut h);
                        b.hash(&mut h);
                    }
                    _ => return alone,
                },
            }
        }
        match rows {
            Some(r) if r > 0 && r <= u64::from(u32::MAX) => (r as u32, h.finish() >> 1),
            _ => alone,
        }
    }

    /// Carries out actions: batches go to workers, refusals and expiries are answered — all
    /// after the lock is released.
    /// `now`: the caller's reading of the clock, taken under or just before the lock.
    fn act(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        mut actions: Vec<Action>,
        now: Instant,
    ) {
        let mut batches = Vec::new();
        let mut failed: Vec<(Job, RuntimeError)> = Vec::new();
        // Lanes whose rest after a failure is over are tried again.
        let mut back = 0;
        let mut rest_ends: Option<Instant> = None;
        for l in &mut st.lanes {
            if l.resting && !l.lane.draining && l.lane.usable(now) {
                l.resting = false;
                if !l.reserve {
                    back += l.lane.workers;
                }
            } else if l.resting
                && !l.lane.draining
                && let Some(t) = l.lane.failed_until
            {
                rest_ends = Some(rest_ends.map_or(t, |r| r.min(t)));
            }
        }
        // The timer keeps only a scheduler's earliest wake-up: a rest's end is asked again
        // for as long as the rest lasts.
        if let Some(t) = rest_ends {
            timer::wake_at(t, self.me.clone());
        }
        // Lanes far slower than the fastest leave the count, and come back.
        let (more, out) = Self::hold_in_reserve(&mut st, now);
        back += more;
        // Netted: a lane back from its rest and held in reserve again at once must not leave
        // free slots behind (retiring busy workers only marks them to leave).
        let (back, out) = (back.saturating_sub(out), out.saturating_sub(back));
        if out > 0 {
            st.batcher.retire_workers(out);
        }
        if back > 0 {
            actions.extend(st.batcher.add_workers(back, now));
        }
        for a in actions {
            match a {
                Action::Run(ids) => Self::form(&mut st, &ids, now, &mut batches),
                Action::Reject(id) => {
                    if let Some((job, ..)) = st.pending.remove(&id) {
                        let capacity = st.batcher.settings().queue_capacity;
                        failed.push((job, RuntimeError::QueueFull { capacity }));
                    }
                }
                Action::Expire(id) => {
                    if let Some((job, ..)) = st.pending.remove(&id) {
                        failed.push((job, RuntimeError::DeadlineExceeded));
                    }
                }
                Action::Wake(at) => timer::wake_at(at, self.me.clone()),
            }
        }
        drop(st);
        // The last batch formed may run on this thread (the others are handed out first, so
        // that their workers start meanwhile); the batches its run makes follow go to workers.
        let last = batches.len();
        for (i, b) in batches.into_iter().enumerate() {
            self.metrics.record_queue(
                now,
                b.arrived.iter().map(|a| now.saturating_duration_since(*a)),
            );
            let rows: u32 = b.rows.iter().sum();
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rows
                .fetch_add(u64::from(rows), Ordering::Relaxed);
            // Counted here, with the rows, so that both are final when a client has its answer.
            let padded = crate::runtime::padded_rows(u64::from(rows), &self.pad_to);
            self.stats
                .padded_rows
                .fetch_add(padded - u64::from(rows), Ordering::Relaxed);
            if i + 1 == last && RUN_HERE.replace(false) {
                self.run_here(b);
            } else {
                self.send(b);
            }
        }
        for (job, e) in failed {
            job.completion.complete(Err(e));
        }
        // A drainer counts itself before it looks at the state under the lock, and this runs
        // after the state changed under it: either it sees the change, or it is counted here.
        if self.draining.load(Ordering::SeqCst) > 0 {
            self.idle.notify_all();
        }
    }

    /// Takes the requests `ids` the policy put in one batch out of the queue and routes it:
    /// one batch to the lane chosen — or, when that lane is being tried (a probe, or not
    /// measured enough to be trusted), one request to it and the rest where they are expected
    /// to finish first: on a device forty times slower a batch of eight would hold eight
    /// requests for seconds.
    fn form(st: &mut State, ids: &[ReqId], now: Instant, batches: &mut Vec<Batch>) {
        let mut jobs = Vec::with_capacity(ids.len());
        let mut rows = Vec::with_capacity(ids.len());
        let mut arrived = Vec::with_capacity(ids.len());
        for (job, r, at) in ids.iter().filter_map(|id| st.pending.remove(id)) {
            jobs.push(job);
            rows.push(r);
            arrived.push(at);
        }
        st.running += 1;
        let total: u32 = rows.iter().sum();
        let routing = st.batcher.settings().routing;
        let mut choice = Self::choose_lane(&st.lanes, routing, total, now, None);
        let trying = routing == route::Routing::ExpectedFinish
            && (choice.probe || !st.lanes[choice.lane].lane.warm());
        if trying && jobs.len() > 1 && st.lanes.len() > 1 {
            if let (Some(job), Some(r), Some(at)) = (jobs.pop(), rows.pop(), arrived.pop()) {
                let expected = Self::hand(&mut st.lanes, choice, r, now);
                // Its own slot in `running`; none of the policy's (`Batch::extra`).
                st.running += 1;
                let one = Batch::new(vec![job], vec![r], vec![at], choice.lane, expected);
                batches.push(Batch { extra: true, ..one });
            }
            let (tried, rest) = (choice.lane, rows.iter().sum());
            choice = Self::choose_lane(&st.lanes, routing, rest, now, Some(tried));
            choice.probe = false;
        }
        let rest = rows.iter().sum();
        let expected = Self::hand(&mut st.lanes, choice, rest, now);
        batches.push(Batch::new(jobs, rows, arrived, choice.lane, expected));
    }

    /// Picks the lane for a batch of `rows` and counts it there, never lane `except` while
    /// another can take the batch; returns it and the compute expected of the batch there.
    fn route_except(
        lanes: &mut [LaneState],
        routing: route::Routing,
        rows: u32,
        now: Instant,
        except: Option<usize>,
    ) -> (usize, Duration) {
        let choice = Self::choose_lane(lanes, routing, rows, now, except);
        (choice.lane, Self::hand(lanes, choice, rows, now))
    }

    /// The lane for a batch of `rows` (the first lane when none is usable: its workers are
    /// all the policy counted), never lane `except` while another can take the batch.
    fn choose_lane(
        lanes: &[LaneState],
        routing: route::Routing,
        rows: u32,
        now: Instant,
        except: Option<usize>,
    ) -> route::Choice {
        if lanes.len() == 1 {
            route::Choice {
                lane: 0,
                probe: false,
            }
        } else {
            let mut views: Vec<Lane> = lanes.iter().map(|l| l.lane.clone()).collect();
            if let Some(v) = except.and_then(|i| views.get_mut(i)) {
                v.draining = true;
            }
            route::pick(routing, &views, rows, now).unwrap_or(route::Choice {
                lane: lanes
                    .iter()
                    .enumerate()
                    .position(|(i, l)| !l.lane.draining && Some(i) != except)
                    .unwrap_or(0),
                probe: false,
            })
        }
    }

    /// Counts a batch of `rows` handed to the chosen lane; returns the compute expected of it.
    fn hand(lanes: &mut [LaneState], choice: route::Choice, rows: u32, now: Instant) -> Duration {
        let l = &mut lanes[choice.lane];
        // A probe measures the lane afresh.
        l.probe |= choice.probe;
        let cost = l.lane.predict(rows).unwrap_or_default();
        l.lane.hand(cost, now);
        cost
    }

    /// Runs a light batch on this thread (`WorkerPool::run_here`), else hands it out.
    fn run_here(&self, b: Batch) {
        let pool = self.read_pools().get(b.lane).cloned().flatten();
        let back = match pool {
            Some(pool) => pool.run_here(b),
            None => Some(b),
        };
        if let Some(b) = back {
            self.send(b);
        }
    }

    /// Hands a routed batch to its lane's workers; a lane gone (never expected: a lane leaves
    /// only after routing stopped choosing it) answers its jobs and frees the slot.
    fn send(&self, b: Batch) {
        let (lane, expected, extra) = (b.lane, b.expected, b.extra);
        let rows: u32 = b.rows.iter().sum();
        let pool = self.read_pools().get(lane).cloned().flatten();
        let sent = match pool {
            Some(pool) => pool.send(b),
            None => Err(Box::new(b)),
        };
        if let Err(b) = sent {
            for job in b.jobs {
                job.completion.complete(Err(RuntimeError::WorkersGone));
            }
            self.batch_done(Finished {
                lane,
                expected,
                rows,
                compute: Duration::ZERO,
                occupied: Duration::ZERO,
                arrived: &[],
                extra,
                elements: 0,
                stopped: false,
                source: None,
            });
        }
    }

    /// A timer set by the policy fired.
    pub fn tick(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let actions = st.batcher.tick(now);
        self.act(st, actions, now);
    }

    /// Waits until nothing is queued or running (before the model is dropped).
    pub fn drain(&self) {
        self.draining.fetch_add(1, Ordering::SeqCst);
        let _counted = Uncount(&self.draining);
        let mut st = self.lock();
        while !st.pending.is_empty() || st.running > 0 {
            let (guard, _) = self
                .idle
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            // A delayed batch may be waiting for its timer: let the policy decide now.
            let now = Instant::now();
            let actions = st.batcher.tick(now);
            if !actions.is_empty() {
                self.act(st, actions, now);
                st = self.lock();
            }
        }
    }
}

/// Takes a drainer off the count when it stops waiting, however it stops.
struct Uncount<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LaneState {
    fn new(device: String, workers: usize) -> LaneState {
        LaneState {
            lane: Lane::new(device, workers),
            rows: 0,
            resting: false,
            reserve: false,
            failing: None,
            probe: false,
        }
    }
}

impl BatchListener for Scheduler {
    fn batch_done(&self, done: Finished<'_>) {
        let Finished {
            lane,
            expected,
            rows,
            compute,
            occupied,
            arrived,
            extra,
            elements,
            stopped,
            source,
        } = done;
        let now = Instant::now();
        if !arrived.is_empty() {
            self.metrics.record_batch(rows, compute, arrived, now);
        }
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        // A batch stopped past its run limit (its values, not its size, made it long) teaches
        // nothing of what its size costs.
        let learn = !arrived.is_empty() && !stopped;
        // The lane's own table learns the batch's compute ...
        let cheapest = {
            let mut cheapest = true;
            if let Some(l) = st.lanes.get_mut(lane) {
                l.lane.finish(expected, now);
                if learn {
                    // Its compute alone: a hand-over to an idle worker (a wake-up, ms on a
                    // loaded machine) is paid by whichever lane is idle, and counting it would
                    // make the idle lane look slower and stay idle.
                    let fresh = std::mem::take(&mut l.probe);
                    l.lane.learn(rows, compute, fresh);
                    l.rows += u64::from(rows);
                    l.failing = None;
                }
                let mine = l.lane.predict(rows).unwrap_or_default();
                cheapest = st
                    .lanes
                    .iter()
                    .all(|o| o.lane.draining || o.lane.predict(rows).is_none_or(|c| c >= mine));
            }
            cheapest
        };
        // A user's batch that took far longer than expected pushes that user's waiting
        // requests back by the difference.
        if let Some(s) = source
            && !arrived.is_empty()
            && compute > expected * 2
        {
            st.batcher.charge(s, compute - expected);
        }
        // ... and the policy's the worker's time from hand-over to free (on a loaded 2-core
        // machine the hand-over is a visible part of a 1 ms batch), from the cheapest lane
        // for this size.
        if learn {
            st.batcher.learn_elements(elements, compute);
            if elements > 0 {
                let x = compute.as_secs_f64() / elements as f64;
                let least = f64::from_bits(self.least_per_element.load(Ordering::Relaxed));
                if x > 0.0 && (least == 0.0 || x < least) {
                    self.least_per_element.store(x.to_bits(), Ordering::Relaxed);
                }
            }
        }
        let actions = if extra {
            // Its slot is the rest of its batch's.
            Vec::new()
        } else if cheapest && learn {
            st.recent_rows = rows;
            st.batcher.batch_done(rows, occupied, now)
        } else {
            st.batcher.worker_free(now)
        };
        self.act(st, actions, now);
    }

    fn batch_failed(&self, lane: usize, batch: Batch, error: String) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(l) = st.lanes.get_mut(lane) {
            l.lane.finish(batch.expected, now);
        }
        // The test hook's device is known to fail: it is blamed at once.
        self.mark_failing(&mut st, lane, &error, now);
        self.retry_or_answer(st, lane, batch, error, now);
    }

    fn can_retry(&self, lane: usize, retried: bool) -> bool {
        !retried && Self::others_usable(&self.lock(), lane, Instant::now())
    }

    fn run_failed(&self, lane: usize, mut batch: Batch, error: String) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(l) = st.lanes.get_mut(lane) {
            l.lane.finish(batch.expected, now);
        }
        // Nobody is blamed yet: if the batch runs on the other device, this one is
        // (`blame`); if it fails there too, its requests are.
        batch.failed_on = Some(Box::new((lane, error.clone())));
        self.retry_or_answer(st, lane, batch, error, now);
    }

    fn blame(&self, lane: usize, error: String) {
        let mut st = self.lock();
        let now = Instant::now();
        self.mark_failing(&mut st, lane, &error, now);
        let actions = st.batcher.tick(now);
        self.act(st, actions, now);
    }
}

impl Scheduler {
    /// Marks the lanes held in reserve now (`route::reserve`, for batches of the size last run
    /// on the cheapest lane); returns how many workers come back into the policy's count and
    /// how many leave it. Lanes resting or draining are out of the count already.
    fn hold_in_reserve(st: &mut State, now: Instant) -> (usize, usize) {
        if st.lanes.len() < 2 {
            return (0, 0);
        }
        let reserve = if st.batcher.settings().routing == route::Routing::ExpectedFinish {
            let views: Vec<(&Lane, bool)> = st.lanes.iter().map(|l| (&l.lane, l.reserve)).collect();
            route::reserve(&views, st.recent_rows, now)
        } else {
            // Round-robin gives every lane its turn: none is held back.
            vec![false; st.lanes.len()]
        };
        let (mut back, mut out) = (0, 0);
        for (l, r) in st.lanes.iter_mut().zip(reserve) {
            if l.reserve == r {
                continue;
            }
            l.reserve = r;
            if !l.resting && !l.lane.draining {
                if r {
                    tracing::debug!(device = %l.lane.device, "held in reserve: far slower than the fastest lane");
                    out += l.lane.workers;
                } else {
                    back += l.lane.workers;
                }
            }
        }
        (back, out)
    }

    /// Whether a lane other than `lane` can take a batch.
    fn others_usable(st: &State, lane: usize, now: Instant) -> bool {
        st.lanes
            .iter()
            .enumerate()
            .any(|(i, l)| i != lane && !l.resting && l.lane.usable(now))
    }

    /// Marks `lane` failing (health names its device) and, while another lane serves, drains
    /// it: its workers leave the policy's count until it is tried again after
    /// [`route::RETRY_AFTER`].
    fn mark_failing(&self, st: &mut State, lane: usize, error: &str, now: Instant) {
        let others = Self::others_usable(st, lane, now);
        let Some(l) = st.lanes.get_mut(lane) else {
            return;
        };
        if l.failing.is_none() {
            tracing::warn!(device = %l.lane.device, "a run failed on the device: {error}");
        }
        l.failing = Some(error.to_string());
        if others {
            l.lane.failed_until = Some(now + route::RETRY_AFTER);
            if !l.resting {
                l.resting = true;
                // A lane in reserve or draining is out of the count already.
                let counted = !l.reserve && !l.lane.draining;
                let workers = if counted { l.lane.workers } else { 0 };
                st.batcher.retire_workers(workers);
            }
            timer::wake_at(now + route::RETRY_AFTER, self.me.clone());
        }
    }

    /// Routes a batch a device failed to another lane, once, keeping the slot the policy
    /// counted for it; or, with nowhere else to go or on its second failure, answers it with
    /// `error` and frees the slot.
    fn retry_or_answer(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        lane: usize,
        mut batch: Batch,
        error: String,
        now: Instant,
    ) {
        let rows: u32 = batch.rows.iter().sum();
        if !batch.retried && Self::others_usable(&st, lane, now) {
            batch.retried = true;
            let routing = st.batcher.settings().routing;
            (batch.lane, batch.expected) =
                Self::route_except(&mut st.lanes, routing, rows, now, Some(lane));
            batch.dispatched = now;
            drop(st);
            self.send(batch);
            // The failing lane left the count: a lane held in reserve may be all that is left.
            self.act(self.lock(), Vec::new(), Instant::now());
            return;
        }
        // Nowhere else to go, or failed twice: answered with the error; the slot is free.
        st.running = st.running.saturating_sub(1);
        let actions = if batch.extra {
            Vec::new()
        } else {
            st.batcher.worker_free(now)
        };
        self.act(st, actions, now);
        for job in batch.jobs {
            job.completion
                .complete(Err(RuntimeError::Run(format!("device failed: {error}"))));
        }
    }
}
