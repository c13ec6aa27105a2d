//! Closing descriptors a peer had a hand in, on threads of their own. Closing the last
//! reference to a file can block the closing thread for as long as the file's owner likes:
//! a TCP socket set to linger on unsent data (even non-blocking), a file on a FUSE mount
//! whose server never answers, a socket whose queue holds such files. A peer can make the
//! daemon hold the last reference by sending fds over its connection (SCM_RIGHTS) — which
//! the kernel refuses where it can (`SO_PASSRIGHTS` off on the listening socket, inherited
//! by every connection; Linux ≥ 6.16). Elsewhere those fds, and the connection sockets whose
//! queues may still hold some, are closed here, never on the IO threads or the workers. A
//! socket is first set to abort rather than linger. A close that blocks holds up only its
//! closer thread, and only its user's closes: each user's run on at most
//! [`PER_USER_THREADS`] threads at once, so one user's hung closes never delay another's.
//! Another thread starts (up to [`MAX_THREADS`]) when none is free; idle ones end.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Closer threads at most.
pub const MAX_THREADS: usize = 16;
/// Closer threads one user's closes may hold at once.
pub const PER_USER_THREADS: usize = 2;
/// A closer idle this long ends (one stays).
const IDLE: Duration = Duration::from_secs(10);
/// A close taking longer is logged.
const SLOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// What waits to be closed, and whose it is.
    queue: VecDeque<(u32, OwnedFd)>,
    /// Closes under way per user.
    running: HashMap<u32, usize>,
    threads: usize,
    idle: usize,
}

impl State {
    /// The first fd in the queue whose user may have another close under way.
    fn next(&mut self) -> Option<(u32, OwnedFd)> {
        let i = self
            .queue
            .iter()
            .position(|(uid, _)| self.running.get(uid).copied().unwrap_or(0) < PER_USER_THREADS)?;
        let job = self.queue.remove(i)?;
        *self.running.entry(job.0).or_default() += 1;
        Some(job)
    }

    fn done(&mut self, uid: u32) {
        if let Some(n) = self.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&uid);
            }
        }
    }
}

struct Closer {
    state: Mutex<State>,
    cv: Condvar,
}

fn closer() -> &'static Closer {
    static CLOSER: OnceLock<Closer> = OnceLock::new();
    CLOSER.get_or_init(|| Closer {
        state: Mutex::new(State::default()),
        cv: Condvar::new(),
    })
}

/// Closes `fds`, which user `uid` had a hand in, on a closer thread.
pub fn close_later(uid: u32, fds: impl IntoIterator<Item = OwnedFd>) {
    let c = closer();
    let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
    let before = st.queue.len();
    st.queue.extend(fds.into_iter().map(|fd| (uid, fd)));
    if st.queue.len() == before {
        return;
    }
    // Idle threads look first (all of them: the first fds may be of a user at its limit).
    if st.idle > 0 {
        drop(st);
        c.cv.notify_all();
        return;
    }
    if st.threads >= MAX_THREADS {
        // Every closer is busy: the fds wait their turn.
        return;
    }
    st.threads += 1;
    let spawned = std::thread::Builder::new()
        .name("rxd-closer".into())
        .spawn(move || serve(c));
    if let Err(e) = spawned {
        st.threads -= 1;
        tracing::error!("cannot start a closer thread: {e}");
        if st.threads == 0 {
            // Nothing else would ever close them.
            let fds: Vec<(u32, OwnedFd)> = st.queue.drain(..).collect();
            drop(st);
            fds.iter()
                .for_each(|(_, fd)| rxd_shm::fd::close_without_lingering(fd));
        }
    }
}

/// A [`rxd_shm::socket::Dispose`] closing a connection's socket of user `uid` here.
pub fn disposer(uid: u32) -> rxd_shm::socket::Dispose {
    std::sync::Arc::new(move |fd| close_later(uid, [fd]))
}

fn serve(c: &'static Closer) {
    let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some((uid, fd)) = st.next() {
            drop(st);
            rxd_shm::fd::close_without_lingering(&fd);
            let start = Instant::now();
            drop(fd);
            let took = start.elapsed();
            if took > SLOW {
                tracing::warn!(
                    uid,
                    secs = took.as_secs_f64(),
                    "closing a file descriptor a peer sent (or its connection) took long"
                );
            }
            st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            st.done(uid);
            // A user's next fd may wait for this one's end: another thread may take it.
            if !st.queue.is_empty() && st.idle > 0 {
                c.cv.notify_one();
            }
            continue;
        }
        st.idle += 1;
        let (guard, timeout) =
            c.cv.wait_timeout(st, IDLE)
                .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.queue.is_empty() && st.threads > 1 {
            st.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A user at its limit of closes under way waits; others' closes are taken past it.
    #[test]
    fn one_users_closes_never_hold_up_anothers() {
        let mut st = State::default();
        for _ in 0..4 {
            st.queue.push_back((1, fd()));
        }
        st.queue.push_back((2, fd()));
        assert_eq!(st.next().map(|j| j.0), Some(1));
        assert_eq!(st.next().map(|j| j.0), Some(1));
        // User 1 has PER_USER_THREADS under way (hung, say): user 2's comes next.
        assert_eq!(st.next().map(|j| j.0), Some(2));
        assert!(st.next().is_none(), "user 1 waits for its own");
        st.done(1);
        assert_eq!(st.next().map(|j| j.0), Some(1));
        st.done(2);
        assert!(!st.running.contains_key(&2));
    }
}
