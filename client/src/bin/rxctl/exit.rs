//! How a command fails: a [`Failure`] is an exit code and the message printed for it; the
//! library's errors map to codes here, and only here.

use rxd_client::{ClientError, ErrorCode};

use crate::Cli;

/// rxctl's exit codes (sysexits where one fits).
pub mod code {
    pub const SERVER_ERROR: u8 = 1;
    pub const UNHEALTHY: u8 = 2;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const IO: u8 = 74;
    pub const NOPERM: u8 = 77;
}

/// A command failed: exit with `.0` after printing `.1`.
pub struct Failure(pub u8, pub String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match &e {
            ClientError::Connect { path, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Failure(
                    code::NOPERM,
                    format!(
                        "cannot connect to {path}: permission denied. Members of the daemon's \
                         group may use its socket; for the packaged service that is group rxd: \
                         `sudo usermod -aG rxd \"$USER\"`, then log in again ({source})"
                    ),
                )
            }
            ClientError::Connect { .. } | ClientError::Handshake(_) | ClientError::Closed(_) => {
                Failure(code::UNAVAILABLE, e.to_string())
            }
            ClientError::Server(w) if w.kind() == Some(ErrorCode::PermissionDenied) => {
                Failure(code::NOPERM, e.to_string())
            }
            _ => Failure(code::SERVER_ERROR, e.to_string()),
        }
    }
}

/// An `unknown_model` error with the models the daemon does serve.
pub fn with_known_models(cli: &Cli, f: Failure) -> Failure {
    let unknown = format!("{} (", ErrorCode::UnknownModel.name());
    if f.0 != code::SERVER_ERROR || !f.1.starts_with(&unknown) {
        return f;
    }
    let names: std::collections::BTreeSet<String> = cli
        .connect()
        .and_then(|c| c.list_models())
        .map(|l| l.into_iter().map(|m| m.name).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return f;
    }
    let names: Vec<String> = names.into_iter().collect();
    Failure(
        f.0,
        format!("{}; the daemon serves: {}", f.1, names.join(", ")),
    )
}
