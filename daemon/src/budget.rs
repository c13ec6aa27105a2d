//! The memory budget of every device and the admission/eviction policy, as a pure state
//! machine: events in (admit, settle, touch, pin, release) with a clock passed in, decisions
//! out (which device, which models to evict, or why it cannot fit). No IO, no ORT, no locks:
//! the registry owns one `Budget` behind its mutex and carries the decisions out.
//!
//! Invariants (checked by the property tests below): the bytes accounted on a device never
//! exceed its budget; a pinned, loading or busy model is never chosen as a victim; victims are
//! taken least-recently-used first among the eligible models of the device being filled.
//! Boundary: the policy only counts bytes it is told about; measuring them is the registry's
//! and the runtime's job.

use std::collections::BTreeMap;
use std::fmt::Debug;

/// A device and its budget in bytes (`u64::MAX`: unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub budget: u64,
    /// Placement without a preference tries lower tiers first (accelerators 0, CPUs 1), the
    /// most free budget first within a tier.
    pub tier: u8,
}

#[derive(Debug, Clone)]
struct Entry {
    device: usize,
    bytes: u64,
    last_used: u64,
    pinned: bool,
    /// Admitted, not yet settled with its measured size: never a victim.
    loading: bool,
}

/// Where a model goes and what must be evicted first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission<K> {
    pub device: usize,
    /// Victims, least-recently-used first; already removed from the accounting.
    pub evict: Vec<K>,
}

/// Why a model cannot be admitted: what it needs and what holds each candidate device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget<K> {
    pub need: u64,
    pub devices: Vec<DeviceUse<K>>,
}

/// A device's budget, use and residents (with why each one cannot go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUse<K> {
    pub name: String,
    pub budget: u64,
    pub used: u64,
    /// (model, bytes, pinned, loading)
    pub residents: Vec<(K, u64, bool, bool)>,
}

impl<K: Debug> std::fmt::Display for OverBudget<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "needs {} bytes;", self.need)?;
        for d in &self.devices {
            write!(
                f,
                " device '{}' budget {} used {}",
                d.name, d.budget, d.used
            )?;
            if d.residents.is_empty() {
                write!(f, " (empty)")?;
            } else {
                let list: Vec<String> = d
                    .residents
                    .iter()
                    .map(|(k, b, pinned, loading)| {
                        let why = match (pinned, loading) {
                            (true, _) => ", pinned",
                            (_, true) => ", loading",
                            _ => "",
                        };
                        format!("{k:?} {b} bytes{why}")
                    })
                    .collect();
                write!(f, ", resident: {}", list.join("; "))?;
            }
            write!(f, ".")?;
        }
        Ok(())
    }
}

/// Budgets of all devices and the models accounted on them.
#[derive(Debug, Clone)]
pub struct Budget<K> {
    devices: Vec<DeviceSpec>,
    entries: BTreeMap<K, Entry>,
}

impl<K: Ord + Clone + Debug> Budget<K> {
    pub fn new(devices: Vec<DeviceSpec>) -> Budget<K> {
        assert!(!devices.is_empty(), "at least one device");
        Budget {
            devices,
            entries: BTreeMap::new(),
        }
    }

    pub fn devices(&self) -> &[DeviceSpec] {
        &self.devices
    }

    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.name == name)
    }

    /// Every device in the order a model without a preference tries them: by tier, then the
    /// most free budget first.
    pub fn preference(&self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.devices.len()).collect();
        all.sort_by_key(|&d| (self.devices[d].tier, std::cmp::Reverse(self.free(d))));
        all
    }

    /// Bytes accounted on device `d`.
    pub fn used(&self, d: usize) -> u64 {
        self.entries
            .values()
            .filter(|e| e.device == d)
            .map(|e| e.bytes)
            .fold(0u64, u64::saturating_add)
    }

    fn free(&self, d: usize) -> u64 {
        self.devices[d].budget.saturating_sub(self.used(d))
    }

    /// Where `key` is accounted and with how many bytes.
    pub fn get(&self, key: &K) -> Option<(usize, u64)> {
        self.entries.get(key).map(|e| (e.device, e.bytes))
    }

    /// Eligible victims on device `d`, least-recently-used first.
    fn victims(&self, d: usize, except: Option<&K>, busy: &dyn Fn(&K) -> bool) -> Vec<(&K, u64)> {
        let mut v: Vec<(&K, &Entry)> = self
            .entries
            .iter()
            .filter(|(k, e)| {
                e.device == d && !e.pinned && !e.loading && Some(*k) != except && !busy(k)
            })
            .collect();
        v.sort_by(|a, b| a.1.last_used.cmp(&b.1.last_used).then(a.0.cmp(b.0)));
        v.into_iter().map(|(k, e)| (k, e.bytes)).collect()
    }

    /// The victims that free enough room for `need` more bytes on `d`, if there are enough.
    fn plan_room(
        &self,
        d: usize,
        need: u64,
        except: &K,
        busy: &dyn Fn(&K) -> bool,
    ) -> Option<Vec<K>> {
        let budget = self.devices[d].budget;
        if need > budget {
            return None;
        }
        let mut used = self.used(d);
        let mut out = Vec::new();
        for (k, bytes) in self.victims(d, Some(except), busy) {
            if used.saturating_add(need) <= budget {
                break;
            }
            used -= bytes;
            out.push(k.clone());
        }
        (used.saturating_add(need) <= budget).then_some(out)
    }

    /// Admits `key` with an estimate of `bytes`, on the first of `candidates` (device indices in
    /// preference order; empty = every device by tier, then most free budget) that fits without
    /// evicting, else on the first that fits after evicting least-recently-used idle models.
    /// The entry counts as loading (never a victim) until [`Budget::settle`].
    pub fn admit(
        &mut self,
        key: K,
        bytes: u64,
        candidates: &[usize],
        busy: &dyn Fn(&K) -> bool,
        now: u64,
    ) -> Result<Admission<K>, OverBudget<K>> {
        if let Some(e) = self.entries.get(&key) {
            return Ok(Admission {
                device: e.device,
                evict: Vec::new(),
            });
        }
        let order: Vec<usize> = if candidates.is_empty() {
            self.preference()
        } else {
            candidates
                .iter()
                .copied()
                .filter(|&d| d < self.devices.len())
                .collect()
        };
        let chosen = order
            .iter()
            .find(|&&d| self.free(d) >= bytes)
            .map(|&d| (d, Vec::new()))
            .or_else(|| {
                order
                    .iter()
                    .find_map(|&d| self.plan_room(d, bytes, &key, busy).map(|v| (d, v)))
            });
        let Some((device, evict)) = chosen else {
            return Err(self.over_budget(bytes, &order));
        };
        for k in &evict {
            self.entries.remove(k);
        }
        self.entries.insert(
            key,
            Entry {
                device,
                bytes,
                last_used: now,
                pinned: false,
                loading: true,
            },
        );
        Ok(Admission { device, evict })
    }

    fn over_budget(&self, need: u64, order: &[usize]) -> OverBudget<K> {
        OverBudget {
            need,
            devices: order.iter().map(|&d| self.device_use(d)).collect(),
        }
    }

    /// A device's budget, use and residents.
    pub fn device_use(&self, d: usize) -> DeviceUse<K> {
        DeviceUse {
            name: self.devices[d].name.clone(),
            budget: self.devices[d].budget,
            used: self.used(d),
            residents: self
                .entries
                .iter()
                .filter(|(_, e)| e.device == d)
                .map(|(k, e)| (k.clone(), e.bytes, e.pinned, e.loading))
                .collect(),
        }
    }

    /// The model is loaded and measured at `measured` bytes: account that figure. If it is
    /// more than the estimate and the device overflows, least-recently-used idle models are
    /// evicted (returned); if that is not enough the model's own entry is removed and the
    /// error says what holds the device (the caller unloads it).
    pub fn settle(
        &mut self,
        key: &K,
        measured: u64,
        busy: &dyn Fn(&K) -> bool,
    ) -> Result<Vec<K>, OverBudget<K>> {
        let Some(e) = self.entries.get(key) else {
            return Ok(Vec::new());
        };
        let (d, estimate) = (e.device, e.bytes);
        let others = self.used(d) - estimate;
        let budget = self.devices[d].budget;
        if others.saturating_add(measured) <= budget {
            let e = self.entries.get_mut(key).expect("checked");
            e.bytes = measured;
            e.loading = false;
            return Ok(Vec::new());
        }
        // Plan with the model's own entry at its measured size.
        let extra = measured.saturating_sub(estimate);
        match self.plan_room(d, extra, key, busy) {
            Some(evict) if measured <= budget => {
                for k in &evict {
                    self.entries.remove(k);
                }
                let e = self.entries.get_mut(key).expect("checked");
                e.bytes = measured;
                e.loading = false;
                Ok(evict)
            }
            _ => {
                self.entries.remove(key);
                Err(self.over_budget(measured, &[d]))
            }
        }
    }

    /// Changes device `d`'s budget (a config reload). If less is accounted than the new
    /// budget allows, least-recently-used idle unpinned models are evicted (returned) until it
    /// fits; if that is not enough, nothing changes and the error says what holds the device.
    pub fn set_budget(
        &mut self,
        d: usize,
        budget: u64,
        busy: &dyn Fn(&K) -> bool,
    ) -> Result<Vec<K>, OverBudget<K>> {
        let used = self.used(d);
        if used <= budget {
            self.devices[d].budget = budget;
            return Ok(Vec::new());
        }
        let mut left = used;
        let mut evict = Vec::new();
        for (k, bytes) in self.victims(d, None, busy) {
            if left <= budget {
                break;
            }
            left -= bytes;
            evict.push(k.clone());
        }
        if left > budget {
            return Err(OverBudget {
                need: used - budget,
                devices: vec![self.device_use(d)],
            });
        }
        for k in &evict {
            self.entries.remove(k);
        }
        self.devices[d].budget = budget;
        Ok(evict)
    }

    /// The model was used at `now` (LRU order).
    pub fn touch(&mut self, key: &K, now: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            e.last_used = e.last_used.max(now);
        }
    }

    /// Pinned models are never evicted.
    pub fn set_pinned(&mut self, key: &K, pinned: bool) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pinned = pinned;
        }
    }

    /// The model left the device (unloaded, evicted, or its load failed).
    pub fn release(&mut self, key: &K) -> Option<u64> {
        self.entries.remove(key).map(|e| e.bytes)
    }
}

/// Estimates a model's resident size before loading, from its file size (weights dominate
/// an ONNX file) times a factor learned from the models measured so far.
#[derive(Debug, Clone)]
pub struct Estimator {
    factor: f64,
}

impl Default for Estimator {
    fn default() -> Self {
        // Before anything is measured: weights once, plus ORT's copies and arena.
        Estimator { factor: 2.0 }
    }
}

impl Estimator {
    pub fn estimate(&self, file_bytes: u64) -> u64 {
        (file_bytes as f64 * self.factor).ceil() as u64
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Learns from one measured model (an average weighted towards recent models; files under
    /// 1 MiB are dominated by fixed costs and teach nothing about weights).
    pub fn learn(&mut self, file_bytes: u64, measured: u64) {
        if file_bytes < (1 << 20) {
            return;
        }
        let ratio = (measured as f64 / file_bytes as f64).clamp(1.0, 16.0);
        self.factor = 0.5 * self.factor + 0.5 * ratio;
    }
}

#[cfg(test)]
mod tests;
