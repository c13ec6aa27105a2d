//! Scheduling requests of one model version onto its workers: the pure batching policy
//! ([`policy`]) and the driver ([`Scheduler`]) that carries out its actions.
//!
//! The driver has no thread of its own: whoever produces an event drives it inline, under one
//! mutex — the connection that submits a request, the worker that finishes a batch (and so
//! may pick up the next one at once), or the shared timer thread for delayed batches and
//! deadlines. A request that finds an idle worker and no reason to wait goes to it directly,
//! so batching costs nothing at low load.
//! Invariants: every submitted job is completed exactly once (run, `busy`, or
//! `deadline_exceeded`); completions run outside the lock; a worker gets a batch only when
//! the policy counted it free.

pub mod policy;
pub mod timer;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::runtime::{Axes, Axis, Batch, BatchListener, InputData, Job, RuntimeError, WorkerPool};
use policy::{Action, Batcher, Item, ReqId, Settings};

/// The terms a request is queued under: how urgent it is and who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Terms {
    /// `None`: the model's default priority.
    pub priority: Option<u8>,
    /// Answer `deadline_exceeded` instead of running after it.
    pub deadline: Option<Instant>,
    /// Who asked (the peer's uid): sources share a priority level fairly.
    pub source: u64,
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
    pool: OnceLock<WorkerPool>,
    batchable: bool,
    /// Where each input's rows are.
    axes: Arc<Axes>,
    /// Hashes shape keys with this process's own random keys, so that no client can make two
    /// different requests share a key on purpose.
    keys: std::hash::RandomState,
    default_priority: std::sync::atomic::AtomicU8,
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
        let workers = crew.sessions.len();
        let axes = crew.axes.clone();
        let sched = Arc::new_cyclic(|me| Scheduler {
            me: me.clone(),
            state: Mutex::new(State {
                batcher: Batcher::new(settings, workers),
                pending: HashMap::new(),
                next_id: 1,
                running: 0,
            }),
            idle: Condvar::new(),
            draining: std::sync::atomic::AtomicUsize::new(0),
            pool: OnceLock::new(),
            batchable,
            axes,
            keys: std::hash::RandomState::new(),
            pad_to: crew.pad_to.clone(),
            default_priority: std::sync::atomic::AtomicU8::new(default_priority),
            stats: Stats::default(),
            metrics,
        });
        let listener: Weak<dyn BatchListener> = sched.me.clone();
        let pool = WorkerPool::start(crew, listener)?;
        let _ = sched.pool.set(pool);
        Ok(sched)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn instances(&self) -> usize {
        self.pool.get().map_or(0, WorkerPool::instances)
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
        let actions = st.batcher.tick(Instant::now());
        self.act(st, actions);
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
        self.pool.get().map_or(0, |p| p.stuck(limit))
    }

    /// Queues a job under `terms`.
    pub fn submit(&self, job: Job, terms: Terms) {
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
        };
        st.pending.insert(id, (job, rows, now));
        let actions = st.batcher.arrive(item, now);
        self.act(st, actions);
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
            match self.axes.inputs.get(k).copied().unwrap_or(Axis::Rows(0)) {
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
    fn act(&self, mut st: std::sync::MutexGuard<'_, State>, actions: Vec<Action>) {
        let mut batches = Vec::new();
        let mut failed: Vec<(Job, RuntimeError)> = Vec::new();
        for a in actions {
            match a {
                Action::Run(ids) => {
                    let mut jobs = Vec::with_capacity(ids.len());
                    let mut rows = Vec::with_capacity(ids.len());
                    let mut arrived = Vec::with_capacity(ids.len());
                    for (job, r, at) in ids.iter().filter_map(|id| st.pending.remove(id)) {
                        jobs.push(job);
                        rows.push(r);
                        arrived.push(at);
                    }
                    st.running += 1;
                    batches.push(Batch {
                        jobs,
                        rows,
                        arrived,
                        dispatched: Instant::now(),
                    });
                }
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
        let now = Instant::now();
        for b in batches {
            self.metrics
                .record_queue(b.arrived.iter().map(|a| now.saturating_duration_since(*a)));
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
            let sent = match self.pool.get() {
                Some(pool) => pool.send(b),
                None => Err(b),
            };
            if let Err(b) = sent {
                // Workers gone (never expected while the scheduler lives): answer, free the slot.
                for job in b.jobs {
                    job.completion.complete(Err(RuntimeError::WorkersGone));
                }
                self.batch_done(rows, Duration::ZERO, Duration::ZERO, &[]);
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

    /// A timer set by the policy fired.
    pub fn tick(&self) {
        let mut st = self.lock();
        let actions = st.batcher.tick(Instant::now());
        self.act(st, actions);
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
            let actions = st.batcher.tick(Instant::now());
            if !actions.is_empty() {
                self.act(st, actions);
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

impl BatchListener for Scheduler {
    fn batch_done(&self, rows: u32, compute: Duration, occupied: Duration, arrived: &[Instant]) {
        if !arrived.is_empty() {
            self.metrics.record_batch(rows, compute, arrived);
        }
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        // The policy learns what a batch costs it: the worker's time from hand-over to free
        // (on a loaded 2-core machine the hand-over is a visible part of a 1 ms batch).
        let actions = st.batcher.batch_done(rows, occupied, Instant::now());
        self.act(st, actions);
    }
}
