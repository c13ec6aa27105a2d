//! Routes one decoded request to the registry, the validator or the reports (`report`), and
//! turns the result into a reply. Checks admin rights before any admin operation runs.
//!
//! Inferences take a synchronous path (`infer`), called from the connection's read loop: a
//! priority above `max-peer-priority` is refused to non-admins, the registry is asked for the
//! model (a non-admin's request may start a load only within the user's load rate, `quota`),
//! the request is validated against the model's signature and submitted under its `Terms`
//! (priority, deadline, the peer's uid as its source). A model that must load first gives a
//! `Cold` request: the first one starts the load on a blocking thread at once (later ones
//! share it), and the connection awaits `Cold::run` in a task of its own.
//! Boundary: no framing or socket IO here (that is `connection`), no ORT (that is `runtime`).

use std::sync::Arc;

use rxd_protocol::{
    ArenaRef, DeviceList, ErrorCode, InferReply, InferRequest, ModelList, ModelState, Reply,
    Request, Tensor, TensorData, WireError,
};

use crate::SharedRef;
use crate::error::{RequestError, Unready};
use crate::peer::Peer;
use crate::registry::{Demand, LoadSlot};
use crate::runtime::{Completion, OutputData, OutputTensor, RuntimeError};
use crate::scheduler::Terms;
use crate::validate;

/// How a request was handled.
// Built once per control request; boxing the reply would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Handled {
    /// The answer, for the connection to send.
    Reply(Reply),
    /// Queued to a model's workers; the completion sends the answer.
    Deferred,
}

/// Builds the completion of an inference once the model version is known.
pub trait MakeCompletion {
    fn make(self, model: &crate::model::LoadedModel) -> Box<dyn Completion>;
}

/// Handles a control request (or an inference, queued through `completion`); `arena` is the
/// sending connection's arena, which `publish` may read its file from.
pub async fn handle(
    shared: &SharedRef,
    peer: &Peer,
    req: Request,
    arena: Option<Arc<rxd_shm::Mapping>>,
    completion: impl MakeCompletion,
) -> Result<Handled, RequestError> {
    if req.is_admin() && !peer.admin {
        return Err(RequestError::PermissionDenied { op: req.op() });
    }
    let reply = match req {
        Request::Infer(infer) => {
            if let Queued::Cold(cold) = self::infer(shared, infer, None, peer, completion)? {
                cold.run(shared.clone(), None).await?;
            }
            return Ok(Handled::Deferred);
        }
        Request::ListModels => {
            let (s, admin) = (shared.clone(), peer.admin);
            let mut models = report(move || s.registry.list()).await?;
            if !admin {
                models.iter_mut().for_each(crate::report::redact);
            }
            Reply::ListModels(ModelList { models })
        }
        Request::ModelInfo(r) => match shared.registry.info(&r.model, r.version) {
            // The signature needs the model: load it as a request would — under the version
            // policy (a version it does not serve loads only for an admin, as with `load`).
            Err(RequestError::NotReady { state, .. })
                if shared.registry.load_on_demand() && state != Unready::In(ModelState::Failed) =>
            {
                let admin = peer.admin;
                let (s, peer) = (shared.clone(), peer.clone());
                let run = finish_apart(shared);
                let info = blocking(move || {
                    if peer.admin {
                        s.registry.load_for_request(&r.model, r.version, run)?;
                    } else {
                        let may_load = load_gate(&s, &peer, &r.model);
                        match s.registry.demand_gated(&r.model, r.version, &may_load)? {
                            Demand::Ready(_) => {}
                            Demand::Cold { slot, start } => {
                                if let Some(ticket) = start {
                                    run(ticket);
                                }
                                slot.wait_blocking()?;
                            }
                        }
                    }
                    s.registry.info(&r.model, r.version)
                })
                .await??;
                Reply::ModelInfo(redacted(info, admin))
            }
            other => Reply::ModelInfo(redacted(other?, peer.admin)),
        },
        Request::Status => {
            #[cfg(feature = "alloc-count")]
            crate::alloc_count::log_totals();
            let s = shared.clone();
            Reply::Status(report(move || crate::report::status(&s)).await?)
        }
        Request::Health => {
            let (s, admin) = (shared.clone(), peer.admin);
            Reply::Health(report(move || crate::report::health(&s, admin)).await?)
        }
        Request::Load(r) => {
            rxd_protocol::check_name(&r.model)?;
            let s = shared.clone();
            let run = finish_apart(shared);
            let summary = blocking(move || {
                // Pick up models added to the repository since the last scan.
                s.registry
                    .scan()
                    .map_err(|e| RequestError::Internal(format!("cannot read repository: {e}")))?;
                s.registry.load_for_request(&r.model, r.version, run)
            })
            .await??;
            Reply::Load(summary)
        }
        Request::Unload(r) => {
            let s = shared.clone();
            let summary = blocking(move || s.registry.unload(&r.model, r.version)).await??;
            Reply::Unload(summary)
        }
        Request::Pin(r) => {
            let s = shared.clone();
            let summary = blocking(move || s.registry.pin(&r.model, r.version)).await??;
            Reply::Pin(summary)
        }
        Request::Unpin(r) => Reply::Unpin(shared.registry.unpin(&r.model, r.version)?),
        Request::Devices => {
            let s = shared.clone();
            let devices = report(move || s.registry.devices()).await?;
            Reply::Devices(DeviceList { devices })
        }
        Request::Metrics => {
            let s = shared.clone();
            Reply::Metrics(Box::new(report(move || crate::report::metrics(&s)).await?))
        }
        Request::Compress(c) => {
            let s = shared.clone();
            let reply = blocking(move || crate::compression::compress(&s, &c)).await??;
            Reply::Compress(reply)
        }
        Request::Publish(p) => {
            let s = shared.clone();
            let reply = blocking(move || {
                let (p, bytes) = crate::publish::take_bytes(&s, p, arena.as_ref())?;
                crate::publish::publish(&s, &p, &bytes)
            })
            .await??;
            Reply::Publish(reply)
        }
        Request::Configure(c) => {
            rxd_protocol::check_name(&c.model)?;
            let s = shared.clone();
            let view = blocking(move || s.registry.configure(&c)).await??;
            Reply::Configure(view)
        }
        Request::Rebalance(r) => {
            if let Some(m) = &r.model {
                rxd_protocol::check_name(m)?;
            }
            let s = shared.clone();
            let models = blocking(move || s.registry.rebalance(r.model.as_deref())).await??;
            Reply::Rebalance(ModelList { models })
        }
        Request::Reload => {
            let s = shared.clone();
            let models = blocking(move || crate::reload::apply(&s))
                .await?
                .map_err(RequestError::Invalid)?;
            Reply::Reload(ModelList { models })
        }
    };
    Ok(Handled::Reply(reply))
}

/// What became of an inference.
pub enum Queued<M> {
    /// Queued to the model's workers; the completion answers.
    Done,
    /// The model is not resident: the caller awaits [`Cold::run`] off the read loop.
    Cold(Box<Cold<M>>),
}

/// An inference waiting for its model to load.
pub struct Cold<M> {
    req: InferRequest,
    completion: M,
    slot: Arc<LoadSlot>,
    deadline: Option<std::time::Instant>,
    peer: Peer,
}

/// Validates and queues an inference (synchronous: no await, no ORT). On success the
/// completion answers (or, for a cold model, the returned [`Cold`] does); on error nothing
/// was queued and the caller answers. A priority above `max-peer-priority` is for admins
/// only (`permission_denied` for others).
pub fn infer<M: MakeCompletion>(
    shared: &SharedRef,
    req: InferRequest,
    arena: Option<&Arc<rxd_shm::Mapping>>,
    peer: &Peer,
    completion: M,
) -> Result<Queued<M>, RequestError> {
    let max = shared.config.max_peer_priority;
    if let Some(p) = req.priority.filter(|&p| p > max && !peer.admin) {
        return Err(RequestError::PriorityDenied { priority: p, max });
    }
    let deadline = req
        .timeout_ms
        .map(|ms| std::time::Instant::now() + std::time::Duration::from_millis(ms));
    let terms = Terms {
        priority: req.priority,
        deadline,
        source: u64::from(peer.uid),
        bounded: !peer.admin,
    };
    let demanded = {
        let may_load = load_gate(shared, peer, &req.model);
        shared
            .registry
            .demand_gated(&req.model, req.version, &may_load)?
    };
    let model = match demanded {
        Demand::Ready(m) => m,
        Demand::Cold { slot, start } => {
            // The load starts here, never carried in the `Cold` that waits for it: a `Cold`
            // dropped holding its ticket (its last retry, or a task never polled) abandoned
            // the load that other requests wait on, and left the version `loading`.
            if let Some(ticket) = start {
                finish_apart(shared)(ticket);
            }
            return Ok(Queued::Cold(Box::new(Cold {
                req,
                completion,
                slot,
                deadline,
                peer: peer.clone(),
            })));
        }
    };
    let checked = validate::check(&model.signature, req, arena).inspect_err(|e| {
        model.metrics.record_outcome(Some(e.code));
    })?;
    if !peer.admin {
        too_long(shared, &model, &checked).inspect_err(|e| {
            model.metrics.record_outcome(Some(e.code));
        })?;
    }
    model.submit(checked, completion.make(&model), terms);
    Ok(Queued::Done)
}

/// A request expected to keep a worker longer than a quarter of `watchdog-stuck-secs` (30 s
/// by default) is refused for non-admins (`tensor_too_large`): a batch runs to its end, one
/// that long holds up every request of the model behind it, and one past the watchdog's
/// limit has the daemon restarted with every user's requests. Expected by its input elements
/// at the lowest time per element measured for the model (dimensions within `max-dims` can
/// still be 64 times the warmup's pixels, and more rows).
fn too_long(
    shared: &SharedRef,
    model: &crate::model::LoadedModel,
    checked: &validate::Checked,
) -> Result<(), WireError> {
    let elements = crate::runtime::input_elements(&checked.inputs);
    let limit = shared.config.watchdog_stuck / 4;
    match model.scheduler().expected_compute(elements) {
        Some(t) if t > limit => Err(WireError::new(
            ErrorCode::TensorTooLarge,
            format!(
                "this request is expected to take {:.0} s of compute (by its size: {elements} \
                 input elements), more than one request may ({} s: a quarter of \
                 watchdog-stuck-secs); send smaller inputs, or fewer rows per request",
                t.as_secs_f64(),
                limit.as_secs()
            ),
        )),
        _ => Ok(()),
    }
}

impl<M: MakeCompletion> Cold<M> {
    /// Waits for the load (started by [`infer`]; bounded by the
    /// request's deadline: past it the answer is `deadline_exceeded` and nothing runs), then
    /// queues the request. A load error (over budget, failed) is the request's error.
    pub async fn run(
        mut self: Box<Self>,
        shared: SharedRef,
        arena: Option<Arc<rxd_shm::Mapping>>,
    ) -> Result<(), RequestError> {
        for _ in 0..3 {
            match self.deadline {
                Some(d) => tokio::time::timeout_at(d.into(), self.slot.wait())
                    .await
                    .map_err(|_| RequestError::Runtime(RuntimeError::DeadlineExceeded))??,
                None => self.slot.wait().await?,
            }
            match infer(
                &shared,
                self.req,
                arena.as_ref(),
                &self.peer,
                self.completion,
            )? {
                Queued::Done => return Ok(()),
                // Evicted again before it could queue (a tiny budget under churn): retry.
                Queued::Cold(again) => self = again,
            }
        }
        Err(RequestError::NotReady {
            model: self.req.model.clone(),
            version: self.req.version.unwrap_or(0),
            state: Unready::In(ModelState::Evicted),
            detail: Some("evicted again before the request could run; retry".into()),
        })
    }
}

/// Whether a request of `peer` may start a load of `model` now: a user's requests start loads
/// at a bounded rate (`quota`), so a client asking for model after model cannot make the
/// daemon load and evict without pause; beyond it the answer is `busy`. `Ok(true)`: a user's
/// load, which spares the versions used in the last `SPARE_RECENT_MS` (an admin's may evict
/// any idle one).
fn load_gate<'a>(
    shared: &'a SharedRef,
    peer: &'a Peer,
    model: &'a str,
) -> impl Fn() -> Result<bool, RequestError> + 'a {
    move || {
        if shared.quotas.try_load(peer.uid, peer.admin) {
            // A user's load spares the versions others use (an admin's may evict any).
            return Ok(!peer.admin);
        }
        Err(RequestError::Busy(format!(
            "model '{model}' is not loaded, and this user's requests have started loads \
                 faster than {} at once and one per {:?}; retry in a moment",
            crate::quota::LOAD_BURST,
            crate::quota::LOAD_EVERY
        )))
    }
}

/// The reply to a finished inference.
pub fn infer_reply(model: &str, version: u64, outputs: Vec<OutputTensor>) -> Reply {
    Reply::Infer(InferReply {
        model: model.into(),
        version,
        outputs: outputs
            .into_iter()
            .map(|o| Tensor {
                name: o.name,
                dtype: o.dtype,
                shape: o.shape,
                data: match o.data {
                    OutputData::Inline(b) => TensorData::Inline(b),
                    OutputData::Arena { offset, len } => {
                        TensorData::Arena(ArenaRef { offset, len })
                    }
                },
            })
            .collect(),
    })
}

/// `info` as a peer may see it (`admin`, or [`crate::report::redact`]ed).
fn redacted(mut info: rxd_protocol::ModelInfo, admin: bool) -> rxd_protocol::ModelInfo {
    if !admin {
        crate::report::redact(&mut info.summary);
    }
    info
}

/// What carries out a load a request started: on a blocking thread of its own, so that the
/// request waits for it like any other waiter and is answered (`shutting_down`) when the
/// daemon stops, however long the load still takes. Made on the runtime.
fn finish_apart(shared: &SharedRef) -> impl FnOnce(Box<crate::registry::Ticket>) + Send + 'static {
    let (s, runtime) = (shared.clone(), tokio::runtime::Handle::current());
    move |ticket| {
        runtime.spawn_blocking(move || {
            let _ = s.registry.finish(ticket);
        });
    }
}

/// Builds a report any peer may ask for (status, health, models, devices, metrics): they
/// cost real CPU (every model's state and distributions; on a GPU host, the driver's
/// queries), so one at a time daemon-wide, in turn (first come, first served), off the IO
/// threads: a flood of them costs at most one core and never delays another client's frames
/// or the ring poller.
pub(crate) async fn report<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RequestError> {
    static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let _turn = ONE_AT_A_TIME
        .acquire()
        .await
        .map_err(|e| RequestError::Internal(e.to_string()))?;
    blocking(f).await
}

/// Runs blocking work (loads, reports, reloads) on the blocking pool, off the IO threads; a
/// task that panicked is an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RequestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RequestError::Internal(e.to_string()))
}
