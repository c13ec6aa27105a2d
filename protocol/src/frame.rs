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

/// Decodes a frame body from an untrusted peer after checking its MessagePack structure
/// ([`check_structure`]): at most `max_values` values in all and nesting at most
/// [`limits::MAX_DEPTH`] deep. What decoding allocates is then bounded by the body's bytes plus a
/// few dozen bytes per value — a body of millions of one-byte values (each of which would
/// decode into a 24-byte `String` or a buffered `Content`) is refused before any allocation.
pub fn decode_bounded<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    max_values: usize,
) -> Result<T, FrameError> {
    check_structure(body, max_values)?;
    decode(body)
}

/// Walks one MessagePack value in `body` without allocating: every length within the body, at
/// most `max_values` values (map keys and values, array items, scalars, strings, bins — each
/// counts one) and at most [`limits::MAX_DEPTH`] levels of maps and arrays. Time is linear in
/// the number of values (string and bin payloads are skipped, not read).
pub fn check_structure(body: &[u8], max_values: usize) -> Result<(), FrameError> {
    let bad = |what: &str| FrameError::Decode(what.to_string());
    let mut pos = 0usize;
    let mut values = 0usize;
    // Values still to read at each open level (the outermost: the one body value), on the
    // stack: at most MAX_DEPTH levels below the outermost.
    let mut pending = [0u64; crate::limits::MAX_DEPTH + 1];
    pending[0] = 1;
    let mut depth = 1usize;
    let take = |pos: &mut usize, n: usize| -> Result<usize, FrameError> {
        let start = *pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad("a length runs past the end of the frame"))?;
        *pos = end;
        Ok(start)
    };
    let uint = |pos: &mut usize, n: usize| -> Result<u64, FrameError> {
        let at = take(pos, n)?;
        Ok(body[at..at + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    while depth > 0 {
        if pending[depth - 1] == 0 {
            depth -= 1;
            continue;
        }
        pending[depth - 1] -= 1;
        values += 1;
        if values > max_values {
            return Err(bad(&format!("more than {max_values} values in one frame")));
        }
        let at = take(&mut pos, 1)?;
        let marker = body[at];
        // (payload bytes to skip, children to read) for this value.
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (uint(&mut pos, 1)?, 0),
            0xc5 | 0xda => (uint(&mut pos, 2)?, 0),
            0xc6 | 0xdb => (uint(&mut pos, 4)?, 0),
            0xc7 => (uint(&mut pos, 1)? + 1, 0),
            0xc8 => (uint(&mut pos, 2)? + 1, 0),
            0xc9 => (uint(&mut pos, 4)? + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, uint(&mut pos, 2)?),
            0xdd => (0, uint(&mut pos, 4)?),
            0xde => (0, 2 * uint(&mut pos, 2)?),
            0xdf => (0, 2 * uint(&mut pos, 4)?),
            0xc1 => return Err(bad("the never-used MessagePack marker 0xc1")),
        };
        let skip = usize::try_from(skip).map_err(|_| bad("a length runs past the end"))?;
        take(&mut pos, skip)?;
        if children > 0 {
            // More children than bytes left can never be valid: refuse early.
            if children > (body.len() - pos) as u64 {
                return Err(bad("a map or array longer than the frame"));
            }
            if depth > crate::limits::MAX_DEPTH {
                return Err(bad(&format!(
                    "maps and arrays nested more than {} deep",
                    crate::limits::MAX_DEPTH
                )));
            }
            pending[depth] = children;
            depth += 1;
        }
    }
    if pos != body.len() {
        return Err(bad(&format!(
            "{} bytes after the message's one value",
            body.len() - pos
        )));
    }
    Ok(())
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
