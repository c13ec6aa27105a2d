//! A model version ready to serve ([`LoadedModel`]) and the serving hot path into it:
//! [`LoadedModel::submit`] stamps its last use (for LRU eviction) and hands a checked request
//! to the coalescer in front of the version's scheduler.
//! Invariant: a `LoadedModel` lives as long as any request holds it; the last drop drains
//! its scheduler (everything queued runs) and joins its workers.
//! Boundary: no registry state, no locks of the registry; the registry decides when a model
//! is created and dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::coalesce::Coalescer;
use crate::runtime::{Built, Completion, Crew, NodePlacement, RuntimeError, Signature};
use crate::scheduler::{Scheduler, Terms, policy};
use crate::validate::Checked;

/// A model version that is ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub signature: Signature,
    /// The device it runs on (the CPU device when it fell back).
    pub device: String,
    /// The execution provider its sessions were created for.
    pub ep: &'static str,
    /// Why it runs on the CPU instead of its device, when it fell back.
    pub fallback: Option<String>,
    /// Which execution provider ran each node (from the profiled warmup).
    pub placement: Option<NodePlacement>,
    scheduler: Arc<Scheduler>,
    pub coalescer: Arc<Coalescer>,
    /// Milliseconds since the registry's epoch when a request last used it (LRU order).
    last_used: AtomicU64,
    epoch: Instant,
    /// ORT's CPU arena after warmup (`TotalAllocated` summed over instances), if reported.
    pub arena_bytes: Option<u64>,
    /// Kept for the daemon's life, shared with every load of this version.
    pub metrics: Arc<crate::metrics::ModelMetrics>,
    /// What a model.toml `compress` strategy did (served compressed, or why not).
    pub compression: Option<String>,
    /// What load-time tuning chose, when it chose anything.
    pub tuning: Option<rxd_protocol::Tuning>,
    /// Why it chose nothing, when it did not.
    pub not_tuned: Option<String>,
    /// What dequantize-at-load did, when the file was a weights-only form.
    pub dequantized: Option<Box<rxd_protocol::Dequantized>>,
}

/// What a version serves with besides its sessions.
pub struct Serving {
    pub name: String,
    pub version: u64,
    /// The device it runs on.
    pub device: String,
    /// The device's cores (`[[device]] cores`), which its workers are pinned to.
    pub cores: Option<Arc<[usize]>>,
    pub scheduler: policy::Settings,
    pub default_priority: u8,
    /// Requests with at most this many input bytes are coalesced (0 = off).
    pub coalesce_max_bytes: u64,
    /// Result cache capacity (0 = off).
    pub cache_bytes: u64,
    pub metrics: Arc<crate::metrics::ModelMetrics>,
    pub compression: Option<String>,
    pub tuning: Option<rxd_protocol::Tuning>,
    pub not_tuned: Option<String>,
    pub dequantized: Option<Box<rxd_protocol::Dequantized>>,
    /// The registry's time origin for `last_used`.
    pub epoch: Instant,
    /// Test hook: its workers hang on their first batch.
    pub wedge: bool,
    /// Test hook: its device fails every run.
    pub fail_runs: bool,
    /// Test hook: its device's runs fail inside ONNX Runtime.
    pub ort_fails: bool,
    /// The longest expected run of a batch the ring poller runs itself.
    pub inline_max: std::time::Duration,
    /// A run holding a non-admin's request is stopped after this long.
    pub run_limit: std::time::Duration,
    /// Users whose runs of the model were stopped lately (the registry's, per model name).
    pub strikes: Arc<crate::runtime::Strikes>,
    /// Its device's busy time and rows (the workers record each batch there).
    pub device_load: Arc<crate::metrics::DeviceLoad>,
}

impl LoadedModel {
    /// Starts the built sessions' workers behind a scheduler and a coalescer; fails when a
    /// worker thread cannot start.
    pub fn start(built: Built, s: Serving) -> Result<LoadedModel, RuntimeError> {
        let batchable = built.signature.batchable();
        let axes = Arc::new(built.signature.axes.clone());
        let crew = LoadedModel::crew(built.sessions, built.pad_to, axes, &s);
        let scheduler = Scheduler::start(
            crew,
            s.scheduler,
            batchable,
            s.default_priority,
            s.metrics.clone(),
        )?;
        Ok(LoadedModel {
            name: s.name,
            version: s.version,
            signature: built.signature,
            device: s.device,
            ep: built.ep,
            fallback: built.fallback,
            placement: built.placement,
            scheduler,
            coalescer: Coalescer::new(s.coalesce_max_bytes, s.cache_bytes),
            last_used: AtomicU64::new(s.epoch.elapsed().as_millis() as u64),
            epoch: s.epoch,
            arena_bytes: built.arena_bytes,
            metrics: s.metrics,
            compression: s.compression,
            tuning: s.tuning,
            not_tuned: s.not_tuned,
            dequantized: s.dequantized,
        })
    }

    /// The workers of built sessions, for this version's scheduler (its first lane, or a
    /// share on another device joining it).
    pub fn crew(
        sessions: Vec<crate::runtime::WorkerSessions>,
        pad_to: Vec<u32>,
        axes: Arc<crate::runtime::Axes>,
        s: &Serving,
    ) -> Crew {
        Crew {
            label: format!("{}-{}", s.name, s.version),
            device: s.device.clone(),
            cores: s.cores.clone(),
            sessions,
            pad_to,
            wedge: s.wedge,
            load: s.device_load.clone(),
            lane: 0,
            fail_runs: s.fail_runs,
            ort_fails: s.ort_fails,
            inline_max: s.inline_max,
            run_limit: Some(s.run_limit),
            strikes: s.strikes.clone(),
            axes,
        }
    }

    /// Queues a checked request; `completion` receives the outputs or the error (a full
    /// queue, a passed deadline) exactly once.
    pub fn submit(
        self: &Arc<Self>,
        checked: Checked,
        completion: Box<dyn Completion>,
        terms: Terms,
    ) {
        self.last_used
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.coalescer.submit(
            &self.name,
            self.version,
            &self.scheduler,
            checked,
            completion,
            terms,
            self.clone(),
        );
    }

    pub fn instances(&self) -> usize {
        self.scheduler.instances()
    }

    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// Whether requests are batched (every input and output has a dynamic first dimension).
    pub fn batchable(&self) -> bool {
        self.signature.batchable()
    }

    /// When a request last used it, in ms since the registry's epoch.
    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Requests are queued, running, or hold the model between lookup and queueing.
    pub fn busy(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) > 1 || self.scheduler.busy()
    }
}

impl Drop for LoadedModel {
    /// Unloading never drops a request: everything queued runs first.
    fn drop(&mut self) {
        self.scheduler.drain();
    }
}
