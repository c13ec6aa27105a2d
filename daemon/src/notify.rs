//! The systemd notification protocol (sd_notify) and the watchdog, without libsystemd.
//!
//! Messages go as datagrams to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
//! Nothing happens when `NOTIFY_SOCKET` is unset. `READY=1` is sent only after the socket is
//! bound and the preloads are done; `STATUS=` says what is served; `STOPPING=1` on shutdown.
//! The watchdog (`WATCHDOG_USEC`) pings at half the interval, but only while the liveness check
//! passes: every model worker is either idle or has been on its current batch for less than the
//! stuck threshold, and the async runtime itself is running the pinger. A wedged worker stops
//! the pings, and systemd restarts the daemon.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let s = v.to_string_lossy().into_owned();
            match s.strip_prefix('@') {
                Some(name) if !name.is_empty() => Some(Target::Abstract(name.as_bytes().to_vec())),
                None if s.starts_with('/') => Some(Target::Path(s.into())),
                _ => None,
            }
        });
        Notifier { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (several `KEY=value` lines); errors are logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some(target) = &self.target else { return };
        let result = UnixDatagram::unbound().and_then(|sock| match target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(message.as_bytes(), &addr)
            }
        });
        if let Err(e) = result {
            tracing::warn!("sd_notify failed: {e}");
        }
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
}
