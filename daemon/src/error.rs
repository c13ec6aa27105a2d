//! The daemon's request-level error enum and its one mapping to wire error codes.
//!
//! Every failure a client can see passes through [`RequestError::to_wire`]; nothing else
//! picks wire codes (validation errors that the protocol crate or `validate` already coded
//! travel as [`RequestError::Wire`]).

use rxd_protocol::{ErrorCode, ModelState, WireError};

use crate::runtime::RuntimeError;

/// Why a version cannot take a request now: the state it is in, or that its model's version
/// policy does not serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unready {
    In(ModelState),
    NotServed,
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unready::In(state) => state.name(),
            Unready::NotServed => "not served",
        })
    }
}

/// How a load that requests waited for ended without a model: what its waiters are told
/// (cloned to each of them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("loading '{model}' version {version} failed: {message}")]
    Failed {
        model: String,
        version: u64,
        message: String,
    },
    #[error("{message}")]
    OverBudget { message: String },
    /// Its load thread ended without finishing it (panicked or cancelled).
    #[error("the load was abandoned")]
    Abandoned,
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl From<LoadError> for RequestError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Failed {
                model,
                version,
                message,
            } => RequestError::LoadFailed {
                model,
                version,
                message,
            },
            LoadError::OverBudget { message } => RequestError::OverBudget { message },
            LoadError::Abandoned => RequestError::Internal(e.to_string()),
            LoadError::ShuttingDown => RequestError::ShuttingDown,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Already carries its wire code (input validation).
    #[error("{0}")]
    Wire(WireError),
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    #[error("model '{model}' has no version {version}")]
    UnknownVersion { model: String, version: u64 },
    #[error("model '{model}' version {version} is {state}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    NotReady {
        model: String,
        version: u64,
        state: Unready,
        detail: Option<String>,
    },
    #[error("'{op}' needs admin rights (uid 0, the daemon's uid, or the admin group)")]
    PermissionDenied { op: &'static str },
    #[error("priority {priority} is for admins; other clients may use 0..={max}")]
    PriorityDenied { priority: u8, max: u8 },
    /// A request that is well-formed but asks for something that cannot be (a bad setting,
    /// version 0, a file too large).
    #[error("{0}")]
    Invalid(String),
    /// Refused for now; the same request may succeed later.
    #[error("{0}")]
    Busy(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("loading '{model}' version {version} failed: {message}")]
    LoadFailed {
        model: String,
        version: u64,
        message: String,
    },
    #[error("{message}")]
    OverBudget { message: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::Wire(w) => w.kind().unwrap_or(ErrorCode::Internal),
            RequestError::UnknownModel(_) | RequestError::UnknownVersion { .. } => {
                ErrorCode::UnknownModel
            }
            RequestError::NotReady { .. } => ErrorCode::ModelNotReady,
            RequestError::PermissionDenied { .. } | RequestError::PriorityDenied { .. } => {
                ErrorCode::PermissionDenied
            }
            RequestError::Invalid(_) => ErrorCode::InvalidRequest,
            RequestError::Busy(_) => ErrorCode::Busy,
            RequestError::ShuttingDown => ErrorCode::ShuttingDown,
            RequestError::LoadFailed { .. } => ErrorCode::LoadFailed,
            RequestError::OverBudget { .. } => ErrorCode::OverBudget,
            RequestError::Runtime(
                RuntimeError::Run(_) | RuntimeError::Stopped { .. } | RuntimeError::Barred { .. },
            ) => ErrorCode::InferenceFailed,
            RequestError::Runtime(RuntimeError::WorkersGone) => ErrorCode::ModelNotReady,
            RequestError::Runtime(RuntimeError::QueueFull { .. }) => ErrorCode::Busy,
            RequestError::Runtime(RuntimeError::Abandoned) => ErrorCode::Internal,
            RequestError::Runtime(RuntimeError::DeadlineExceeded) => ErrorCode::DeadlineExceeded,
            RequestError::Runtime(RuntimeError::OutputTooSmall { .. }) => {
                ErrorCode::OutputRegionTooSmall
            }
            RequestError::Runtime(
                RuntimeError::Library { .. }
                | RuntimeError::Session { .. }
                | RuntimeError::Unsupported { .. }
                | RuntimeError::Warmup { .. }
                | RuntimeError::NoInstances,
            ) => ErrorCode::LoadFailed,
            RequestError::Runtime(RuntimeError::Scratch { .. } | RuntimeError::Threads(_))
            | RequestError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn to_wire(&self) -> WireError {
        match self {
            RequestError::Wire(w) => w.clone(),
            RequestError::Runtime(RuntimeError::OutputTooSmall { needed, .. }) => WireError {
                needed_bytes: Some(*needed),
                ..WireError::new(self.code(), self.to_string())
            },
            other => WireError::new(other.code(), other.to_string()),
        }
    }
}

impl From<WireError> for RequestError {
    fn from(w: WireError) -> Self {
        RequestError::Wire(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_names_the_state_or_the_version_policy() {
        let e = RequestError::NotReady {
            model: "m".into(),
            version: 2,
            state: Unready::In(ModelState::Failed),
            detail: Some("no such op".into()),
        };
        assert_eq!(e.to_string(), "model 'm' version 2 is failed: no such op");
        assert_eq!(e.code(), ErrorCode::ModelNotReady);
        let e = RequestError::NotReady {
            model: "m".into(),
            version: 1,
            state: Unready::NotServed,
            detail: None,
        };
        assert_eq!(e.to_string(), "model 'm' version 1 is not served");
    }
}
