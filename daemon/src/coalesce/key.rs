//! A request's key (arena inputs copied and hashed a piece at a time), and keying off the IO
//! thread: the pool of threads that keys large requests and the daemon-wide budget of the
//! bytes those requests hold.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::{Completion, InputData, InputTensor, OutputTensor, RuntimeError};

use super::{KEY_THREADS, Key};

/// Arena inputs are copied and hashed in pieces of this size (the piece just copied is hashed
/// while it is still in the cache).
const KEY_CHUNK: usize = 1 << 20;

thread_local! {
    /// Arena bytes this thread copied to key requests ([`copied_here`]).
    static COPIED_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Arena bytes the calling thread copied to key requests since it last asked: the ring
/// poller counts what keying a user's request cost it against that user's round.
pub fn copied_here() -> u64 {
    COPIED_HERE.replace(0)
}

/// The key of a request; arena inputs are copied (and replaced by the copies) as they are
/// hashed, a piece at a time. `None` if an arena input cannot be read.
pub(super) fn key(
    source: u64,
    model: &str,
    version: u64,
    inputs: &mut [InputTensor],
    outputs: &[String],
) -> Option<Key> {
    let mut h = blake3::Hasher::new();
    let field = |h: &mut blake3::Hasher, b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(&mut h, &source.to_le_bytes());
    field(&mut h, model.as_bytes());
    field(&mut h, &version.to_le_bytes());
    for t in inputs.iter_mut() {
        field(&mut h, t.name.as_bytes());
        field(&mut h, t.dtype.name().as_bytes());
        for d in &t.shape {
            field(&mut h, &d.to_le_bytes());
        }
        match &t.data {
            InputData::Inline(b) => field(&mut h, b),
            InputData::Shared { map, offset, len } => {
                // Hashed exactly as an inline input of the same bytes: the copy is what runs.
                let mut copy = vec![0u8; usize::try_from(*len).ok()?];
                h.update(&len.to_le_bytes());
                let mut at = 0usize;
                for piece in copy.chunks_mut(KEY_CHUNK) {
                    map.copy_out(offset.checked_add(at as u64)?, piece).ok()?;
                    h.update(piece);
                    at += piece.len();
                }
                COPIED_HERE.set(COPIED_HERE.get().saturating_add(*len));
                t.data = InputData::Inline(copy);
            }
        }
    }
    for o in outputs {
        field(&mut h, o.as_bytes());
    }
    Some(*h.finalize().as_bytes())
}

/// Bytes that requests keyed off the IO thread may hold at once (see [`set_key_budget`]).
static KEY_BUDGET: AtomicU64 = AtomicU64::new(1 << 30);
/// Bytes they hold now.
pub(super) static KEY_HELD: AtomicU64 = AtomicU64::new(0);

/// Sets the daemon-wide bound on the bytes of requests being keyed off the IO thread (arena
/// inputs copied or being copied, inputs being hashed). The daemon passes its
/// `arena-total-bytes`: at most one more copy of what clients may make it map.
pub fn set_key_budget(bytes: u64) {
    KEY_BUDGET.store(bytes, Ordering::Relaxed);
}

/// A share of the key budget, returned on drop.
#[derive(Debug)]
pub(super) struct Charge(u64);

impl Charge {
    /// Takes `bytes` of the budget, or nothing if that would overspend it — except that a
    /// request alone may always take it (so that one large request is still keyed).
    pub(super) fn take(bytes: u64) -> Option<Charge> {
        let budget = KEY_BUDGET.load(Ordering::Relaxed);
        KEY_HELD
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let after = held.checked_add(bytes)?;
                (held == 0 || after <= budget).then_some(after)
            })
            .ok()
            .map(|_| Charge(bytes))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        KEY_HELD.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// A completion that holds a share of the key budget until the request is answered (its
/// input copies live in the job until then).
pub(super) struct Charged {
    pub(super) inner: Box<dyn Completion>,
    pub(super) _charge: Charge,
}

impl Completion for Charged {
    fn is_abandoned(&self) -> bool {
        self.inner.is_abandoned()
    }

    fn complete(self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>) {
        self.inner.complete(result);
    }
}

pub(super) type Task = Box<dyn FnOnce() + Send>;

/// Threads that key large requests, fed through one channel (first come, first served).
pub(super) struct KeyPool {
    tx: crossbeam_channel::Sender<Task>,
}

impl KeyPool {
    pub(super) fn run(&self, task: Task) {
        if let Err(e) = self.tx.send(task) {
            // The threads never exit while the sender lives; run it here rather than drop it.
            (e.0)();
        }
    }
}

pub(super) fn key_pool() -> &'static KeyPool {
    static POOL: OnceLock<KeyPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Task>();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = (cores / 2).clamp(1, KEY_THREADS);
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rxd-key-{i}"))
                .spawn(move || {
                    for task in rx {
                        task();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a key thread: {e}");
            }
        }
        KeyPool { tx }
    })
}
