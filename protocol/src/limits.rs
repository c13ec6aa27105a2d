//! Bounds on everything a peer controls. Both sides enforce them; the daemon may be configured
//! lower (never higher) for frame size and in-flight requests.

/// Hard ceiling on a frame body, whatever the configuration says.
pub const MAX_FRAME_LIMIT: u64 = 1 << 30;
/// Default maximum frame body the daemon accepts (inline tensors up to about this size).
pub const DEFAULT_MAX_FRAME: u64 = 80 << 20;
/// Largest frame a handshake may be.
pub const MAX_HANDSHAKE_FRAME: u64 = 4096;
/// Longest model, tensor or client name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 32;
/// Most tensors (inputs or requested outputs) in one request.
pub const MAX_TENSORS: usize = 1024;
/// Largest size of one dimension: ONNX Runtime's dimensions are `int64`.
pub const MAX_DIM: u64 = i64::MAX as u64;
/// Largest single tensor, in bytes.
pub const MAX_TENSOR_BYTES: u64 = 1 << 34;
/// Default number of requests in flight per connection.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;
/// Default largest shared-memory arena per connection.
pub const DEFAULT_MAX_ARENA: u64 = 256 << 20;
/// Default total of all connections' arenas.
pub const DEFAULT_ARENA_TOTAL: u64 = 1 << 30;
/// Default answer bytes a connection may have waiting for its client to read.
pub const DEFAULT_MAX_UNSENT: u64 = 64 << 20;
/// Default request bytes the daemon holds at once over all connections (at least twice the
/// frame limit in force).
pub const DEFAULT_REQUEST_MEMORY: u64 = 512 << 20;
/// Deepest nesting of MessagePack maps and arrays accepted in a frame from a peer.
pub const MAX_DEPTH: usize = 32;
/// Most MessagePack values (scalars, strings, bins, map keys and values, array items) in one
/// request frame: a request at every other limit (1024 tensors of rank 32 with their names,
/// 1024 outputs and output regions) has about 55 000.
pub const MAX_FRAME_VALUES: usize = 1 << 16;
