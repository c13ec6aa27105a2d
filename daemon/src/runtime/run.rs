//! Running a batch on a worker's session: one job alone straight from where its inputs are
//! (zero copy from the arena or the request's bytes), several as one batch gathered into the
//! worker's reused buffers (padded to the batch size its session runs) along each tensor's
//! rows dimension ([`Axis`]) and split back per job; every job completed exactly once. Each run
//! goes under its [`Limits`]: past them it is stopped ([`super::limit`]).
//! Boundary: the worker thread calls in; outputs go out through `deliver`.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ort::session::{RunOptions, SessionInputValue};

use super::deliver::{View, deliver};
use super::job::{Batch, InputData, Job, OutputTensor, padded_rows};
use super::limit::{Strikes, Watch};
use super::worker::{ArenaRelease, Pad, WorkerSessions};
use super::{
    Axis, DeviceSession, RuntimeError, dtype_of, element_type_of, raw, release_free_memory, run_err,
};

/// A worker's gather buffers, one per model input, kept (with their capacity) from batch to
/// batch: a batch's inputs are copied once, into memory that was used before, and the batch
/// tensors are built over it (no fresh allocation, page faults or second copy per batch).
#[derive(Debug, Default)]
pub struct Staging {
    buffers: Vec<Vec<u8>>,
}

impl Staging {
    /// Buffer `k`, emptied (its capacity kept).
    fn take(&mut self, k: usize) -> Vec<u8> {
        if self.buffers.len() <= k {
            self.buffers.resize_with(k + 1, Vec::new);
        }
        let mut b = std::mem::take(&mut self.buffers[k]);
        b.clear();
        b
    }

    /// Gives buffer `k` back for the next batch.
    fn put(&mut self, k: usize, b: Vec<u8>) {
        self.buffers[k] = b;
    }
}

/// Input elements of a set of shapes (saturating).
pub(super) fn elements_of<'a>(shapes: impl IntoIterator<Item = &'a [u64]>) -> u64 {
    shapes
        .into_iter()
        .map(|s| s.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
        .fold(0u64, u64::saturating_add)
}

/// The elements of `inputs` in all: what a request costs relative to others of its model.
pub fn input_elements(inputs: &[super::InputTensor]) -> u64 {
    elements_of(inputs.iter().map(|t| t.shape.as_slice()))
}

/// Jobs of a batch that ONNX Runtime failed, every one (each run alone too): handed back to
/// the scheduler unanswered, with the error, so that another device can try them.
pub(super) struct Failed {
    pub jobs: Vec<Job>,
    pub rows: Vec<u32>,
    pub error: String,
}

/// What became of a batch.
pub(super) enum Ran {
    /// Every job answered; `ok`: at least one with outputs; `stopped`: a run was stopped
    /// past its limit; `partial`: some jobs were answered without a run (abandoned, or their
    /// user barred), so what the batch took is not what its rows cost.
    Answered {
        ok: bool,
        stopped: bool,
        partial: bool,
    },
    HandedBack(Failed),
    /// Run by the thread that formed it, the batch failed or was stopped past
    /// [`Limits::here`]: its jobs are unanswered, for a worker to run.
    Requeue(Failed),
}

impl Ran {
    /// Every job answered, each by a run.
    fn answered(ok: bool, stopped: bool) -> Ran {
        Ran::Answered {
            ok,
            stopped,
            partial: false,
        }
    }
}

/// How long runs may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits<'a> {
    /// A run that holds a non-admin's job ([`Job::bounded`]) is stopped after this long (or
    /// less for a user whose runs were stopped lately: `strikes`) and its jobs answered
    /// [`RuntimeError::Stopped`].
    pub bounded: Option<Duration>,
    pub strikes: &'a Strikes,
    /// Every run is stopped after this long, and a batch that fails (stopped or not) is handed
    /// back unanswered ([`Ran::Requeue`]): a light batch on the thread that formed it.
    pub here: Option<Duration>,
    /// The worker's heartbeat (when its current run began, ms since its epoch), renewed at
    /// each run of a failed batch's jobs alone: each run is bounded, so a worker making them
    /// is not stuck.
    pub heartbeat: &'a std::sync::atomic::AtomicU64,
}

impl<'s> Limits<'s> {
    /// The limit of a run of `jobs`: the least of its bounded jobs' limits, and for a batch of
    /// several [`BATCH_ALLOWANCE`] more.
    fn of<'a>(&self, jobs: impl Iterator<Item = &'a Job>) -> Option<Duration> {
        let bounded = self.bounded.and_then(|limit| {
            let (mut n, mut least) = (0usize, None::<Duration>);
            for j in jobs {
                n += 1;
                if j.bounded {
                    let l = self.strikes.limit(j.source, limit);
                    least = Some(least.map_or(l, |m| m.min(l)));
                }
            }
            least.map(|l| if n > 1 { l + BATCH_ALLOWANCE } else { l })
        });
        match (bounded, self.here) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `job`'s run alone was stopped: it counts against its user (not a light batch's stop
    /// on the thread that formed it, which is that thread's limit, not the user's).
    fn stopped_alone(&self, job: &Job, result: &Result<Vec<OutputTensor>, RuntimeError>) {
        if let Err(RuntimeError::Stopped { limit, took }) = result
            && self.here.is_none()
            && job.bounded
        {
            self.strikes.strike(job.source, *took, *limit);
        }
    }

    /// Why `job` is not to run: its user is barred from these workers
    /// ([`Strikes::barred`]).
    fn barred(&self, job: &Job) -> Option<RuntimeError> {
        if !job.bounded || self.bounded.is_none() {
            return None;
        }
        let b = self.strikes.barred(job.source)?;
        Some(RuntimeError::Barred {
            took: b.took,
            limit: b.limit,
            left: super::limit::STRIKE_MEMORY.saturating_sub(b.at.elapsed()),
        })
    }
}

/// What a batch of several requests may take beyond one request's limit: twice the expected
/// compute a batch gathers beyond its head (`scheduler::policy::MAX_BATCH_COMPUTE`, 0.5 s),
/// the same margin a request has between the longest expected run admitted (a quarter of
/// `watchdog-stuck-secs`) and its limit (a half). Honest requests batched together are not
/// stopped for being many.
pub(super) const BATCH_ALLOWANCE: Duration = Duration::from_secs(1);

/// How one run is made: with which options (`None`: ORT's defaults), stopped after how long.
#[derive(Clone, Copy)]
pub(super) struct How<'a> {
    pub options: Option<&'a Arc<RunOptions>>,
    pub after: Option<Duration>,
}

/// Runs a batch and completes every job in it — except when ONNX Runtime fails every job
/// (alone too) and `hand_back()` says another device could try them: those are handed back
/// unanswered ([`Failed`]). Otherwise each failed job is answered with its own error.
pub(super) fn run_batch(
    sessions: &mut WorkerSessions,
    batch: Batch,
    pad: Pad<'_>,
    staging: &mut Staging,
    hand_back: &dyn Fn() -> bool,
    limits: Limits<'_>,
) -> Ran {
    let Batch { jobs, rows, .. } = batch;
    let given = jobs.len();
    let mut live: Vec<(Job, u32)> = Vec::with_capacity(jobs.len());
    for (j, r) in jobs.into_iter().zip(rows) {
        if j.completion.is_abandoned() {
            // Nobody waits for it: skip the work, still complete it (bookkeeping).
            j.completion.complete(Err(RuntimeError::Abandoned));
        } else if let Some(e) = limits.barred(&j) {
            j.completion.complete(Err(e));
        } else {
            live.push((j, r));
        }
    }
    let total: u64 = live.iter().map(|(_, r)| u64::from(*r)).sum();
    let padded = padded_rows(total, pad.to);
    // A request that cannot batch (inputs disagreeing on their rows, none along the rows
    // dimension: the scheduler counts it one row, alone) runs as it is, never padded: padding
    // would answer it a row of the padding's outputs, not its own answer or error.
    let padded = match live.as_slice() {
        [(job, r)] if !rows_agree(job, *r, pad.axes) => total,
        _ => padded,
    };
    let (session, arena, plain, is_main) = sessions.for_rows(padded);
    let live_count = live.len();
    let (shrunk, ran) = match live_count {
        // Every job answered unrun: `partial` (below).
        0 => (false, Ran::answered(false, false)),
        1 if padded == total => {
            let (job, r) = live.into_iter().next().expect("one");
            let elements = input_elements(&job.inputs);
            let shrink = arena.for_run(elements);
            let shrunk = shrink.is_some();
            let how = How {
                options: shrink.or(plain),
                after: limits.of(std::iter::once(&job)),
            };
            match run_one(session, &job, how, pad.bogus) {
                Err(e @ RuntimeError::Stopped { .. }) if limits.here.is_some() => (
                    shrunk,
                    Ran::Requeue(Failed {
                        jobs: vec![job],
                        rows: vec![r],
                        error: e.to_string(),
                    }),
                ),
                Err(RuntimeError::Run(error)) if hand_back() => (
                    shrunk,
                    Ran::HandedBack(Failed {
                        jobs: vec![job],
                        rows: vec![r],
                        error,
                    }),
                ),
                result => {
                    let ok = result.is_ok();
                    let stopped = matches!(result, Err(RuntimeError::Stopped { .. }));
                    limits.stopped_alone(&job, &result);
                    job.completion.complete(result);
                    (shrunk, Ran::answered(ok, stopped))
                }
            }
        }
        _ => {
            let (jobs, rows): (Vec<Job>, Vec<u32>) = live.into_iter().unzip();
            let how = How {
                options: plain,
                after: limits.of(jobs.iter()),
            };
            let (result, shrunk) =
                run_many(session, &jobs, &rows, padded, pad, staging, arena, how);
            match result {
                Ok(results) => {
                    let ok = results.iter().any(Result::is_ok);
                    for (job, r) in jobs.into_iter().zip(results) {
                        job.completion.complete(r);
                    }
                    (shrunk, Ran::answered(ok, false))
                }
                // A light batch that fails on the thread that formed it goes to a worker,
                // which runs its jobs alone (the thread takes requests: it runs nothing long).
                Err(e) if limits.here.is_some() => {
                    let error = e.to_string();
                    (shrunk, Ran::Requeue(Failed { jobs, rows, error }))
                }
                Err(e) => {
                    let stopped = matches!(e, RuntimeError::Stopped { .. });
                    // One request can fail a whole batch (a value ONNX Runtime refuses, such
                    // as an index out of range): each then runs alone, so that only requests
                    // that fail on their own fail, never a stranger's batched beside them.
                    // (On a GPU session kept for one batch size this runs other sizes on it:
                    // slower, once, and only after a failure.) When every one fails alone
                    // too, the device may be what fails: they go back unanswered.
                    // Each run alone has its own limit (its user's: a stranger's endless request
                    // in the batch never gets an honest one stopped), and renews the worker's
                    // heartbeat (every run is bounded: the worker is not stuck). A user whose
                    // requests stop here halves its limit at each (`Strikes`), so what its
                    // endless requests cost the runs alone is about two limits at most.
                    // Users take turns (each one's first request, then each one's second...):
                    // a user's many slow requests in the batch do not all run before another
                    // user's one.
                    tracing::debug!("a batch of {} failed, running each alone: {e}", jobs.len());
                    let (jobs, rows) = in_turns(jobs, rows);
                    let alone: Vec<_> = jobs
                        .into_iter()
                        .map(|job| {
                            // Its user may have been barred by a run alone just before.
                            if let Some(e) = limits.barred(&job) {
                                return (job, Err(e));
                            }
                            limits
                                .heartbeat
                                .store(super::worker::now_ms(), Ordering::Relaxed);
                            let how = How {
                                options: plain,
                                after: limits.of(std::iter::once(&job)),
                            };
                            let result = run_one(session, &job, how, pad.bogus);
                            limits.stopped_alone(&job, &result);
                            (job, result)
                        })
                        .collect();
                    let every = alone
                        .iter()
                        .all(|(_, r)| matches!(r, Err(RuntimeError::Run(_))));
                    let partial = alone
                        .iter()
                        .any(|(_, r)| matches!(r, Err(RuntimeError::Barred { .. })));
                    if every && hand_back() {
                        let error = match &alone[0].1 {
                            Err(RuntimeError::Run(m)) => m.clone(),
                            _ => e.to_string(),
                        };
                        let jobs = alone.into_iter().map(|(job, _)| job).collect();
                        (shrunk, Ran::HandedBack(Failed { jobs, rows, error }))
                    } else {
                        let ok = alone.iter().any(|(_, r)| r.is_ok());
                        let stopped = stopped
                            || alone
                                .iter()
                                .any(|(_, r)| matches!(r, Err(RuntimeError::Stopped { .. })));
                        for (job, result) in alone {
                            job.completion.complete(result);
                        }
                        (
                            shrunk,
                            Ran::Answered {
                                ok,
                                stopped,
                                partial,
                            },
                        )
                    }
                }
            }
        }
    };
    // A run that shrank the arena itself: its freed heap goes back now that the answers
    // are out. (Sessions per batch size run one shape each; only `main` meets larger ones.)
    if shrunk && is_main {
        release_free_memory();
    }
    match ran {
        Ran::Answered { ok, stopped, .. } if live_count < given => Ran::Answered {
            ok,
            stopped,
            partial: true,
        },
        ran => ran,
    }
}

/// `jobs` (with their `rows`) reordered so that their users take turns: every user's first
/// job, in the order they came, then every user's second, and so on.
fn in_turns(jobs: Vec<Job>, rows: Vec<u32>) -> (Vec<Job>, Vec<u32>) {
    let mut seen: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut keyed: Vec<(usize, usize, Job, u32)> = jobs
        .into_iter()
        .zip(rows)
        .enumerate()
        .map(|(i, (job, r))| {
            let turn = seen.entry(job.source).or_default();
            *turn += 1;
            (*turn, i, job, r)
        })
        .collect();
    keyed.sort_by_key(|&(turn, i, _, _)| (turn, i));
    keyed.into_iter().map(|(_, _, job, r)| (job, r)).unzip()
}

/// Runs `values` and borrows the outputs named `names` (all of them must exist). With the
/// options that shrink (see [`ArenaRelease`]), ORT's arena frees its unused blocks when the
/// run ends; past `how.after`, the run is stopped ([`RuntimeError::Stopped`]).
fn with_outputs<R>(
    session: &mut DeviceSession,
    values: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
    names: &[&str],
    how: How<'_>,
    then: impl FnOnce(&[View<'_>]) -> Result<R, RuntimeError>,
) -> Result<R, RuntimeError> {
    // The limit's clock starts once the device's turn has come (see `gate`).
    let outputs = session.with(|session| match how.options {
        Some(options) => {
            let watch = how
                .after
                .and_then(|after| Some((Watch::start(options.clone(), after)?, after)));
            let began = std::time::Instant::now();
            let outputs = session.run_with_options(values, &**options);
            // Stopped, unless it ended just as the limit came (its outputs are good).
            if let Some((w, limit)) = watch
                && w.end()
                && outputs.is_err()
            {
                let took = began.elapsed();
                return Err(RuntimeError::Stopped { limit, took });
            }
            outputs.map_err(|e| run_err(&e))
        }
        None => session.run(values).map_err(|e| run_err(&e)),
    })?;
    let mut tensors = Vec::with_capacity(names.len());
    for &name in names {
        let value = outputs
            .get(name)
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' missing")))?;
        let tensor = value
            .view()
            .downcast::<ort::value::DynTensorValueType>()
            .map_err(|e| run_err(&e))?;
        tensors.push((name, tensor));
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let ty = *tensor.data_type();
        let dtype = dtype_of(ty)
            .ok_or_else(|| RuntimeError::Run(format!("output '{name}' has type {ty:?}")))?;
        views.push(View {
            name,
            dtype,
            shape: tensor.shape().iter().map(|&d| d.max(0) as u64).collect(),
            bytes: raw::tensor_bytes(tensor).map_err(|e| run_err(&e))?,
        });
    }
    then(&views)
}

/// The test hook's input that no model has (`config::TestHooks`, `ort:` devices): ONNX Runtime
/// refuses the run, as a failing execution provider would.
fn bogus_input() -> Result<(Cow<'static, str>, SessionInputValue<'static>), RuntimeError> {
    static ZERO: [u8; 4] = [0; 4];
    let value = raw::tensor_over_bytes(&ZERO, element_type_of(rxd_protocol::DType::Float32), &[1])
        .map_err(|e| run_err(&e))?;
    Ok((Cow::Borrowed("rxd_test_no_such_input"), value))
}

/// Runs one job: inputs straight from where they are (zero copy from the arena or from the
/// request's inline bytes).
fn run_one(
    session: &mut DeviceSession,
    job: &Job,
    how: How<'_>,
    bogus: bool,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(job.inputs.len());
    for t in &job.inputs {
        let ty = element_type_of(t.dtype);
        let value: SessionInputValue<'_> = match &t.data {
            InputData::Inline(bytes) => {
                raw::tensor_over_bytes(bytes, ty, &t.shape).map_err(|e| run_err(&e))?
            }
            InputData::Shared { map, offset, len } => {
                raw::tensor_over_mapping(map, *offset, *len, ty, &t.shape)
                    .map_err(|e| run_err(&e))?
            }
        };
        values.push((Cow::Borrowed(t.name.as_str()), value));
    }
    if bogus {
        values.push(bogus_input()?);
    }
    let names: Vec<&str> = job.outputs.iter().map(String::as_str).collect();
    with_outputs(session, values, &names, how, |views| {
        deliver(views, &job.placement)
    })
}

/// Runs several jobs as one batch: one gather copy of the inputs into batch tensors (padded
/// with zero rows up to `padded` rows), one run, then each job's rows of every output are
/// delivered where that job wants them (the padding rows' outputs are dropped). `how`: the
/// run's options unless it shrinks the arena, and its limit.
#[allow(clippy::too_many_arguments)]
fn run_many(
    session: &mut DeviceSession,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    pad: Pad<'_>,
    staging: &mut Staging,
    arena: &mut ArenaRelease,
    how: How<'_>,
) -> (Results, bool) {
    let mut gathered: Vec<(Vec<u8>, Vec<u64>)> = Vec::with_capacity(jobs[0].inputs.len());
    let mut shrunk = false;
    let result = run_gathered(
        session,
        jobs,
        rows,
        padded,
        pad,
        staging,
        &mut gathered,
        arena,
        how,
        &mut shrunk,
    );
    for (k, (b, _)) in gathered.into_iter().enumerate() {
        staging.put(k, b);
    }
    (result, shrunk)
}

/// Whether every input of `job` with a rows dimension has `rows` rows along it.
fn rows_agree(job: &Job, rows: u32, axes: &super::Axes) -> bool {
    job.inputs
        .iter()
        .enumerate()
        .all(|(k, t)| match axes.input(k) {
            Axis::Rows(a) => t.shape.get(a) == Some(&u64::from(rows)),
            Axis::Shared => true,
        })
}

/// Each job's outputs, or the batch's error.
type Results = Result<Vec<Result<Vec<OutputTensor>, RuntimeError>>, RuntimeError>;

/// [`run_many`]'s work, gathering into `gathered` (buffers from `staging`, returned by the
/// caller whatever happens); `shrunk` says whether the run shrank ORT's arena.
#[allow(clippy::too_many_arguments)]
fn run_gathered(
    session: &mut DeviceSession,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    pad: Pad<'_>,
    staging: &mut Staging,
    gathered: &mut Vec<(Vec<u8>, Vec<u64>)>,
    arena: &mut ArenaRelease,
    how: How<'_>,
    shrunk: &mut bool,
) -> Results {
    let real: u64 = rows.iter().map(|&r| u64::from(r)).sum();
    let total = padded.max(real);
    let (axes, first) = (pad.axes, &jobs[0]);
    let incompatible = || RuntimeError::Run("incompatible requests in one batch".into());
    for (k, t) in first.inputs.iter().enumerate() {
        gathered.push((staging.take(k), Vec::new()));
        let axis = axes.input(k);
        let mut parts = Vec::with_capacity(jobs.len());
        for (job, &r) in jobs.iter().zip(rows) {
            let input = job
                .inputs
                .get(k)
                .filter(|i| i.name == t.name && i.dtype == t.dtype && same_but_rows(i, t, axis))
                .filter(|i| match axis {
                    // Each part has the rows it was counted with (its outputs are split so).
                    Axis::Rows(a) => i.shape.get(a) == Some(&u64::from(r)),
                    Axis::Shared => true,
                })
                .ok_or_else(incompatible)?;
            parts.push(input);
        }
        let (bytes, shape) = &mut gathered[k];
        match axis {
            Axis::Rows(a) => {
                let layout = Layout::of(&t.shape, a, t.dtype.byte_len(1).unwrap_or(1))
                    .ok_or_else(incompatible)?;
                gather(bytes, &parts, a, layout, total)?;
                *shape = t.shape.clone();
                shape[a] = total;
            }
            Axis::Shared => {
                // Every request gives the same value (the scheduler batches only equal inline
                // values; checked again here): the batch runs with it once.
                let InputData::Inline(value) = &t.data else {
                    return Err(incompatible());
                };
                if parts
                    .iter()
                    .any(|p| !matches!(&p.data, InputData::Inline(v) if v == value))
                {
                    return Err(incompatible());
                }
                bytes.extend_from_slice(value);
                *shape = t.shape.clone();
            }
        }
    }
    // The batch tensors are built over the gathered buffers (no second copy).
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(gathered.len());
    for (t, (bytes, shape)) in first.inputs.iter().zip(gathered.iter()) {
        let tensor = raw::tensor_over_bytes(bytes, element_type_of(t.dtype), shape)
            .map_err(|e| run_err(&e))?;
        values.push((Cow::Borrowed(t.name.as_str()), tensor));
    }
    if pad.bogus {
        values.push(bogus_input()?);
    }
    // Every output any job wants, in first-seen order, with where its rows are.
    let mut names: Vec<&str> = Vec::new();
    for job in jobs {
        for o in &job.outputs {
            if !names.contains(&o.as_str()) {
                names.push(o);
            }
        }
    }
    let elements = elements_of(gathered.iter().map(|(_, shape)| shape.as_slice()));
    let shrink = arena.for_run(elements);
    *shrunk = shrink.is_some();
    let how = How {
        options: shrink.or(how.options),
        ..how
    };
    with_outputs(session, values, &names, how, |views| {
        let mut layouts = Vec::with_capacity(views.len());
        for v in views {
            let a = match axes.output(v.name) {
                Axis::Rows(a) => a,
                Axis::Shared => usize::MAX,
            };
            let layout = Layout::of(&v.shape, a, v.dtype.byte_len(1).unwrap_or(1))
                .filter(|l| v.shape[a] == total && l.bytes(total) == v.bytes.len() as u64)
                .ok_or_else(|| {
                    RuntimeError::Run(format!(
                        "output '{}' has shape {:?}, not {total} rows along dimension {a}: the \
                         model cannot batch (model.toml batch-axes)",
                        v.name, v.shape
                    ))
                })?;
            layouts.push((a, layout));
        }
        let mut start = 0u64;
        let mut results = Vec::with_capacity(jobs.len());
        for (job, &r) in jobs.iter().zip(rows) {
            let r = u64::from(r);
            // A job's rows of an output: one slice where they are contiguous (rows along
            // dimension 0), else copied out of each outer block.
            let mut parts: Vec<(usize, Cow<'_, [u8]>)> = Vec::with_capacity(job.outputs.len());
            for name in &job.outputs {
                let i = views
                    .iter()
                    .position(|v| v.name == name)
                    .expect("collected above");
                parts.push((i, layouts[i].1.rows_of(views[i].bytes, total, start, r)));
            }
            let mine: Vec<View<'_>> = parts
                .iter()
                .map(|(i, bytes)| {
                    let v = &views[*i];
                    let mut shape = v.shape.clone();
                    shape[layouts[*i].0] = r;
                    View {
                        name: v.name,
                        dtype: v.dtype,
                        shape,
                        bytes: bytes.as_ref(),
                    }
                })
                .collect();
            results.push(deliver(&mine, &job.placement));
            start += r;
        }
        Ok(results)
    })
}

/// Whether input `i` can run in one batch with `t`: the same shape but for the rows dimension
/// (for a shared input, the same shape).
fn same_but_rows(i: &super::job::InputTensor, t: &super::job::InputTensor, axis: Axis) -> bool {
    match axis {
        Axis::Rows(a) => {
            i.shape.len() == t.shape.len()
                && a < t.shape.len()
                && i.shape[..a] == t.shape[..a]
                && i.shape[a + 1..] == t.shape[a + 1..]
        }
        Axis::Shared => i.shape == t.shape,
    }
}

/// A tensor seen as `outer` blocks, each of some rows of `inner` bytes: rows along dimension
/// `a` of a row-major shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    outer: u64,
    inner: u64,
}

impl Layout {
    /// The layout of `shape` with rows along dimension `a`, elements of `element` bytes
    /// (`None` if `a` is not a dimension of it or the sizes overflow).
    fn of(shape: &[u64], a: usize, element: u64) -> Option<Layout> {
        if a >= shape.len() {
            return None;
        }
        let product = |dims: &[u64]| dims.iter().try_fold(1u64, |p, &d| p.checked_mul(d));
        Some(Layout {
            outer: product(&shape[..a])?,
            inner: product(&shape[a + 1..])?.checked_mul(element)?,
        })
    }

    /// Bytes of a tensor of `rows` rows.
    fn bytes(&self, rows: u64) -> u64 {
        self.outer.saturating_mul(rows).saturating_mul(self.inner)
    }

    /// Rows `start..start + r` of a tensor of `total` rows laid out so: borrowed when they
    /// are contiguous (one outer block), copied otherwise.
    fn rows_of<'b>(&self, bytes: &'b [u8], total: u64, start: u64, r: u64) -> Cow<'b, [u8]> {
        let (inner, outer) = (self.inner as usize, self.outer as usize);
        let (total, start, r) = (total as usize, start as usize, r as usize);
        if outer == 1 {
            return Cow::Borrowed(&bytes[start * inner..(start + r) * inner]);
        }
        let mut out = Vec::with_capacity(outer * r * inner);
        for o in 0..outer {
            let from = (o * total + start) * inner;
            out.extend_from_slice(&bytes[from..from + r * inner]);
        }
        Cow::Owned(out)
    }
}

/// Gathers `parts` (inputs with their rows along dimension `a`, laid out as `layout` with
/// their own row counts) into one tensor of `total` rows in `dst` (empty, its capacity
/// reused); rows past the parts' are zeros (padding).
fn gather(
    dst: &mut Vec<u8>,
    parts: &[&super::job::InputTensor],
    a: usize,
    layout: Layout,
    total: u64,
) -> Result<(), RuntimeError> {
    let short = || RuntimeError::Run("an input is shorter than its shape".into());
    let rows: Vec<u64> = parts
        .iter()
        .map(|p| p.shape.get(a).copied().unwrap_or(0))
        .collect();
    let size = usize::try_from(layout.bytes(total))
        .ok()
        .filter(|_| {
            rows.iter()
                .try_fold(0u64, |s, &r| s.checked_add(r))
                .is_some_and(|s| s <= total)
        })
        .ok_or_else(|| RuntimeError::Run("incompatible requests in one batch".into()))?;
    let inner = layout.inner as usize;
    // Copies `to.len()` bytes of a part from byte `from` on.
    let copy = |data: &InputData, from: usize, to: &mut [u8]| -> Result<(), RuntimeError> {
        match data {
            InputData::Inline(b) => {
                to.copy_from_slice(b.get(from..from + to.len()).ok_or_else(short)?);
                Ok(())
            }
            InputData::Shared { map, offset, len } => {
                if (from + to.len()) as u64 > *len {
                    return Err(short());
                }
                map.copy_out(offset + from as u64, to)
                    .map_err(|e| RuntimeError::Run(e.to_string()))
            }
        }
    };
    if layout.outer == 1 {
        // Rows along the outermost dimension: each part is one contiguous run, appended.
        for (p, &r) in parts.iter().zip(&rows) {
            let n = r as usize * inner;
            match &p.data {
                InputData::Inline(b) => dst.extend_from_slice(b.get(..n).ok_or_else(short)?),
                InputData::Shared { map, offset, len } => {
                    if n as u64 > *len {
                        return Err(short());
                    }
                    map.extend_out(*offset, n as u64, dst)
                        .map_err(|e| RuntimeError::Run(e.to_string()))?;
                }
            }
        }
        dst.resize(size, 0);
        return Ok(());
    }
    // Rows inside each outer block: every part contributes its rows to every block.
    dst.resize(size, 0);
    let total = total as usize;
    let mut start = 0usize;
    for (p, &r) in parts.iter().zip(&rows) {
        let n = r as usize * inner;
        for o in 0..layout.outer as usize {
            let to = (o * total + start) * inner;
            copy(&p.data, o * n, &mut dst[to..to + n])?;
        }
        start += r as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::InputTensor;
    use rxd_protocol::DType;

    /// An inline f32 input of `shape` whose elements count up from `base`.
    fn input(shape: &[u64], base: f32) -> InputTensor {
        let n: u64 = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|i| (base + i as f32).to_ne_bytes())
            .collect();
        InputTensor {
            name: "x".into(),
            dtype: DType::Float32,
            shape: shape.to_vec(),
            data: InputData::Inline(bytes),
        }
    }

    fn bytes_of(t: &InputTensor) -> &[u8] {
        match &t.data {
            InputData::Inline(b) => b,
            InputData::Shared { .. } => unreachable!(),
        }
    }

    struct Nothing;
    impl crate::runtime::Completion for Nothing {
        fn complete(self: Box<Self>, _: Result<Vec<OutputTensor>, RuntimeError>) {}
    }

    #[test]
    fn users_take_turns_in_a_failed_batchs_runs_alone() {
        let job = |source: u64, tag: u32| {
            let j = Job {
                inputs: Vec::new(),
                outputs: Vec::new(),
                placement: Default::default(),
                completion: Box::new(Nothing),
                bounded: true,
                source,
            };
            (j, tag)
        };
        // User 1 sent five, then user 2 one, user 3 two.
        let order = [1, 1, 1, 1, 1, 2, 3, 3];
        let (jobs, rows): (Vec<Job>, Vec<u32>) = order
            .iter()
            .enumerate()
            .map(|(i, &s)| job(s, i as u32))
            .unzip();
        let (jobs, rows) = in_turns(jobs, rows);
        let sources: Vec<u64> = jobs.iter().map(|j| j.source).collect();
        assert_eq!(sources, [1, 2, 3, 1, 3, 1, 1, 1]);
        // Each job keeps its rows, and each user's jobs their order.
        assert_eq!(rows, [0, 5, 6, 1, 7, 2, 3, 4]);
    }

    /// Gathering parts (inline and in an arena) along any dimension and taking each part's rows
    /// back out gives every part's bytes back, and the padding rows are zeros, for several
    /// shapes and row counts.
    #[test]
    fn gathered_rows_split_back_into_each_part_along_any_dimension() {
        let cases: &[(&[u64], usize, &[u64])] = &[
            // (a part's shape with its rows set to 0, the rows dimension, each part's rows)
            (&[0, 3], 0, &[1, 2, 1]),
            (&[2, 0, 4], 1, &[1, 1, 3]),
            (&[2, 0, 128], 1, &[1, 1, 1, 1, 1, 1, 1, 1]),
            (&[3, 2, 0], 2, &[2, 1]),
            (&[0], 0, &[5, 2]),
        ];
        for &(shape, a, rows) in cases {
            // Every other part lies in an arena, as a client's shared input does; `want` keeps
            // each part's bytes.
            let fd = rxd_shm::create_sealed("rxd-gather-test", 1 << 16).unwrap();
            let map = std::sync::Arc::new(
                rxd_shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), 1 << 16).unwrap(),
            );
            let mut at = 64u64;
            let mut want: Vec<Vec<u8>> = Vec::new();
            let parts: Vec<InputTensor> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| {
                    let mut s = shape.to_vec();
                    s[a] = r;
                    let mut part = input(&s, 1000.0 * (i + 1) as f32);
                    let bytes = bytes_of(&part).to_vec();
                    if i % 2 == 1 {
                        map.copy_in(at, &bytes).unwrap();
                        let len = bytes.len() as u64;
                        part.data = InputData::Shared {
                            map: map.clone(),
                            offset: at,
                            len,
                        };
                        at += len + 8;
                    }
                    want.push(bytes);
                    part
                })
                .collect();
            let refs: Vec<&InputTensor> = parts.iter().collect();
            let real: u64 = rows.iter().sum();
            for total in [real, real + 3] {
                let mut full = shape.to_vec();
                full[a] = total;
                let layout = Layout::of(&full, a, 4).unwrap();
                let mut dst = Vec::new();
                gather(&mut dst, &refs, a, layout, total).unwrap();
                assert_eq!(dst.len() as u64, layout.bytes(total), "{shape:?} along {a}");
                let mut start = 0;
                for (bytes, &r) in want.iter().zip(rows) {
                    let back = layout.rows_of(&dst, total, start, r);
                    assert_eq!(
                        &*back,
                        &bytes[..],
                        "{shape:?} along {a}, rows {start}..+{r}"
                    );
                    start += r;
                }
                let pad = layout.rows_of(&dst, total, real, total - real);
                assert!(pad.iter().all(|&b| b == 0), "padding rows are zeros");
            }
        }
    }

    #[test]
    fn parts_with_more_rows_than_the_batch_are_refused_not_indexed() {
        let parts = [input(&[2, 3, 4], 0.0), input(&[2, 3, 4], 1.0)];
        let refs: Vec<&InputTensor> = parts.iter().collect();
        let layout = Layout::of(&[2, 4, 4], 1, 4).unwrap();
        let mut dst = Vec::new();
        assert!(
            gather(&mut dst, &refs, 1, layout, 4).is_err(),
            "6 rows into 4"
        );
        let short = InputTensor {
            data: InputData::Inline(vec![0; 8]),
            ..input(&[2, 1, 4], 0.0)
        };
        let mut dst = Vec::new();
        assert!(
            gather(&mut dst, &[&short], 1, layout, 4).is_err(),
            "bytes shorter than the shape"
        );
    }

    #[test]
    fn a_layout_needs_the_dimension_and_sizes_that_fit() {
        assert_eq!(
            Layout::of(&[2, 5, 128], 1, 4),
            Some(Layout {
                outer: 2,
                inner: 512
            })
        );
        assert_eq!(Layout::of(&[2, 5], 2, 4), None);
        assert_eq!(Layout::of(&[2, u64::MAX], 0, 4), None);
        assert_eq!(Layout::of(&[u64::MAX, 2, 2], 2, 4), None, "outer overflows");
    }
}
