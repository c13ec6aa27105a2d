//! A blocking client: the async [`crate::Client`] driven by a private one-thread runtime.
//! Safe to share between threads (`&Client` is enough to send requests concurrently).

use std::path::Path;

use rxd_protocol::{
    Health, InferReply, InferRequest, ModelInfo, ModelSummary, Reply, Request, Status, Tensor,
};

use crate::ClientError;

pub struct Client {
    inner: crate::Client,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Client {
    /// Connects with default options (see [`crate::ClientOptions`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, crate::ClientOptions::default())
    }

    pub fn connect_with(
        path: impl AsRef<Path>,
        options: crate::ClientOptions,
    ) -> Result<Client, ClientError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rxd-client")
            .enable_all()
            .build()?;
        let inner = rt.block_on(crate::Client::connect_with(path, options))?;
        Ok(Client { inner, rt })
    }

    /// The connection's shared-memory arena, if any.
    pub fn arena(&self) -> Option<&crate::Arena> {
        self.inner.arena()
    }

    /// The async client behind this one.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    pub fn request(&self, body: Request) -> Result<Reply, ClientError> {
        self.rt.block_on(self.inner.request(body))
    }

    pub fn infer(&self, model: &str, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ClientError> {
        self.rt.block_on(self.inner.infer(model, inputs))
    }

    /// Runs a model with every option of `req`, inputs and outputs through the arena where
    /// they fit (see [`crate::Client::infer_with`]).
    pub fn infer_with(&self, req: InferRequest) -> Result<InferReply, ClientError> {
        self.rt.block_on(self.inner.infer_with(req))
    }

    pub fn infer_request(&self, req: InferRequest) -> Result<InferReply, ClientError> {
        self.rt.block_on(self.inner.infer_request(req))
    }

    /// Runs a model with its outputs written into arena buffers lent to the request until
    /// the answer (see [`crate::Client::infer_into`]).
    pub fn infer_into(
        &self,
        req: InferRequest,
        outputs: crate::OutputBufs<'_>,
    ) -> Result<InferReply, ClientError> {
        self.rt.block_on(self.inner.infer_into(req, outputs))
    }

    pub fn list_models(&self) -> Result<Vec<ModelSummary>, ClientError> {
        self.rt.block_on(self.inner.list_models())
    }

    pub fn model_info(&self, model: &str, version: Option<u64>) -> Result<ModelInfo, ClientError> {
        self.rt.block_on(self.inner.model_info(model, version))
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.rt.block_on(self.inner.status())
    }

    pub fn health(&self) -> Result<Health, ClientError> {
        self.rt.block_on(self.inner.health())
    }

    pub fn load(&self, model: &str, version: Option<u64>) -> Result<ModelSummary, ClientError> {
        self.rt.block_on(self.inner.load(model, version))
    }

    pub fn reload(&self) -> Result<Vec<ModelSummary>, ClientError> {
        self.rt.block_on(self.inner.reload())
    }

    pub fn rebalance(&self, model: Option<&str>) -> Result<Vec<ModelSummary>, ClientError> {
        self.rt.block_on(self.inner.rebalance(model))
    }

    pub fn unload(&self, model: &str, version: Option<u64>) -> Result<ModelSummary, ClientError> {
        self.rt.block_on(self.inner.unload(model, version))
    }

    pub fn pin(&self, model: &str, version: Option<u64>) -> Result<ModelSummary, ClientError> {
        self.rt.block_on(self.inner.pin(model, version))
    }

    pub fn unpin(&self, model: &str, version: Option<u64>) -> Result<ModelSummary, ClientError> {
        self.rt.block_on(self.inner.unpin(model, version))
    }

    pub fn metrics(&self) -> Result<rxd_protocol::MetricsReport, ClientError> {
        self.rt.block_on(self.inner.metrics())
    }

    pub fn configure(
        &self,
        c: rxd_protocol::Configure,
    ) -> Result<rxd_protocol::ModelSettingsView, ClientError> {
        self.rt.block_on(self.inner.configure(c))
    }

    pub fn compress(
        &self,
        req: rxd_protocol::CompressRequest,
    ) -> Result<rxd_protocol::CompressReply, ClientError> {
        self.rt.block_on(self.inner.compress(req))
    }

    pub fn devices(&self) -> Result<Vec<rxd_protocol::DeviceSummary>, ClientError> {
        self.rt.block_on(self.inner.devices())
    }

    /// Admin: publishes a model file into the repository (see [`crate::Client::publish`]).
    pub fn publish(
        &self,
        model: &str,
        version: Option<u64>,
        bytes: &[u8],
    ) -> Result<rxd_protocol::PublishReply, ClientError> {
        self.rt.block_on(self.inner.publish(model, version, bytes))
    }
}
