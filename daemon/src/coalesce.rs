//! Identical-request coalescing and the result cache of one model version.
//!
//! A request's key is a BLAKE3 hash of the model version, every input's name, dtype, shape and
//! bytes, and the outputs asked for. Identical requests in flight at the same time run once:
//! the first one (the leader) runs with its outputs returned inline to a group completion,
//! which then delivers the same bytes to every member where that member wants them (inline or
//! its own arena region). With a cache (`cache-bytes` > 0), finished results are kept in an
//! LRU bounded in bytes and answer repeats without running. Answers from either path are
//! byte-identical to a fresh run: they are copies of the bytes ORT produced.
//! Boundary: no ORT here; the runtime's `deliver` places the bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::DType;

use crate::runtime::{
    Completion, InputData, InputTensor, OutputData, OutputTensor, Placement, RuntimeError, View,
    deliver,
};

pub type Key = [u8; 32];

/// A finished result: every output's bytes.
#[derive(Debug)]
pub struct Outputs {
    items: Vec<(String, DType, Vec<u64>, Vec<u8>)>,
    bytes: u64,
}

impl Outputs {
    fn from_inline(outputs: Vec<OutputTensor>) -> Option<Outputs> {
        let mut items = Vec::with_capacity(outputs.len());
        let mut bytes = 0;
        for o in outputs {
            let OutputData::Inline(b) = o.data else {
                return None;
            };
            bytes += b.len() as u64;
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

#[derive(Default)]
struct Lru {
    map: HashMap<Key, Arc<Outputs>>,
    order: VecDeque<Key>,
    bytes: u64,
}

/// Coalescing and caching for one model version.
pub struct Coalescer {
    coalesce_max_bytes: u64,
    /// Changeable at run time (`rxctl configure --cache-bytes`).
    cache_capacity: AtomicU64,
    inflight: Mutex<HashMap<Key, Vec<Member>>>,
    cache: Mutex<Lru>,
    pub stats: Stats,
}

/// What to do with a request.
pub enum Route {
    /// Not coalescable (too large, or both features off): run it as is.
    Run(Box<dyn Completion>, Placement),
    /// Run it as the leader of a group: its outputs come back inline to this completion.
    Lead(Box<dyn Completion>),
    /// Answered (from the cache) or joined a group in flight: nothing to run.
    Done,
}

impl Coalescer {
    pub fn new(coalesce_max_bytes: u64, cache_capacity: u64) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            coalesce_max_bytes,
            cache_capacity: AtomicU64::new(cache_capacity),
            inflight: Mutex::new(HashMap::new()),
            cache: Mutex::new(Lru::default()),
            stats: Stats::default(),
        })
    }

    /// Bytes held by the cache.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    fn enabled_for(&self, input_bytes: u64) -> bool {
        input_bytes <= self.coalesce_max_bytes || self.capacity() > 0
    }

    /// The result cache's size limit (0 = off).
    pub fn capacity(&self) -> u64 {
        self.cache_capacity.load(Ordering::Relaxed)
    }

    /// Resizes the result cache (0 turns it off), dropping least-recently-used entries that
    /// no longer fit.
    pub fn set_capacity(&self, bytes: u64) {
        self.cache_capacity.store(bytes, Ordering::Relaxed);
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        while c.bytes > bytes {
            let Some(k) = c.order.pop_front() else { break };
            if let Some(out) = c.map.remove(&k) {
                c.bytes -= out.bytes;
            }
        }
    }

    /// Empties the result cache.
    pub fn clear(&self) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.map.clear();
        c.order.clear();
        c.bytes = 0;
    }

    /// Decides how a request runs. `completion` and `placement` are the request's own. When
    /// the request is keyed, its arena inputs are replaced by copies of the bytes hashed, so
    /// that what runs is exactly what the key names (a client changing its arena cannot
    /// poison the cache or another client's answer).
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        inputs: &mut [InputTensor],
        outputs: &[String],
        completion: Box<dyn Completion>,
        placement: Placement,
    ) -> Route {
        let input_bytes: u64 = inputs
            .iter()
            .map(|t| match &t.data {
                InputData::Inline(b) => b.len() as u64,
                InputData::Shared { len, .. } => *len,
            })
            .sum();
        if !self.enabled_for(input_bytes) {
            return Route::Run(completion, placement);
        }
        let Some(key) = key(model, version, inputs, outputs) else {
            return Route::Run(completion, placement);
        };
        if self.capacity() > 0 {
            let hit = {
                let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                let hit = c.map.get(&key).cloned();
                if hit.is_some() {
                    c.order.retain(|k| k != &key);
                    c.order.push_back(key);
                }
                hit
            };
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
        if let Some(group) = inflight.get_mut(&key) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            group.push(member);
            return Route::Done;
        }
        inflight.insert(key, vec![member]);
        Route::Lead(Box::new(Group {
            owner: self.clone(),
            key,
            answered: false,
        }))
    }

    fn insert(&self, key: Key, out: Arc<Outputs>) {
        let capacity = self.capacity();
        if capacity == 0 || out.bytes > capacity {
            return;
        }
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.map.contains_key(&key) {
            return;
        }
        while c.bytes + out.bytes > capacity {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(o) = c.map.remove(&old) {
                c.bytes -= o.bytes;
            }
        }
        c.bytes += out.bytes;
        c.order.push_back(key);
        c.map.insert(key, out);
    }
}

/// The leader's completion: answers every member of the group.
struct Group {
    owner: Arc<Coalescer>,
    key: Key,
    answered: bool,
}

impl Group {
    fn take_members(&self) -> Vec<Member> {
        self.owner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key)
            .unwrap_or_default()
    }
}

impl Completion for Group {
    fn is_abandoned(&self) -> bool {
        let inflight = self
            .owner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inflight
            .get(&self.key)
            .is_none_or(|g| g.iter().all(|m| m.completion.is_abandoned()))
    }

    fn complete(mut self: Box<Self>, result: Result<Vec<OutputTensor>, RuntimeError>) {
        self.answered = true;
        // Members are taken before answering: a request arriving now starts a new group.
        let members = self.take_members();
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

/// The key of a request; arena inputs are copied (and replaced by the copies) before they
/// are hashed. `None` if an arena input cannot be read.
fn key(model: &str, version: u64, inputs: &mut [InputTensor], outputs: &[String]) -> Option<Key> {
    let mut h = blake3::Hasher::new();
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(model.as_bytes());
    field(&version.to_le_bytes());
    for t in inputs.iter_mut() {
        field(t.name.as_bytes());
        field(t.dtype.name().as_bytes());
        for d in &t.shape {
            field(&d.to_le_bytes());
        }
        if let InputData::Shared { map, offset, len } = &t.data {
            let mut copy = vec![0u8; *len as usize];
            map.copy_out(*offset, &mut copy).ok()?;
            t.data = InputData::Inline(copy);
        }
        if let InputData::Inline(b) = &t.data {
            field(b);
        }
    }
    for o in outputs {
        field(o.as_bytes());
    }
    Some(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            key("m", 1, &mut [t(b)], &outs).unwrap()
        };
        assert_eq!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 3], &["y"]));
        assert_ne!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 4], &["y"]));
        assert_ne!(k(vec![1, 2, 3], &["y"]), k(vec![1, 2, 3], &["z"]));
        assert_ne!(
            key("m", 1, &mut [t(vec![1])], &[]),
            key("m", 2, &mut [t(vec![1])], &[])
        );
    }
}
