//! Routes one decoded request to the registry, the validator or the status reports, and turns
//! the result into a reply. Checks admin rights before any admin operation runs.
//! Boundary: no framing or socket IO here (that is `connection`), no ORT (that is `runtime`).

use rxd_protocol::{
    Health, HealthState, InferReply, ModelList, ModelState, PROTOCOL_VERSION, Reply, Request,
    Status, Tensor,
};

use crate::SharedRef;
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::validate;

pub async fn handle(shared: &SharedRef, peer: &Peer, req: Request) -> Result<Reply, RequestError> {
    if req.is_admin() && !peer.admin {
        return Err(RequestError::PermissionDenied { op: req.op() });
    }
    match req {
        Request::Infer(infer) => {
            let model = shared.registry.get(&infer.model, infer.version)?;
            let checked = validate::check(&model.signature, infer)?;
            let outputs = model.infer(checked).await?;
            Ok(Reply::Infer(InferReply {
                model: model.name.clone(),
                version: model.version,
                outputs: outputs
                    .into_iter()
                    .map(|o| Tensor::inline(o.name, o.dtype, o.shape, o.bytes))
                    .collect(),
            }))
        }
        Request::ListModels => Ok(Reply::ListModels(ModelList {
            models: shared.registry.list(),
        })),
        Request::ModelInfo(r) => Ok(Reply::ModelInfo(shared.registry.info(&r.model, r.version)?)),
        Request::Status => Ok(Reply::Status(status(shared))),
        Request::Health => Ok(Reply::Health(health(shared))),
        Request::Load(r) => {
            rxd_protocol::check_name(&r.model)?;
            let s = shared.clone();
            let summary = tokio::task::spawn_blocking(move || {
                // Pick up models added to the repository since the last scan.
                s.registry
                    .scan()
                    .map_err(|e| RequestError::Internal(format!("cannot read repository: {e}")))?;
                s.registry.load(&r.model, r.version)
            })
            .await
            .map_err(|e| RequestError::Internal(e.to_string()))??;
            Ok(Reply::Load(summary))
        }
        Request::Unload(r) => {
            let s = shared.clone();
            let summary =
                tokio::task::spawn_blocking(move || s.registry.unload(&r.model, r.version))
                    .await
                    .map_err(|e| RequestError::Internal(e.to_string()))??;
            Ok(Reply::Unload(summary))
        }
        _ => Err(RequestError::Internal("request kind not handled".into())),
    }
}

fn uptime_ms(shared: &SharedRef) -> u64 {
    shared.started.elapsed().as_millis() as u64
}

pub fn status(shared: &SharedRef) -> Status {
    let (ready, failed) = shared.registry.counts();
    let m = &shared.metrics;
    Status {
        server: crate::SERVER_NAME.into(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        uptime_ms: uptime_ms(shared),
        socket: shared.config.socket.display().to_string(),
        model_repository: shared.config.model_repository.display().to_string(),
        ort_version: shared.registry.runtime().version().into(),
        ort_library: shared.registry.runtime().library().display().to_string(),
        intra_op_threads: shared.config.intra_op_threads,
        models_ready: ready,
        models_failed: failed,
        connections: Metrics::get(&m.connections_open),
        requests_total: Metrics::get(&m.requests_total),
        requests_failed: Metrics::get(&m.requests_failed),
        in_flight: Metrics::get(&m.in_flight),
    }
}

pub fn health(shared: &SharedRef) -> Health {
    let models = shared.registry.list();
    let ready = models
        .iter()
        .filter(|m| m.state == ModelState::Ready)
        .count() as u32;
    let mut reasons: Vec<String> = models
        .iter()
        .filter(|m| m.state == ModelState::Failed)
        .map(|m| {
            format!(
                "model '{}' version {} failed to load: {}",
                m.name,
                m.version,
                m.error.as_deref().unwrap_or("unknown error")
            )
        })
        .collect();
    let state = if ready == 0 && !models.is_empty() {
        reasons.insert(0, "no model is ready".into());
        HealthState::Unhealthy
    } else if !reasons.is_empty() {
        HealthState::Degraded
    } else {
        HealthState::Healthy
    };
    Health {
        state,
        reasons,
        ready: true,
        models_loaded: ready,
        uptime_ms: uptime_ms(shared),
        last_error: shared.metrics.last_error(),
    }
}
