//! The devices' capabilities and load, as the registry keeps them: each device probed once
//! (`runtime::caps`) and the result kept for the daemon's life; each device's
//! `DeviceLoad`, which the workers of every version placed there record into; and the
//! placement rule that keeps a float16 model off devices without float16.
//! Boundary: the probe runs outside the registry's locks; placement only reads its result.

use rxd_protocol::Capabilities;

use super::{BudgetState, Registry};
use crate::runtime::Target;

impl Registry {
    /// Probes every device not probed yet (blocking; once per device for the daemon's life).
    /// A device whose execution provider does not come up is left unknown: its loads fail
    /// with that reason, not with a capability.
    pub fn probe_devices(&self) {
        for (i, dev) in self.defaults.devices.iter().enumerate() {
            self.caps[i].get_or_init(|| {
                if let Err(e) = self.runtime.probe(&dev.kind) {
                    tracing::info!(device = %dev.name, "capabilities not probed: {e}");
                    return None;
                }
                let target = Target {
                    kind: &dev.kind,
                    options: &dev.options,
                    cache_dir: Some(self.defaults.cache_dir.as_path()),
                };
                let mut caps = self.runtime.capabilities(target);
                if self.defaults.hooks.hides_float16(&dev.name) {
                    tracing::warn!(device = %dev.name, "test hook: no float16 on this device");
                    caps.float16 = rxd_protocol::Support::Absent;
                }
                tracing::info!(
                    device = %dev.name,
                    float16 = caps.float16.name(),
                    int8 = caps.int8.name(),
                    "device capabilities"
                );
                Some(caps)
            });
        }
    }

    /// Whether a device's probe found no float16 (else no model needs to be read for it).
    pub(super) fn some_device_lacks_float16(&self) -> bool {
        (0..self.caps.len()).any(|i| self.capabilities(i).is_some_and(|c| !c.float16.usable()))
    }

    /// Device `i`'s capabilities, once probed.
    pub(super) fn capabilities(&self, i: usize) -> Option<Capabilities> {
        self.caps.get(i).and_then(|c| c.get().copied().flatten())
    }

    /// Device `i`'s load figures, with `queue_depth` requests waiting for its models.
    pub(super) fn device_load_report(
        &self,
        i: usize,
        queue_depth: u64,
    ) -> Option<rxd_protocol::DeviceLoad> {
        Some(self.loads.get(i)?.report(queue_depth))
    }

    /// For a model that computes in float16 (`why`): the devices it may go to among
    /// `candidates` (empty = any, in the budget's preference order) without those whose
    /// probe found no float16 — `candidates` unchanged when none is excluded — or why none
    /// is left. Devices not probed (or whose probe could not run) are not excluded: their
    /// load says what is wrong.
    pub(super) fn float16_candidates(
        &self,
        b: &BudgetState,
        candidates: Vec<usize>,
        why: &str,
    ) -> Result<Vec<usize>, String> {
        let order = if candidates.is_empty() {
            b.budget.preference()
        } else {
            candidates.clone()
        };
        let (with, without): (Vec<usize>, Vec<usize>) = order
            .into_iter()
            .partition(|&d| self.capabilities(d).is_none_or(|c| c.float16.usable()));
        if without.is_empty() {
            return Ok(candidates);
        }
        if with.is_empty() {
            let names: Vec<String> = without
                .iter()
                .map(|&d| {
                    let dev = &self.defaults.devices[d];
                    format!("'{}' ({})", dev.name, dev.kind.name())
                })
                .collect();
            return Err(format!(
                "it computes in float16 ({why}), and no device it may use has float16 \
                 arithmetic: device {} has none (probed at start)",
                names.join(", device ")
            ));
        }
        Ok(with)
    }
}
