//! Message types: the handshake, requests, replies and tensor descriptors.
//!
//! Owns the shape of every message and the pure, model-independent checks on them (limits on
//! names, ranks, element counts). It does not know models or ONNX Runtime; checks that need a
//! model's signature live in the daemon.
//!
//! # Layout
//! - `handshake`: `Hello`, the welcome or refusal.
//! - `request`: the request frame, every op, `ModelRef`.
//! - `infer`: the infer request, output places, name checks.
//! - `tensor`: tensors, where their bytes are, their model-independent limits.
//! - `admin`: publish, compress and configure arguments and replies.
//! - `reply`: the response frame, outcomes and every reply type.
//!
//! Everything is re-exported here (and from the crate root), so paths do not name the files.

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

mod admin;
mod handshake;
mod infer;
mod reply;
mod request;
mod tensor;

pub use admin::*;
pub use handshake::*;
pub use infer::*;
pub use reply::*;
pub use request::*;
pub use tensor::*;
