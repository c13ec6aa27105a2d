//! Reading frames from the connection's socket.
//!
//! Every read is a `recvmsg`, so that a file descriptor sent with any byte is seen: a plain
//! `read` stops at a message that carries fds (and tokio then waits for readiness that never
//! comes, stalling the connection), and would silently drop them. Fds travel only with the
//! welcome (PROTOCOL.md); any that arrives here is closed at once and reported as
//! [`ReadError::Fd`]. What a header claims is reserved from the user's request-memory quota
//! before the body is read (the caller does it), and a body's pages are committed only as its
//! bytes arrive.

use std::io;
use std::os::fd::RawFd;

use rxd_protocol::frame::{self, FrameError, HEADER_LEN};

use rxd_shm::socket::ReadSide;

/// Why reading a frame stopped.
#[derive(Debug)]
pub(super) enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    Frame(FrameError),
    /// File descriptors arrived (now closed).
    Fd,
    Io(io::Error),
}

/// Bytes read ahead of the current frame.
const STAGING: usize = 64 * 1024;

/// Frames from one socket: a staging buffer for small reads, bodies read into their own
/// vectors.
pub(super) struct FrameReader {
    rd: ReadSide,
    /// The peer's uid: whose any fds it sends are, for [`crate::closer`].
    uid: u32,
    staging: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub(super) fn new(rd: ReadSide, uid: u32) -> FrameReader {
        FrameReader {
            rd,
            uid,
            staging: vec![0; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received but not yet consumed.
    pub(super) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// One `recvmsg` into `buf`, waiting for readiness; 0 = end of stream. A read that fills
    /// less than `buf` emptied the socket: the next one waits for the peer's next bytes
    /// without a `recvmsg` that would only say there are none (see [`ReadSide::read`]; one
    /// system call per request fewer). A read also stops short where file descriptors come
    /// with the next bytes; only a peer that breaks the protocol sends any, and it then
    /// waits for its own next bytes to be read.
    async fn recv(rd: &ReadSide, uid: u32, buf: &mut [u8]) -> Result<usize, ReadError> {
        let cap = buf.len();
        loop {
            // A user whose sent fds wait to be closed (their closes hang) sends no more: looked
            // at again once the socket is readable, just before reading (all of a user's
            // connections may be waiting for readiness at once).
            crate::closer::wait_for_room(uid).await;
            let read = rd
                .read(
                    |fd| {
                        if !crate::closer::may_read(uid) {
                            return Ok(None);
                        }
                        recv_no_fds(fd, uid, buf).map(Some)
                    },
                    |r| matches!(r, Some(Ok(n)) if *n > 0 && *n < cap),
                )
                .await;
            return match read {
                Ok(None) => continue,
                Ok(Some(Ok(n))) => Ok(n),
                Ok(Some(Err(()))) => Err(ReadError::Fd),
                Err(e) => Err(ReadError::Io(e)),
            };
        }
    }

    /// Waits until at least one byte is buffered; `Eof` if the stream ended first.
    pub(super) async fn fill(&mut self) -> Result<(), ReadError> {
        if self.buffered() > 0 {
            return Ok(());
        }
        self.start = 0;
        self.end = 0;
        let n = Self::recv(&self.rd, self.uid, &mut self.staging).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        self.end = n;
        Ok(())
    }

    /// The next header's body length, checked against `max`. `Eof` only at a frame boundary.
    pub(super) async fn header(&mut self, max: u64) -> Result<usize, ReadError> {
        self.fill().await?;
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            if self.buffered() == 0 {
                self.start = 0;
                self.end = 0;
                let n = Self::recv(&self.rd, self.uid, &mut self.staging).await?;
                if n == 0 {
                    return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                self.end = n;
            }
            let take = (HEADER_LEN - got).min(self.buffered());
            header[got..got + take].copy_from_slice(&self.staging[self.start..self.start + take]);
            self.start += take;
            got += take;
        }
        frame::body_len(header, max).map_err(ReadError::Frame)
    }

    /// A body of `len` bytes (the length was reserved from the request-memory quota before
    /// this is called). A large zeroed vector is fresh anonymous memory: its pages are
    /// committed only as the peer's bytes land in them.
    pub(super) async fn body(&mut self, len: usize) -> Result<Vec<u8>, ReadError> {
        let mut body = vec![0u8; len];
        let have = self.buffered().min(len);
        body[..have].copy_from_slice(&self.staging[self.start..self.start + have]);
        self.start += have;
        let mut filled = have;
        while filled < len {
            let n = Self::recv(&self.rd, self.uid, &mut body[filled..]).await?;
            if n == 0 {
                return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            filled += n;
        }
        Ok(body)
    }
}

/// `recvmsg` into `buf`. `Err(())` when file descriptors came with the bytes: the kernel put
/// them in our fd table, and they go to [`crate::closer`] (closing one may block).
fn recv_no_fds(fd: RawFd, uid: u32, buf: &mut [u8]) -> io::Result<Result<usize, ()>> {
    let r = rxd_shm::recv_taking_fds(fd, buf)?;
    if r.fds.is_empty() && !r.truncated {
        return Ok(Ok(r.bytes));
    }
    crate::closer::close_later(uid, r.fds);
    Ok(Err(()))
}

/// The handshake's reader: a whole frame of at most `max` bytes.
pub(super) async fn read_frame(rd: &mut FrameReader, max: u64) -> Result<Vec<u8>, ReadError> {
    let len = rd.header(max).await?;
    rd.body(len).await
}
