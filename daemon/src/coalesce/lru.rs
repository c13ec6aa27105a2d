//! The result cache of one model version: answers by key, bounded in bytes, least recently
//! used out first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Key, Outputs};

/// The result cache: answers by key, least recently used first out, bounded in bytes. A hit
/// moves its entry to the back in O(log n) (the order is kept by use tick, not scanned).
#[derive(Default)]
pub(super) struct Lru {
    /// Each entry with the tick of its last use.
    pub(super) map: HashMap<Key, (u64, Arc<Outputs>)>,
    /// Keys by the tick of their last use: the first is the least recently used.
    pub(super) order: BTreeMap<u64, Key>,
    tick: u64,
    pub(super) bytes: u64,
}

impl Lru {
    /// The answer for `key`, now the most recently used.
    pub(super) fn get(&mut self, key: &Key) -> Option<Arc<Outputs>> {
        self.tick += 1;
        let tick = self.tick;
        let (used, out) = self.map.get_mut(key)?;
        self.order.remove(used);
        self.order.insert(tick, *key);
        *used = tick;
        Some(out.clone())
    }

    /// Keeps `out` under `key` (unless already kept), dropping the least recently used
    /// entries until it fits in `capacity` bytes.
    pub(super) fn insert(&mut self, key: Key, out: Arc<Outputs>, capacity: u64) {
        if self.map.contains_key(&key) {
            return;
        }
        self.shrink_to(capacity.saturating_sub(out.bytes));
        self.tick += 1;
        self.bytes += out.bytes;
        self.order.insert(self.tick, key);
        self.map.insert(key, (self.tick, out));
    }

    /// Drops the least recently used entries until at most `bytes` are held.
    pub(super) fn shrink_to(&mut self, bytes: u64) {
        while self.bytes > bytes {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, o)) = self.map.remove(&old) {
                self.bytes -= o.bytes;
            }
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Lru::default();
    }
}
