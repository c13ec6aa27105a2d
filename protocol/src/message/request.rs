//! Request frames: what a client may ask for after the handshake, and the model reference.
//!
//! The `op` of each request and whether it needs admin rights are decided here, once; the
//! arguments of infer and of the admin operations live in `infer` and `admin`.

use serde::{Deserialize, Serialize};

use super::{CompressRequest, Configure, InferRequest, PublishRequest};

/// Every frame after the handshake from client to daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client, non-zero, unique among the connection's requests in flight.
    pub id: u64,
    pub body: Request,
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum Request {
    Infer(InferRequest),
    ListModels,
    ModelInfo(ModelRef),
    Status,
    Health,
    /// Admin: load a model version from the repository.
    Load(ModelRef),
    /// Admin: unload a model version (in-flight requests finish first).
    Unload(ModelRef),
    /// Admin: re-read the repository (as SIGHUP does).
    Reload,
    /// Admin: keep a model version resident (loads it if needed); never evicted.
    Pin(ModelRef),
    /// Admin: let a pinned version be evicted again.
    Unpin(ModelRef),
    /// Devices, their memory budgets and the models resident on each.
    Devices,
    /// Every metric: global, per model version, per device, process, GPUs.
    Metrics,
    /// Admin: change a loaded version's settings at run time.
    Configure(Configure),
    /// Admin: compress a repository model into a new version, published only when its
    /// accuracy report passes.
    Compress(CompressRequest),
    /// Admin: write a model file into the repository as a new version, then rescan it.
    Publish(PublishRequest),
    /// Admin: place resident versions (of one model, or all) again over the devices their
    /// settings allow: shares on devices no longer allowed or failing leave, missing ones are
    /// added; no request fails.
    Rebalance(RebalanceRequest),
}

/// Which models `rebalance` places again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceRequest {
    /// One model; none: every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Request {
    /// Short name for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Infer(_) => "infer",
            Request::ListModels => "list_models",
            Request::ModelInfo(_) => "model_info",
            Request::Status => "status",
            Request::Health => "health",
            Request::Load(_) => "load",
            Request::Unload(_) => "unload",
            Request::Reload => "reload",
            Request::Pin(_) => "pin",
            Request::Unpin(_) => "unpin",
            Request::Devices => "devices",
            Request::Metrics => "metrics",
            Request::Configure(_) => "configure",
            Request::Compress(_) => "compress",
            Request::Publish(_) => "publish",
            Request::Rebalance(_) => "rebalance",
        }
    }

    /// Whether the request needs admin rights.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::Load(_)
                | Request::Unload(_)
                | Request::Reload
                | Request::Pin(_)
                | Request::Unpin(_)
                | Request::Configure(_)
                | Request::Compress(_)
                | Request::Publish(_)
                | Request::Rebalance(_)
        )
    }
}

/// Names a model and optionally one version (default: the model's default version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}
