//! The worker threads of one model version ([`WorkerPool`]): each owns its sessions
//! ([`WorkerSessions`]) and takes batches from one channel; a worker gives back what large runs
//! grew ORT's arena by once idle ([`ArenaRelease`]) and stamps the start of each batch for the
//! watchdog.
//! Invariant: only a worker thread runs its sessions; dropping the pool closes the channel and
//! joins the threads after they finish what they hold.
//! Boundary: test hooks come in as arguments; nothing is read from the environment here.

use std::borrow::Cow;
use std::sync::Arc;
use std::thread::JoinHandle;

use ort::session::SessionInputValue;

use super::job::{Batch, BatchListener, Finished, Job};
use super::run::{Limits, Ran, Staging, run_batch};
use super::{DeviceSession, RuntimeError, release_free_memory};

/// The sessions of one worker: `main`, and on GPU devices one more session per padded batch
/// size, each run only at that size. ORT's CUDA EP keeps one set of cuDNN plans per Conv node,
/// for the last input shape: a session that alternates between two batch sizes pays a re-plan
/// on every change — 0.5–0.7 s per run for YOLOv8n and the PP-OCR classifier with ORT's
/// default algorithm search, ~0.1 s with the heuristic one, against 1–3 ms at a fixed shape
/// (measured in-process on an H200: `cargo bench --bench cuda_probe`). A session per size
/// never changes shape.
pub struct WorkerSessions {
    pub main: DeviceSession,
    /// Sessions by the batch size (rows) they run; batches of other sizes use `main`.
    pub by_rows: Vec<(u64, DeviceSession)>,
    /// When ORT's CPU arena gives memory back.
    pub arena: ArenaRelease,
    /// They run on the CPU EP: a light batch may run on the thread that formed it
    /// ([`WorkerPool::run_here`]).
    pub cpu: bool,
    /// The options of their runs (made on first use), which a run past its limit is stopped
    /// through ([`super::limit`]).
    options: Option<Arc<ort::session::RunOptions>>,
}

impl From<DeviceSession> for WorkerSessions {
    fn from(main: DeviceSession) -> Self {
        WorkerSessions {
            main,
            by_rows: Vec::new(),
            arena: ArenaRelease::default(),
            cpu: false,
            options: None,
        }
    }
}

/// What [`WorkerSessions::for_rows`] gives: the session for a batch, the arena policy, the
/// run options, and whether the session is `main`.
pub(super) type ForRows<'a> = (
    &'a mut DeviceSession,
    &'a mut ArenaRelease,
    Option<&'a Arc<ort::session::RunOptions>>,
    bool,
);

impl WorkerSessions {
    /// The session for a batch of `rows` rows, the arena policy, the run options (`None`
    /// only if ORT could not make them: runs then go unlimited), and whether it is `main`.
    pub(super) fn for_rows(&mut self, rows: u64) -> ForRows<'_> {
        if self.options.is_none() {
            match ort::session::RunOptions::new() {
                Ok(o) => self.options = Some(Arc::new(o)),
                Err(e) => tracing::warn!("cannot make run options (runs go unlimited): {e}"),
            }
        }
        let options = self.options.as_ref();
        match self.by_rows.iter_mut().find(|(r, _)| *r == rows) {
            Some((_, s)) => (s, &mut self.arena, options, false),
            None => (&mut self.main, &mut self.arena, options, true),
        }
    }
}

/// Gives back what ORT's CPU arena grew by for runs larger than the warmup's. ORT's arena keeps
/// every block it ever allocated: one detector request with a 1536×1536 image grew the daemon
/// by ~480 MiB for good, memory the budget never saw (a version is accounted at what it holds
/// after its warmup). After a run whose inputs hold more elements than the largest warmup run,
/// once the worker has been idle for [`ARENA_IDLE`], it runs the batch-1 warmup inputs with
/// ORT's `memory.enable_memory_arena_shrinkage` (the arena frees every block no tensor uses
/// when that run ends) and returns freed heap to the kernel. Waiting for idleness keeps a
/// stream of large requests at full speed (shrinking after each run made the PP-OCR detector
/// at 640×640 ~50 % slower: every run faulted its memory in again, BENCHMARKS.md); runs
/// within the warmup shapes change nothing. Without batch-1 warmup inputs (warmup off, or
/// failed at automatic shapes) the large run itself shrinks the arena when it ends (the block
/// holding its outputs stays until the next such run). `warmup-dims` at the shapes a model
/// serves keeps their memory resident and accounted.
pub struct ArenaRelease {
    /// Input elements of the largest warmup run; larger runs make the arena shrink.
    pub keep_elements: u64,
    options: Option<Arc<ort::session::RunOptions>>,
    /// Zero inputs of the batch-1 warmup (empty when that warmup did not run or failed).
    tidy: Vec<(String, ort::value::DynTensor)>,
    /// A large run happened since the last shrink: shrink once the worker is idle.
    pending: bool,
    /// Whether the first large run was logged.
    logged: bool,
}

/// A run at least this long and four times its expected compute may have grown ORT's arena by
/// its values ([`ArenaRelease::after_long_run`]).
const LONG_RUN: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a worker waits, idle, before giving back what a large run grew its arena by.
pub const ARENA_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for ArenaRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaRelease")
            .field("keep_elements", &self.keep_elements)
            .field("tidy", &!self.tidy.is_empty())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Default for ArenaRelease {
    /// Never shrinks.
    fn default() -> Self {
        ArenaRelease::above(u64::MAX, Vec::new())
    }
}

impl ArenaRelease {
    /// Shrinks after runs of more than `keep_elements` input elements; `tidy` are the zero
    /// inputs of the batch-1 warmup, which the session ran successfully.
    pub fn above(keep_elements: u64, tidy: Vec<(String, ort::value::DynTensor)>) -> ArenaRelease {
        ArenaRelease {
            keep_elements,
            options: None,
            tidy,
            pending: false,
            logged: false,
        }
    }

    /// Run options that shrink the arena (made once).
    fn shrink_options(&mut self) -> Option<&Arc<ort::session::RunOptions>> {
        if self.options.is_none() {
            let made = ort::session::RunOptions::new().and_then(|mut o| {
                o.set("memory.enable_memory_arena_shrinkage", "cpu:0")
                    .map(|()| o)
            });
            match made {
                Ok(o) => self.options = Some(Arc::new(o)),
                Err(e) => tracing::warn!("cannot make run options that shrink the arena: {e}"),
            }
        }
        self.options.as_ref()
    }

    /// Notes a run of `elements` input elements about to start; returns run options when the
    /// run itself must shrink the arena (no batch-1 inputs to do it later).
    pub(super) fn for_run(&mut self, elements: u64) -> Option<&Arc<ort::session::RunOptions>> {
        if elements <= self.keep_elements {
            return None;
        }
        if !self.logged {
            self.logged = true;
            tracing::info!(
                thread = std::thread::current().name().unwrap_or(""),
                elements,
                warmup = self.keep_elements,
                "a run larger than the warmup's: ORT's arena is given back after such runs \
                 (warmup-dims at the shapes served keeps their memory resident and accounted)"
            );
        }
        if self.tidy.is_empty() {
            return self.shrink_options();
        }
        self.pending = true;
        None
    }

    /// Whether a large run's growth waits to be given back.
    fn pending(&self) -> bool {
        self.pending
    }

    /// A run took far longer than expected or was stopped: a request's values, not its size,
    /// may have grown the arena (a `ConstantOfShape` of a size sent as a value held 0.8–2.5
    /// GB after its run was stopped), so it is given back once the worker is idle, as after a
    /// run larger than the warmup's.
    fn after_long_run(&mut self) {
        if !self.tidy.is_empty() {
            self.pending = true;
        }
    }

    /// Gives a large run's growth back: a batch-1 run that shrinks the arena (nothing is in
    /// use between runs, so every block a larger run added is freed), then freed heap to the
    /// kernel.
    fn tidy(&mut self, session: &mut DeviceSession) {
        self.pending = false;
        if self.shrink_options().is_none() {
            return;
        }
        let Some(options) = &self.options else {
            return;
        };
        let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = self
            .tidy
            .iter()
            .map(|(name, t)| (Cow::Borrowed(name.as_str()), t.into()))
            .collect();
        if let Err(e) = session.with(|s| s.run_with_options(values, &**options)) {
            tracing::debug!("the batch-1 run that shrinks the arena failed: {e}");
        }
        release_free_memory();
    }
}

/// The worker threads of one model version: one session each, all taking batches from one
/// channel. Dropping the pool closes the channel and joins the threads (after they finish
/// what they hold).
pub struct WorkerPool {
    tx: Option<crossbeam_channel::Sender<Batch>>,
    handles: Vec<JoinHandle<()>>,
    /// One per worker: what it runs batches with.
    seats: Vec<Arc<Seat>>,
    /// What every worker of the pool shares.
    common: Arc<Common>,
}

/// What one worker runs batches with, locked by whichever thread runs a batch: the worker's
/// own, or a thread that runs a light batch itself ([`WorkerPool::run_here`]).
struct Seat {
    bench: std::sync::Mutex<Bench>,
    /// When its current batch started (ms since [`epoch`] + 1), 0 when idle.
    busy_since: std::sync::atomic::AtomicU64,
}

/// A worker's sessions and gather buffers.
struct Bench {
    sessions: WorkerSessions,
    staging: Staging,
    /// When a batch last finished here: a batch routed to the worker while it was busy was
    /// the scheduler's from then on, not from its dispatch.
    last_done: std::time::Instant,
}

/// What the workers of one pool share.
struct Common {
    pad_to: Arc<[u32]>,
    axes: Arc<super::Axes>,
    /// Test hook: runs are given an input the model does not have.
    bogus: bool,
    hooks: Hooks,
    listener: std::sync::Weak<dyn BatchListener>,
    load: Arc<crate::metrics::DeviceLoad>,
    lane: usize,
    /// Batches may run on the thread that formed them: no test hooks, and no run there has
    /// taken longer than [`INLINE_STOP`].
    inline: std::sync::atomic::AtomicBool,
    /// The longest expected run of a light batch.
    inline_max: std::time::Duration,
    /// [`Crew::run_limit`].
    run_limit: Option<std::time::Duration>,
    /// Users whose runs of the model were stopped lately ([`Crew::strikes`]).
    strikes: Arc<super::limit::Strikes>,
}

impl Seat {
    fn bench(&self) -> std::sync::MutexGuard<'_, Bench> {
        self.bench.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The longest run a batch may be expected to take to be run by the thread that formed it
/// rather than handed to a worker ([`WorkerPool::run_here`]).
pub const INLINE_MAX: std::time::Duration = std::time::Duration::from_micros(50);

/// A run on the thread that formed its batch that took more of that thread's CPU than this
/// (the cost table was wrong: inputs whose values make the model slow) ends such runs for the
/// pool: the threads that take requests are held up by one such run at most. CPU time, not
/// wall time: on a busy machine an honest run may wait for a core for longer than this.
pub const INLINE_STOP: std::time::Duration = std::time::Duration::from_millis(1);

/// The same in wall time, far above what waiting for a core makes of an honest light run: a
/// run whose thread spent its time blocked (waiting on the session's intra-op threads, which
/// did the work) ends such runs too.
pub const INLINE_STOP_WALL: std::time::Duration = std::time::Duration::from_millis(20);

/// The calling thread's CPU time so far.
fn thread_cpu() -> std::time::Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(std::time::Duration::ZERO, |t| {
        std::time::Duration::new(
            t.tv_sec().max(0) as u64,
            t.tv_nsec().clamp(0, 999_999_999) as u32,
        )
    })
}

/// The process's time origin for worker heartbeats.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

pub(super) fn now_ms() -> u64 {
    ms_at(std::time::Instant::now())
}

/// [`now_ms`] of a time already read.
fn ms_at(t: std::time::Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

/// What a worker pool is started with.
pub struct Crew {
    /// `model-version`, for the threads' names.
    pub label: String,
    /// The device its sessions run on.
    pub device: String,
    /// The device's cores: each worker pins itself to them (`[[device]] cores`).
    pub cores: Option<Arc<[usize]>>,
    /// One worker per entry.
    pub sessions: Vec<WorkerSessions>,
    /// Batch sizes batches are padded up to.
    pub pad_to: Vec<u32>,
    /// A test hook (`config::TestHooks`): every worker hangs on its first batch, to test the
    /// watchdog.
    pub wedge: bool,
    /// The device's busy time and rows, recorded per batch.
    pub load: Arc<crate::metrics::DeviceLoad>,
    /// Where each tensor's rows are in a batch.
    pub axes: Arc<super::Axes>,
    /// Which of the scheduler's lanes these workers are (told back with each batch).
    pub lane: usize,
    /// A test hook (`config::TestHooks`): the device fails every run; each batch is handed
    /// back to the listener unrun.
    pub fail_runs: bool,
    /// A test hook (`config::TestHooks`): every run is given an input the model does not
    /// have, so ONNX Runtime fails it.
    pub ort_fails: bool,
    /// The longest expected run of a light batch ([`INLINE_MAX`] but in a test).
    pub inline_max: std::time::Duration,
    /// A run holding a non-admin's request ([`Job::bounded`]) is stopped after this long
    /// (half of `watchdog-stuck-secs`), its requests answered with
    /// [`RuntimeError::Stopped`](super::RuntimeError::Stopped) (`None`: never).
    pub run_limit: Option<std::time::Duration>,
    /// Users whose runs of the model were stopped lately: the model's, kept for the daemon's
    /// life (every version, every device, and reloads share it: a user barred from a model
    /// stays barred when it is evicted and loaded again).
    pub strikes: Arc<super::limit::Strikes>,
}

impl WorkerPool {
    /// Starts one worker thread per session. The channel holds at most one batch per worker:
    /// batches are formed by the scheduler only when a worker is free. A thread that cannot be
    /// started (the process is out of threads) is an error, not an abort: the workers already
    /// started stop (their channel closes) and are joined.
    pub fn start(
        crew: Crew,
        listener: std::sync::Weak<dyn BatchListener>,
    ) -> Result<WorkerPool, RuntimeError> {
        let Crew {
            label,
            device,
            cores,
            sessions,
            pad_to,
            wedge,
            load,
            axes,
            lane,
            fail_runs,
            ort_fails,
            inline_max,
            run_limit,
            strikes,
        } = crew;
        let hooks = Hooks { wedge, fail_runs };
        let common = Arc::new(Common {
            pad_to: pad_to.into(),
            axes,
            bogus: ort_fails,
            hooks,
            listener,
            load,
            lane,
            inline: (!wedge && !fail_runs && !ort_fails).into(),
            inline_max,
            run_limit,
            strikes,
        });
        // The scheduler bounds what is handed out in all (one batch per worker of the version,
        // over every lane) and may route several to the lane expected to finish them first.
        let (tx, rx) = crossbeam_channel::unbounded::<Batch>();
        let seats: Vec<Arc<Seat>> = sessions
            .into_iter()
            .map(|sessions| {
                Arc::new(Seat {
                    bench: std::sync::Mutex::new(Bench {
                        sessions,
                        staging: Staging::default(),
                        last_done: std::time::Instant::now(),
                    }),
                    busy_since: Default::default(),
                })
            })
            .collect();
        let mut pool = WorkerPool {
            tx: Some(tx),
            handles: Vec::with_capacity(seats.len()),
            seats,
            common,
        };
        for (i, seat) in pool.seats.iter().enumerate() {
            let (rx, seat, common) = (rx.clone(), seat.clone(), pool.common.clone());
            let (device, cores) = (device.clone(), cores.clone());
            let handle = std::thread::Builder::new()
                .name(format!("rxd-w-{label}-{lane}.{i}"))
                .spawn(move || {
                    crate::affinity::pin_for(&device, cores.as_deref());
                    worker_loop(&seat, rx, &common)
                })
                .map_err(|e| RuntimeError::Threads(e.to_string()))?;
            pool.handles.push(handle);
        }
        Ok(pool)
    }

    /// Hands a batch to the workers (the next free one takes it). Fails (returning the batch,
    /// boxed: the error path is rare) only if the workers are gone.
    pub fn send(&self, batch: Batch) -> Result<(), Box<Batch>> {
        let Some(batch) = keep_here(&self.common, batch) else {
            return Ok(());
        };
        match &self.tx {
            Some(tx) => tx.try_send(batch).map_err(|e| Box::new(e.into_inner())),
            None => Err(Box::new(batch)),
        }
    }

    /// Runs a light batch on the calling thread, on the sessions of a worker not running one
    /// (the scheduler counted that worker busy with this batch; its thread waits on the
    /// channel meanwhile), and reports it to the scheduler as the worker would. A light batch
    /// is one on a CPU device expected to take at most [`INLINE_MAX`] whose inputs are no
    /// larger than the warmup's: the hand-over to a worker (a wake-up of its thread, and its
    /// sleep again after) costs as much as such a run. Gives the batch back (`Some`), to be
    /// sent, when it is not light or every worker's sessions are in use.
    pub fn run_here(&self, batch: Batch) -> Option<Batch> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.common.inline.load(Relaxed)
            || batch.expected.is_zero()
            || batch.expected > self.common.inline_max
            || batch.failed_on.is_some()
            || self.tx.is_none()
        {
            return Some(batch);
        }
        let elements = batch.elements();
        for seat in &self.seats {
            let Ok(mut bench) = seat.bench.try_lock() else {
                continue;
            };
            let keep = bench.sessions.arena.keep_elements;
            if !bench.sessions.cpu || keep == u64::MAX || elements > keep {
                return Some(batch);
            }
            let (cpu, wall) = (thread_cpu(), std::time::Instant::now());
            let here = Some(INLINE_STOP_WALL);
            let report = self.common.run(&mut bench, &seat.busy_since, batch, here);
            drop(bench);
            let took = thread_cpu().saturating_sub(cpu);
            let wall = wall.elapsed();
            if (took > INLINE_STOP || wall > INLINE_STOP_WALL)
                && self.common.inline.swap(false, Relaxed)
            {
                tracing::info!(
                    cpu_us = took.as_micros() as u64,
                    wall_us = wall.as_micros() as u64,
                    expected_us = report.lane_batch.expected.as_micros() as u64,
                    "a light batch run by the thread that took it took far longer than \
                     expected: this model's batches go to its workers from now on"
                );
            }
            // Stopped here, or failed: a worker runs it (the scheduler counts it that
            // worker's already).
            if let Ran::Requeue(f) = report.ran {
                let batch = report
                    .lane_batch
                    .into_batch(f.jobs, f.rows, self.common.lane);
                if let Some(b) = self.tx.as_ref().and_then(|tx| tx.try_send(batch).err()) {
                    for job in b.into_inner().jobs {
                        job.completion.complete(Err(RuntimeError::WorkersGone));
                    }
                }
                return None;
            }
            self.common.report(report);
            return None;
        }
        Some(batch)
    }

    pub fn instances(&self) -> usize {
        self.handles.len()
    }

    /// Workers that have been on their current batch for longer than `limit`.
    pub fn stuck(&self, limit: std::time::Duration) -> usize {
        let now = now_ms();
        let limit = limit.as_millis() as u64;
        self.seats
            .iter()
            .map(|s| s.busy_since.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&since| since != 0 && now.saturating_sub(since) > limit)
            .count()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx = None;
        let me = std::thread::current().id();
        for h in self.handles.drain(..) {
            // The last reference may be dropped by a worker itself (it upgrades its listener
            // after each batch): that thread exits on its own once the channel is closed.
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

/// How a worker lays out its batches: the sizes it pads them to, and where each tensor's rows
/// are.
#[derive(Clone, Copy)]
pub(super) struct Pad<'a> {
    pub to: &'a [u32],
    pub axes: &'a super::Axes,
    /// Test hook: runs are given an input the model does not have (ONNX Runtime fails them).
    pub bogus: bool,
}

/// The test hooks a worker obeys.
#[derive(Debug, Clone, Copy)]
struct Hooks {
    wedge: bool,
    fail_runs: bool,
}

thread_local! {
    /// On a worker thread while it reports a batch: its pool (the address of its `Common`)
    /// and the first batch the scheduler hands that pool meanwhile — the policy counted this
    /// worker free for it. The worker runs it next itself: through the channel, it would wake
    /// another worker of the pool (a system call and a context switch) while this one went
    /// to sleep, once per batch under load.
    static NEXT_HERE: std::cell::RefCell<Option<(usize, Option<Batch>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Keeps `batch` for this worker thread to run next ([`NEXT_HERE`]), or gives it back.
fn keep_here(common: &Arc<Common>, batch: Batch) -> Option<Batch> {
    let me = Arc::as_ptr(common) as usize;
    NEXT_HERE.with_borrow_mut(|k| match k {
        Some((pool, slot @ None)) if *pool == me => {
            *slot = Some(batch);
            None
        }
        _ => Some(batch),
    })
}

/// What became of a batch, for the scheduler: told after the worker's sessions are free.
struct Report {
    ran: Ran,
    /// The one user all the batch's jobs came from.
    source: Option<u64>,
    lane_batch: LaneBatch,
    rows: u32,
    /// The batch's input elements in all.
    elements: u64,
    started: std::time::Instant,
    done: std::time::Instant,
}

/// What a batch carried that the scheduler needs back with its report.
struct LaneBatch {
    arrived: Vec<std::time::Instant>,
    dispatched: std::time::Instant,
    expected: std::time::Duration,
    retried: bool,
    failed_on: Option<Box<(usize, String)>>,
    extra: bool,
}

impl LaneBatch {
    /// The batch again, with `jobs` (of `rows` rows each), on `lane`.
    fn into_batch(self, jobs: Vec<Job>, rows: Vec<u32>, lane: usize) -> Batch {
        Batch {
            jobs,
            rows,
            arrived: self.arrived,
            dispatched: self.dispatched,
            lane,
            expected: self.expected,
            retried: self.retried,
            failed_on: self.failed_on,
            extra: self.extra,
        }
    }
}

impl Common {
    /// Runs `batch` on `bench`, the sessions of the worker whose heartbeat is `busy`; `here`:
    /// the limit of a light batch's run on the thread that formed it ([`Limits::here`]).
    fn run(
        &self,
        bench: &mut Bench,
        busy: &std::sync::atomic::AtomicU64,
        mut batch: Batch,
        here: Option<std::time::Duration>,
    ) -> Report {
        let limits = Limits {
            bounded: self.run_limit,
            strikes: &self.strikes,
            here,
            heartbeat: busy,
        };
        use std::sync::atomic::Ordering::Relaxed;
        let arrived = std::mem::take(&mut batch.arrived);
        let started = std::time::Instant::now();
        busy.store(ms_at(started), Relaxed);
        let source = batch
            .jobs
            .first()
            .map(|j| j.source)
            .filter(|&s| batch.jobs.iter().all(|j| j.source == s));
        let rows: u32 = batch.rows.iter().sum();
        let elements = batch.elements();
        let lane_batch = LaneBatch {
            arrived,
            dispatched: batch.dispatched.max(bench.last_done),
            expected: batch.expected,
            retried: batch.retried,
            failed_on: batch.failed_on.take(),
            extra: batch.extra,
        };
        let listener = self.listener.upgrade();
        let (lane, retried) = (self.lane, lane_batch.retried);
        let hand_back = || {
            listener
                .as_ref()
                .is_some_and(|l| l.can_retry(lane, retried))
        };
        let pad = Pad {
            to: &self.pad_to,
            axes: &self.axes,
            bogus: self.bogus,
        };
        self.load.begin(started);
        let Bench {
            sessions, staging, ..
        } = bench;
        let expected = lane_batch.expected;
        let ran = run_batch(sessions, batch, pad, staging, &hand_back, limits);
        let done = std::time::Instant::now();
        let took = done.saturating_duration_since(started);
        if matches!(ran, Ran::Answered { stopped: true, .. })
            || (took > LONG_RUN && took > expected * 4)
        {
            sessions.arena.after_long_run();
        }
        self.load.end(done, rows);
        busy.store(0, Relaxed);
        bench.last_done = done;
        Report {
            ran,
            source,
            lane_batch,
            rows,
            elements,
            started,
            done,
        }
    }

    /// Tells the scheduler what became of a batch (its jobs were answered, or are handed
    /// back for another device).
    fn report(&self, report: Report) {
        let Report {
            ran,
            source,
            lane_batch,
            rows,
            elements,
            started,
            done,
        } = report;
        let lane = self.lane;
        let Some(l) = self.listener.upgrade() else {
            if let Ran::HandedBack(f) | Ran::Requeue(f) = ran {
                for job in f.jobs {
                    job.completion
                        .complete(Err(RuntimeError::Run(f.error.clone())));
                }
            }
            return;
        };
        let (ok, stopped) = match ran {
            // Every request failed here: another device tries them (`hand_back` said one
            // could), and this one is blamed only if they run there.
            Ran::HandedBack(f) => {
                let mut batch = lane_batch.into_batch(f.jobs, f.rows, lane);
                batch.failed_on = None;
                l.run_failed(lane, batch, f.error);
                return;
            }
            // Only a run on the thread that formed the batch hands it back for a worker
            // ([`WorkerPool::run_here`] sends it on): answered with the error otherwise.
            Ran::Requeue(f) => {
                for job in f.jobs {
                    job.completion
                        .complete(Err(RuntimeError::Run(f.error.clone())));
                }
                (false, true)
            }
            // A batch some of whose jobs did not run teaches nothing either.
            Ran::Answered {
                ok,
                stopped,
                partial,
            } => (ok, stopped || partial),
        };
        let LaneBatch {
            arrived,
            dispatched,
            expected,
            failed_on,
            extra,
            ..
        } = lane_batch;
        if let (true, Some(blamed)) = (ok, failed_on) {
            let (bad, error) = *blamed;
            l.blame(bad, error);
        }
        l.batch_done(Finished {
            lane,
            expected,
            rows,
            compute: done.saturating_duration_since(started),
            occupied: done.saturating_duration_since(dispatched),
            arrived: &arrived,
            extra,
            elements,
            stopped,
            source,
        });
    }
}

fn worker_loop(seat: &Seat, rx: crossbeam_channel::Receiver<Batch>, common: &Arc<Common>) {
    let me = Arc::as_ptr(common) as usize;
    // The batch the scheduler handed this pool while this worker reported its last one.
    let mut kept: Option<Batch> = None;
    loop {
        // After a run larger than the warmup's, the arena's growth goes back once idle.
        let next = if kept.is_some() {
            kept.take()
        } else if seat.bench().sessions.arena.pending() {
            match rx.recv_timeout(ARENA_IDLE) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let mut bench = seat.bench();
                    let sessions = &mut bench.sessions;
                    sessions.arena.tidy(&mut sessions.main);
                    continue;
                }
                other => other.ok(),
            }
        } else {
            rx.recv().ok()
        };
        let Some(mut batch) = next else {
            break;
        };
        if common.hooks.wedge {
            seat.busy_since
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("test hook: this worker hangs now");
            loop {
                std::thread::park();
            }
        }
        if common.hooks.fail_runs {
            seat.bench().last_done = std::time::Instant::now();
            match common.listener.upgrade() {
                Some(l) => l.batch_failed(
                    common.lane,
                    batch,
                    "test hook: the device fails every run".into(),
                ),
                None => {
                    for job in std::mem::take(&mut batch.jobs) {
                        job.completion.complete(Err(RuntimeError::WorkersGone));
                    }
                }
            }
            continue;
        }
        let report = common.run(&mut seat.bench(), &seat.busy_since, batch, None);
        NEXT_HERE.set(Some((me, None)));
        common.report(report);
        kept = NEXT_HERE.take().and_then(|(_, b)| b);
    }
}
