//! The control requests: one method per op, each sending the request and matching its reply.
//!
//! No state of their own; `publish` lends its arena buffer to the request until the answer.

use rxd_protocol::{Health, ModelInfo, ModelRef, ModelSummary, Reply, Request, Status, TensorData};

use super::Client;
use crate::ClientError;
use crate::arena::ArenaBuf;

impl Client {
    pub async fn list_models(&self) -> Result<Vec<ModelSummary>, ClientError> {
        match self.request(Request::ListModels).await? {
            Reply::ListModels(l) => Ok(l.models),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn model_info(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<ModelInfo, ClientError> {
        match self
            .request(Request::ModelInfo(model_ref(model, version)))
            .await?
        {
            Reply::ModelInfo(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.request(Request::Status).await? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        match self.request(Request::Health).await? {
            Reply::Health(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: load a model version.
    pub async fn load(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<ModelSummary, ClientError> {
        match self
            .request(Request::Load(model_ref(model, version)))
            .await?
        {
            Reply::Load(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: re-read the repository (new models and versions load; old versions unload once
    /// the new one is ready).
    pub async fn reload(&self) -> Result<Vec<ModelSummary>, ClientError> {
        match self.request(Request::Reload).await? {
            Reply::Reload(l) => Ok(l.models),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: place resident versions (of `model`, or all) again over the devices their
    /// settings allow; returns them with their devices.
    pub async fn rebalance(&self, model: Option<&str>) -> Result<Vec<ModelSummary>, ClientError> {
        let body = Request::Rebalance(rxd_protocol::RebalanceRequest {
            model: model.map(str::to_string),
        });
        match self.request(body).await? {
            Reply::Rebalance(l) => Ok(l.models),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: pin a model version (loading it if needed); pinned versions are never evicted.
    pub async fn pin(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<ModelSummary, ClientError> {
        match self
            .request(Request::Pin(model_ref(model, version)))
            .await?
        {
            Reply::Pin(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: unpin a model version.
    pub async fn unpin(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<ModelSummary, ClientError> {
        match self
            .request(Request::Unpin(model_ref(model, version)))
            .await?
        {
            Reply::Unpin(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Every metric the daemon keeps.
    pub async fn metrics(&self) -> Result<rxd_protocol::MetricsReport, ClientError> {
        match self.request(Request::Metrics).await? {
            Reply::Metrics(m) => Ok(*m),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: change a model version's settings at run time.
    pub async fn configure(
        &self,
        c: rxd_protocol::Configure,
    ) -> Result<rxd_protocol::ModelSettingsView, ClientError> {
        match self.request(Request::Configure(c)).await? {
            Reply::Configure(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: compress a repository model into a new version (published if its report passes).
    pub async fn compress(
        &self,
        req: rxd_protocol::CompressRequest,
    ) -> Result<rxd_protocol::CompressReply, ClientError> {
        match self.request(Request::Compress(req)).await? {
            Reply::Compress(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: publishes a model file's bytes into the daemon's repository as `version` (default:
    /// one more than the highest on disk) and rescans it. The bytes go through the arena when
    /// they fit there, else inline (up to the daemon's frame limit).
    pub async fn publish(
        &self,
        model: &str,
        version: Option<u64>,
        bytes: &[u8],
    ) -> Result<rxd_protocol::PublishReply, ClientError> {
        let mut held = match &self.inner.arena {
            Some(arena) if bytes.len() as u64 >= self.inner.inline_threshold => {
                arena.alloc(bytes.len() as u64).ok().map(|mut buf| {
                    buf.bytes_mut().copy_from_slice(bytes);
                    buf
                })
            }
            _ => None,
        };
        let data = match &held {
            Some(buf) => TensorData::Arena(buf.as_ref()),
            None => TensorData::Inline(bytes.to_vec()),
        };
        let req = rxd_protocol::PublishRequest {
            model: model.into(),
            version,
            data,
        };
        // The daemon reads the range until it answers: the buffer is lent to the request (kept
        // out of use until the answer even if this future is dropped).
        let lent: Vec<&mut ArenaBuf> = held.iter_mut().collect();
        match self.send(Request::Publish(req), lent).await? {
            Reply::Publish(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Devices with their memory budgets and resident models.
    pub async fn devices(&self) -> Result<Vec<rxd_protocol::DeviceSummary>, ClientError> {
        match self.request(Request::Devices).await? {
            Reply::Devices(d) => Ok(d.devices),
            other => Err(unexpected(&other)),
        }
    }

    /// Admin: unload a model version (all loaded versions when `None`).
    pub async fn unload(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<ModelSummary, ClientError> {
        match self
            .request(Request::Unload(model_ref(model, version)))
            .await?
        {
            Reply::Unload(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }
}

fn model_ref(model: &str, version: Option<u64>) -> ModelRef {
    ModelRef {
        model: model.into(),
        version,
    }
}

pub(super) fn unexpected(reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}
