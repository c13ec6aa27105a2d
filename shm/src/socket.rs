//! A connected Unix socket split into a reading side registered with the async runtime for
//! readability only, and a writing side registered for writability only while a write waits
//! for room (daemon and client both use it).
//!
//! Why not the runtime's own split stream: it registers the socket for both directions, and a
//! Unix socket signals "writable" every time the peer reads — so every message the peer read
//! woke the runtime once for nothing (one `epoll_wait` return and a thread wake-up per
//! request on each side, BENCHMARKS.md "cost per request"). Writes go straight to the socket;
//! only a peer that does not read makes a write wait, and only then is writability watched,
//! through a second descriptor of the same socket.
//! Boundary: bytes in and out of one socket; no framing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::socket::MsgFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

use crate::fd::watch;

/// What closes a side's descriptor when the side is dropped, in place of closing it on the
/// dropping thread: the last close of a socket frees what is queued on it, fds a peer sent
/// included, and closing those may block ([`crate::fd::Received::fds`]).
pub type Dispose = std::sync::Arc<dyn Fn(std::os::fd::OwnedFd) + Send + Sync>;

/// The reading side: the socket, watched for readability.
pub struct ReadSide {
    /// Taken only by `drop`.
    fd: Option<AsyncFd<UnixStream>>,
    dispose: Option<Dispose>,
}

/// The writing side: a second descriptor of the socket. Shuts the socket's writing direction
/// down when dropped (the client then sees the end of the stream).
pub struct WriteSide {
    /// Taken only by `drop`.
    sock: Option<UnixStream>,
    dispose: Option<Dispose>,
}

/// Splits an accepted connection (taken out of the runtime's registration).
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadSide, WriteSide)> {
    split_disposing(stream, None)
}

/// [`split`], each side handing its descriptor to `dispose` when dropped.
pub fn split_disposing(
    stream: tokio::net::UnixStream,
    dispose: Option<Dispose>,
) -> io::Result<(ReadSide, WriteSide)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(true)?;
    let writer = stream.try_clone()?;
    Ok((
        ReadSide {
            fd: Some(watch(stream, Interest::READABLE)?),
            dispose: dispose.clone(),
        },
        WriteSide {
            sock: Some(writer),
            dispose,
        },
    ))
}

impl ReadSide {
    fn fd(&self) -> &AsyncFd<UnixStream> {
        self.fd.as_ref().expect("taken only by drop")
    }
}

impl Drop for ReadSide {
    fn drop(&mut self) {
        if let (Some(fd), Some(dispose)) = (self.fd.take(), &self.dispose) {
            dispose(fd.into_inner().into());
        }
    }
}

impl WriteSide {
    fn sock(&self) -> &UnixStream {
        self.sock.as_ref().expect("taken only by drop")
    }
}

impl ReadSide {
    /// Waits until the socket is readable, then runs `read` on its descriptor: `Ok(n)` what
    /// `read` returned. A `WouldBlock` from `read` waits again. When `drained(&n)` says the
    /// read emptied the socket (it filled less than it could), the readiness seen before the
    /// read is cleared as a `WouldBlock` would clear it, so that the next call waits for the
    /// peer's next bytes instead of reading once more only to learn there are none: bytes
    /// that arrived during or after the read set readiness anew, and the end of the stream
    /// is never cleared, so nothing is left unread.
    pub async fn read<R>(
        &self,
        mut read: impl FnMut(RawFd) -> io::Result<R>,
        drained: impl Fn(&R) -> bool,
    ) -> io::Result<R> {
        loop {
            let mut guard = self.fd().readable().await?;
            match guard.try_io(|s| read(s.as_raw_fd())) {
                Ok(Ok(r)) => {
                    if drained(&r) {
                        guard.clear_ready();
                    }
                    return Ok(r);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads through the runtime (as a buffered reader wants them), with the same clearing of
/// readiness after a read that drains the socket as [`ReadSide::read`]. Any file descriptors
/// sent along are discarded by the kernel (nothing is passed after the handshake).
impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd().poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            match guard.try_io(|s| {
                nix::sys::socket::recv(s.as_raw_fd(), unfilled, MsgFlags::MSG_DONTWAIT)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl WriteSide {
    /// Writes what the socket takes now: `WouldBlock` when it takes nothing. Never raises
    /// SIGPIPE (a peer gone is an error).
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        nix::sys::socket::send(
            self.sock().as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)
    }

    /// Runs `write` on the socket's descriptor until it does not answer `WouldBlock`,
    /// waiting for room in between.
    pub async fn write_with<R>(
        &self,
        mut write: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        loop {
            match write(self.sock().as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Ends the socket's writing direction (the peer sees the end of the stream).
    pub fn shutdown(&self) {
        let _ = self.sock().shutdown(std::net::Shutdown::Write);
    }

    /// Writes all of `buf`, waiting for room as needed.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_with(|_| self.try_write(buf)).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Waits until the socket can take bytes. The socket is watched for writability, through
    /// a descriptor of its own, only for the wait: watching starts from the socket's state
    /// at that moment, so room made before the wait began is seen.
    pub async fn writable(&self) -> io::Result<()> {
        let watch = watch(self.sock().try_clone()?, Interest::WRITABLE)?;
        let _ready = watch.writable().await?;
        Ok(())
    }
}

impl Drop for WriteSide {
    fn drop(&mut self) {
        if let Some(sock) = self.sock.take() {
            let _ = sock.shutdown(std::net::Shutdown::Write);
            if let Some(dispose) = &self.dispose {
                dispose(sock.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (ReadSide, WriteSide, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let (r, w) = split(tokio::net::UnixStream::from_std(a).unwrap()).unwrap();
        (r, w, b)
    }

    fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        nix::sys::socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    }

    /// A read that empties the socket clears readiness; bytes that come later are still read,
    /// and so is the end of the stream.
    #[tokio::test]
    async fn a_drained_socket_waits_for_the_next_bytes_and_sees_the_end() {
        use std::io::Write;
        let (r, _w, mut peer) = pair();
        let mut buf = [0u8; 64];
        peer.write_all(b"abc").unwrap();
        let n = r.read(|fd| recv(fd, &mut buf), |&n| n < 64).await.unwrap();
        assert_eq!(&buf[..n], b"abc");
        // Nothing buffered: the next read waits, and returns once bytes come.
        let later = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            r.read(|fd| recv(fd, &mut buf), |&n| n < 64),
        )
        .await;
        assert!(later.is_err(), "no bytes, no read");
        peer.write_all(b"de").unwrap();
        let n = r.read(|fd| recv(fd, &mut buf), |&n| n < 64).await.unwrap();
        assert_eq!(&buf[..n], b"de");
        // Bytes and the end of the stream at once: the bytes, then the end.
        peer.write_all(b"f").unwrap();
        drop(peer);
        let n = r.read(|fd| recv(fd, &mut buf), |&n| n < 64).await.unwrap();
        assert_eq!(&buf[..n], b"f");
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            r.read(|fd| recv(fd, &mut buf), |&n| n < 64),
        )
        .await
        .expect("the end of the stream is seen")
        .unwrap();
        assert_eq!(n, 0);
    }

    /// A write that finds the socket full waits until the peer reads, then goes on; dropping
    /// the writing side ends the peer's stream.
    #[tokio::test]
    async fn a_full_socket_waits_for_room_and_drop_ends_the_stream() {
        use std::io::Read;
        let (_r, w, mut peer) = pair();
        let big = vec![7u8; 4 << 20];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got.len()
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), w.write_all(&big))
            .await
            .expect("written as the peer reads")
            .unwrap();
        drop(w);
        assert_eq!(reader.join().unwrap(), big.len());
    }
}
