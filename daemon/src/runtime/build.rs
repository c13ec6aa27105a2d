//! Building a model version's sessions: one worker's sessions per instance on the device's
//! execution provider (or on the CPU when the device cannot come up and fallback is allowed),
//! warmed at the batch sizes it will serve, the first instance's warmup profiled on an
//! accelerator to learn which provider runs each node, and ORT's arena statistics read after
//! warmup.
//! Boundary: knows nothing about model.toml, the registry or the budget; the caller passes a
//! [`BuildSpec`] in and gets the sessions, the signature and what the warmup found back
//! ([`Built`]), and decides input limits itself ([`Built::limit`]).

use std::collections::HashMap;
use std::path::Path;

use super::{
    ArenaRelease, AxesConfig, DeviceKind, DeviceSession, NodePlacement, Runtime, RuntimeError,
    SessionOptions, Signature, Target, WorkerSessions, arena_stats, node_placement, warmup,
    warmup_shape, zero_inputs,
};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec<'a> {
    /// The model and version, for logs and the profile's file name.
    pub name: &'a str,
    pub version: u64,
    /// The device's name, for logs.
    pub device: &'a str,
    pub path: &'a Path,
    /// The model made from the file in memory (dequantized at load): sessions are made from
    /// it; `None`: from the file.
    pub bytes: Option<&'a [u8]>,
    pub options: SessionOptions,
    pub target: Target<'a>,
    /// When the device's execution provider cannot be created, run on the CPU instead.
    pub cpu_fallback: bool,
    /// Sessions (workers).
    pub instances: u32,
    /// Run zero inputs before serving.
    pub warmup: bool,
    /// Shapes of dynamic dimensions for warmup inputs; when given, a failing warmup fails the
    /// build (without, it is logged and the build goes on).
    pub warmup_dims: Option<&'a HashMap<String, Vec<i64>>>,
    /// Configured batch sizes to pad batches to (see [`batch_sizes`]).
    pub batch_sizes: Option<&'a [u32]>,
    /// Where each tensor's rows are (model.toml `batch-axes`, `shared-inputs`).
    pub axes: &'a AxesConfig,
    pub max_batch_rows: u32,
    /// On accelerators, one session per padded batch size.
    pub session_per_batch_size: bool,
}

/// A built version, ready to be handed to a scheduler.
pub struct Built {
    pub sessions: Vec<WorkerSessions>,
    pub signature: Signature,
    /// The execution provider its sessions run on.
    pub ep: &'static str,
    /// Why it runs on the CPU instead of its device, when it fell back.
    pub fallback: Option<String>,
    /// Which execution provider ran each node (from the profiled warmup; `None` on the CPU,
    /// where the CPU EP runs every node).
    pub placement: Option<NodePlacement>,
    /// ORT's CPU arena after warmup (`TotalAllocated` summed over instances), if reported.
    pub arena_bytes: Option<u64>,
    /// Batch sizes batches are padded to.
    pub pad_to: Vec<u32>,
    /// The largest batch any warmup ran (or would run, with warmup off).
    pub warm_rows: u64,
    /// Whether the batch-1 warmup ran: its inputs then shrink the arena after large runs.
    warm_one: bool,
    /// The outputs' shapes in the first instance's batch-1 warmup.
    warmed_outputs: Option<Vec<Vec<u64>>>,
    warmup_dims: HashMap<String, Vec<i64>>,
}

impl Built {
    /// Sets what requests may send with `limit` (which returns the input elements of the
    /// largest warmup run, or why the limits are wrong), records the batch-1 warmup's shapes
    /// in the signature, and makes every worker give back what runs larger than that warmup
    /// grow ORT's arena by ([`ArenaRelease`]).
    pub fn limit<E>(
        &mut self,
        limit: impl FnOnce(&mut Signature, u64) -> Result<u64, E>,
    ) -> Result<(), E> {
        let keep = limit(&mut self.signature, self.warm_rows)?;
        if let (true, Some(outputs)) = (self.warm_one, self.warmed_outputs.take()) {
            let axes = self.signature.axes.inputs.clone();
            for (spec, axis) in self.signature.inputs.iter_mut().zip(axes) {
                let given = self.warmup_dims.get(&spec.name).map(Vec::as_slice);
                spec.warmup_dims = warmup_shape(spec, axis, 1, given);
            }
            for (spec, shape) in self.signature.outputs.iter_mut().zip(outputs) {
                spec.warmup_dims = shape;
            }
        }
        for worker in &mut self.sessions {
            let tidy = if self.warm_one {
                zero_inputs(&self.signature, 1, &self.warmup_dims).unwrap_or_default()
            } else {
                Vec::new()
            };
            worker.arena = ArenaRelease::above(keep, tidy);
        }
        Ok(())
    }
}

/// The batch sizes a model's batches are padded up to: the configured list (sorted, without
/// sizes above max-batch-rows or zero), or by default on an NVIDIA device (CUDA, TensorRT) the
/// powers of two up to max-batch-rows and max-batch-rows itself; none for a model that cannot
/// batch.
pub fn batch_sizes(
    configured: Option<&[u32]>,
    batchable: bool,
    max_batch_rows: u32,
    on_gpu: bool,
) -> Vec<u32> {
    if !batchable || max_batch_rows <= 1 {
        return Vec::new();
    }
    let mut sizes: Vec<u32> = match configured {
        Some(list) => list
            .iter()
            .copied()
            .filter(|&b| (1..=max_batch_rows).contains(&b))
            .collect(),
        None if on_gpu => (0..u32::BITS)
            .map(|k| 1u32 << k)
            .take_while(|&b| b < max_batch_rows)
            .chain([max_batch_rows])
            .collect(),
        None => Vec::new(),
    };
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

impl Runtime {
    /// Creates and warms a version's sessions. On an accelerator the first instance's warmup
    /// is profiled (in the daemon's private directory, never at a predictable path of a
    /// shared one) to learn which execution provider runs each node; on the CPU there is
    /// nothing to learn, and profiling made a load 10 % slower (YOLOv8n 65 ms against 58,
    /// ppocr_det 94 against 85). Blocking.
    pub fn build(&self, spec: &BuildSpec<'_>) -> Result<Built, RuntimeError> {
        let (name, version) = (spec.name, spec.version);
        let no_dims = HashMap::new();
        let warmup_dims = spec.warmup_dims.unwrap_or(&no_dims);
        let profile = self.scratch_dir().join(format!("profile-{name}-{version}"));
        let mut target = spec.target;
        let mut fallback: Option<String> = None;
        let mut placement = None;
        let mut sessions = Vec::new();
        let mut signature = None;
        let mut arena: Option<u64> = None;
        let mut pad_to: Vec<u32> = Vec::new();
        let mut warm_one = spec.warmup;
        let mut warmed_outputs: Option<Vec<Vec<u64>>> = None;
        for i in 0..spec.instances {
            let prof = (i == 0 && spec.warmup && *target.kind != DeviceKind::Cpu)
                .then_some(profile.as_path());
            let (mut session, mut sig) = match self.session_on(
                spec.path,
                spec.bytes,
                &spec.options,
                target,
                prof,
            ) {
                Ok(s) => s,
                Err(e) if i == 0 && *target.kind != DeviceKind::Cpu && spec.cpu_fallback => {
                    // Allowed to fall back: run on the CPU, and say so (health: degraded).
                    let why = format!("{} is unavailable: {e}", target.kind.ep());
                    tracing::warn!(model = %name, version, device = spec.device, "running on the CPU: {why}");
                    fallback = Some(why);
                    target = Target::cpu();
                    self.session_on(spec.path, spec.bytes, &spec.options, target, prof)?
                }
                Err(e) => return Err(e),
            };
            sig.set_axes(spec.axes)
                .map_err(|message| RuntimeError::Unsupported {
                    path: spec.path.to_path_buf(),
                    message,
                })?;
            // The shape-change cost these avoid was measured on ORT's CUDA EP (and TensorRT
            // builds an engine per shape); the CPU and WebGPU keep batches at their own size.
            let nvidia = matches!(
                target.kind,
                DeviceKind::Cuda { .. } | DeviceKind::TensorRt { .. }
            );
            if i == 0 {
                pad_to = batch_sizes(
                    spec.batch_sizes,
                    sig.batchable(),
                    spec.max_batch_rows,
                    nvidia,
                );
            }
            let per_size = spec.session_per_batch_size
                && *target.kind != DeviceKind::Cpu
                && pad_to.iter().any(|&b| b > 1);
            // Zero inputs at `rows` rows: the outputs' shapes, or None (logged) when it fails
            // with automatic shapes; with configured warmup-dims a failure fails the build.
            let warm_at = |session: &mut DeviceSession,
                           rows: u64|
             -> Result<Option<Vec<Vec<u64>>>, RuntimeError> {
                match warmup(session, &sig, rows, warmup_dims) {
                    Ok(shapes) => Ok(Some(shapes)),
                    Err(e) if spec.warmup_dims.is_some() => Err(RuntimeError::Warmup {
                        rows,
                        message: e.to_string(),
                    }),
                    Err(e) => {
                        tracing::warn!(
                            model = %name,
                            version,
                            "warmup at batch {rows} with automatic shapes failed (set \
                             warmup-dims in model.toml): {e}"
                        );
                        Ok(None)
                    }
                }
            };
            if spec.warmup {
                // With a session per batch size, `main` only ever runs batch 1 (and sizes above
                // the largest): warming it at others would leave it planned for the wrong shape.
                let mut sizes = vec![1u64];
                if !per_size {
                    if sig.batchable() && spec.max_batch_rows > 1 {
                        sizes.push(u64::from(spec.max_batch_rows));
                    }
                    sizes.extend(pad_to.iter().map(|&b| u64::from(b)));
                }
                sizes.sort_unstable();
                sizes.dedup();
                for rows in sizes {
                    match warm_at(&mut session, rows)? {
                        Some(shapes) if rows == 1 && i == 0 => warmed_outputs = Some(shapes),
                        Some(_) => {}
                        None => {
                            warm_one &= rows > 1;
                            break;
                        }
                    }
                }
            }
            if prof.is_some() {
                match session.with(|s| node_placement(s, target.kind.ep())) {
                    Ok(p) => {
                        let nodes: Vec<String> = p
                            .nodes
                            .iter()
                            .map(|(ep, n)| format!("{n} on {ep}"))
                            .collect();
                        tracing::info!(model = %name, version, "nodes: {}", nodes.join(", "));
                        placement = Some(p);
                    }
                    Err(e) => tracing::warn!(model = %name, version, "no node placement: {e}"),
                }
            }
            match arena_stats(session.get()) {
                Ok(stats) => {
                    tracing::debug!(model = %name, version, ?stats, "ORT arena after warmup");
                    if let Some((_, v)) = stats.iter().find(|(k, _)| k == "TotalAllocated") {
                        *arena.get_or_insert(0) += (*v).max(0) as u64;
                    }
                }
                Err(e) => tracing::debug!(model = %name, version, "no ORT arena statistics: {e}"),
            }
            // On a GPU, a session per padded batch size (see `WorkerSessions`), each warmed at
            // its size; `main` serves batch size 1 and any size above the largest.
            let mut worker = WorkerSessions::from(session);
            worker.cpu = *target.kind == DeviceKind::Cpu;
            if per_size {
                for &rows in pad_to.iter().filter(|&&b| b > 1) {
                    let (mut extra, _) =
                        self.session_on(spec.path, spec.bytes, &spec.options, target, None)?;
                    if spec.warmup {
                        let _ = warm_at(&mut extra, u64::from(rows))?;
                    }
                    worker.by_rows.push((u64::from(rows), extra));
                }
            }
            sessions.push(worker);
            signature = Some(sig);
        }
        let signature = signature.ok_or(RuntimeError::NoInstances)?;
        let warm_rows = pad_to
            .iter()
            .map(|&b| u64::from(b))
            .chain([1])
            .chain(
                (signature.batchable() && spec.max_batch_rows > 1)
                    .then_some(u64::from(spec.max_batch_rows)),
            )
            .max()
            .unwrap_or(1);
        Ok(Built {
            sessions,
            signature,
            ep: target.kind.ep(),
            fallback,
            placement,
            arena_bytes: arena,
            pad_to,
            warm_rows,
            warm_one,
            warmed_outputs,
            warmup_dims: warmup_dims.clone(),
        })
    }

    /// Removes what ORT's profiler wrote for a version in the private directory (a build
    /// that failed after profiling began leaves its profile behind).
    pub fn remove_profiles(&self, name: &str, version: u64) {
        let prefix = format!("profile-{name}-{version}_");
        for entry in std::fs::read_dir(self.scratch_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::batch_sizes;

    #[test]
    fn gpu_devices_pad_to_powers_of_two_and_the_cpu_does_not() {
        assert_eq!(batch_sizes(None, true, 32, true), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(batch_sizes(None, true, 12, true), vec![1, 2, 4, 8, 12]);
        assert!(batch_sizes(None, true, 32, false).is_empty());
        assert!(
            batch_sizes(None, false, 32, true).is_empty(),
            "cannot batch"
        );
        assert!(batch_sizes(None, true, 1, true).is_empty(), "no batching");
        assert_eq!(
            batch_sizes(Some(&[16, 0, 4, 64, 4]), true, 32, false),
            vec![4, 16],
            "configured: sorted, deduplicated, within 1..=max-batch-rows"
        );
        assert!(
            batch_sizes(Some(&[]), true, 32, true).is_empty(),
            "[] turns it off"
        );
    }
}
