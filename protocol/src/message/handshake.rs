//! The handshake: the client's `Hello` and the daemon's welcome or refusal.
//!
//! The first frame each way on a connection; the welcome is the only frame that may carry an fd
//! (the arena's). Nothing here knows about models or requests.

use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// First frame from client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks ([`PROTOCOL_VERSION`](super::PROTOCOL_VERSION)).
    pub protocol: u32,
    /// Free-form client name and version, for logs.
    #[serde(default)]
    pub client: String,
    /// Size of the shared-memory arena the client asks for, in bytes; 0 = none.
    #[serde(default)]
    pub arena_bytes: u64,
    /// A submission/completion ring the client asks for (PROTOCOL.md, "The ring"); it lies in
    /// the arena, after `arena_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingAsk>,
}

/// The ring a client asks for: `entries` slots of `slot_bytes` each way (the daemon rounds
/// them to what it allows, [`crate::ring::Geometry::granted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingAsk {
    pub entries: u32,
    pub slot_bytes: u32,
}

/// The ring granted: where it starts in the arena, and its geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingGrant {
    /// Offset of the ring's header in the arena (a multiple of 4096); the ring ends at the
    /// arena's end.
    pub offset: u64,
    pub entries: u32,
    pub slot_bytes: u32,
}

/// First frame from daemon to client, answering [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandshakeReply {
    Welcome(Welcome),
    /// The handshake was refused (for example [`ErrorCode::UnsupportedVersion`](crate::ErrorCode::UnsupportedVersion)); the daemon
    /// closes the connection after sending it.
    Error(HandshakeError),
}

/// The daemon accepted the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// Daemon name and version, e.g. `rxd 0.1.0`.
    pub server: String,
    /// Largest frame body the daemon accepts, in bytes.
    pub max_frame_bytes: u64,
    /// Requests that may be in flight on this connection at once; the daemon stops reading
    /// the connection while that many are unanswered.
    pub max_in_flight: u32,
    /// Size of the arena granted; 0 = none. When non-zero the frame carries the arena's fd
    /// (see PROTOCOL.md).
    #[serde(default)]
    pub arena_bytes: u64,
    /// The ring granted, when one was asked for and the daemon allows it (the arena then ends
    /// with it; `arena_bytes` counts it). Absent: requests go on the socket only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingGrant>,
}

/// A refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeError {
    #[serde(flatten)]
    pub error: WireError,
    /// Protocol versions the daemon speaks.
    pub supported: Vec<u32>,
}
