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

/// Scrapes served at once; connections beyond are closed at once (a loopback TCP peer has
/// no credentials: any local user may connect, whatever the Unix socket's mode), so they
/// cannot take the daemon's fds. Each has [`SCRAPE_TIME`] in all.
const MAX_SCRAPES: usize = 32;
/// A scrape's whole time: the request's header, the report, the answer.
const SCRAPE_TIME: Duration = Duration::from_secs(5);

/// Serves scrapes until shutdown.
pub async fn serve(listener: TcpListener, shared: SharedRef, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIME, scrape(stream, shared)).await;
            drop(slot);
        });
    }
}

async fn scrape(mut stream: TcpStream, shared: SharedRef) -> std::io::Result<()> {
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
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEADER {
            return respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "header too large\n",
            )
            .await;
        }
    }
    let line = String::from_utf8_lossy(&buf);
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
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        (Some("GET"), Some(_)) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "only /metrics is here\n",
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "GET /metrics\n",
            )
            .await
        }
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
