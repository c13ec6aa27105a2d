//! Running a batch on a worker's session: one job alone straight from where its inputs are
//! (zero copy from the arena or the request's bytes), several as one batch gathered into the
//! worker's reused buffers (padded to the batch size its session runs) and split back per job;
//! every job completed exactly once.
//! Boundary: the worker thread calls in; outputs go out through `deliver`.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};

use super::deliver::{View, deliver};
use super::job::{Batch, InputData, Job, OutputTensor, padded_rows};
use super::worker::{ArenaRelease, WorkerSessions};
use super::{RuntimeError, dtype_of, element_type_of, raw, release_free_memory, run_err};

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
fn elements_of<'a>(shapes: impl IntoIterator<Item = &'a [u64]>) -> u64 {
    shapes
        .into_iter()
        .map(|s| s.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
        .fold(0u64, u64::saturating_add)
}

/// Runs a batch and completes every job in it.
pub(super) fn run_batch(
    sessions: &mut WorkerSessions,
    batch: Batch,
    pad_to: &[u32],
    staging: &mut Staging,
) {
    let Batch { jobs, rows, .. } = batch;
    let mut live: Vec<(Job, u32)> = Vec::with_capacity(jobs.len());
    for (j, r) in jobs.into_iter().zip(rows) {
        if !j.completion.is_abandoned() {
            live.push((j, r));
            continue;
        }
        // Nobody waits for it: skip the work, still complete it (bookkeeping).
        j.completion.complete(Err(RuntimeError::Abandoned));
    }
    let total: u64 = live.iter().map(|(_, r)| u64::from(*r)).sum();
    let padded = padded_rows(total, pad_to);
    let (session, arena, is_main) = sessions.for_rows(padded);
    let shrunk = match live.len() {
        0 => false,
        1 if padded == total => {
            let (job, _) = live.into_iter().next().expect("one");
            let elements = elements_of(job.inputs.iter().map(|t| t.shape.as_slice()));
            let shrink = arena.for_run(elements);
            let shrunk = shrink.is_some();
            let result = run_one(session, &job, shrink);
            job.completion.complete(result);
            shrunk
        }
        _ => {
            let (jobs, rows): (Vec<Job>, Vec<u32>) = live.into_iter().unzip();
            let (result, shrunk) = run_many(session, &jobs, &rows, padded, staging, arena);
            match result {
                Ok(results) => {
                    for (job, r) in jobs.into_iter().zip(results) {
                        job.completion.complete(r);
                    }
                }
                Err(e) => {
                    for job in jobs {
                        job.completion
                            .complete(Err(RuntimeError::Run(e.to_string())));
                    }
                }
            }
            shrunk
        }
    };
    // A run that shrank the arena itself: its freed heap goes back now that the answers
    // are out. (Sessions per batch size run one shape each; only `main` meets larger ones.)
    if shrunk && is_main {
        release_free_memory();
    }
}

/// Runs `values` and borrows the outputs named `names` (all of them must exist).
/// With `shrink` (see [`ArenaRelease`]), ORT's arena frees its unused blocks when the run
/// ends.
fn with_outputs<R>(
    session: &mut Session,
    values: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
    names: &[&str],
    shrink: Option<&ort::session::RunOptions>,
    then: impl FnOnce(&[View<'_>]) -> Result<R, RuntimeError>,
) -> Result<R, RuntimeError> {
    let outputs = match shrink {
        Some(options) => session.run_with_options(values, options),
        None => session.run(values),
    }
    .map_err(|e| run_err(&e))?;
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

/// Runs one job: inputs straight from where they are (zero copy from the arena or from the
/// request's inline bytes).
fn run_one(
    session: &mut Session,
    job: &Job,
    shrink: Option<&ort::session::RunOptions>,
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
    let names: Vec<&str> = job.outputs.iter().map(String::as_str).collect();
    with_outputs(session, values, &names, shrink, |views| {
        deliver(views, &job.placement)
    })
}

/// Runs several jobs as one batch: one gather copy of the inputs into batch tensors (padded
/// with zero rows up to `padded` rows), one run, then each job's rows of every output are
/// delivered where that job wants them (the padding rows' outputs are dropped).
fn run_many(
    session: &mut Session,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    staging: &mut Staging,
    arena: &mut ArenaRelease,
) -> (Results, bool) {
    let mut gathered: Vec<(Vec<u8>, Vec<u64>)> = Vec::with_capacity(jobs[0].inputs.len());
    let mut shrunk = false;
    let result = run_gathered(
        session,
        jobs,
        rows,
        padded,
        staging,
        &mut gathered,
        arena,
        &mut shrunk,
    );
    for (k, (b, _)) in gathered.into_iter().enumerate() {
        staging.put(k, b);
    }
    (result, shrunk)
}

/// Each job's outputs, or the batch's error.
type Results = Result<Vec<Result<Vec<OutputTensor>, RuntimeError>>, RuntimeError>;

/// [`run_many`]'s work, gathering into `gathered` (buffers from `staging`, returned by the
/// caller whatever happens); `shrunk` says whether the run shrank ORT's arena.
#[allow(clippy::too_many_arguments)]
fn run_gathered(
    session: &mut Session,
    jobs: &[Job],
    rows: &[u32],
    padded: u64,
    staging: &mut Staging,
    gathered: &mut Vec<(Vec<u8>, Vec<u64>)>,
    arena: &mut ArenaRelease,
    shrunk: &mut bool,
) -> Results {
    let real: u64 = rows.iter().map(|&r| u64::from(r)).sum();
    let total = padded.max(real);
    let first = &jobs[0];
    for (k, t) in first.inputs.iter().enumerate() {
        gathered.push((staging.take(k), Vec::new()));
        let bytes = &mut gathered[k].0;
        for job in jobs {
            let input = job
                .inputs
                .get(k)
                .filter(|i| {
                    i.name == t.name && i.dtype == t.dtype && i.shape.get(1..) == t.shape.get(1..)
                })
                .ok_or_else(|| RuntimeError::Run("incompatible requests in one batch".into()))?;
            match &input.data {
                InputData::Inline(b) => bytes.extend_from_slice(b),
                InputData::Shared { map, offset, len } => {
                    let start = bytes.len();
                    bytes.resize(start + *len as usize, 0);
                    map.copy_out(*offset, &mut bytes[start..])
                        .map_err(|e| RuntimeError::Run(e.to_string()))?;
                }
            }
        }
        if total > real && real > 0 {
            let row = bytes.len() as u64 / real;
            bytes.resize((row * total) as usize, 0);
        }
        let mut shape = t.shape.clone();
        shape[0] = total;
        gathered[k].1 = shape;
    }
    // The batch tensors are built over the gathered buffers (no second copy).
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(gathered.len());
    for (t, (bytes, shape)) in first.inputs.iter().zip(gathered.iter()) {
        let tensor = raw::tensor_over_bytes(bytes, element_type_of(t.dtype), shape)
            .map_err(|e| run_err(&e))?;
        values.push((Cow::Borrowed(t.name.as_str()), tensor));
    }
    // Every output any job wants, in first-seen order.
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
    with_outputs(session, values, &names, shrink, |views| {
        for v in views {
            if v.shape.first() != Some(&total)
                || !(v.bytes.len() as u64).is_multiple_of(total.max(1))
            {
                return Err(RuntimeError::Run(format!(
                    "output '{}' has shape {:?}, not {total} rows: the model cannot batch",
                    v.name, v.shape
                )));
            }
        }
        let mut start = 0u64;
        let mut results = Vec::with_capacity(jobs.len());
        for (job, &r) in jobs.iter().zip(rows) {
            let r = u64::from(r);
            let mine: Vec<View<'_>> = job
                .outputs
                .iter()
                .map(|name| {
                    let v = views
                        .iter()
                        .find(|v| v.name == name)
                        .expect("collected above");
                    let row_bytes = v.bytes.len() as u64 / total.max(1);
                    let mut shape = v.shape.clone();
                    shape[0] = r;
                    let (a, b) = (
                        (start * row_bytes) as usize,
                        ((start + r) * row_bytes) as usize,
                    );
                    View {
                        name: v.name,
                        dtype: v.dtype,
                        shape,
                        bytes: &v.bytes[a..b],
                    }
                })
                .collect();
            results.push(deliver(&mine, &job.placement));
            start += r;
        }
        Ok(results)
    })
}
