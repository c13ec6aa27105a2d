//! Identical-request coalescing and the result cache of one model version.
//!
//! A request's key is a BLAKE3 hash of the user who sent it, the model version, every input's
//! name, dtype, shape and bytes, and the outputs asked for. Requests are never coalesced with,
//! nor answered from the cache of, another user's: whether another user sent an input would
//! show in the answer's timing and in the counts any user may read. Identical requests of a
//! user in flight at the same time run once:
//! the first one (the leader) runs with its outputs returned inline to a group completion,
//! which then delivers the same bytes to every member where that member wants them (inline or
//! its own arena region). With a cache (`cache-bytes` > 0), finished results are kept in an
//! LRU bounded in bytes and answer repeats without running. Answers from either path are
//! byte-identical to a fresh run: they are copies of the bytes ORT produced.
//!
//! A request joins a group in flight only if the group cannot fail it for a reason of the
//! leader's: the group's priority is at least the joiner's and its deadline no earlier (no
//! deadline is the latest). Otherwise it leads a group of its own (several groups may then
//! share a key), so no request ever fails or waits because of another client's settings.
//!
//! Keying is per-byte work (a copy of arena inputs and a hash, about 1 ms per MB): requests
//! with more than [`INLINE_KEY_BYTES`] of input are keyed on a small pool of threads
//! ([`KEY_THREADS`] at most) and routed from there once the key is known, never on the
//! connection's IO thread. What those requests hold (copies being made or made, bytes being
//! hashed) is bounded daemon-wide by [`set_key_budget`] (the daemon's `arena-total-bytes`);
//! a request that finds the budget spent runs without being keyed (a fresh run, neither
//! cached nor coalesced), so a client cannot make the daemon copy without bound.
//!
//! Coalescing is on by default for requests with at most `coalesce-max-bytes` of input
//! (model.toml; 16 KiB by default, since hashing and copying image-sized inputs costs
//! throughput); larger requests opt in per model, and the cache is opt-in.
//!
//! Without the cache, keying pays only where duplicates come, and costs every request where
//! none do (a stream of voice frames or camera crops is never twice the same). So a version
//! whose last [`QUIET_AFTER`] keyed requests all found nothing to join stops keying, but for
//! a window of [`LISTEN`] requests in every [`LISTEN_EVERY`] (requests arriving one after
//! the other, so that duplicates sent together fall in the same window); one of those
//! joining a group turns keying back on for every request (see [`Listen`]). What is lost
//! while quiet is bounded: a duplicate outside a window runs twice, as it would with
//! coalescing off; nothing else changes for the request.
//! Invariant: a keyed request runs on copies of the bytes it was keyed on (its arena inputs are
//! replaced by the copies hashed, a piece at a time), so a client that changes its arena cannot
//! poison the cache or another client's answer.
//! Boundary: no ORT here; the runtime's `deliver` places the bytes.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rxd_protocol::DType;

use crate::runtime::{
    Completion, InputData, Job, OutputData, OutputTarget, OutputTensor, Placement, RuntimeError,
    View, deliver,
};
use crate::scheduler::{Scheduler, Terms};
use crate::validate::Checked;

mod key;
mod lru;

pub use key::copied_here;
pub use key::set_key_budget;
use key::{Charge, Charged, key, key_pool};
use lru::Lru;

pub type Key = [u8; 32];

/// Requests with at most this many input bytes are keyed inline, where they arrive (the fast
/// path: hashing 64 KiB takes tens of microseconds); larger ones on the key pool.
pub const INLINE_KEY_BYTES: u64 = 64 << 10;

/// Threads of the key pool at most (fewer on small machines: half the cores, at least one).
pub const KEY_THREADS: usize = 4;

/// A finished result: every output's bytes.
#[derive(Debug)]
pub struct Outputs {
    items: Vec<(String, DType, Vec<u64>, Vec<u8>)>,
    /// What keeping it costs, counted against `cache-bytes`: the outputs' bytes, names and
    /// shapes, and the entry's own bookkeeping ([`ENTRY_BYTES`], [`ITEM_BYTES`]) — so that
    /// results with tiny or empty outputs (a detector finding nothing) cannot fill memory
    /// many times over the bound while counting as nothing.
    bytes: u64,
}

/// The cache's own memory per entry, about: its key in the map and in the use order, the
/// `Arc`, the item list.
const ENTRY_BYTES: u64 = 256;
/// Per output, about: the tuple and the name's, shape's and bytes' allocations.
const ITEM_BYTES: u64 = 96;

impl Outputs {
    fn from_inline(outputs: Vec<OutputTensor>) -> Option<Outputs> {
        let mut items = Vec::with_capacity(outputs.len());
        let mut bytes = ENTRY_BYTES;
        for o in outputs {
            let OutputData::Inline(b) = o.data else {
                return None;
            };
            bytes += ITEM_BYTES + (b.len() + o.name.len() + 8 * o.shape.len()) as u64;
            items.push((o.name, o.dtype, o.shape, b));
        }
        Some(Outputs { items, bytes })
    }

    /// Delivers a copy where `placement` says.
    fn deliver(&self, placement: &Placement) -> Result<Vec<OutputTensor>, RuntimeError> {
        let views: Vec<View<'_>> = self
            .items
            .iter()
            .map(|(name, dtype, shape, bytes)| View {
                name,
                dtype: *dtype,
                shape: shape.clone(),
                bytes,
            })
            .collect();
        deliver(&views, placement)
    }
}

/// Keyed requests in a row that found no group to join, after which keying is quiet (no
/// cache only): each costs a hash and a copy of its inputs for nothing.
pub const QUIET_AFTER: u64 = 1024;

/// While quiet, requests are counted and one window of [`LISTEN`] in every this many is
/// keyed, so that a stream of duplicates turns keying on again within this many requests.
pub const LISTEN_EVERY: u64 = 512;

/// The keyed window's length while quiet (about 6 % of requests keyed).
pub const LISTEN: u64 = 32;

/// Whether a version's requests are keyed, where nothing is cached: every request while
/// duplicates come, a window of [`LISTEN`] in every [`LISTEN_EVERY`] once [`QUIET_AFTER`]
/// keyed requests in a row found nothing to join. Counters only (relaxed atomics): two
/// threads submitting at once may see a count a request late, which moves a window by one
/// request and nothing else.
#[derive(Debug, Default)]
pub struct Listen {
    /// Keyed requests since one last joined a group.
    alone: AtomicU64,
    /// Requests seen while quiet (what places the windows).
    seen: AtomicU64,
}

impl Listen {
    /// Whether the next request is keyed.
    pub fn keys(&self) -> bool {
        if self.alone.load(Ordering::Relaxed) < QUIET_AFTER {
            return true;
        }
        self.seen.fetch_add(1, Ordering::Relaxed) % LISTEN_EVERY < LISTEN
    }

    /// A keyed request found no group to join (it leads its own).
    pub fn led(&self) {
        self.alone.fetch_add(1, Ordering::Relaxed);
    }

    /// A keyed request joined a group: duplicates come, every request is keyed again.
    pub fn joined(&self) {
        self.alone.store(0, Ordering::Relaxed);
        self.seen.store(0, Ordering::Relaxed);
    }

    /// Whether keying is quiet now.
    pub fn quiet(&self) -> bool {
        self.alone.load(Ordering::Relaxed) >= QUIET_AFTER
    }
}

/// Counters for status.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
}

struct Member {
    completion: Box<dyn Completion>,
    placement: Placement,
}

/// A group in flight: the leader's terms (what the group runs under) and who waits for it.
struct Flight {
    id: u64,
    priority: u8,
    deadline: Option<Instant>,
    members: Vec<Member>,
    /// Its worker found every member gone and skips it: nobody may join any more (a joiner
    /// would be answered "the client is gone").
    closed: bool,
}

impl Flight {
    /// Whether a request with these terms may join: the group runs no later and fails no
    /// sooner than the request would on its own.
    fn accepts(&self, priority: u8, deadline: Option<Instant>) -> bool {
        let deadline_ok = match (self.deadline, deadline) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(group), Some(own)) => group >= own,
        };
        !self.closed && self.priority >= priority && deadline_ok
    }
}

/// Coalescing and caching for one model version.
pub struct Coalescer {
    coalesce_max_bytes: u64,
    /// Changeable at run time (`rxctl configure --cache-bytes`).
    cache_capacity: AtomicU64,
    /// Groups in flight by key (usually one; more when terms kept a request from joining).
    inflight: Mutex<HashMap<Key, Vec<Flight>>>,
    next_flight: AtomicU64,
    cache: Mutex<Lru>,
    pub stats: Stats,
    pub listen: Listen,
}

/// What to do with a keyed request.
enum Route {
    /// Run it as the leader of a group: its outputs come back inline to this completion.
    Lead(Box<dyn Completion>),
    /// Answered (from the cache) or joined a group in flight: nothing to run.
    Done,
}

/// Keeps the model version alive while a request is keyed off the IO thread (so it is not
/// evicted between lookup and queueing).
pub type Keep = Arc<dyn Any + Send + Sync>;

impl Coalescer {
    pub fn new(coalesce_max_bytes: u64, cache_capacity: u64) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            coalesce_max_bytes,
            cache_capacity: AtomicU64::new(cache_capacity),
            inflight: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(1),
            cache: Mutex::new(Lru::default()),
            stats: Stats::default(),
            listen: Listen::default(),
        })
    }

    /// Bytes held by the cache.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Whether a request of `input_bytes` is keyed: always where the cache is on, else where
    /// coalescing applies to its size and keying is not quiet ([`Listen`]).
    fn enabled_for(&self, input_bytes: u64) -> bool {
        self.capacity() > 0 || (input_bytes <= self.coalesce_max_bytes && self.listen.keys())
    }

    /// The result cache's size limit (0 = off).
    pub fn capacity(&self) -> u64 {
        self.cache_capacity.load(Ordering::Relaxed)
    }

    /// Resizes the result cache (0 turns it off), dropping least-recently-used entries that
    /// no longer fit.
    pub fn set_capacity(&self, bytes: u64) {
        self.cache_capacity.store(bytes, Ordering::Relaxed);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shrink_to(bytes);
    }

    /// Empties the result cache.
    pub fn clear(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Queues a checked request on `scheduler`, keyed first when coalescing or the cache
    /// applies: answered from the cache, joined to an identical group in flight whose terms
    /// suit it, or run (as a group's leader when keyed). Small requests are keyed here, large
    /// ones on the key pool (`keep` holds the model until then). `completion` receives the
    /// outputs or the error exactly once.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        scheduler: &Arc<Scheduler>,
        checked: Checked,
        completion: Box<dyn Completion>,
        terms: Terms,
        keep: Keep,
    ) {
        let (mut inline, mut shared) = (0u64, 0u64);
        for t in &checked.inputs {
            match &t.data {
                InputData::Inline(b) => inline += b.len() as u64,
                InputData::Shared { len, .. } => shared += *len,
            }
        }
        let input_bytes = inline.saturating_add(shared);
        let job = Job {
            inputs: checked.inputs,
            outputs: checked.outputs,
            placement: checked.placement,
            completion,
            bounded: terms.bounded,
            source: terms.source,
        };
        if !self.enabled_for(input_bytes) {
            scheduler.submit(job, terms);
            return;
        }
        // The group's terms are compared with resolved priorities.
        let terms = Terms {
            priority: Some(terms.priority.unwrap_or(scheduler.default_priority())),
            ..terms
        };
        if input_bytes <= INLINE_KEY_BYTES {
            self.keyed(model, version, scheduler, job, terms);
            return;
        }
        let Some(charge) = Charge::take(input_bytes) else {
            // The key budget is spent: run it as is (zero-copy; neither cached nor coalesced).
            scheduler.submit(job, terms);
            return;
        };
        let (owner, scheduler, model) = (self.clone(), scheduler.clone(), model.to_string());
        key_pool().run(Box::new(move || {
            let _keep = keep;
            if job.completion.is_abandoned() {
                // The client is gone: nobody wants the answer, so no keying (the worker skips
                // abandoned jobs).
                scheduler.submit(job, terms);
                return;
            }
            let job = Job {
                completion: Box::new(Charged {
                    inner: job.completion,
                    _charge: charge,
                }),
                ..job
            };
            owner.keyed(&model, version, &scheduler, job, terms);
        }));
    }

    /// Keys `job` (arena inputs are replaced by copies of the bytes hashed, so that what runs
    /// is exactly what the key names: a client changing its arena cannot poison the cache or
    /// another client's answer), then answers it from the cache, joins it to a group, or
    /// queues it as a group's leader.
    fn keyed(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        scheduler: &Scheduler,
        mut job: Job,
        terms: Terms,
    ) {
        let Some(key) = key(terms.source, model, version, &mut job.inputs, &job.outputs) else {
            scheduler.submit(job, terms);
            return;
        };
        let Job {
            inputs,
            outputs,
            placement,
            completion,
            bounded,
            source,
        } = job;
        let priority = terms.priority.unwrap_or(0);
        match self.route(key, priority, terms.deadline, completion, placement) {
            Route::Lead(completion) => scheduler.submit(
                Job {
                    inputs,
                    outputs,
                    // The group wants the bytes back inline; it places them for each member.
                    placement: Placement::default(),
                    completion,
                    bounded,
                    source,
                },
                terms,
            ),
            Route::Done => {}
        }
    }

    /// Decides how a keyed request runs.
    fn route(
        self: &Arc<Self>,
        key: Key,
        priority: u8,
        deadline: Option<Instant>,
        completion: Box<dyn Completion>,
        placement: Placement,
    ) -> Route {
        if self.capacity() > 0 {
            let hit = self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key);
            match hit {
                Some(out) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    completion.complete(out.deliver(&placement));
                    return Route::Done;
                }
                None => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let member = Member {
            completion,
            placement,
        };
        let flights = inflight.entry(key).or_default();
        if let Some(f) = flights.iter_mut().find(|f| f.accepts(priority, deadline)) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            self.listen.joined();
            f.members.push(member);
            return Route::Done;
        }
        self.listen.led();
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        flights.push(Flight {
            id,
            priority,
            deadline,
            members: vec![member],
            closed: false,
        });
        Route::Lead(Box::new(Group {
            owner: self.clone(),
            key,
            id,
            answered: false,
        }))
    }

    fn insert(&self, key: Key, out: Arc<Outputs>) {
        let capacity = self.capacity();
        if capacity == 0 || out.bytes > capacity {
            return;
        }
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, out, capacity);
    }
}

/// The leader's completion: answers every member of the group.
struct Group {
    owner: Arc<Coalescer>,
    key: Key,
    /// Which of the key's flights is this group's.
    id: u64,
    answered: bool,
}

impl Group {
    fn take_members(&self) -> Vec<Member> {
        let mut inflight = self
            .owner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(flights) = inflight.get_mut(&self.key) else {
            return Vec::new();
        };
        let members = match flights.iter().position(|f| f.id == self.id) {
            Some(i) => flights.swap_remove(i).members,
            None => Vec::new(),
        };
        if flights.is_empty() {
            inflight.remove(&self.key);
        }
        members
    }
}

impl Completion for Group {
    fn is_abandoned(&self) -> bool {
        let mut inflight = self
            .owner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A `true` here is final (the worker skips the group and completes it as abandoned),
        // so the group is closed under the same lock that joining takes: no request can join
        // between this answer and that completion.
        match inflight
            .get_mut(&self.key)
            .and_then(|fs| fs.iter_mut().find(|f| f.id == self.id))
        {
            None => true,
            Some(f) => {
                let gone = f.members.iter().all(|m| m.completion.is_abandoned());
                f.closed |= gone;
                gone
            }
        }
    }

    fn complete(mut self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>) {
        self.answered = true;
        // Members are taken before answering: a request arriving now starts a new group.
        let mut members = self.take_members();
        if members.len() == 1 && self.owner.capacity() == 0 {
            // No duplicate came and nothing is cached: the leader's own outputs, moved to it
            // when it wants them inline (no shared copy of them is made).
            let m = members.pop().expect("one member");
            m.completion
                .complete(result.and_then(|outputs| alone(outputs, &m.placement)));
            return;
        }
        match result.map(Outputs::from_inline) {
            Ok(Some(out)) => {
                let out = Arc::new(out);
                self.owner.insert(self.key, out.clone());
                for m in members {
                    m.completion.complete(out.deliver(&m.placement));
                }
            }
            Ok(None) => {
                let e = RuntimeError::Run("coalesced outputs were not inline".into());
                for m in members {
                    m.completion.complete(Err(e.clone()));
                }
            }
            Err(e) => {
                for m in members {
                    m.completion.complete(Err(e.clone()));
                }
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.answered {
            for m in self.take_members() {
                m.completion
                    .complete(Err(RuntimeError::Run("the request was dropped".into())));
            }
        }
    }
}

/// A group's only member gets the outputs the leader ran with (inline): as they are when it
/// wants them inline, else placed where it wants them.
fn alone(
    outputs: Vec<OutputTensor>,
    placement: &Placement,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    if placement.targets.iter().all(|t| *t == OutputTarget::Inline) {
        return Ok(outputs);
    }
    let views = outputs
        .iter()
        .map(|o| match &o.data {
            OutputData::Inline(bytes) => Ok(View {
                name: &o.name,
                dtype: o.dtype,
                shape: o.shape.clone(),
                bytes,
            }),
            OutputData::Arena { .. } => Err(RuntimeError::Run(
                "coalesced outputs were not inline".into(),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    deliver(&views, placement)
}

#[cfg(test)]
mod tests {
    use super::key::KEY_HELD;
    use super::*;
    use crate::runtime::InputTensor;
    use std::time::Duration;

    fn out(n: usize) -> Arc<Outputs> {
        Arc::new(Outputs {
            items: vec![("y".into(), DType::Uint8, vec![n as u64], vec![0; n])],
            bytes: n as u64,
        })
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_evicts_the_least_recent() {
        let c = Coalescer::new(0, 100);
        c.insert([1; 32], out(40));
        c.insert([2; 32], out(40));
        assert_eq!(c.cache_bytes(), 80);
        c.insert([3; 32], out(40));
        assert_eq!(c.cache_bytes(), 80, "one evicted to make room");
        let lru = c.cache.lock().unwrap();
        assert!(!lru.map.contains_key(&[1; 32]), "the oldest went first");
        assert!(lru.map.contains_key(&[2; 32]) && lru.map.contains_key(&[3; 32]));
        drop(lru);
        // An entry larger than the whole cache is not kept.
        c.insert([4; 32], out(101));
        assert_eq!(c.cache_bytes(), 80);
    }

    /// Results with empty or tiny outputs count what keeping them costs, not their zero or
    /// few bytes: a cache of 64 KiB holds at most 64 KiB / 256 of them, however many come.
    #[test]
    fn empty_results_count_their_entry_against_the_bound() {
        let c = Coalescer::new(0, 64 << 10);
        let empty = || {
            Outputs::from_inline(vec![OutputTensor {
                name: "boxes".into(),
                dtype: DType::Float32,
                shape: vec![0, 4],
                data: OutputData::Inline(Vec::new()),
            }])
            .unwrap()
        };
        for i in 0..100_000u32 {
            let o = empty();
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            c.insert(key, Arc::new(o));
        }
        let lru = c.cache.lock().unwrap();
        assert!(
            lru.map.len() <= (64 << 10) / ENTRY_BYTES as usize,
            "{}",
            lru.map.len()
        );
        assert!(lru.map.len() > 100, "{}", lru.map.len());
        assert!(lru.bytes <= 64 << 10);
    }

    #[test]
    fn a_hit_makes_an_entry_the_most_recent_and_shrinking_drops_the_least_recent() {
        let mut lru = Lru::default();
        for k in 1..=3u8 {
            lru.insert([k; 32], out(10), 30);
        }
        assert!(lru.get(&[1; 32]).is_some(), "a hit");
        assert!(lru.get(&[9; 32]).is_none(), "a miss");
        lru.insert([4; 32], out(10), 30);
        assert!(
            !lru.map.contains_key(&[2; 32]),
            "2 was the least recent, not 1"
        );
        assert!(lru.map.contains_key(&[1; 32]));
        lru.insert([1; 32], out(10), 30);
        assert_eq!(
            (lru.bytes, lru.map.len(), lru.order.len()),
            (30, 3, 3),
            "kept once"
        );
        lru.shrink_to(15);
        assert_eq!(lru.bytes, 10);
        assert!(lru.map.contains_key(&[4; 32]), "the most recent stays");
        lru.clear();
        assert_eq!((lru.bytes, lru.map.len(), lru.order.len()), (0, 0, 0));
    }

    type Outcome = Result<Vec<OutputTensor>, RuntimeError>;

    /// Records what a request was answered.
    #[derive(Clone, Default)]
    struct Answer(Arc<Mutex<Option<Outcome>>>);

    impl Answer {
        fn completion(&self) -> Box<dyn Completion> {
            Box::new(self.clone())
        }

        fn get(&self) -> Option<Outcome> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Completion for Answer {
        fn complete(self: Box<Self>, result: Outcome) {
            *self.0.lock().unwrap() = Some(result);
        }
    }

    fn lead(route: Route) -> Box<dyn Completion> {
        match route {
            Route::Lead(c) => c,
            Route::Done => panic!("joined a group, expected to lead one"),
        }
    }

    fn output() -> Vec<OutputTensor> {
        vec![OutputTensor {
            name: "y".into(),
            dtype: DType::Uint8,
            shape: vec![1],
            data: OutputData::Inline(vec![7]),
        }]
    }

    /// Issue 19, item 8: a request without a deadline that joined an identical one with
    /// `timeout_ms: 30` got that one's `deadline_exceeded`. It now joins only a group that
    /// cannot fail it for the leader's reasons (deadline no earlier, priority no lower).
    #[test]
    fn a_request_joins_only_groups_whose_terms_cannot_fail_it() {
        let c = Coalescer::new(1 << 20, 0);
        let now = Instant::now();
        let soon = Some(now + Duration::from_millis(30));
        let later = Some(now + Duration::from_millis(300));
        let key = [9; 32];
        let route = |priority, deadline, a: &Answer| {
            c.route(
                key,
                priority,
                deadline,
                a.completion(),
                Placement::default(),
            )
        };
        // A leader with a 30 ms deadline; an identical request without one leads its own.
        let (hurried, patient) = (Answer::default(), Answer::default());
        let hurried_group = lead(route(0, soon, &hurried));
        let patient_group = lead(route(0, None, &patient));
        // Requests whose terms the groups meet join them: an earlier or equal deadline...
        let (a, b, d) = (Answer::default(), Answer::default(), Answer::default());
        assert!(matches!(route(0, soon, &a), Route::Done));
        assert!(
            matches!(route(0, later, &b), Route::Done),
            "joins the patient group"
        );
        // ...but not a higher priority, which leads a third group.
        let urgent_group = lead(route(3, None, &d));
        // A lower priority may join the urgent group.
        let e = Answer::default();
        assert!(matches!(route(1, None, &e), Route::Done));
        assert_eq!(c.stats.coalesced.load(Ordering::Relaxed), 3);

        // The hurried group's deadline passes: only its own members hear of it.
        hurried_group.complete(Err(RuntimeError::DeadlineExceeded));
        for x in [&hurried, &a] {
            assert!(matches!(x.get(), Some(Err(RuntimeError::DeadlineExceeded))));
        }
        for x in [&patient, &b, &d, &e] {
            assert!(x.get().is_none(), "answered by another group");
        }
        patient_group.complete(Ok(output()));
        urgent_group.complete(Ok(output()));
        for x in [&patient, &b, &d, &e] {
            assert_eq!(x.get().unwrap().unwrap(), output());
        }
        assert!(
            c.inflight.lock().unwrap().is_empty(),
            "every group removed itself"
        );
    }

    /// A request whose client has gone.
    struct Gone(Answer);

    impl Completion for Gone {
        fn is_abandoned(&self) -> bool {
            true
        }

        fn complete(self: Box<Self>, result: Outcome) {
            Box::new(self.0).complete(result);
        }
    }

    /// Regression (soak): the worker found a group's only member gone and skipped it; an
    /// identical request from a live client joined in between and was answered "the client is
    /// gone; the request was not run". A group found abandoned is closed to joiners.
    #[test]
    fn a_request_never_joins_a_group_its_worker_has_found_abandoned() {
        let c = Coalescer::new(1 << 20, 0);
        let key = [5; 32];
        let (gone, live) = (Answer::default(), Answer::default());
        let group = lead(c.route(
            key,
            0,
            None,
            Box::new(Gone(gone.clone())),
            Placement::default(),
        ));
        assert!(group.is_abandoned(), "its only member is gone");
        // The worker now skips it; meanwhile an identical request arrives: it leads anew.
        let fresh = lead(c.route(key, 0, None, live.completion(), Placement::default()));
        group.complete(Err(RuntimeError::Abandoned));
        assert!(matches!(gone.get(), Some(Err(RuntimeError::Abandoned))));
        assert!(live.get().is_none(), "not answered by the skipped group");
        assert!(!fresh.is_abandoned());
        fresh.complete(Ok(output()));
        assert_eq!(live.get().unwrap().unwrap(), output());
        assert!(c.inflight.lock().unwrap().is_empty());
    }

    #[test]
    fn the_key_budget_bounds_what_large_requests_hold_but_one_always_fits() {
        // (The only test that touches the process-wide budget.)
        set_key_budget(100);
        let a = Charge::take(60).expect("fits");
        let b = Charge::take(40).expect("fits exactly");
        assert!(Charge::take(1).is_none(), "spent");
        drop(a);
        drop(b);
        let alone = Charge::take(1000).expect("a request alone is always keyed");
        assert!(Charge::take(1).is_none());
        drop(alone);
        assert_eq!(KEY_HELD.load(Ordering::Relaxed), 0);
        set_key_budget(1 << 30);
    }

    #[test]
    fn arena_inputs_are_hashed_as_the_copies_that_run() {
        use std::os::fd::AsFd;
        let fd = rxd_shm::create_sealed("rxd-key-test", 3 << 20).unwrap();
        let map = Arc::new(rxd_shm::Mapping::map(fd.as_fd(), 3 << 20).unwrap());
        let bytes: Vec<u8> = (0..(2 << 20) + 5).map(|i| (i % 251) as u8).collect();
        map.copy_in(64, &bytes).unwrap();
        let tensor = |data| InputTensor {
            name: "x".into(),
            dtype: DType::Uint8,
            shape: vec![bytes.len() as u64],
            data,
        };
        let mut shared = [tensor(InputData::Shared {
            map: map.clone(),
            offset: 64,
            len: bytes.len() as u64,
        })];
        let mut inline = [tensor(InputData::Inline(bytes.clone()))];
        copied_here();
        let k = key(7, "m", 1, &mut shared, &[]).unwrap();
        assert_eq!(k, key(7, "m", 1, &mut inline, &[]).unwrap());
        // What this thread copied (the arena input only), for the ring's round budget.
        assert_eq!(copied_here(), bytes.len() as u64);
        assert_eq!(copied_here(), 0);
        // The arena input now runs from the copy that was hashed.
        assert!(matches!(&shared[0].data, InputData::Inline(b) if *b == bytes));
    }

    #[test]
    fn keys_depend_on_every_input_byte_and_the_outputs_asked() {
        let t = |b: Vec<u8>| InputTensor {
            name: "x".into(),
            dtype: DType::Uint8,
            shape: vec![b.len() as u64],
            data: InputData::Inline(b),
        };
        let k = |b: Vec<u8>, outs: &[&str]| {
            let outs: Vec<String> = outs.iter().map(|s| s.to_string()).collect();
            key(7, "m", 1, &mut [t(b)], &outs).unwrap()
        };
        assert_eq!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 3], &["y"]));
        assert_ne!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 4], &["y"]));
        assert_ne!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 3], &["z"]));
        assert_ne!(
            key(7, "m", 1, &mut [t(vec![1])], &[]),
            key(7, "m", 2, &mut [t(vec![1])], &[])
        );
        // Another user's identical request is another key: results are never shared
        // between users (whether another user sent an input would show in timing and counts).
        assert_ne!(
            key(7, "m", 1, &mut [t(vec![1])], &[]),
            key(8, "m", 1, &mut [t(vec![1])], &[])
        );
    }

    #[test]
    fn keying_goes_quiet_after_a_run_without_duplicates_and_a_duplicate_in_a_window_wakes_it() {
        let l = Listen::default();
        for _ in 0..QUIET_AFTER {
            assert!(l.keys() && !l.quiet());
            l.led();
        }
        assert!(l.quiet());
        // Quiet: one window of LISTEN consecutive requests in every LISTEN_EVERY is keyed.
        let pattern: Vec<bool> = (0..3 * LISTEN_EVERY).map(|_| l.keys()).collect();
        for (i, keyed) in pattern.iter().enumerate() {
            assert_eq!(*keyed, (i as u64) % LISTEN_EVERY < LISTEN, "request {i}");
        }
        // Keyed requests in a window that lead alone keep it quiet; one that joins wakes it.
        l.led();
        assert!(l.quiet());
        l.joined();
        assert!(!l.quiet());
        assert!((0..2 * LISTEN_EVERY).all(|_| l.keys()));
    }

    #[test]
    fn a_quiet_coalescer_still_keys_every_request_while_the_cache_is_on() {
        let c = Coalescer::new(16 << 10, 0);
        for _ in 0..QUIET_AFTER {
            c.listen.led();
        }
        let keyed = (0..LISTEN_EVERY).filter(|_| c.enabled_for(100)).count() as u64;
        assert_eq!(keyed, LISTEN);
        c.set_capacity(1 << 20);
        assert!((0..LISTEN_EVERY).all(|_| c.enabled_for(100)));
        // Past coalesce-max-bytes, only the cache keys.
        c.set_capacity(0);
        assert!(!(0..LISTEN_EVERY).any(|_| c.enabled_for(32 << 10)));
    }
}
