//! One timer thread for every scheduler: wakes a scheduler at the instant it asked for (a
//! delayed batch, a deadline, a lane's rest after a failure). Each scheduler has at most one
//! wake-up pending, its earliest: a later one asked meanwhile is dropped, since the tick that
//! comes first re-decides everything and asks again for what it still needs (the policy its
//! next instant, the scheduler its resting lanes' return). So the timer holds one entry per
//! scheduler, however requests' deadlines move (a peer sending ever-earlier deadlines once
//! left one entry per request until each far-future instant came). Early or stale wake-ups
//! are harmless: the scheduler simply finds nothing to do. The thread sleeps while there is
//! nothing to wait for.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, OnceLock, Weak};
use std::time::Instant;

use super::Scheduler;

/// The wake-ups pending, of schedulers (`T`; generic for the tests).
struct Pending<T> {
    /// (instant, sequence) → the scheduler to wake.
    by_time: BTreeMap<(Instant, u64), Weak<T>>,
    /// Each scheduler's entry (by its allocation's address, unique while the entry's `Weak`
    /// keeps the allocation).
    by_target: HashMap<usize, (Instant, u64)>,
    seq: u64,
    /// Entries of dropped schedulers are swept when the count reaches this.
    sweep_at: usize,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            by_time: BTreeMap::new(),
            by_target: HashMap::new(),
            seq: 0,
            sweep_at: 64,
        }
    }
}

struct Timer {
    pending: Mutex<Pending<Scheduler>>,
    cv: Condvar,
}

static TIMER: OnceLock<&'static Timer> = OnceLock::new();

/// Starts the timer thread. The daemon does so at start, so that a thread that cannot be
/// spawned is a start-up error rather than a panic on the request that first waits.
pub fn start() -> std::io::Result<()> {
    static STARTING: Mutex<()> = Mutex::new(());
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if TIMER.get().is_some() {
        return Ok(());
    }
    let t: &'static Timer = Box::leak(Box::new(Timer {
        pending: Mutex::new(Pending::default()),
        cv: Condvar::new(),
    }));
    std::thread::Builder::new()
        .name("rxd-timer".into())
        .spawn(move || run(t))?;
    let _ = TIMER.set(t);
    Ok(())
}

fn timer() -> &'static Timer {
    if let Some(t) = TIMER.get() {
        return t;
    }
    // Only where the daemon's start did not run (unit tests).
    start().expect("spawn the timer thread");
    TIMER.get().expect("just started")
}

/// Asks for `target.tick()` at `at` (or earlier: see the module's doc).
pub fn wake_at(at: Instant, target: Weak<Scheduler>) {
    let t = timer();
    let mut p = t.pending.lock().unwrap_or_else(|e| e.into_inner());
    if !p.add(at, target) {
        return;
    }
    drop(p);
    t.cv.notify_one();
}

/// A scheduler's key in `Pending::by_target`: its allocation's address.
fn key_of<T>(w: &Weak<T>) -> usize {
    w.as_ptr().cast::<()>() as usize
}

impl<T> Pending<T> {
    /// Adds a wake-up unless one at or before `at` is pending for `target`; whether it did.
    fn add(&mut self, at: Instant, target: Weak<T>) -> bool {
        let key = key_of(&target);
        if let Some(&old) = self.by_target.get(&key) {
            if old.0 <= at {
                return false;
            }
            self.by_time.remove(&old);
        }
        self.seq += 1;
        let entry = (at, self.seq);
        self.by_time.insert(entry, target);
        self.by_target.insert(key, entry);
        if self.by_target.len() >= self.sweep_at {
            let dead: Vec<(Instant, u64)> = self
                .by_time
                .iter()
                .filter(|(_, w)| w.strong_count() == 0)
                .map(|(k, _)| *k)
                .collect();
            for k in dead {
                if let Some(w) = self.by_time.remove(&k) {
                    self.by_target.remove(&key_of(&w));
                }
            }
            self.sweep_at = (self.by_target.len() * 2).max(64);
        }
        true
    }

    /// The first entry, taken out if its instant has come; else when it comes.
    fn next(&mut self, now: Instant) -> Option<Result<Weak<T>, Instant>> {
        let (&(at, seq), _) = self.by_time.first_key_value()?;
        if at > now {
            return Some(Err(at));
        }
        let target = self.by_time.remove(&(at, seq)).expect("first");
        self.by_target.remove(&key_of(&target));
        Some(Ok(target))
    }
}

fn run(t: &'static Timer) {
    let mut p = t.pending.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match p.next(Instant::now()) {
            None => p = t.cv.wait(p).unwrap_or_else(|e| e.into_inner()),
            Some(Ok(target)) => {
                drop(p);
                if let Some(s) = target.upgrade() {
                    s.tick();
                }
                p = t.pending.lock().unwrap_or_else(|e| e.into_inner());
            }
            Some(Err(at)) => {
                let wait = at.saturating_duration_since(Instant::now());
                p =
                    t.cv.wait_timeout(p, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A peer's ever-earlier (or ever-later) far-future deadlines leave one entry per
    /// scheduler, the earliest; each scheduler still gets its tick when its instant comes.
    #[test]
    fn one_pending_wake_per_scheduler_the_earliest() {
        let now = Instant::now();
        let far = now + Duration::from_secs(1 << 40);
        let (a, b) = (Arc::new(1u32), Arc::new(2u32));
        let mut p = Pending::default();
        for i in 0..10_000u64 {
            p.add(far - Duration::from_secs(i), Arc::downgrade(&a));
            p.add(far + Duration::from_secs(i), Arc::downgrade(&b));
        }
        assert_eq!(p.by_time.len(), 2);
        assert_eq!(p.by_target.len(), 2);
        assert!(matches!(p.next(now), Some(Err(t)) if t == far - Duration::from_secs(9_999)));
        // An earlier one replaces it; a later one does not.
        assert!(p.add(now, Arc::downgrade(&a)));
        assert!(!p.add(now + Duration::from_secs(1), Arc::downgrade(&a)));
        let first = p.next(now).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first.upgrade().unwrap(), &a));
        // Taken: the next one for `a` is accepted again.
        assert!(p.add(now + Duration::from_secs(5), Arc::downgrade(&a)));
        assert_eq!(p.by_time.len(), 2);
        assert!(matches!(p.next(now), Some(Err(t)) if t == now + Duration::from_secs(5)));
    }

    /// Entries of schedulers that are gone are swept as new ones come, so the count stays
    /// bounded by the schedulers alive (plus the sweep's slack).
    #[test]
    fn entries_of_dropped_schedulers_are_swept() {
        let far = Instant::now() + Duration::from_secs(1 << 40);
        let mut p = Pending::default();
        let alive: Vec<Arc<u64>> = (0..10).map(Arc::new).collect();
        for s in &alive {
            p.add(far, Arc::downgrade(s));
        }
        for i in 0..100_000u64 {
            let gone = Arc::new(i);
            p.add(far, Arc::downgrade(&gone));
        }
        assert!(p.by_time.len() < 200, "{} entries", p.by_time.len());
        assert_eq!(p.by_time.len(), p.by_target.len());
        for s in &alive {
            let key = Arc::as_ptr(s).cast::<()>() as usize;
            assert!(
                p.by_target.contains_key(&key),
                "a live scheduler's wake-up swept"
            );
        }
    }
}
