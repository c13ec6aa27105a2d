//! Run limits: a run still going past its limit is stopped. A request's cost can depend on its
//! values rather than its size (a `Loop` whose trip count is an input, a `Range` whose bounds
//! are): the scheduler, which expects by size, cannot see it coming, and one such request
//! would hold a worker for as long as its values say — past the watchdog's limit, which has
//! systemd restart the daemon with every user's requests. One timer thread sets ONNX Runtime's
//! terminate flag on the run options of a run past its deadline; ORT checks it between nodes
//! and between a loop's iterations, and the run fails at the next check.
//! Invariant: the timer touches a run's options only while the run is registered, under its
//! lock, and a run's end takes the same lock: a flag set for one run never stops the next.
//!
//! A user whose requests keep running into the limit would hold a worker for a whole limit
//! each time, and others' requests would wait that long at each of its turns: [`Strikes`]
//! halves the limit of that user's next runs at each stop (down to a 64th), and forgets after
//! [`STRIKE_MEMORY`] without one. Only the user's own stops count, so no one can shorten
//! another's limit.
//!
//! The flag cannot stop one operator midway (a `MatMul` whose size comes from a request's
//! values runs to its end), so a stop can come late by far more than the limit, and a
//! shorter limit does not help. A user whose run ended a whole limit or more past it is
//! *barred* from the model's workers for [`STRIKE_MEMORY`]: its requests there are answered
//! at once, unrun ([`Strikes::barred`]). So such a request holds a worker once per model and
//! ten minutes, not at each of its turns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ort::session::RunOptions;

/// What the timer stops: a run's options (a flag in tests).
pub(super) trait Stoppable: Send + Sync {
    /// Stops the runs made with it (at their next check).
    fn stop(&self);
    /// Lets the next run made with it go.
    fn clear(&self);
}

impl Stoppable for RunOptions {
    fn stop(&self) {
        if let Err(e) = self.terminate() {
            tracing::warn!("cannot stop a run past its limit: {e}");
        }
    }

    fn clear(&self) {
        if let Err(e) = self.unterminate() {
            tracing::warn!("cannot clear a stopped run's terminate flag: {e}");
        }
    }
}

/// How often the timer looks while runs have come and gone within [`IDLE`]: a run whose
/// deadline is later than the next look needs no wake-up (at the rate light runs come, one
/// system call each would cost more than the run).
const TICK: Duration = Duration::from_millis(10);

/// How long the timer goes on ticking after the last run it saw, before it sleeps until the
/// next.
const IDLE: Duration = Duration::from_secs(1);

/// A run registered with the timer.
struct Active {
    id: u64,
    deadline: Instant,
    options: Arc<dyn Stoppable>,
}

#[derive(Default)]
struct Pending {
    runs: Vec<Active>,
    next_id: u64,
    /// When the timer looks next (`None`: it sleeps until woken).
    wake_at: Option<Instant>,
    /// When a run was last registered.
    last_run: Option<Instant>,
}

struct Timer {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Timer {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every run past its deadline, then waits for the next deadline or tick.
    fn serve(&self) {
        let mut p = self.lock();
        loop {
            let now = Instant::now();
            p.runs.retain(|r| {
                if r.deadline > now {
                    return true;
                }
                r.options.stop();
                false
            });
            let first = p.runs.iter().map(|r| r.deadline).min();
            let ticking = p.last_run.is_some_and(|t| now.duration_since(t) < IDLE);
            let next = match (first, ticking) {
                (Some(d), true) => Some(d.min(now + TICK)),
                (None, true) => Some(now + TICK),
                (d, false) => d,
            };
            p.wake_at = next;
            p = match next {
                Some(at) => {
                    self.wake
                        .wait_timeout(p, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(p).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The timer, its thread started on first use (`None` if it could not start: runs then go
/// unlimited, and that is logged once).
fn timer() -> Option<&'static Timer> {
    static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
    *TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        }));
        match std::thread::Builder::new()
            .name("rxd-run-limit".into())
            .spawn(move || timer.serve())
        {
            Ok(_) => Some(timer),
            Err(e) => {
                tracing::error!("cannot start the thread that stops runs past their limit: {e}");
                None
            }
        }
    })
}

/// A run registered with the timer; [`Watch::end`] says whether it was stopped.
#[must_use]
pub(super) struct Watch {
    id: u64,
    options: Arc<dyn Stoppable>,
}

impl Watch {
    /// Registers a run made with `options` that is to be stopped `after` from now.
    pub fn start(options: Arc<dyn Stoppable>, after: Duration) -> Option<Watch> {
        let timer = timer()?;
        let now = Instant::now();
        let deadline = now + after;
        let mut p = timer.lock();
        let id = p.next_id;
        p.next_id += 1;
        p.runs.push(Active {
            id,
            deadline,
            options: options.clone(),
        });
        p.last_run = Some(now);
        if p.wake_at.is_none_or(|w| deadline < w) {
            p.wake_at = Some(deadline);
            timer.wake.notify_one();
        }
        Some(Watch { id, options })
    }

    /// The run is over: whether the timer stopped it. Its options are ready for the next run
    /// either way.
    pub fn end(self) -> bool {
        let Some(timer) = timer() else {
            return false;
        };
        let mut p = timer.lock();
        match p.runs.iter().position(|r| r.id == self.id) {
            Some(i) => {
                p.runs.swap_remove(i);
                false
            }
            None => {
                self.options.clear();
                true
            }
        }
    }
}

/// How long a user's stopped runs shorten its limit after the last of them.
pub const STRIKE_MEMORY: Duration = Duration::from_secs(600);

/// The most a user's stops halve its limit: 6 times, to a 64th.
const MOST_STRIKES: u32 = 6;

/// Users whose runs were stopped lately, and how often (module docs).
#[derive(Debug, Default)]
pub struct Strikes {
    /// Any user has a strike (the common case, none, takes no lock).
    any: AtomicBool,
    by_source: Mutex<HashMap<u64, Strike>>,
}

/// A user's stops: how many (each halves its limit), the last, and the last that came a
/// whole limit late.
#[derive(Debug, Clone, Copy)]
struct Strike {
    count: u32,
    last: Instant,
    late: Option<Bar>,
}

/// Why a user is barred from a model's workers: its run that took `took` against a limit of
/// `limit`, stopped at `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub took: Duration,
    pub limit: Duration,
    pub at: Instant,
}

impl Strikes {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Strike>> {
        self.by_source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit of `source`'s next run, `limit` unless its runs were stopped lately.
    pub fn limit(&self, source: u64, limit: Duration) -> Duration {
        if !self.any.load(Ordering::Relaxed) {
            return limit;
        }
        match self.lock().get(&source) {
            Some(s) if s.last.elapsed() < STRIKE_MEMORY => limit / (1 << s.count),
            _ => limit,
        }
    }

    /// Whether `source` is barred from the model's workers, and why (module docs).
    pub fn barred(&self, source: u64) -> Option<Bar> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.lock()
            .get(&source)
            .and_then(|s| s.late)
            .filter(|b| b.at.elapsed() < STRIKE_MEMORY)
    }

    /// A run of `source`'s alone was stopped past its `limit`, having taken `took`.
    pub fn strike(&self, source: u64, took: Duration, limit: Duration) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| {
            now.duration_since(s.last) < STRIKE_MEMORY
                || s.late
                    .is_some_and(|b| now.duration_since(b.at) < STRIKE_MEMORY)
        });
        let s = map.entry(source).or_insert(Strike {
            count: 0,
            last: now,
            late: None,
        });
        s.count = if now.duration_since(s.last) < STRIKE_MEMORY {
            (s.count + 1).min(MOST_STRIKES)
        } else {
            1
        };
        s.last = now;
        if took >= limit.saturating_mul(2) {
            s.late = Some(Bar {
                took,
                limit,
                at: now,
            });
        }
        self.any.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    #[test]
    fn each_stop_halves_only_that_users_limit_down_to_a_64th() {
        let s = Strikes::default();
        let limit = Duration::from_secs(64);
        assert_eq!(s.limit(7, limit), limit);
        for n in 1..=8u32 {
            s.strike(7, limit, limit);
            let want = limit / (1 << n.min(MOST_STRIKES));
            assert_eq!(s.limit(7, limit), want, "after {n} stops");
        }
        assert_eq!(s.limit(8, limit), limit, "another user's limit is its own");
        assert_eq!(s.barred(7), None, "stops on time bar nobody");
    }

    #[test]
    fn a_stop_a_whole_limit_late_bars_only_that_user() {
        let s = Strikes::default();
        let limit = Duration::from_secs(2);
        s.strike(7, limit * 2 - Duration::from_millis(1), limit);
        assert_eq!(s.barred(7), None, "less than a limit late");
        s.strike(7, Duration::from_secs(9), limit);
        let b = s.barred(7).expect("barred");
        assert_eq!((b.took, b.limit), (Duration::from_secs(9), limit));
        assert!(b.at.elapsed() < Duration::from_secs(1));
        assert_eq!(s.barred(8), None, "another user is not");
        // A later stop on time keeps the bar (it lasts from the late one).
        s.strike(7, limit / 4, limit / 4);
        assert_eq!(s.barred(7), Some(b));
    }

    /// A run's terminate flag.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Stoppable for Flag {
        fn stop(&self) {
            self.0.store(true, SeqCst);
        }
        fn clear(&self) {
            self.0.store(false, SeqCst);
        }
    }

    fn watch(flag: &Arc<Flag>, after: Duration) -> Watch {
        Watch::start(flag.clone(), after).expect("the timer runs")
    }

    #[test]
    fn a_run_that_ends_in_time_is_not_stopped_and_a_late_one_is() {
        let flag = Arc::new(Flag::default());
        let w = watch(&flag, Duration::from_secs(60));
        assert!(
            !w.end(),
            "a run that ended within its limit was reported stopped"
        );
        assert!(!flag.0.load(SeqCst));
        let w = watch(&flag, Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(300));
        assert!(flag.0.load(SeqCst), "a run past its limit was not stopped");
        assert!(w.end());
        assert!(!flag.0.load(SeqCst), "the flag stayed set for the next run");
        let w = watch(&flag, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!w.end(), "the next run with the same options was stopped");
    }

    #[test]
    fn an_early_deadline_wakes_a_timer_waiting_for_a_later_one() {
        let (a, b) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
        let long = watch(&a, Duration::from_secs(60));
        // Past the ticking period the timer sleeps until the long run's deadline.
        std::thread::sleep(IDLE + TICK * 5);
        let short = watch(&b, Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            b.0.load(SeqCst),
            "the short run was not stopped while the timer slept"
        );
        assert!(short.end());
        assert!(!long.end());
        assert!(!a.0.load(SeqCst));
    }
}
