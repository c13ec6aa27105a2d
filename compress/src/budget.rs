//! A search's time budget and its progress reports: the searches check the budget before each
//! costly step and stop with [`Error::ThresholdsUnmet`] once it is spent, and say how far they
//! got through a callback. Must not: print — the faces decide where progress goes (stderr for
//! `rxd compress`, the log for the daemon).

use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a search may run, and who hears how it goes.
pub struct Budget<'a> {
    start: Instant,
    limit: Duration,
    progress: &'a dyn Fn(&str),
}

fn quiet(_: &str) {}

impl<'a> Budget<'a> {
    /// A budget of `limit` from now, progress to `progress`.
    pub fn new(limit: Duration, progress: &'a dyn Fn(&str)) -> Budget<'a> {
        Budget {
            start: Instant::now(),
            limit,
            progress,
        }
    }

    /// No limit, no progress.
    pub fn unlimited() -> Budget<'static> {
        Budget::new(Duration::MAX, &quiet)
    }

    /// Reports a step, with the time spent so far.
    pub fn say(&self, what: &str) {
        (self.progress)(&format!(
            "[{:.1} s] {what}",
            self.start.elapsed().as_secs_f64()
        ));
    }

    /// Fails once the budget is spent; `state` says where the search stood.
    pub fn check(&self, state: impl FnOnce() -> String) -> Result<()> {
        if self.start.elapsed() < self.limit {
            return Ok(());
        }
        Err(Error::ThresholdsUnmet(format!(
            "the search used up its time budget ({} s) {} without meeting the thresholds",
            self.limit.as_secs_f64(),
            state()
        )))
    }
}
