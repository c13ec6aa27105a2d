//! The connection to the daemon: handshake, request ids, and a reader task that routes each
//! response to the request waiting for it (responses may come in any order).
//! Invariant: a request's pending entry is removed exactly once — by its response, by the
//! connection closing, or by the caller dropping the request future.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{
    HandshakeReply, Health, Hello, InferReply, InferRequest, ModelInfo, ModelRef, ModelSummary,
    Outcome, PROTOCOL_VERSION, Reply, Request, RequestFrame, ResponseFrame, Status, Tensor,
    TensorData, Welcome, limits,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use crate::ClientError;
use crate::arena::{Arena, ArenaBuf, OutputBufs};

/// Maps the arena fd the daemon passed, after checking its size and seals.
fn map_arena(fd: OwnedFd, size: u64) -> Result<Arena, ClientError> {
    use std::os::fd::AsFd;
    let seals = rxd_shm::seals(fd.as_fd())?;
    if seals & rxd_shm::ARENA_SEALS != rxd_shm::ARENA_SEALS {
        return Err(ClientError::Protocol("the arena fd is not sealed".into()));
    }
    let map = rxd_shm::Mapping::map(fd.as_fd(), size as usize)?;
    Ok(Arena::new(map))
}

type Waiter = oneshot::Sender<Result<Outcome, ClientError>>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Output buffers of requests whose futures were dropped before the answer: the daemon
    /// may write them until it answers; they are freed when the answer comes.
    lent: HashMap<u64, Vec<rxd_shm::Lent>>,
    /// Set once the connection is gone; new requests fail at once with this reason.
    closed: Option<String>,
}

impl Drop for Pending {
    /// The connection is gone without the answers: those ranges are never reused.
    fn drop(&mut self) {
        for (_, lent) in self.lent.drain() {
            lent.into_iter().for_each(rxd_shm::Lent::leak);
        }
    }
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    welcome: Welcome,
    reader: tokio::task::JoinHandle<()>,
    arena: Option<Arena>,
    inline_threshold: u64,
    /// Output bytes each model (and version asked for) needed last time, to size output
    /// areas when its signature does not tell.
    output_sizes: Mutex<HashMap<(String, Option<u64>), u64>>,
    /// Signatures of the models (and versions asked for) this client ran, for output areas.
    signatures: Mutex<HashMap<(String, Option<u64>), SignatureCell>>,
}

type SignatureCell = Arc<tokio::sync::OnceCell<Option<Arc<ModelInfo>>>>;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shared-memory arena to ask for, in bytes (0 = none).
    pub arena_bytes: u64,
    /// Tensors of at least this many bytes go through the arena (when there is one).
    pub inline_threshold: u64,
    /// Name sent in the handshake.
    pub client_name: String,
    /// If the daemon refuses the arena (`arena_unavailable`: over its limits), connect again
    /// without one instead of failing. Default true.
    pub arena_fallback: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            arena_bytes: 16 << 20,
            inline_threshold: 64 << 10,
            client_name: concat!("rxd-client ", env!("CARGO_PKG_VERSION")).into(),
            arena_fallback: true,
        }
    }
}

impl ClientOptions {
    /// No arena: every tensor travels inline.
    pub fn inline_only() -> ClientOptions {
        ClientOptions {
            arena_bytes: 0,
            ..ClientOptions::default()
        }
    }
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

/// Removes a request's waiter if its future is dropped before the answer, and then takes
/// the output buffers lent to it out of their owners' hands (the daemon may still write
/// them): they are freed when the answer comes, or never if the connection is gone.
struct PendingGuard<'a, 'b> {
    inner: &'a Inner,
    id: u64,
    lent: Vec<&'b mut ArenaBuf>,
    /// The daemon's answer reached this request.
    answered: bool,
}

impl Drop for PendingGuard<'_, '_> {
    fn drop(&mut self) {
        let mut p = lock(&self.inner.pending);
        let outstanding = p.waiters.remove(&self.id).is_some();
        // The daemon answered (delivered to a future that was dropped before it looked, if
        // the waiter is gone while the connection is open): it is done with the buffers.
        if self.answered || (!outstanding && p.closed.is_none()) {
            return;
        }
        let lent: Vec<rxd_shm::Lent> = self.lent.iter_mut().filter_map(|b| b.give_up()).collect();
        if p.closed.is_some() {
            lent.into_iter().for_each(rxd_shm::Lent::leak);
        } else if !lent.is_empty() {
            p.lent.insert(self.id, lent);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the welcome frame with `recvmsg`, so that an fd passed with it is not lost.
async fn read_welcome(stream: &UnixStream) -> Result<(Vec<u8>, Option<OwnedFd>), ClientError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut fd = None;
    let mut body: Vec<u8> = Vec::new();
    let mut need = HEADER_LEN;
    loop {
        stream.readable().await?;
        let buf: &mut [u8] = if got < HEADER_LEN {
            &mut header[got..]
        } else {
            &mut body[got - HEADER_LEN..]
        };
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            rxd_shm::recv_with_fd(stream.as_raw_fd(), buf)
        });
        let (n, passed) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(ClientError::Closed(
                "the daemon closed the connection in the handshake".into(),
            ));
        }
        if passed.is_some() {
            fd = passed;
        }
        got += n;
        if got == HEADER_LEN && need == HEADER_LEN {
            let len = frame::body_len(header, limits::MAX_HANDSHAKE_FRAME)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            body = vec![0; len];
            need = HEADER_LEN + len;
        }
        if got == need && need > HEADER_LEN {
            return Ok((body, fd));
        }
    }
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
    /// Connects with default options (a 16 MiB arena, tensors from 64 KiB through it; no arena
    /// if the daemon refuses one).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default()).await
    }

    /// Connects and performs the handshake.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let open = || async {
            UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                })
        };
        match Client::handshake(open().await?, options.clone()).await {
            Err(ClientError::Handshake(e))
                if options.arena_fallback
                    && options.arena_bytes > 0
                    && e.kind() == Some(rxd_protocol::ErrorCode::ArenaUnavailable) =>
            {
                let inline = ClientOptions {
                    arena_bytes: 0,
                    ..options
                };
                Client::handshake(open().await?, inline).await
            }
            other => other,
        }
    }

    /// Performs the handshake on an already-connected stream.
    pub async fn handshake(
        mut stream: UnixStream,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client: options.client_name.clone(),
            arena_bytes: options.arena_bytes,
        };
        let bytes = frame::encode(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&bytes).await?;
        let (body, fd) = read_welcome(&stream).await?;
        let welcome = match frame::decode::<HandshakeReply>(&body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            HandshakeReply::Welcome(w) => w,
            HandshakeReply::Error(e) => return Err(ClientError::Handshake(e.error)),
        };
        let arena = match (welcome.arena_bytes, fd) {
            (0, _) => None,
            (n, Some(fd)) => Some(map_arena(fd, n)?),
            (_, None) => {
                return Err(ClientError::Protocol(
                    "an arena was granted but no fd came".into(),
                ));
            }
        };
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
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
                    for (_, lent) in p.lent.drain() {
                        lent.into_iter().for_each(rxd_shm::Lent::leak);
                    }
                }
            });
            Inner {
                writer: tokio::sync::Mutex::new(wr),
                pending: Mutex::new(Pending::default()),
                next_id: AtomicU64::new(1),
                welcome,
                reader,
                arena,
                inline_threshold: options.inline_threshold,
                output_sizes: Mutex::new(HashMap::new()),
                signatures: Mutex::new(HashMap::new()),
            }
        });
        Ok(Client { inner })
    }

    /// The connection's shared-memory arena, if the daemon granted one.
    pub fn arena(&self) -> Option<&Arena> {
        self.inner.arena.as_ref()
    }

    /// What the daemon said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// Sends one request and waits for its answer. An inference that names output places in
    /// the arena is refused here: the daemon writes them while the request is in flight, so
    /// they must be buffers lent to it ([`Client::infer_into`]).
    pub async fn request(&self, body: Request) -> Result<Reply, ClientError> {
        if let Request::Infer(r) = &body
            && (r.output_area.is_some() || !r.output_regions.is_empty())
        {
            return Err(ClientError::Tensor(
                "output places in the arena are named with Client::infer_into (OutputBufs)".into(),
            ));
        }
        self.send(body, Vec::new()).await
    }

    /// Sends one request with `lent` output buffers and waits for its answer.
    async fn send(&self, body: Request, lent: Vec<&mut ArenaBuf>) -> Result<Reply, ClientError> {
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
        let mut guard = PendingGuard {
            inner: &self.inner,
            id,
            lent,
            answered: false,
        };
        self.inner.writer.lock().await.write_all(&bytes).await?;
        let outcome = rx.await;
        guard.answered = matches!(outcome, Ok(Ok(_)));
        match outcome {
            Ok(Ok(Outcome::Ok(reply))) => Ok(reply),
            Ok(Ok(Outcome::Err(e))) => Err(ClientError::Server(e)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed("connection closed".into())),
        }
    }

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
        let (waiter, lent) = {
            let mut p = lock(&inner.pending);
            let waiter = p.waiters.remove(&resp.id);
            let lent = if waiter.is_none() {
                p.lent.remove(&resp.id)
            } else {
                None
            };
            (waiter, lent)
        };
        if let Some(w) = waiter {
            let _ = w.send(Ok(resp.outcome));
        }
        // Answered: the daemon is done with the buffers of a request given up.
        drop(lent);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use rxd_protocol::{InferReply, RequestFrame};

    use super::*;

    fn read_std_frame(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
        let mut header = [0u8; HEADER_LEN];
        s.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        s.read_exact(&mut body).unwrap();
        body
    }

    /// A client connected to a fake daemon (the other end of a socket pair, returned with the
    /// daemon's view of the 64 KiB arena it granted).
    async fn fake_daemon() -> (Client, std::os::unix::net::UnixStream, rxd_shm::Mapping) {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let daemon = std::thread::spawn(move || {
            read_std_frame(&mut theirs);
            let fd = rxd_shm::create_sealed("rxd-client-test", 1 << 16).unwrap();
            let map = rxd_shm::Mapping::map(fd.as_fd(), 1 << 16).unwrap();
            let welcome = HandshakeReply::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                server: "fake".into(),
                max_frame_bytes: 1 << 20,
                max_in_flight: 16,
                arena_bytes: 1 << 16,
            });
            let bytes = frame::encode(&welcome).unwrap();
            let sent = rxd_shm::send_with_fd(rxd_shm::raw(&theirs), &bytes, fd.as_fd()).unwrap();
            theirs.write_all(&bytes[sent..]).unwrap();
            (theirs, map)
        });
        ours.set_nonblocking(true).unwrap();
        let stream = UnixStream::from_std(ours).unwrap();
        let options = ClientOptions {
            arena_bytes: 1 << 16,
            ..ClientOptions::default()
        };
        let client = Client::handshake(stream, options).await.unwrap();
        let (theirs, map) = daemon.join().unwrap();
        (client, theirs, map)
    }

    /// The daemon writes an output buffer until it answers: a request holds its buffers until
    /// then, and a request dropped before the answer gives them up (emptied) rather than
    /// letting their owner read memory being written; their range is reused only once the
    /// answer has come.
    #[tokio::test]
    async fn output_buffers_stay_lent_until_the_daemon_answers() {
        let (client, mut daemon, map) = fake_daemon().await;
        let arena = client.arena().unwrap().clone();
        let mut area = arena.alloc(4096).unwrap();
        let offset = area.offset();
        let free = arena.free_bytes();

        // Naming output places by hand is refused: only lent buffers may be written.
        let mut raw = InferRequest::new("m", Vec::new());
        raw.output_area = Some(area.as_ref());
        assert!(matches!(
            client.infer_request(raw).await,
            Err(ClientError::Tensor(_))
        ));

        // The request's future is dropped before the daemon answers.
        let req = InferRequest::new("m", Vec::new());
        let call = client.infer_into(req, OutputBufs::area(&mut area));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), call)
                .await
                .is_err()
        );
        assert!(area.is_empty(), "given up: {area:?}");
        assert!(area.bytes().is_empty());
        assert_eq!(arena.free_bytes(), free, "still allocated");
        drop(area);
        assert_eq!(
            arena.free_bytes(),
            free,
            "still allocated after its owner let go"
        );

        // The daemon writes the area, then answers: only now is the range free again.
        let body = read_std_frame(&mut daemon);
        let req: RequestFrame = frame::decode(&body).unwrap();
        assert!(matches!(&req.body, Request::Infer(r) if r.output_area.is_some()));
        map.copy_in(offset, &[7; 4096]).unwrap();
        let reply = ResponseFrame {
            id: req.id,
            outcome: Outcome::Ok(Reply::Infer(InferReply {
                model: "m".into(),
                version: 1,
                outputs: Vec::new(),
            })),
        };
        daemon.write_all(&frame::encode(&reply).unwrap()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while arena.free_bytes() != free + 4096 {
            assert!(std::time::Instant::now() < deadline, "never freed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // A request answered in time keeps its buffer, with what the daemon wrote.
        let mut area = arena.alloc(64).unwrap();
        let offset = area.offset();
        let call = client.infer_into(
            InferRequest::new("m", Vec::new()),
            OutputBufs::area(&mut area),
        );
        let answer = async {
            let mut daemon = daemon.try_clone().unwrap();
            tokio::task::spawn_blocking(move || {
                let req: RequestFrame = frame::decode(&read_std_frame(&mut daemon)).unwrap();
                map.copy_in(offset, &[9; 64]).unwrap();
                let reply = ResponseFrame {
                    id: req.id,
                    outcome: Outcome::Ok(Reply::Infer(InferReply {
                        model: "m".into(),
                        version: 1,
                        outputs: Vec::new(),
                    })),
                };
                daemon.write_all(&frame::encode(&reply).unwrap()).unwrap();
            })
            .await
            .unwrap()
        };
        let (result, ()) = tokio::join!(call, answer);
        result.unwrap();
        assert_eq!(area.bytes(), &[9; 64][..]);
    }
}
