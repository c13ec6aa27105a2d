//! ONNX Runtime's own log messages, routed through tracing (target `onnxruntime`) instead of
//! ORT's coloured lines on stderr, at levels that say what they mean to rxd: a failed kernel
//! is a request that failed (the client gets `inference_failed`, the metrics count it), so
//! ORT's errors and warnings are warnings; its information is debug. Repeats are rate-limited
//! per code location: a client sending bad inputs in a loop cannot fill the journal.
//! Boundary: no ORT calls here; [`super::Runtime::init`] installs [`logger`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ort::logging::LogLevel;

/// At most one message per code location per this long.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Code locations tracked at once (ORT has a bounded set; this bounds the map regardless).
const MAX_KEYS: usize = 1024;

/// Decides which messages are logged: the first of a key, then one per window, each saying
/// how many were left out since the one before. Pure: the caller gives the time.
#[derive(Debug, Default)]
pub struct RateLimit {
    seen: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    logged: Instant,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(n)`: log this message, noting the `n` left out since the last one of `key`;
    /// `None`: leave it out (counted).
    pub fn check(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some(e) = self.seen.get_mut(key) {
            if now.saturating_duration_since(e.logged) < WINDOW {
                e.suppressed += 1;
                return None;
            }
            let n = e.suppressed;
            *e = Entry {
                logged: now,
                suppressed: 0,
            };
            return Some(n);
        }
        if self.seen.len() >= MAX_KEYS {
            self.seen.clear();
        }
        self.seen.insert(
            key.to_string(),
            Entry {
                logged: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// The logger ORT's environment calls for every message (from any thread).
pub fn logger() -> ort::logging::LoggerFunction {
    let limit = Arc::new(Mutex::new(RateLimit::default()));
    Arc::new(
        move |level: LogLevel, _category: &str, id: &str, location: &str, message: &str| {
            let key = format!("{level:?} {location}");
            let left_out = {
                let mut l = limit.lock().unwrap_or_else(|e| e.into_inner());
                l.check(&key, Instant::now())
            };
            let Some(left_out) = left_out else {
                return;
            };
            let more = if left_out > 0 {
                format!(
                    " ({left_out} more like it in the last {} s not logged)",
                    WINDOW.as_secs()
                )
            } else {
                String::new()
            };
            let session = if id.is_empty() { "-" } else { id };
            // A load that failed before its model was read has no profile to write; rxd logs
            // the failure itself.
            let level = if message.starts_with("Could not write a profile") {
                LogLevel::Info
            } else {
                level
            };
            match level {
                LogLevel::Verbose => {
                    tracing::trace!(target: "onnxruntime", session, location, "{message}{more}")
                }
                LogLevel::Info => {
                    tracing::debug!(target: "onnxruntime", session, location, "{message}{more}")
                }
                LogLevel::Warning | LogLevel::Error => {
                    tracing::warn!(target: "onnxruntime", session, location, "{message}{more}")
                }
                LogLevel::Fatal => {
                    tracing::error!(target: "onnxruntime", session, location, "{message}{more}")
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_logged_once_per_window_with_the_count_left_out() {
        let mut l = RateLimit::default();
        let t0 = Instant::now();
        assert_eq!(l.check("E a.cc:1", t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(l.check("E a.cc:1", t0 + Duration::from_millis(i)), None);
        }
        // Another location is not held back by the first.
        assert_eq!(l.check("E b.cc:2", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(l.check("E a.cc:1", t0 + WINDOW), Some(1000));
        assert_eq!(
            l.check("E a.cc:1", t0 + WINDOW + Duration::from_secs(1)),
            None
        );
        assert_eq!(l.check("E a.cc:1", t0 + WINDOW * 2), Some(1));
    }

    #[test]
    fn the_map_stays_bounded() {
        let mut l = RateLimit::default();
        let t0 = Instant::now();
        for i in 0..5000 {
            l.check(&format!("k{i}"), t0);
        }
        assert!(l.seen.len() <= MAX_KEYS);
    }
}
