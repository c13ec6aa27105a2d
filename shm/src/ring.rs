//! The words of a submission/completion ring in a shared mapping, and the futex calls that
//! let either side sleep until the other publishes (the layout itself is
//! `rxd_protocol::ring`'s; this module only touches memory).
//!
//! Memory safety: a ring's words are `AtomicU32`s at 4-byte-aligned offsets of a page-aligned
//! mapping that stays mapped while the [`RingMem`] lives (it holds the `Arc`). An atomic is
//! valid for every bit pattern, and the peer writing it at any time, with any instruction, is
//! what atomics are for: the values read are untrusted numbers, never anything more. Slots are
//! only copied ([`Mapping::copy_in`], [`Mapping::copy_out`]).
//!
//! Futexes: the words are shared between processes, so the calls use the shared (not
//! `FUTEX_PRIVATE`) forms. A wait only sleeps while the word still holds the value the caller
//! expects (checked by the kernel atomically with going to sleep), and every wait here has a
//! timeout or a wake the daemon controls: a peer that never wakes, or wakes all the time, costs
//! the sleeper at most a timed sleep, or one look at the ring per wake.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::{Mapping, RangeError};

/// A ring's memory: the mapping and the ring's offset in it.
#[derive(Debug, Clone)]
pub struct RingMem {
    map: Arc<Mapping>,
    base: u64,
    len: u64,
}

impl RingMem {
    /// The ring of `len` bytes at `base` in `map`; `base` must be a multiple of 64 and the
    /// range inside the mapping.
    pub fn new(map: Arc<Mapping>, base: u64, len: u64) -> Result<RingMem, RangeError> {
        map.ptr_whole(base, len)?;
        if !base.is_multiple_of(64) || len < 256 {
            return Err(RangeError {
                offset: base,
                len,
                size: map.len() as u64,
            });
        }
        Ok(RingMem { map, base, len })
    }

    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// The atomic word at `offset` from the ring's start (a header word).
    ///
    /// # Panics
    /// If `offset` is not a multiple of 4 inside the ring's first 256 bytes: the offsets are
    /// the protocol's constants, so that is a bug, not input.
    #[inline]
    pub fn word(&self, offset: u64) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= 256,
            "ring word {offset}"
        );
        let ptr = self
            .map
            .ptr_whole(self.base + offset, 4)
            .expect("the ring's header lies inside the mapping (checked in new)");
        // SAFETY: `ptr` points at 4 bytes inside the mapping (checked by `ptr`, and the header
        // by `new`), 4-byte aligned (the mapping is page-aligned, `base` a multiple of 64,
        // `offset` of 4); the mapping lives as long as `self` (its Arc), which bounds the
        // reference. Every bit pattern is a valid AtomicU32, and the other process writing it
        // concurrently is a race between atomic accesses to shared memory, which is what they
        // are for: this process only ever reads a value from it.
        unsafe { &*ptr.cast::<AtomicU32>() }
    }

    /// Copies `src` into the ring at `offset` (a slot), after the range check.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), RangeError> {
        self.check(offset, src.len() as u64)?;
        self.map.copy_in_whole(self.base + offset, src)
    }

    /// Copies bytes of the ring at `offset` into `dst`: untrusted but stable bytes.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), RangeError> {
        self.check(offset, dst.len() as u64)?;
        self.map.copy_out_whole(self.base + offset, dst)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), RangeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RangeError {
                offset,
                len,
                size: self.len,
            }),
        }
    }
}

const FUTEX_WAIT: i32 = 0;
const FUTEX_WAKE: i32 = 1;
/// `FUTEX2_SIZE_U32`: the waited word is 32 bits (shared: no `FUTEX2_PRIVATE`).
const FUTEX2_SIZE_U32: u32 = 0x02;

/// Sleeps while `word` holds `expected`, at most `timeout`, or until a wake. Returns at once if
/// it holds something else. Spurious returns are allowed: callers look again.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = timespec(timeout);
    // SAFETY: `word` is a live, aligned u32 (a reference); `ts` lives across the call; the
    // other arguments are unused by FUTEX_WAIT. The kernel only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every sleeper waiting on `word` (in any process).
pub fn wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE only uses its address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// The most words [`wait_any`] waits on at once (the kernel's limit).
pub const WAIT_ANY_MAX: usize = 128;

#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// Sleeps until one of `words` no longer holds its expected value or is woken, or `timeout`
/// passes (`futex_waitv`, Linux 5.16+). At most [`WAIT_ANY_MAX`] words. Spurious returns are
/// allowed.
pub fn wait_any(words: &[(&AtomicU32, u32)], timeout: Duration) -> io::Result<()> {
    if words.len() > WAIT_ANY_MAX || words.is_empty() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .map(|(w, v)| FutexWaitv {
            val: u64::from(*v),
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let deadline = add(now, timeout);
    // SAFETY: `waiters` holds `words.len()` entries (≤ 128) whose addresses are live, aligned
    // u32s borrowed for the call; `deadline` is an absolute CLOCK_MONOTONIC time that lives
    // across it. The kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as u32,
            0u32,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
            _ => Err(e),
        };
    }
    Ok(())
}

/// Whether this kernel (and any system-call filter) lets [`wait_any`] work: a wait on a word
/// that does not hold the value expected returns at once when it does.
pub fn wait_any_works() -> bool {
    let word = AtomicU32::new(1);
    let start = std::time::Instant::now();
    wait_any(&[(&word, 0)], Duration::from_millis(100)).is_ok()
        && start.elapsed() < Duration::from_millis(50)
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

fn add(t: libc::timespec, d: Duration) -> libc::timespec {
    let mut nsec = t.tv_nsec + d.subsec_nanos() as libc::c_long;
    let mut sec = t
        .tv_sec
        .saturating_add(d.as_secs().min(i64::MAX as u64) as libc::time_t);
    if nsec >= 1_000_000_000 {
        nsec -= 1_000_000_000;
        sec = sec.saturating_add(1);
    }
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    fn ring() -> RingMem {
        let fd = crate::create_sealed("ring-test", 8192).unwrap();
        let map = Arc::new(Mapping::map(std::os::fd::AsFd::as_fd(&fd), 8192).unwrap());
        RingMem::new(map, 4096, 4096).unwrap()
    }

    #[test]
    fn a_wait_returns_when_another_thread_publishes_and_wakes() {
        let r = ring();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r2.word(0).store(1, Ordering::SeqCst);
            wake(r2.word(0));
        });
        let start = Instant::now();
        while r.word(0).load(Ordering::SeqCst) == 0 {
            wait(r.word(0), 0, Duration::from_secs(5));
        }
        assert!(start.elapsed() < Duration::from_secs(4));
        t.join().unwrap();
    }

    #[test]
    fn wait_any_returns_for_any_word_and_at_once_for_a_changed_one() {
        let r = ring();
        let start = Instant::now();
        // Already changed: no sleep.
        r.word(64).store(5, Ordering::SeqCst);
        wait_any(&[(r.word(0), 0), (r.word(64), 4)], Duration::from_secs(5)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        // Woken on the second word.
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r2.word(128).store(1, Ordering::SeqCst);
            wake(r2.word(128));
        });
        let start = Instant::now();
        wait_any(&[(r.word(0), 0), (r.word(128), 0)], Duration::from_secs(5)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(4));
        assert_eq!(r.word(128).load(Ordering::SeqCst), 1);
        t.join().unwrap();
        // Nothing happens: the timeout ends the wait.
        let start = Instant::now();
        wait_any(&[(r.word(192), 0)], Duration::from_millis(30)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn slot_copies_are_bounded_by_the_ring() {
        let r = ring();
        r.write(4000, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        r.read(4000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(r.write(4094, &[0; 3]).is_err());
        assert!(r.read(u64::MAX - 1, &mut b).is_err());
        let map = r.mapping().clone();
        assert!(RingMem::new(map.clone(), 4096, 4097).is_err());
        assert!(RingMem::new(map, 100, 256).is_err());
    }

    /// A mapping whose tail is reserved for its ring refuses every reference into the ring
    /// (whatever a peer names), while the ring itself still reaches all of it.
    #[test]
    fn a_reserved_ring_is_reachable_only_through_the_ring() {
        let fd = crate::create_sealed("ring-test", 8192).unwrap();
        let mut map = Mapping::map(std::os::fd::AsFd::as_fd(&fd), 8192).unwrap();
        map.reserve_from(4096);
        let map = Arc::new(map);
        let r = RingMem::new(map.clone(), 4096, 4096).unwrap();
        r.word(0).store(7, Ordering::SeqCst);
        r.write(4092, &[1, 2, 3, 4]).unwrap();
        assert!(map.range(0, 4096).is_ok());
        for (offset, len) in [(4096, 4), (4095, 2), (0, 4097), (8188, 4), (4097, 0)] {
            assert!(map.range(offset, len).is_err(), "{offset}+{len}");
            assert!(map.ptr(offset, len).is_err(), "{offset}+{len}");
            assert!(map.copy_in(offset, &vec![0; len as usize]).is_err());
            assert!(map.copy_out(offset, &mut vec![0; len as usize]).is_err());
        }
        assert_eq!(r.word(0).load(Ordering::SeqCst), 7);
        let mut b = [0u8; 4];
        r.read(4092, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // Reserving never reopens: a later, larger offset keeps the smaller one.
        let mut m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), 8192).unwrap();
        m.reserve_from(4096);
        m.reserve_from(6000);
        assert!(m.range(4096, 1).is_err());
    }
}
