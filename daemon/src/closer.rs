//! Closing descriptors a peer had a hand in, on threads of their own. Closing the last
//! reference to a file can block the closing thread for as long as the file's owner likes:
//! a TCP socket set to linger on unsent data (even non-blocking), a file on a FUSE mount
//! whose server never answers, a socket whose queue holds such files. A peer can make the
//! daemon hold the last reference by sending fds over its connection (SCM_RIGHTS; refused by
//! the kernel itself where `SO_PASSRIGHTS` exists, Linux ≥ 6.16, but not before the socket
//! option is set at accept) — so those fds, and the connection sockets whose queues may still
//! hold some, are closed here, never on the IO threads or the workers. A socket is first set
//! to abort rather than linger. A close that blocks holds up only its closer thread: another
//! starts (up to [`MAX_THREADS`]) when none is free, and idle ones end.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Closer threads at most (each is stuck only on a file a peer made hang).
pub const MAX_THREADS: usize = 8;
/// A closer idle this long ends (one stays).
const IDLE: Duration = Duration::from_secs(10);
/// A close taking longer is logged.
const SLOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    queue: VecDeque<OwnedFd>,
    threads: usize,
    idle: usize,
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

/// Closes `fds` on a closer thread.
pub fn close_later(fds: impl IntoIterator<Item = OwnedFd>) {
    let c = closer();
    let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
    let before = st.queue.len();
    st.queue.extend(fds);
    if st.queue.len() == before {
        return;
    }
    if st.idle > 0 {
        drop(st);
        c.cv.notify_one();
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
            let fds: Vec<OwnedFd> = st.queue.drain(..).collect();
            drop(st);
            fds.iter().for_each(rxd_shm::fd::close_without_lingering);
        }
    }
}

/// [`close_later`] for one fd (a [`rxd_shm::socket::Dispose`]).
pub fn close_one(fd: OwnedFd) {
    close_later([fd]);
}

fn serve(c: &'static Closer) {
    let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(fd) = st.queue.pop_front() {
            drop(st);
            rxd_shm::fd::close_without_lingering(&fd);
            let start = Instant::now();
            drop(fd);
            let took = start.elapsed();
            if took > SLOW {
                tracing::warn!(
                    secs = took.as_secs_f64(),
                    "closing a file descriptor a peer sent (or its connection) took long"
                );
            }
            st = c.state.lock().unwrap_or_else(|e| e.into_inner());
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

/// Fds waiting for a closer, and closer threads (for tests and the log).
pub fn backlog() -> (usize, usize) {
    let st = closer().state.lock().unwrap_or_else(|e| e.into_inner());
    (st.queue.len(), st.threads)
}
