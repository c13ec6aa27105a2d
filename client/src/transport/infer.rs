//! Inference on a connection: inputs of at least the inline threshold placed in the arena,
//! output areas sized from the model's signature (asked once per model) or the last call, and
//! buffers lent to a request until its answer (`infer_into`).
//!
//! Arena buffers of a call are freed when it ends, however it ends.

use std::sync::Arc;

use rxd_protocol::{InferReply, InferRequest, ModelInfo, Reply, Request, Tensor, TensorData};

use super::ops::unexpected;
use super::{Client, lock};
use crate::ClientError;
use crate::arena::{ArenaBuf, OutputBufs};

impl Client {
    /// Runs a model; outputs in the model's output order, as inline tensors (see
    /// [`Client::infer_with`]).
    pub async fn infer(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, ClientError> {
        Ok(self
            .infer_with(InferRequest::new(model, inputs))
            .await?
            .outputs)
    }

    /// Runs a model with every option of `req` (version, outputs wanted, priority, deadline);
    /// outputs come back as inline tensors. With an arena, inline inputs of at least the
    /// inline threshold are placed in it, and outputs come through it too — from the first
    /// request: the output area is sized from the model's signature (asked once per model with
    /// `model_info`, unless the request names a version or has a deadline) and the inputs' shapes
    /// ([`crate::shapes`]), else from the previous call's outputs; outputs that do not fit it
    /// come inline in the same answer (the model runs once). The arena buffers are freed when
    /// the call ends, however it ends. `req` must not name output places itself.
    pub async fn infer_with(&self, req: InferRequest) -> Result<InferReply, ClientError> {
        if req.output_area.is_some() || !req.output_regions.is_empty() {
            return Err(ClientError::Tensor(
                "output places in the arena are named with Client::infer_into (OutputBufs)".into(),
            ));
        }
        let Some(arena) = &self.inner.arena else {
            return self.infer_request(req).await;
        };
        let key = (req.model.clone(), req.version);
        let mut held = Vec::new();
        let mut sent = Vec::with_capacity(req.inputs.len());
        for t in req.inputs {
            match &t.data {
                TensorData::Inline(b) if b.len() as u64 >= self.inner.inline_threshold => {
                    match arena.alloc(b.len() as u64) {
                        Ok(mut buf) => {
                            buf.bytes_mut().copy_from_slice(b);
                            sent.push(buf.tensor(&t.name, t.dtype, t.shape.clone())?);
                            held.push(buf);
                        }
                        Err(ClientError::ArenaFull { .. }) => sent.push(t),
                        Err(e) => return Err(e),
                    }
                }
                _ => sent.push(t),
            }
        }
        // Asking for the signature may load the model (as the request would): not for a
        // request with a deadline, which the lookup would not respect, nor for one naming a
        // version, which the lookup could load where the request would be refused.
        let signature = if req.timeout_ms.is_none() && req.version.is_none() {
            self.signature(&key).await?
        } else {
            None
        };
        let estimate = signature
            .as_deref()
            .and_then(|info| crate::shapes::output_area_bytes(info, &sent, &req.outputs))
            .or_else(|| lock(&self.inner.output_sizes).get(&key).copied());
        let mut area = match estimate {
            Some(n) if n >= self.inner.inline_threshold => arena.alloc(n).ok(),
            _ => None,
        };
        let req = InferRequest {
            inputs: sent,
            inline_overflow: true,
            ..req
        };
        let result = match &mut area {
            Some(buf) => self.infer_into(req.clone(), OutputBufs::area(buf)).await,
            None => self.infer_request(req.clone()).await,
        };
        let reply = match (result, &area) {
            // A daemon that does not know `inline_overflow` refuses an area too small: run
            // again with the outputs inline.
            (Err(ClientError::Server(e)), Some(_))
                if e.kind() == Some(rxd_protocol::ErrorCode::OutputRegionTooSmall) =>
            {
                if let Some(n) = e.needed_bytes {
                    lock(&self.inner.output_sizes).insert(key.clone(), n);
                }
                area = None;
                self.infer_request(req).await?
            }
            (r, _) => r?,
        };
        let mut total = 0u64;
        let mut overflowed = false;
        let mut outputs = Vec::with_capacity(reply.outputs.len());
        for t in reply.outputs {
            let bytes = match (&t.data, &area) {
                (TensorData::Inline(b), _) => {
                    overflowed |= area.is_some();
                    total += (b.len() as u64).next_multiple_of(rxd_protocol::OUTPUT_ALIGN);
                    outputs.push(t);
                    continue;
                }
                (TensorData::Arena(_), Some(buf)) => buf.output_bytes(&t)?.to_vec(),
                _ => {
                    return Err(ClientError::Protocol(
                        "an output in the arena was not asked for".into(),
                    ));
                }
            };
            total += (bytes.len() as u64).next_multiple_of(rxd_protocol::OUTPUT_ALIGN);
            outputs.push(Tensor::inline(t.name, t.dtype, t.shape, bytes));
        }
        lock(&self.inner.output_sizes).insert(key.clone(), total);
        if overflowed && signature.is_some() {
            // The signature's estimate was short (a new version?): ask again next time.
            lock(&self.inner.signatures).remove(&key);
        }
        drop(held);
        Ok(InferReply {
            model: reply.model,
            version: reply.version,
            outputs,
        })
    }

    /// The model's signature for sizing output areas: asked once per model and version (one
    /// lookup however many requests wait for it). Errors about the model (unknown, failed to
    /// load, over its memory budget, not ready) are the request's errors: it would fail the
    /// same way (the lookup loads a cold model as the request would); others give `None`.
    async fn signature(
        &self,
        key: &(String, Option<u64>),
    ) -> Result<Option<Arc<ModelInfo>>, ClientError> {
        let cell = lock(&self.inner.signatures)
            .entry(key.clone())
            .or_default()
            .clone();
        let got = cell
            .get_or_try_init(|| async {
                match self.model_info(&key.0, key.1).await {
                    Ok(info) => Ok(Some(Arc::new(info))),
                    Err(e)
                        if matches!(
                            e.code(),
                            Some(
                                rxd_protocol::ErrorCode::UnknownModel
                                    | rxd_protocol::ErrorCode::LoadFailed
                                    | rxd_protocol::ErrorCode::OverBudget
                                    | rxd_protocol::ErrorCode::ModelNotReady
                            )
                        ) =>
                    {
                        Err(e)
                    }
                    Err(_) => Ok(None),
                }
            })
            .await?;
        Ok(got.clone())
    }

    /// Runs a model with every option of the request (outputs in the arena go through
    /// [`Client::infer_into`]).
    pub async fn infer_request(&self, req: InferRequest) -> Result<InferReply, ClientError> {
        match self.request(Request::Infer(req)).await? {
            Reply::Infer(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a model with its outputs written into arena buffers of this connection, lent to
    /// the request until the answer (`outputs` borrows them mutably; read them afterwards
    /// with [`ArenaBuf::view`] or [`ArenaBuf::output_bytes`]). `req` must not name output
    /// places itself. If this future is dropped before the answer, the buffers are emptied
    /// (the daemon may still write their ranges, which are freed once it has answered).
    pub async fn infer_into(
        &self,
        mut req: InferRequest,
        outputs: OutputBufs<'_>,
    ) -> Result<InferReply, ClientError> {
        if req.output_area.is_some() || !req.output_regions.is_empty() {
            return Err(ClientError::Tensor(
                "name output places through OutputBufs only".into(),
            ));
        }
        let arena = self.inner.arena.as_ref().ok_or_else(|| {
            ClientError::Tensor("this connection has no arena for outputs".into())
        })?;
        let foreign = |b: &ArenaBuf| !b.is_in(arena);
        if outputs.area.as_deref().is_some_and(foreign)
            || outputs.regions.iter().any(|(_, b)| foreign(b))
        {
            return Err(ClientError::Tensor(
                "an output buffer is not in this connection's arena (or was given up)".into(),
            ));
        }
        req.output_area = outputs.area.as_deref().map(ArenaBuf::as_ref);
        req.output_regions = outputs
            .regions
            .iter()
            .map(|(name, b)| rxd_protocol::OutputRegion {
                name: name.clone(),
                offset: b.offset(),
                len: b.len(),
            })
            .collect();
        match self.send(Request::Infer(req), outputs.into_all()).await? {
            Reply::Infer(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
}
