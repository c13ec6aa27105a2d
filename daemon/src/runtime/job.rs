//! What workers are given and give back: validated input tensors (inline or over a client's
//! arena), where each output goes, the [`Completion`] that answers a job exactly once, jobs
//! and batches, and the size a batch runs at.

use std::sync::Arc;

use rxd_protocol::DType;
use rxd_shm::Mapping;

use super::RuntimeError;

/// A validated input: its bytes match dtype × shape (checked by `validate`).
#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: InputData,
}

/// Where an input's bytes are.
#[derive(Debug)]
pub enum InputData {
    /// Decoded from the frame.
    Inline(Vec<u8>),
    /// In the client's arena (range and alignment checked). The bytes may change under us at
    /// any time; they are only ever handed to ORT as raw memory, never read as Rust data.
    Shared {
        map: Arc<Mapping>,
        offset: u64,
        len: u64,
    },
}

/// Where one output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    /// Back in the response frame.
    Inline,
    /// At this region of the client's arena.
    Region { offset: u64, len: u64 },
    /// Packed into the request's output area.
    Area,
}

/// Where a job's outputs go: one target per wanted output.
#[derive(Debug, Default)]
pub struct Placement {
    pub arena: Option<Arc<Mapping>>,
    pub targets: Vec<OutputTarget>,
    /// The output area (offset, len), when any target is `Area`.
    pub area: Option<(u64, u64)>,
    /// An output that does not fit its region or the rest of the area goes inline instead of
    /// failing the job (`InferRequest::inline_overflow`).
    pub inline_overflow: bool,
}

/// One output of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: OutputData,
}

/// Where an output's bytes were put.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Inline(Vec<u8>),
    /// Written into the client's arena.
    Arena {
        offset: u64,
        len: u64,
    },
}

/// What happens when a job is done. Called exactly once, on the worker thread that ran the
/// job (or on the submitting thread when the job could not be queued). The connection's
/// implementation encodes the response and writes it to the client straight from the worker,
/// so an answer needs no hop back through the async runtime.
pub trait Completion: Send {
    /// True when nobody waits for the result any more (the client is gone): the job is skipped
    /// and completed with [`RuntimeError::Abandoned`]. A `true` is final: the caller commits to
    /// skipping (a coalescing group closes itself to joiners when it answers `true`).
    fn is_abandoned(&self) -> bool {
        false
    }
    fn complete(self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>);
}

/// A unit of work for a model's workers.
pub struct Job {
    pub inputs: Vec<InputTensor>,
    /// Output names to return (non-empty, validated).
    pub outputs: Vec<String>,
    pub placement: Placement,
    pub completion: Box<dyn Completion>,
    /// A non-admin's: a run that holds it is stopped past the pool's run limit
    /// ([`Crew::run_limit`](super::Crew::run_limit)).
    pub bounded: bool,
    /// Who asked (the peer's uid): its runs stopped lately shorten its limit.
    pub source: u64,
}

/// Jobs that run together as one batch (concatenated along dimension 0), or one job alone.
pub struct Batch {
    pub jobs: Vec<Job>,
    /// Rows of each job (dimension 0 of its inputs), same order.
    pub rows: Vec<u32>,
    /// When each job arrived (for latency metrics), same order.
    pub arrived: Vec<std::time::Instant>,
    /// When the scheduler took a worker for it (the worker is the scheduler's from then on).
    pub dispatched: std::time::Instant,
    /// The lane (a device's workers) it was routed to, told back to the listener.
    pub lane: usize,
    /// The compute the router expected of it there (taken off the lane's backlog when done).
    pub expected: std::time::Duration,
    /// Already handed back once by a failing device and routed again (a batch is retried
    /// once).
    pub retried: bool,
    /// The lane whose run of it failed inside ONNX Runtime, and how: should it succeed here,
    /// that device is to blame ([`BatchListener::blame`]); should it fail here too, the
    /// requests are (and nobody is blamed).
    pub failed_on: Option<Box<(usize, String)>>,
    /// Split off a batch the policy formed, to try a lane with one request (a probe, or a
    /// lane not measured yet): its end frees none of the policy's worker slots (the rest of
    /// the batch holds that one).
    pub extra: bool,
}

impl Batch {
    /// Its jobs' input elements in all.
    pub fn elements(&self) -> u64 {
        self.jobs
            .iter()
            .map(|j| super::input_elements(&j.inputs))
            .fold(0, u64::saturating_add)
    }

    /// A batch formed now and routed to `lane`, expected to take `expected` there.
    pub fn new(
        jobs: Vec<Job>,
        rows: Vec<u32>,
        arrived: Vec<std::time::Instant>,
        lane: usize,
        expected: std::time::Duration,
    ) -> Batch {
        Batch {
            jobs,
            rows,
            arrived,
            dispatched: std::time::Instant::now(),
            lane,
            expected,
            retried: false,
            failed_on: None,
            extra: false,
        }
    }
}

/// What a worker tells of a batch it finished.
pub struct Finished<'a> {
    /// The lane it ran on.
    pub lane: usize,
    /// The compute the router expected of it.
    pub expected: std::time::Duration,
    pub rows: u32,
    /// The worker's time on the batch.
    pub compute: std::time::Duration,
    /// From dispatch to now: what the batch cost the scheduler in worker time, hand-over
    /// included.
    pub occupied: std::time::Duration,
    /// When each of its jobs arrived; empty for a batch handed back unrun.
    pub arrived: &'a [std::time::Instant],
    /// [`Batch::extra`]: its end frees no slot of the policy's.
    pub extra: bool,
    /// Its jobs' input elements in all.
    pub elements: u64,
    /// A run of it was stopped past its limit: its time says nothing of what such a batch
    /// costs.
    pub stopped: bool,
    /// The one user all its jobs came from (`None`: several, or none).
    pub source: Option<u64>,
}

/// Told when a worker finishes a batch (the scheduler, held weakly by the workers).
pub trait BatchListener: Send + Sync {
    /// A worker finished a batch (or it was handed back unrun: no `arrived`).
    fn batch_done(&self, done: Finished<'_>);

    /// The worker's device failed the batch before any job was answered: the listener retries
    /// it elsewhere or answers it. The test hook that fails a device's runs hands batches back
    /// this way (the device is known to be at fault).
    fn batch_failed(&self, lane: usize, batch: Batch, error: String);

    /// Whether a batch that ONNX Runtime failed on `lane` could be tried on another device
    /// (one is usable, and the batch was not retried already).
    fn can_retry(&self, lane: usize, retried: bool) -> bool;

    /// ONNX Runtime failed every request of the batch, each run alone too: the device may be
    /// at fault (an execution provider that fails every run, a lost GPU) or the requests may
    /// be (a value ONNX Runtime refuses). The listener retries it once on another device,
    /// marking it `failed_on` this lane, or answers it with `error`.
    fn run_failed(&self, lane: usize, batch: Batch, error: String);

    /// A batch that failed on `lane` ran here: that device is at fault.
    fn blame(&self, lane: usize, error: String);
}

/// The size a batch of `rows` rows runs at: the smallest of `pad_to` that holds it, or its own
/// size when none does (or `pad_to` is empty).
pub fn padded_rows(rows: u64, pad_to: &[u32]) -> u64 {
    pad_to
        .iter()
        .map(|&b| u64::from(b))
        .find(|&b| b >= rows)
        .unwrap_or(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_to_the_smallest_size_that_holds_them() {
        let sizes = [1, 2, 4, 8, 16, 32];
        let got: Vec<u64> = [1, 2, 3, 5, 8, 9, 17, 32]
            .iter()
            .map(|&r| padded_rows(r, &sizes))
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 8, 16, 32, 32]);
        assert_eq!(padded_rows(40, &sizes), 40, "larger than every size: as is");
        assert_eq!(padded_rows(3, &[]), 3, "no sizes: as is");
        assert_eq!(padded_rows(3, &[16]), 16);
    }
}
