//! Rust client library for rxd: an async [`Client`] (tokio) and a [`blocking::Client`] over the
//! same protocol, tensors in and out as `ndarray` arrays, many requests in flight on one
//! connection, and errors as [`ClientError`] carrying the wire code.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rxd_client::ClientError> {
//! let client = rxd_client::Client::connect("/run/rxd/rxd.sock").await?;
//! let x = rxd_client::ndarray::Array2::<f32>::zeros((1, 64));
//! let outputs = client
//!     .infer("digits", vec![rxd_client::tensor::from_array("input", &x)])
//!     .await?;
//! let label = rxd_client::tensor::to_array::<i64>(&outputs[0])?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`transport`]: the connection: handshake, a reader task that routes responses by id.
//! - [`arena`]: the shared-memory arena: allocator, buffers, zero-copy views.
//! - [`tensor`]: conversions between `ndarray` arrays and wire tensors.
//! - [`npy`]: reading and writing NumPy `.npy` files of any wire dtype (used by rxctl).
//! - [`shapes`]: output sizes known before a run (to size an output area for a first request).
//! - [`blocking`]: the same API without async.
//! - [`bench`]: the load generator behind `rxctl bench`.
//! - `generate` (feature `generate`): man pages and shell completions from clap definitions,
//!   shared by `rxctl` and `rxd`.
//!
//! The `rxctl` binary needs the default feature `cli` (clap, crossterm); the library does not:
//! `default-features = false` leaves them out.
#![forbid(unsafe_code)]

pub mod arena;
pub mod bench;
pub mod blocking;
#[cfg(feature = "generate")]
pub mod generate;
pub mod npy;
pub mod ring;
pub mod shapes;
pub mod tensor;
pub mod transport;

pub use arena::{Arena, ArenaBuf, OutputBufs};
/// The `ndarray` this library's tensors convert to and from (use it rather than adding your
/// own dependency, whose version would have to match).
pub use ndarray;
pub use ring::{RingClient, RingOptions};
pub use rxd_protocol as protocol;
pub use rxd_protocol::{DType, ErrorCode, Tensor, WireError};
pub use transport::{Client, ClientOptions};

// The Rust snippets of the README and docs/clients.md compile as doctests, unchanged.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeSnippets;
#[cfg(doctest)]
#[doc = include_str!("../../docs/clients.md")]
pub struct ClientsSnippets;

/// Default socket path of a packaged daemon; `RXD_SOCKET` overrides it in rxctl.
pub const DEFAULT_SOCKET: &str = "/run/rxd/rxd.sock";

/// Everything that can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered with an error.
    #[error("{0}")]
    Server(WireError),
    /// The daemon refused the handshake.
    #[error("handshake refused: {0}")]
    Handshake(WireError),
    /// The peer sent something this library cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection closed before the answer came.
    #[error("connection closed: {0}")]
    Closed(String),
    /// A tensor could not be converted (dtype or shape).
    #[error("tensor conversion: {0}")]
    Tensor(String),
    /// The arena has no free range that large.
    #[error("the arena has no {wanted} free bytes in one piece ({free} free in all)")]
    ArenaFull { wanted: u64, free: u64 },
}

impl ClientError {
    /// The wire code when the daemon answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(w) | ClientError::Handshake(w) => w.kind(),
            _ => None,
        }
    }
}
