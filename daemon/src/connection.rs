//! One client connection: the handshake, then framed requests read in order and answered as
//! they complete (pipelining, out-of-order responses).
//!
//! Invariants: every request frame that was read completely gets exactly one response frame
//! (a success, or an error under its id — id 0 when the frame is too broken to carry one);
//! at most `max_in_flight` requests run at once per connection — beyond that the connection is
//! simply not read (backpressure); on shutdown the connection stops reading, answers what it
//! accepted, then closes. A peer that vanishes only ends its own connection.
//! Boundary: decoding and dispatch only; shared-memory fds are passed at the handshake and
//! nowhere else (PROTOCOL.md), so plain reads are safe after it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rxd_protocol::frame::{self, FrameError, HEADER_LEN};
use rxd_protocol::{
    ErrorCode, HandshakeError, HandshakeReply, Hello, Outcome, PROTOCOL_VERSION, RequestFrame,
    ResponseFrame, Welcome, WireError, limits,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::SharedRef;
use crate::dispatch;
use crate::metrics::Metrics;
use crate::peer::Peer;

/// Why reading a frame stopped.
enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    Frame(FrameError),
    Io(std::io::Error),
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: u64) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    // Distinguish a clean close (no byte of a new frame) from a truncated frame.
    let n = rd.read(&mut header).await.map_err(ReadError::Io)?;
    if n == 0 {
        return Err(ReadError::Eof);
    }
    rd.read_exact(&mut header[n..])
        .await
        .map_err(ReadError::Io)?;
    let len = frame::body_len(header, max).map_err(ReadError::Frame)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.map_err(ReadError::Io)?;
    Ok(body)
}

fn encode_response(id: u64, outcome: Outcome) -> Vec<u8> {
    let frame = ResponseFrame { id, outcome };
    frame::encode(&frame).unwrap_or_else(|e| {
        // Only an output too large for a u32 frame can get here; answer with the error.
        let err = WireError::new(ErrorCode::Internal, format!("cannot encode response: {e}"));
        frame::encode(&ResponseFrame {
            id,
            outcome: Outcome::Err(err),
        })
        .expect("an error frame always encodes")
    })
}

/// Serves one connection until the peer closes it or the daemon shuts down.
pub async fn run(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let span = tracing::info_span!("conn", uid = peer.uid, pid = peer.pid.unwrap_or(0));
    serve(stream, shared, peer, shutdown).instrument(span).await;
}

async fn serve(stream: UnixStream, shared: SharedRef, peer: Peer, shutdown: CancellationToken) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);

    // Handshake.
    let hello = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = read_frame(&mut rd, limits::MAX_HANDSHAKE_FRAME) => r,
    };
    let hello: Hello = match hello {
        Ok(body) => match frame::decode(&body) {
            Ok(h) => h,
            Err(e) => return refuse(&mut wr, e.to_wire()).await,
        },
        Err(ReadError::Frame(e)) => return refuse(&mut wr, e.to_wire()).await,
        Err(_) => return,
    };
    if hello.protocol != PROTOCOL_VERSION {
        let err = WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
        );
        return refuse(&mut wr, err).await;
    }
    let max_in_flight = shared.config.max_in_flight;
    let welcome = HandshakeReply::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        server: crate::SERVER_NAME.into(),
        max_frame_bytes: shared.config.max_frame_bytes,
        max_in_flight,
        arena_bytes: 0,
    });
    let Ok(bytes) = frame::encode(&welcome) else {
        return;
    };
    if wr.write_all(&bytes).await.is_err() {
        return;
    }
    tracing::debug!(client = %hello.client, "handshake done");

    // Responses are encoded by request tasks and written by one writer task, in completion order.
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(write_loop(wr, out_rx));
    let permits = Arc::new(Semaphore::new(max_in_flight as usize));
    let in_flight_ids: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let tasks = TaskTracker::new();

    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let body = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = read_frame(&mut rd, shared.config.max_frame_bytes) => r,
        };
        let body = match body {
            Ok(b) => b,
            Err(ReadError::Eof) => break,
            Err(ReadError::Io(e)) => {
                tracing::debug!("read failed: {e}");
                break;
            }
            Err(ReadError::Frame(e)) => {
                // The stream cannot be resynchronised: answer, then close.
                shared.metrics.record_error(e.to_string());
                let _ = out_tx.send(encode_response(0, Outcome::Err(e.to_wire())));
                break;
            }
        };
        let request: RequestFrame = match frame::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                let id = frame::salvage_id(&body).unwrap_or(0);
                Metrics::inc(&shared.metrics.requests_total);
                shared.metrics.record_error(e.to_string());
                let _ = out_tx.send(encode_response(id, Outcome::Err(e.to_wire())));
                continue;
            }
        };
        drop(body);
        let id = request.id;
        Metrics::inc(&shared.metrics.requests_total);
        let fresh = id != 0 && in_flight_ids.lock().expect("ids lock").insert(id);
        if !fresh {
            let err = WireError::new(
                ErrorCode::BadRequestId,
                format!("request id {id} is 0 or already in flight on this connection"),
            );
            shared.metrics.record_error(err.message.clone());
            let _ = out_tx.send(encode_response(id, Outcome::Err(err)));
            continue;
        }

        let (shared, peer, out_tx, ids) = (
            shared.clone(),
            peer.clone(),
            out_tx.clone(),
            in_flight_ids.clone(),
        );
        let op = request.body.op();
        let span = tracing::debug_span!("req", id, op);
        tasks.spawn(
            async move {
                let started = Instant::now();
                Metrics::inc(&shared.metrics.in_flight);
                let outcome = match dispatch::handle(&shared, &peer, request.body).await {
                    Ok(reply) => Outcome::Ok(reply),
                    Err(e) => {
                        let wire = e.to_wire();
                        tracing::debug!(code = wire.code, "{e}");
                        shared.metrics.record_error(e.to_string());
                        Outcome::Err(wire)
                    }
                };
                let bytes = encode_response(id, outcome);
                Metrics::dec(&shared.metrics.in_flight);
                ids.lock().expect("ids lock").remove(&id);
                let _ = out_tx.send(bytes);
                drop(permit);
                tracing::trace!(us = started.elapsed().as_micros() as u64, "answered");
            }
            .instrument(span),
        );
    }

    // Answer everything accepted, then let the writer drain and close.
    tasks.close();
    tasks.wait().await;
    drop(out_tx);
    let _ = writer.await;
}

async fn refuse(wr: &mut OwnedWriteHalf, error: WireError) {
    tracing::debug!(code = error.code, "handshake refused: {}", error.message);
    let reply = HandshakeReply::Error(HandshakeError {
        error,
        supported: vec![PROTOCOL_VERSION],
    });
    if let Ok(bytes) = frame::encode(&reply) {
        let _ = wr.write_all(&bytes).await;
    }
    let _ = wr.shutdown().await;
}

/// Writes encoded frames; coalesces frames that are ready together into one write.
async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    const COALESCE: usize = 256 * 1024;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut buf = first;
        if buf.len() < COALESCE {
            while let Ok(next) = rx.try_recv() {
                if batch.is_empty() {
                    batch.append(&mut buf);
                }
                batch.extend_from_slice(&next);
                if batch.len() >= COALESCE {
                    break;
                }
            }
            if !batch.is_empty() {
                buf = std::mem::take(&mut batch);
            }
        }
        if wr.write_all(&buf).await.is_err() {
            // The peer is gone; keep draining so senders never block, but stop writing.
            while rx.recv().await.is_some() {}
            return;
        }
        // Reuse the buffer unless it grew huge (a large inline output).
        if buf.capacity() <= 4 * COALESCE {
            buf.clear();
            batch = buf;
        }
    }
    let _ = wr.shutdown().await;
}
