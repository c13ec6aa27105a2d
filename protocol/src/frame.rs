//! Framing: a 4-byte little-endian body length, then a MessagePack body.
//!
//! Pure functions over bytes: parse a header, encode a message into a complete frame, decode a
//! body. No IO happens here; the daemon's `connection` and the client's `transport` do the
//! reading and writing.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, WireError};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// The wire error for this failure.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Empty | FrameError::Decode(_) => ErrorCode::MalformedMessage,
            FrameError::Encode(_) => ErrorCode::Internal,
        };
        WireError::new(code, self.to_string())
    }
}

/// Reads a header and returns the body length, checked against `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: u64) -> Result<usize, FrameError> {
    let len = u64::from(u32::from_le_bytes(header));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    usize::try_from(len).map_err(|_| FrameError::TooLarge { len, max })
}

/// Encodes `msg` as a complete frame (header + body) appended to `out`.
pub fn encode_into<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    rmp_serde::encode::write_named(out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - start - HEADER_LEN;
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len: len as u64,
        max: u64::from(u32::MAX),
    })?;
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(())
}

/// Encodes `msg` as a complete frame (header + body).
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Decodes a frame body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Best effort: the `id` of a request frame whose body does not decode as a whole, so that the
/// error can be answered under the right id. `None` when even that fails.
pub fn salvage_id(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    decode::<IdOnly>(body)
        .ok()
        .map(|x| x.id)
        .filter(|&id| id != 0)
}

/// Encodes then decodes, for tests in this and other crates.
pub fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(msg: &T) -> T {
    let frame = encode(msg).expect("encode");
    let mut header = [0; HEADER_LEN];
    header.copy_from_slice(&frame[..HEADER_LEN]);
    let len = body_len(header, u64::MAX).expect("length");
    decode(&frame[HEADER_LEN..HEADER_LEN + len]).expect("decode")
}
