//! One timer thread for every scheduler: wakes a scheduler at the instant its policy asked
//! for (a delayed batch, a deadline). Stale or duplicate wake-ups are harmless: the policy
//! simply finds nothing to do. The thread sleeps while there is nothing to wait for.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock, Weak};
use std::time::Instant;

use super::Scheduler;

struct Entry {
    at: Instant,
    seq: u64,
    target: Weak<Scheduler>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Timer {
    heap: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
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
        heap: Mutex::new((BinaryHeap::new(), 0)),
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

/// Asks for `target.tick()` at `at`.
pub fn wake_at(at: Instant, target: Weak<Scheduler>) {
    let t = timer();
    let mut g = t.heap.lock().unwrap_or_else(|e| e.into_inner());
    g.1 += 1;
    let seq = g.1;
    g.0.push(Reverse(Entry { at, seq, target }));
    drop(g);
    t.cv.notify_one();
}

fn run(t: &'static Timer) {
    let mut g = t.heap.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match g.0.peek() {
            None => g = t.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            Some(Reverse(e)) if e.at <= now => {
                let Reverse(e) = g.0.pop().expect("peeked");
                drop(g);
                if let Some(s) = e.target.upgrade() {
                    s.tick();
                }
                g = t.heap.lock().unwrap_or_else(|e| e.into_inner());
            }
            Some(Reverse(e)) => {
                let wait = e.at - now;
                g =
                    t.cv.wait_timeout(g, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
        }
    }
}
