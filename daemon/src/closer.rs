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
//!
//! What one user has waiting here is bounded too: at [`PER_USER_BACKLOG`] fds (queued or
//! being closed), reading its connections pauses ([`wait_for_room`]) — whatever more it sends
//! stays in the kernel's socket queues, counted against its own limits, not in the daemon's
//! fd table. Only its refused connections (over `max-connections-per-uid`) still come here
//! while it is over: one socket each.

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
/// Fds of one user waiting to be closed (or being closed) past which its connections are
/// not read: one message can bring [`rxd_shm::fd::SCM_MAX_FD`] at once.
pub const PER_USER_BACKLOG: usize = 512;

/// Users at or over [`PER_USER_BACKLOG`] (a quick look on every read).
static USERS_OVER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Default)]
struct State {
    /// What waits to be closed, and whose it is.
    queue: VecDeque<(u32, OwnedFd)>,
    /// Closes under way per user.
    running: HashMap<u32, usize>,
    /// Fds queued or under way per user.
    backlog: HashMap<u32, usize>,
    /// Closes the test hook has delayed per user.
    delayed: HashMap<u32, usize>,
    threads: usize,
    idle: usize,
}

/// Whether a user with `n` fds waiting may have its connections read (room for one more
/// message's worth).
fn has_room(n: usize) -> bool {
    n + rxd_shm::fd::SCM_MAX_FD < PER_USER_BACKLOG
}

impl State {
    fn add(&mut self, uid: u32, n: usize) {
        let b = self.backlog.entry(uid).or_default();
        let was = has_room(*b);
        *b += n;
        if was && !has_room(*b) {
            USERS_OVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn closed(&mut self, uid: u32) {
        if let Some(b) = self.backlog.get_mut(&uid) {
            let was = has_room(*b);
            *b -= 1;
            if !was && has_room(*b) {
                USERS_OVER.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            if *b == 0 {
                self.backlog.remove(&uid);
            }
        }
    }

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
        self.closed(uid);
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
    /// Test hook (`RXD_TEST_CLOSE_DELAY_MS`): each user's first closes take this long.
    delay: Option<Duration>,
}

fn closer() -> &'static Closer {
    static CLOSER: OnceLock<Closer> = OnceLock::new();
    CLOSER.get_or_init(|| Closer {
        state: Mutex::new(State::default()),
        cv: Condvar::new(),
        delay: crate::config::TestHooks::from_env().close_delay,
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
    let added = st.queue.len() - before;
    st.add(uid, added);
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
            st.backlog.clear();
            USERS_OVER.store(0, std::sync::atomic::Ordering::Relaxed);
            drop(st);
            fds.iter()
                .for_each(|(_, fd)| rxd_shm::fd::close_without_lingering(fd));
        }
    }
}

/// Waits until user `uid` has room for another message's fds in the closer (at once, but
/// for a user whose closes hang with [`PER_USER_BACKLOG`] fds waiting).
pub async fn wait_for_room(uid: u32) {
    while !may_read(uid) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether user `uid`'s connections may be read now ([`wait_for_room`]).
pub fn may_read(uid: u32) -> bool {
    USERS_OVER.load(std::sync::atomic::Ordering::Relaxed) == 0 || room_for(uid)
}

fn room_for(uid: u32) -> bool {
    let st = closer().state.lock().unwrap_or_else(|e| e.into_inner());
    has_room(st.backlog.get(&uid).copied().unwrap_or(0))
}

/// A [`rxd_shm::socket::Dispose`] closing a connection's socket of user `uid` here.
pub fn disposer(uid: u32) -> rxd_shm::socket::Dispose {
    std::sync::Arc::new(move |fd| close_later(uid, [fd]))
}

fn serve(c: &'static Closer) {
    let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some((uid, fd)) = st.next() {
            let delay = c.delay.filter(|_| {
                let n = st.delayed.entry(uid).or_default();
                *n += 1;
                *n <= PER_USER_THREADS
            });
            drop(st);
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
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

    /// A user's backlog counts what is queued and under way, and says when it is full.
    #[test]
    fn a_users_backlog_is_counted_until_each_close_ends() {
        let mut st = State::default();
        let uid = 7;
        let n = PER_USER_BACKLOG - rxd_shm::fd::SCM_MAX_FD;
        for _ in 0..n - 1 {
            st.queue.push_back((uid, fd()));
        }
        st.add(uid, n - 1);
        assert!(has_room(st.backlog[&uid]));
        st.queue.push_back((uid, fd()));
        st.add(uid, 1);
        assert!(!has_room(st.backlog[&uid]), "full at {n}");
        let job = st.next().unwrap();
        assert!(!has_room(st.backlog[&uid]), "one under way still counts");
        drop(job);
        st.done(uid);
        assert!(has_room(st.backlog[&uid]));
        while st.next().is_some() {
            st.done(uid);
        }
        assert!(!st.backlog.contains_key(&uid));
    }
}
