//! Shared memory for rxd: sealed memfd arenas, their mappings, and file descriptors passed
//! between processes ([`fd`]: over a Unix socket, or by the service manager at start; and a
//! socket registered with the async runtime for one direction). This crate holds the project's shared-memory unsafe code (the daemon's only other
//! unsafe code copies bytes into and out of ONNX Runtime tensors); daemon and client use its
//! safe API.
//!
//! Invariants:
//! - A [`Mapping`] stays mapped for its whole life and is unmapped exactly once, on drop. Its
//!   memory may be written by the other process at any time: this crate never hands out a
//!   Rust reference to mapped memory except through [`Region`], which only an [`Allocator`]
//!   creates: it hands each byte range to one `Region` at a time, and a range the peer may
//!   write (an output buffer named in a request) is lent ([`Region::lend`]), which gives up
//!   the `Region` until the peer is done with it. Everything else is copied
//!   ([`Mapping::copy_in`], [`Mapping::copy_out`]) or passed on as a raw pointer.
//! - Every offset and length is checked with overflow-safe arithmetic before a pointer is
//!   formed ([`Mapping::range`]).
//! - Only a file sealed against shrinking and growing is mapped ([`Mapping::map`] checks the
//!   seals and the size itself), so the peer cannot truncate it under the mapping (no
//!   SIGBUS); arenas are created sealed ([`create_sealed`]) before their fd leaves the
//!   creating process.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

pub mod fd;
pub mod ring;
pub mod socket;
pub use fd::{
    activated_listener, peek, peer_groups, raw, recv_taking_fds, recv_with_fd, send_with_fd,
};

/// Seals every arena carries: size fixed, seals fixed.
pub const ARENA_SEALS: i32 = libc_seal(SealFlag::F_SEAL_SHRINK)
    | libc_seal(SealFlag::F_SEAL_GROW)
    | libc_seal(SealFlag::F_SEAL_SEAL);

/// Seals [`Mapping::map`] requires: the size cannot change under the mapping.
pub const SIZE_SEALS: i32 = libc_seal(SealFlag::F_SEAL_SHRINK) | libc_seal(SealFlag::F_SEAL_GROW);

const fn libc_seal(f: SealFlag) -> i32 {
    f.bits()
}

/// A range that does not lie inside the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeError {
    pub offset: u64,
    pub len: u64,
    pub size: u64,
}

impl std::fmt::Display for RangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bytes {}..{}+{} are outside the {}-byte arena",
            self.offset, self.offset, self.len, self.size
        )
    }
}

impl std::error::Error for RangeError {}

/// Creates a memfd of `size` bytes and seals it (`F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL`).
pub fn create_sealed(name: &str, size: usize) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC)?;
    let len = i64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::unistd::ftruncate(&fd, len)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// The seals on an fd (`F_GET_SEALS`).
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    Ok(fcntl(fd, FcntlArg::F_GET_SEALS)?)
}

/// The size of the file behind an fd.
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_size as u64)
}

/// A shared, read-write mapping of a whole file: memmap2's `MmapRaw`, made for memory another
/// process may write (it hands out raw pointers only, never references), which maps in
/// `map` and unmaps exactly once on drop.
pub struct Mapping {
    map: memmap2::MmapRaw,
    len: usize,
    /// The end of the part [`Mapping::range`] and the accessors open to references; the rest
    /// is reserved for this crate's [`ring::RingMem`] ([`Mapping::reserve_from`]).
    open: usize,
    /// Whether the file's pages are freed when this is dropped ([`Mapping::discard_on_drop`]).
    discard: bool,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes)", self.len)
    }
}

impl Mapping {
    /// Maps `fd` shared read-write. The file must be sealed against shrinking and growing
    /// (`F_SEAL_SHRINK|F_SEAL_GROW`, checked here: another process holding the fd could
    /// otherwise truncate it, and an access past the end faults with SIGBUS) and `len` must
    /// equal its size (checked after the seals, when the size can no longer change). Pages
    /// are not populated: memory is committed by whichever side touches a page first
    /// (normally the client writing its inputs), and the other side's first access to a page
    /// is a minor fault.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        let have = seals(fd)?;
        if have & SIZE_SEALS != SIZE_SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file is not sealed against shrinking and growing (F_SEAL_SHRINK|F_SEAL_GROW)",
            ));
        }
        let size = file_size(fd)?;
        if size != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file is {size} bytes, mapping {len} asked"),
            ));
        }
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // Shared and read-write, at an address the kernel picks. `len` equals the file size
        // and the size is sealed (both checked above), so no access inside it can fault.
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(fd.as_raw_fd())?;
        Ok(Mapping {
            map,
            len,
            open: len,
            discard: false,
        })
    }

    /// Frees the file's pages when this mapping is dropped (`MADV_REMOVE`: the file reads as
    /// zeros after). For an arena the other side may keep open after it is done with: the
    /// pages this process touched first are charged to it, and would stay so for as long as
    /// the other side kept the file, out of reach of this process and of its memory limits.
    pub fn discard_on_drop(&mut self) {
        self.discard = true;
    }

    /// Reserves the bytes from `offset` to the end (a ring's, whose header words are atomics):
    /// [`Mapping::range`], [`Mapping::ptr`], [`Mapping::copy_in`] and [`Mapping::copy_out`]
    /// refuse them from now on, so that no reference a peer names (a tensor, an output area)
    /// can cover them; only a [`ring::RingMem`] reaches them.
    pub fn reserve_from(&mut self, offset: u64) {
        self.open = usize::try_from(offset).map_or(self.open, |o| o.min(self.open));
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `len` bytes from `offset` lie inside the mapping's open part (all of it
    /// unless [`Mapping::reserve_from`]); returns the offset.
    pub fn range(&self, offset: u64, len: u64) -> Result<usize, RangeError> {
        self.range_below(offset, len, self.open)
    }

    /// [`Mapping::range`] against `end` (at most the mapping's length).
    fn range_below(&self, offset: u64, len: u64, end: usize) -> Result<usize, RangeError> {
        let err = RangeError {
            offset,
            len,
            size: end as u64,
        };
        match offset.checked_add(len) {
            Some(last) if last <= end as u64 && end <= self.len => Ok(offset as usize),
            _ => Err(err),
        }
    }

    /// A raw pointer to `offset` for handing to C code (ONNX Runtime), after the range check.
    /// The memory may change under the reader at any time; callers must treat it as untrusted
    /// bytes and never form Rust references to it.
    pub fn ptr(&self, offset: u64, len: u64) -> Result<*mut u8, RangeError> {
        self.ptr_below(offset, len, self.open)
    }

    /// [`Mapping::ptr`] into the whole mapping, reserved part included (for [`ring::RingMem`]).
    pub(crate) fn ptr_whole(&self, offset: u64, len: u64) -> Result<*mut u8, RangeError> {
        self.ptr_below(offset, len, self.len)
    }

    fn ptr_below(&self, offset: u64, len: u64, end: usize) -> Result<*mut u8, RangeError> {
        let off = self.range_below(offset, len, end)?;
        // SAFETY: `off + len <= end <= self.len` (checked by `range_below`), so the result
        // stays inside the mapping.
        Ok(unsafe { self.map.as_mut_ptr().add(off) })
    }

    /// Copies `src` into the mapping at `offset` (after the range check).
    ///
    /// Concurrent access by the peer: the bytes are stored through a raw pointer, once each.
    /// If the peer reads the range meanwhile it may see a mix of old and new bytes, and if it
    /// writes the range meanwhile the range ends up holding a mix of both; that is the peer's
    /// business (the protocol gives a range to one side at a time) and it can never make this
    /// process misbehave: no Rust reference into the mapping exists while this runs (only a
    /// [`Region`] would make one, and the peer is never lent a `Region`'s range), and nothing
    /// here reads the range back.
    pub fn copy_in(&self, offset: u64, src: &[u8]) -> Result<(), RangeError> {
        self.copy_in_below(offset, src, self.open)
    }

    /// [`Mapping::copy_in`] into the whole mapping, reserved part included.
    pub(crate) fn copy_in_whole(&self, offset: u64, src: &[u8]) -> Result<(), RangeError> {
        self.copy_in_below(offset, src, self.len)
    }

    fn copy_in_below(&self, offset: u64, src: &[u8], end: usize) -> Result<(), RangeError> {
        let dst = self.ptr_below(offset, src.len() as u64, end)?;
        // SAFETY: `dst..dst+src.len()` lies inside the mapping (checked by `ptr`); `src` is a
        // Rust slice, which cannot overlap shared memory we never hand out as a reference.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Copies bytes out of the mapping at `offset` into `dst` (after the range check).
    ///
    /// Concurrent writes by the peer: each byte of the range is read once, through a raw
    /// pointer, into `dst`, which is private memory. A peer writing the range meanwhile makes
    /// `dst` a mix of old and new bytes (torn at any granularity — a multi-byte value may be
    /// half old, half new); `dst` then holds those bytes and never changes again. Callers get
    /// untrusted but stable bytes: whatever they validate in `dst` stays valid. It is never
    /// undefined behaviour for this process: no Rust reference into the mapping is formed,
    /// and the compiler cannot assume the source is unchanged between reads because nothing
    /// reads it twice.
    pub fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<(), RangeError> {
        self.copy_out_below(offset, dst, self.open)
    }

    /// Appends `len` bytes of the mapping at `offset` to `dst` (after the range check), as
    /// [`Mapping::copy_out`] copies them, without zeroing the room first: a gathered batch's
    /// rows are written once, not twice.
    pub fn extend_out(&self, offset: u64, len: u64, dst: &mut Vec<u8>) -> Result<(), RangeError> {
        let src = self.ptr_below(offset, len, self.open)?;
        // `ptr_below` checked `len` against the mapping's size, a `usize`.
        let n = len as usize;
        dst.reserve(n);
        let at = dst.len();
        // SAFETY: `src..src+n` lies inside the mapping (checked by `ptr_below`); `reserve` made
        // room for `n` more bytes after `at` in `dst`'s private buffer, which cannot overlap
        // the mapping. Every one of those `n` bytes is written by the copy before `set_len`
        // makes them part of the vector.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr().add(at), n);
            dst.set_len(at + n);
        }
        Ok(())
    }

    /// `len` bytes of the mapping at `offset`, copied out into a vector of their own.
    pub fn read_out(&self, offset: u64, len: u64) -> Result<Vec<u8>, RangeError> {
        let mut v = Vec::new();
        self.extend_out(offset, len, &mut v)?;
        Ok(v)
    }

    /// [`Mapping::copy_out`] from the whole mapping, reserved part included.
    pub(crate) fn copy_out_whole(&self, offset: u64, dst: &mut [u8]) -> Result<(), RangeError> {
        self.copy_out_below(offset, dst, self.len)
    }

    fn copy_out_below(&self, offset: u64, dst: &mut [u8], end: usize) -> Result<(), RangeError> {
        let src = self.ptr_below(offset, dst.len() as u64, end)?;
        // SAFETY: `src..src+dst.len()` lies inside the mapping (checked by `ptr`); `dst` is an
        // exclusive Rust slice outside it.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.discard {
            // SAFETY: the range is this mapping (shared, read-write, of a memfd), still mapped
            // (the map is unmapped after this); MADV_REMOVE frees its backing pages, which
            // only changes what the bytes read as (zeros), never whether they can be accessed.
            // Nothing in this process holds a reference into the mapping: it is being dropped.
            // A failure leaves the pages as they were: nothing to do about it here.
            unsafe {
                nix::libc::madvise(
                    self.map.as_mut_ptr().cast(),
                    self.len,
                    nix::libc::MADV_REMOVE,
                )
            };
        }
    }
}

/// Alignment of every [`Region`] offset and length (enough for every dtype and SIMD loads).
pub const REGION_ALIGN: u64 = 64;

/// Hands out disjoint byte ranges of a mapping as [`Region`]s (first fit, [`REGION_ALIGN`]ed,
/// freed ranges coalesced): the allocator that makes `Region`'s references sound. Each range
/// belongs to at most one `Region` or [`Lent`] at a time; it returns to the free list only
/// when that one is dropped.
#[derive(Debug)]
pub struct Allocator {
    map: Arc<Mapping>,
    /// Free ranges: offset → length.
    free: Mutex<BTreeMap<u64, u64>>,
}

impl Allocator {
    /// An allocator over the whole of `map`, which no one else allocates from.
    pub fn new(map: Mapping) -> Arc<Allocator> {
        let size = map.len() as u64;
        Allocator::within(Arc::new(map), size)
    }

    /// An allocator over the first `size` bytes of `map` (the rest, such as a ring, is not
    /// handed out), which no one else allocates from.
    pub fn within(map: Arc<Mapping>, size: u64) -> Arc<Allocator> {
        let size = size.min(map.len() as u64);
        let usable = size - size % REGION_ALIGN;
        let free = if usable > 0 {
            BTreeMap::from([(0, usable)])
        } else {
            BTreeMap::new()
        };
        Arc::new(Allocator {
            map,
            free: Mutex::new(free),
        })
    }

    /// The mapping allocated from (for copies and raw pointers, never references).
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes not allocated (nor lent).
    pub fn free_bytes(&self) -> u64 {
        self.lock().values().sum()
    }

    /// A region of at least `len` bytes (at least 1; rounded up to [`REGION_ALIGN`]), or
    /// `None` when no free range is large enough.
    pub fn alloc(self: &Arc<Self>, len: u64) -> Option<Region> {
        let want = len.max(1).checked_next_multiple_of(REGION_ALIGN)?;
        let mut free = self.lock();
        let (offset, have) = free
            .iter()
            .find(|&(_, &l)| l >= want)
            .map(|(&o, &l)| (o, l))?;
        free.remove(&offset);
        if have > want {
            free.insert(offset + want, have - want);
        }
        drop(free);
        // The free list only ever holds ranges inside the mapping.
        debug_assert!(self.map.range(offset, want).is_ok());
        Some(Region {
            span: Span {
                owner: self.clone(),
                offset,
                len: want,
                leak: false,
            },
        })
    }

    fn release(&self, offset: u64, len: u64) {
        let mut free = self.lock();
        let (mut start, mut size) = (offset, len);
        // Merge with the previous and the next free range.
        if let Some((&po, &pl)) = free.range(..offset).next_back()
            && po + pl == offset
        {
            free.remove(&po);
            start = po;
            size += pl;
        }
        if let Some(&nl) = free.get(&(offset + len)) {
            free.remove(&(offset + len));
            size += nl;
        }
        free.insert(start, size);
    }
}

/// An allocated range; returns to its allocator's free list on drop (unless leaked).
#[derive(Debug)]
struct Span {
    owner: Arc<Allocator>,
    offset: u64,
    len: u64,
    leak: bool,
}

impl Drop for Span {
    fn drop(&mut self) {
        if !self.leak {
            self.owner.release(self.offset, self.len);
        }
    }
}

/// A byte range of a mapping that this side alone may use, from an [`Allocator`]: the only
/// way to get Rust references into shared memory. Sound because the allocator gives the
/// range to no one else in this process, and the peer, by the protocol, writes only ranges
/// a request names for outputs — which a `Region` must be [`lend`](Region::lend)ed for, giving
/// up its references until the peer has answered.
#[derive(Debug)]
pub struct Region {
    span: Span,
}

/// Where a range of an allocator's mapping lies, for the types that hold one.
macro_rules! span_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn offset(&self) -> u64 {
                self.span.offset
            }

            /// The range's length (the length asked for, rounded up to [`REGION_ALIGN`]).
            pub fn len(&self) -> u64 {
                self.span.len
            }

            pub fn is_empty(&self) -> bool {
                self.span.len == 0
            }
        }
    )*};
}

span_accessors!(Region, Lent);

impl Region {
    /// Whether this region was allocated by `alloc` (so its offset means a place in that
    /// allocator's mapping).
    pub fn is_from(&self, alloc: &Arc<Allocator>) -> bool {
        Arc::ptr_eq(&self.span.owner, alloc)
    }

    fn ptr(&self) -> *mut u8 {
        self.span
            .owner
            .map
            .ptr(self.span.offset, self.span.len)
            .expect("a region lies inside its mapping")
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is inside the mapping (`ptr` checks it), the mapping outlives
        // `self` (the span holds the allocator, which holds it), the allocator gives the
        // range to this region alone, and the peer does not write it while it is a region
        // (only lent ranges are named for outputs: `lend` consumes the region).
        unsafe { std::slice::from_raw_parts(self.ptr(), self.span.len as usize) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.span.len as usize) }
    }

    /// Gives the range to the peer to write (name it in a request only after this): no
    /// reference into it can exist any more. The returned [`Lent`] keeps the range allocated;
    /// drop it once the peer has answered (the range is free again), or [`Lent::leak`] it if
    /// no answer will come (the peer may still write it).
    pub fn lend(self) -> Lent {
        Lent { span: self.span }
    }
}

/// A range lent to the peer: allocated, but without access from this side.
#[derive(Debug)]
pub struct Lent {
    span: Span,
}

impl Lent {
    /// Never gives the range back to the allocator: for a range the peer may still write
    /// although no answer will tell when it is done (the connection is gone). The mapping
    /// itself is still unmapped once nothing else uses it.
    pub fn leak(mut self) {
        self.span.leak = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn sealed_arena_cannot_change_size() {
        let fd = create_sealed("rxd-test", 8192).unwrap();
        assert_eq!(seals(fd.as_fd()).unwrap() & ARENA_SEALS, ARENA_SEALS);
        let err = nix::unistd::ftruncate(&fd, 0).unwrap_err();
        assert_eq!(err, nix::errno::Errno::EPERM);
        let err = nix::unistd::ftruncate(&fd, 1 << 20).unwrap_err();
        assert_eq!(err, nix::errno::Errno::EPERM);
        assert_eq!(file_size(fd.as_fd()).unwrap(), 8192);
    }

    #[test]
    fn two_mappings_share_bytes_and_ranges_are_checked() {
        let fd = create_sealed("rxd-test", 4096).unwrap();
        let a = Arc::new(Mapping::map(fd.as_fd(), 4096).unwrap());
        let b = Mapping::map(fd.as_fd(), 4096).unwrap();
        a.copy_in(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.copy_out(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(a.range(4096, 0).is_ok());
        assert!(a.range(4092, 4).is_ok());
        assert!(a.range(4093, 4).is_err(), "one byte past the end");
        assert!(a.range(u64::MAX, 2).is_err(), "overflow");
        assert!(
            Mapping::map(fd.as_fd(), 8192).is_err(),
            "longer than the file"
        );
    }

    #[test]
    fn bytes_appended_out_of_a_mapping_are_its_bytes_and_ranges_are_checked() {
        let fd = create_sealed("rxd-test", 4096).unwrap();
        let a = Mapping::map(fd.as_fd(), 4096).unwrap();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        a.copy_in(0, &pattern).unwrap();
        let mut v = b"head".to_vec();
        a.extend_out(4000, 96, &mut v).unwrap();
        assert_eq!(&v[..4], b"head");
        assert_eq!(&v[4..], &pattern[4000..]);
        // Refused past the end (or by overflow): the vector is left as it was.
        assert!(a.extend_out(4000, 97, &mut v).is_err());
        assert!(a.extend_out(u64::MAX, 2, &mut v).is_err());
        assert_eq!(v.len(), 100);
        assert_eq!(a.read_out(17, 1000).unwrap(), &pattern[17..1017]);
        assert!(a.read_out(0, 4097).is_err());
        assert!(a.read_out(4096, 0).unwrap().is_empty());
    }

    #[test]
    fn only_files_sealed_against_resizing_are_mapped() {
        // An unsealed memfd: its owner could truncate it under the mapping (SIGBUS).
        let fd = memfd_create("rxd-test", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        let err = Mapping::map(fd.as_fd(), 4096).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        // Sealed against shrinking only: still refused (it could grow, then shrink).
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert!(Mapping::map(fd.as_fd(), 4096).is_err());
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        let map = Mapping::map(fd.as_fd(), 4096).unwrap();
        assert_eq!(map.len(), 4096);
        // A file that cannot be sealed at all (no MFD_ALLOW_SEALING).
        let plain = memfd_create("rxd-test", MFdFlags::empty()).unwrap();
        nix::unistd::ftruncate(&plain, 4096).unwrap();
        assert!(Mapping::map(plain.as_fd(), 4096).is_err());
    }

    #[test]
    fn regions_are_disjoint_aligned_and_lent_ranges_are_not_reused_until_returned() {
        let fd = create_sealed("rxd-test", 4096).unwrap();
        let peer = Mapping::map(fd.as_fd(), 4096).unwrap();
        let alloc = Allocator::new(Mapping::map(fd.as_fd(), 4096).unwrap());
        let mut a = alloc.alloc(10).unwrap();
        let b = alloc.alloc(100).unwrap();
        assert_eq!((a.offset(), a.len()), (0, 64));
        assert_eq!((b.offset(), b.len()), (64, 128));
        a.as_mut_slice().fill(1);
        let mut out = [0u8; 64];
        peer.copy_out(0, &mut out).unwrap();
        assert_eq!(out, [1; 64], "the peer sees what the region wrote");
        assert!(alloc.alloc(4096).is_none());
        // Lent to the peer: the range stays allocated until the lender gives it back.
        let lent = a.lend();
        peer.copy_in(0, &[2; 64]).unwrap();
        assert_eq!(alloc.free_bytes(), 4096 - 192);
        drop(lent);
        assert_eq!(alloc.free_bytes(), 4096 - 128);
        // Leaked: never handed out again.
        let c = alloc.alloc(64).unwrap();
        assert_eq!(c.offset(), 0);
        c.lend().leak();
        drop(b);
        assert_eq!(alloc.free_bytes(), 4096 - 64);
        let all = alloc.alloc(4096 - 64).unwrap();
        assert_eq!(all.offset(), 64, "the leaked range stays out");
    }

    #[test]
    fn activation_is_only_for_this_process() {
        assert!(activated_listener(None, Some(1)).unwrap().is_none());
        assert!(
            activated_listener(Some(std::process::id() + 1), Some(1))
                .unwrap()
                .is_none()
        );
        assert!(
            activated_listener(Some(std::process::id()), Some(0))
                .unwrap()
                .is_none()
        );
        assert!(activated_listener(Some(std::process::id()), Some(2)).is_err());
    }

    #[test]
    fn fd_passes_over_a_socket_pair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = create_sealed("rxd-test", 4096).unwrap();
        let sent = send_with_fd(raw(&a), b"xyz", fd.as_fd()).unwrap();
        assert_eq!(sent, 3);
        let mut buf = [0u8; 16];
        let (n, got) = recv_with_fd(raw(&b), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"xyz");
        let got = got.expect("an fd came");
        assert_eq!(file_size(got.as_fd()).unwrap(), 4096);
        // Plain data afterwards carries no fd.
        std::io::Write::write_all(&mut &a, b"more").unwrap();
        let (n, none) = recv_with_fd(raw(&b), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"more");
        assert!(none.is_none());
    }
}
