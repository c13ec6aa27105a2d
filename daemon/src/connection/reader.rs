//! Reading frames from the connection's socket.

use rxd_protocol::frame::{self, FrameError, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why reading a frame stopped.
pub(super) enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    Frame(FrameError),
    Io(std::io::Error),
}

pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: u64,
) -> Result<Vec<u8>, ReadError> {
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
