//! The connection to the daemon: handshake, request ids, and a reader task that routes each
//! response to the request waiting for it (responses may come in any order).
//! Invariant: a request's pending entry is removed exactly once — by its response, by the
//! connection closing, or by the caller dropping the request future.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{
    HandshakeReply, Health, Hello, InferReply, InferRequest, ModelInfo, ModelRef, ModelSummary,
    Outcome, PROTOCOL_VERSION, Reply, Request, RequestFrame, ResponseFrame, Status, Tensor,
    Welcome, limits,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use crate::ClientError;

type Waiter = oneshot::Sender<Result<Outcome, ClientError>>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Set once the connection is gone; new requests fail at once with this reason.
    closed: Option<String>,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    welcome: Welcome,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An async connection to rxd. Cheap to clone; clones share the connection, and any number of
/// requests may be in flight at once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.welcome.server)
            .finish()
    }
}

/// Removes a request's waiter if its future is dropped before the answer.
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.pending).waiters.remove(&self.id);
    }
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: u64) -> Result<Vec<u8>, ClientError> {
    let mut header = [0u8; HEADER_LEN];
    rd.read_exact(&mut header).await?;
    let len = frame::body_len(header, max).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(body)
}

impl Client {
    /// Connects and performs the handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Client::handshake(stream, concat!("rxd-client ", env!("CARGO_PKG_VERSION"))).await
    }

    /// Performs the handshake on an already-connected stream.
    pub async fn handshake(stream: UnixStream, client_name: &str) -> Result<Client, ClientError> {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client: client_name.into(),
            arena_bytes: 0,
        };
        let bytes = frame::encode(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
        wr.write_all(&bytes).await?;
        let body = read_frame(&mut rd, limits::MAX_HANDSHAKE_FRAME).await?;
        let welcome = match frame::decode::<HandshakeReply>(&body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            HandshakeReply::Welcome(w) => w,
            HandshakeReply::Error(e) => return Err(ClientError::Handshake(e.error)),
        };
        let max_frame = welcome.max_frame_bytes.max(limits::DEFAULT_MAX_FRAME);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let reader = tokio::spawn(async move {
                let reason = read_loop(&mut rd, &weak, max_frame).await;
                if let Some(inner) = weak.upgrade() {
                    let mut p = lock(&inner.pending);
                    p.closed = Some(reason.clone());
                    for (_, w) in p.waiters.drain() {
                        let _ = w.send(Err(ClientError::Closed(reason.clone())));
                    }
                }
            });
            Inner {
                writer: tokio::sync::Mutex::new(wr),
                pending: Mutex::new(Pending::default()),
                next_id: AtomicU64::new(1),
                welcome,
                reader,
            }
        });
        Ok(Client { inner })
    }

    /// What the daemon said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, body: Request) -> Result<Reply, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(&RequestFrame { id, body })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.inner.pending);
            if let Some(reason) = &p.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            p.waiters.insert(id, tx);
        }
        let _guard = PendingGuard {
            inner: &self.inner,
            id,
        };
        self.inner.writer.lock().await.write_all(&bytes).await?;
        match rx.await {
            Ok(Ok(Outcome::Ok(reply))) => Ok(reply),
            Ok(Ok(Outcome::Err(e))) => Err(ClientError::Server(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed("connection closed".into())),
        }
    }

    /// Runs a model; outputs in the model's output order (or the order asked for).
    pub async fn infer(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, ClientError> {
        Ok(self
            .infer_request(InferRequest {
                model: model.into(),
                version: None,
                inputs,
                outputs: Vec::new(),
            })
            .await?
            .outputs)
    }

    /// Runs a model with every option of the request.
    pub async fn infer_request(&self, req: InferRequest) -> Result<InferReply, ClientError> {
        match self.request(Request::Infer(req)).await? {
            Reply::Infer(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

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

fn unexpected(reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

/// Reads responses until the connection ends; returns why it ended.
async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    inner: &std::sync::Weak<Inner>,
    max_frame: u64,
) -> String {
    loop {
        let body = match read_frame(rd, max_frame).await {
            Ok(b) => b,
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the daemon closed the connection".into();
            }
            Err(e) => return e.to_string(),
        };
        let resp: ResponseFrame = match frame::decode(&body) {
            Ok(r) => r,
            Err(e) => return format!("undecodable response: {e}"),
        };
        let Some(inner) = inner.upgrade() else {
            return "client dropped".into();
        };
        if resp.id == 0 {
            // An error about the connection itself; the daemon closes after it.
            if let Outcome::Err(e) = resp.outcome {
                return format!("the daemon reported: {e}");
            }
            continue;
        }
        let waiter = lock(&inner.pending).waiters.remove(&resp.id);
        if let Some(w) = waiter {
            let _ = w.send(Ok(resp.outcome));
        }
    }
}
