//! The optional Prometheus endpoint: `GET /metrics` over HTTP/1.1 on a loopback TCP address
//! (`metrics-listen`). Off by default — without it the daemon has no network socket at all.
//! One request per connection, bounded header size and time; anything else gets 404/400.
//! Boundary: formats nothing itself (the protocol crate renders the report).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::SharedRef;

const MAX_HEADER: usize = 8 * 1024;

/// Binds the listener (before the daemon reports ready, so a bad address fails the start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Scrapes served at once (a loopback TCP peer has no credentials: any local user may
/// connect, whatever the Unix socket's mode), so connections cannot take the daemon's fds.
/// Each has [`SCRAPE_TIME`] in all. When all are taken, a new connection takes the place of
/// the oldest one still waiting for its request's header — a scraper sends its header at
/// once, so connections that say nothing cannot keep scrapes out — or is closed at once
/// when every place is serving a request.
const MAX_SCRAPES: usize = 32;
/// A scrape's whole time: the request's header, the report, the answer.
const SCRAPE_TIME: Duration = Duration::from_secs(5);

/// The connections still waiting for their request's header, oldest first.
type Waiting =
    std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(u64, CancellationToken)>>>;

/// Closes the oldest connection still waiting for its header (its place is freed as its
/// task ends); false when there is none.
fn displace_oldest(waiting: &Waiting) -> bool {
    let oldest = waiting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front();
    oldest.map(|(_, cancel)| cancel.cancel()).is_some()
}

/// Serves scrapes until shutdown.
pub async fn serve(listener: TcpListener, shared: SharedRef, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let waiting = Waiting::default();
    let mut next_id = 0u64;
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) if displace_oldest(&waiting) => {
                // The displaced task gives its place back as soon as it runs.
                match tokio::time::timeout(
                    Duration::from_millis(100),
                    slots.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(slot)) => slot,
                    _ => continue,
                }
            }
            Err(_) => continue,
        };
        next_id += 1;
        let (id, cancel) = (next_id, CancellationToken::new());
        waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((id, cancel.clone()));
        let (shared, waiting) = (shared.clone(), waiting.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            let header = async {
                let header = read_header(&mut stream).await;
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(i, _)| *i != id);
                match header? {
                    Some(buf) => scrape(&mut stream, &buf, shared).await,
                    None => Ok(()),
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(SCRAPE_TIME, header) => {}
                _ = cancel.cancelled() => {}
            }
            waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(i, _)| *i != id);
            drop(slot);
        });
    }
}

/// Reads a request's header: its bytes, or `None` when the peer closed first or sent too
/// much (answered 400 then).
async fn read_header(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Looked for in the bytes just read (and the three before them), not the whole buffer
    // again after each read.
    let mut seen = 0usize;
    while !buf[seen.saturating_sub(3)..]
        .windows(4)
        .any(|w| w == b"\r\n\r\n")
    {
        seen = buf.len();
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEADER {
            respond(
                stream,
                "400 Bad Request",
                "text/plain",
                "header too large\n",
            )
            .await?;
            return Ok(None);
        }
    }
    Ok(Some(buf))
}

async fn scrape(stream: &mut TcpStream, buf: &[u8], shared: SharedRef) -> std::io::Result<()> {
    let line = String::from_utf8_lossy(buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) if path == "/metrics" || path.starts_with("/metrics?") => {
            // Built like every report: one at a time, off the IO threads.
            let s = shared.clone();
            let body = crate::dispatch::report(move || {
                rxd_protocol::metrics::prometheus(&crate::report::metrics(&s))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            respond(
                stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        (Some("GET"), Some(_)) => {
            respond(
                stream,
                "404 Not Found",
                "text/plain",
                "only /metrics is here\n",
            )
            .await
        }
        _ => respond(stream, "400 Bad Request", "text/plain", "GET /metrics\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
