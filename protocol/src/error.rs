//! Stable numeric error codes and the wire error value.
//!
//! Owns the code table that clients match on. Codes never change meaning once released; new
//! codes are added, old ones are never reused. Daemon-side error enums map into these in one
//! place (`daemon/src/error.rs`); this module knows nothing about why an error happened.

use serde::{Deserialize, Serialize};

/// A stable error code. The number is what travels on the wire.
///
/// Ranges: 1xx framing and handshake, 2xx request and input validation, 3xx models,
/// 4xx permissions, 5xx capacity and time, 6xx shared memory, 9xx internal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame body is not a valid message.
    MalformedMessage = 100,
    /// The frame's declared length exceeds the negotiated maximum.
    FrameTooLarge = 101,
    /// The client speaks a protocol version the daemon does not.
    UnsupportedVersion = 102,
    /// A request was sent before the handshake completed, or the handshake was sent twice.
    HandshakeRequired = 103,
    /// A request id is 0 (reserved) or is already in flight on this connection.
    BadRequestId = 104,
    /// A file descriptor came with a frame after the handshake (fds travel only with the
    /// welcome). The descriptors are closed and the connection ends.
    UnexpectedFd = 105,

    /// A request is well-formed but its contents are invalid (names, sizes, limits).
    InvalidRequest = 200,
    /// A required model input is missing.
    MissingInput = 201,
    /// An input name the model does not have.
    UnknownInput = 202,
    /// An input's dtype differs from the model's.
    DtypeMismatch = 203,
    /// An input's rank or a fixed dimension differs from the model's.
    ShapeMismatch = 204,
    /// An input's data length differs from element count × dtype size.
    DataLengthMismatch = 205,
    /// A requested output name the model does not have.
    UnknownOutput = 206,
    /// A tensor exceeds a size limit (rank, elements, bytes).
    TensorTooLarge = 207,

    /// No model (or no such version) with that name.
    UnknownModel = 300,
    /// The model exists but is not ready (it failed to load, or is loading/unloading).
    ModelNotReady = 301,
    /// Loading a model failed.
    LoadFailed = 302,

    /// The peer is not allowed to perform an admin operation.
    PermissionDenied = 400,

    /// The model's queue is full; retry later (backpressure).
    Busy = 500,
    /// The request's deadline passed before it could run.
    DeadlineExceeded = 501,
    /// The daemon is shutting down and takes no new requests.
    ShuttingDown = 502,
    /// The model does not fit its device's memory budget, even after evicting every idle,
    /// unpinned model (the message names what is resident).
    OverBudget = 503,
    /// The connection's answers not yet taken by the client exceed `max-unsent-bytes`: this
    /// answer was dropped (the request ran). Read answers as they come; large outputs belong
    /// in the arena.
    UnreadAnswers = 504,
    /// The peer's user already holds its share of the daemon's connections
    /// (`max-connections-per-uid`); sent as a handshake error.
    ConnectionLimit = 505,
    /// The connection was closed for a timeout: no handshake in time, a frame not completed
    /// in time, or idle with nothing in flight. Sent under id 0 (or as a handshake error).
    ConnectionTimeout = 506,

    /// No shared-memory arena on this connection.
    ArenaUnavailable = 600,
    /// A shared-memory reference lies (partly) outside the arena or overflows.
    ArenaOutOfRange = 601,
    /// A shared-memory reference is not aligned for its dtype.
    ArenaMisaligned = 602,
    /// An output region is smaller than the output (the error carries the size needed).
    OutputRegionTooSmall = 603,

    /// ONNX Runtime failed while running the model.
    InferenceFailed = 900,
    /// A bug or an unexpected condition in the daemon.
    Internal = 901,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 30] = [
        ErrorCode::MalformedMessage,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HandshakeRequired,
        ErrorCode::BadRequestId,
        ErrorCode::UnexpectedFd,
        ErrorCode::InvalidRequest,
        ErrorCode::MissingInput,
        ErrorCode::UnknownInput,
        ErrorCode::DtypeMismatch,
        ErrorCode::ShapeMismatch,
        ErrorCode::DataLengthMismatch,
        ErrorCode::UnknownOutput,
        ErrorCode::TensorTooLarge,
        ErrorCode::UnknownModel,
        ErrorCode::ModelNotReady,
        ErrorCode::LoadFailed,
        ErrorCode::PermissionDenied,
        ErrorCode::Busy,
        ErrorCode::DeadlineExceeded,
        ErrorCode::ShuttingDown,
        ErrorCode::OverBudget,
        ErrorCode::UnreadAnswers,
        ErrorCode::ConnectionLimit,
        ErrorCode::ConnectionTimeout,
        ErrorCode::ArenaUnavailable,
        ErrorCode::ArenaOutOfRange,
        ErrorCode::ArenaMisaligned,
        ErrorCode::OutputRegionTooSmall,
        ErrorCode::InferenceFailed,
    ];

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire number, if this version knows it.
    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .chain([ErrorCode::Internal])
            .find(|c| c.as_u16() == n)
    }

    /// A short stable identifier (`snake_case`), used by `rxctl --json` and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedMessage => "malformed_message",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HandshakeRequired => "handshake_required",
            ErrorCode::BadRequestId => "bad_request_id",
            ErrorCode::UnexpectedFd => "unexpected_fd",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MissingInput => "missing_input",
            ErrorCode::UnknownInput => "unknown_input",
            ErrorCode::DtypeMismatch => "dtype_mismatch",
            ErrorCode::ShapeMismatch => "shape_mismatch",
            ErrorCode::DataLengthMismatch => "data_length_mismatch",
            ErrorCode::UnknownOutput => "unknown_output",
            ErrorCode::TensorTooLarge => "tensor_too_large",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::ModelNotReady => "model_not_ready",
            ErrorCode::LoadFailed => "load_failed",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Busy => "busy",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::OverBudget => "over_budget",
            ErrorCode::UnreadAnswers => "unread_answers",
            ErrorCode::ConnectionLimit => "connection_limit",
            ErrorCode::ConnectionTimeout => "connection_timeout",
            ErrorCode::ArenaUnavailable => "arena_unavailable",
            ErrorCode::ArenaOutOfRange => "arena_out_of_range",
            ErrorCode::ArenaMisaligned => "arena_misaligned",
            ErrorCode::OutputRegionTooSmall => "output_region_too_small",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// An error as it travels on the wire: a numeric code and a human-readable message.
///
/// The code is kept as a plain number so that a client of an older version still decodes codes
/// it does not know; [`WireError::kind`] maps it to [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: u16,
    pub message: String,
    /// For [`ErrorCode::OutputRegionTooSmall`]: bytes needed. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needed_bytes: Option<u64>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code: code.as_u16(),
            message: message.into(),
            needed_bytes: None,
        }
    }

    /// The known code, or `None` for a code newer than this library.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            Some(k) => write!(f, "{k}: {}", self.message),
            None => write!(f, "error {}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL.into_iter().chain([ErrorCode::Internal]) {
            assert!(seen.insert(c.as_u16()), "duplicate code {}", c.as_u16());
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(c));
        }
        assert_eq!(ErrorCode::from_u16(12345), None);
    }

    #[test]
    fn released_codes_keep_their_numbers() {
        // Clients match these numbers: changing one is a protocol break.
        assert_eq!(ErrorCode::MalformedMessage.as_u16(), 100);
        assert_eq!(ErrorCode::UnsupportedVersion.as_u16(), 102);
        assert_eq!(ErrorCode::DtypeMismatch.as_u16(), 203);
        assert_eq!(ErrorCode::UnknownModel.as_u16(), 300);
        assert_eq!(ErrorCode::PermissionDenied.as_u16(), 400);
        assert_eq!(ErrorCode::Busy.as_u16(), 500);
        assert_eq!(ErrorCode::ArenaOutOfRange.as_u16(), 601);
        assert_eq!(ErrorCode::Internal.as_u16(), 901);
    }
}
