//! The rxd wire protocol: what travels over the daemon's Unix socket.
//!
//! # Layout
//! - [`frame`]: length-prefixed framing, encode/decode of MessagePack bodies.
//! - [`message`]: the handshake, requests, replies, tensor descriptors.
//! - [`dtype`]: tensor element types.
//! - [`error`]: stable numeric error codes and the wire error.
//! - [`limits`]: bounds on every size a peer controls.
//! - [`metrics`]: the metrics report and its Prometheus text rendering.
//! - [`units`]: sizes as people write them (`512MiB`), for configs and command lines.
//! - [`ring`]: the shared-memory submission/completion ring's layout and index arithmetic.
//! - [`npy`]: NumPy `.npy` files as tensors (over any `Read`/`Write`), for clients and tools.
//!
//! This crate is pure: no IO of its own, no async runtime, no unsafe code, no ONNX Runtime. PROTOCOL.md at
//! the repository root describes the same format for clients written in other languages.
#![forbid(unsafe_code)]

pub mod dtype;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod npy;
pub mod ring;
mod shape;
pub mod units;

pub use dtype::DType;
pub use error::{ErrorCode, WireError};
pub use message::*;
pub use metrics::{MetricsReport, ModelSettingsView};

#[cfg(test)]
mod tests;
