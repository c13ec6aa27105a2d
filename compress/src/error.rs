//! The compressor's one error type. Each variant is a kind of failure a caller handles
//! differently (the `rxd compress` face maps them to exit codes, the daemon to wire error
//! codes); the text says what, where and why. Must not: carry daemon or CLI notions.

use std::path::PathBuf;

/// What went wrong while compressing or evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not an ONNX model, or a part the compressor reads is malformed.
    #[error("not an ONNX model (it does not read as an ONNX ModelProto: {0})")]
    NotOnnx(crate::proto::Error),
    /// The model is ONNX, but something the compressor rewrites is malformed.
    #[error("{0}")]
    Malformed(#[from] crate::proto::Error),
    /// A strategy, calibration method or input that the caller wrote does not make sense.
    #[error("{0}")]
    Usage(String),
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An input file (.npy) or an input tensor is not what the compressor takes.
    #[error("{0}")]
    Data(String),
    /// The model uses something this strategy cannot handle.
    #[error("{0}")]
    Unsupported(String),
    /// ONNX Runtime failed to load or run a model.
    #[error("{0}")]
    Runtime(String),
    /// ONNX Runtime refused the compressed model (a compressor bug: the original loads).
    #[error("the compressed model does not load: {0}")]
    CompressedDoesNotLoad(String),
    /// The compressed model's outputs are not the original's (a compressor bug).
    #[error("output {name} changed size: {before} vs {after}")]
    OutputChanged {
        name: String,
        before: usize,
        after: usize,
    },
    /// The strategy found nothing to change in this model: its result would be the original.
    #[error("{0}")]
    NothingChanged(String),
    /// No variant the search may try meets the accuracy thresholds.
    #[error("{0}")]
    ThresholdsUnmet(String),
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Runtime(e.to_string())
    }
}

/// The compressor's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
