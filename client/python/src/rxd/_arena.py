"""The client side of the shared-memory arena: the memfd the daemon passed with the welcome,
mapped once, and a first-fit allocator over it.

Lifetimes. A :class:`Slot` is a range of the arena. It is freed when every claim on it is
dropped: the request that uses it (until the daemon's answer, even if the caller stopped
waiting), the :class:`rxd.Result` that holds outputs in it (until closed), and every numpy
array that shows its bytes (until garbage-collected — numpy views of such an array keep it
alive, so they count too). A range is therefore never reused while anything can still read
it: a view never changes under its owner's feet.

Frees can happen in any thread (an array's finalizer runs where its last reference dies,
possibly inside the cyclic garbage collector while the allocator's lock is held); they are
queued and applied by the next allocator call, so the allocator never re-enters itself.

Asynchronous exceptions (a signal handler raising, KeyboardInterrupt) may land anywhere: a range
is handed to its owner's list before it leaves the free list, and counts as taken only once it
has (a release before that gives nothing back); the last release queues the range in the same
step that drops the count; and no lock is taken outside a ``with`` block.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
import weakref
from typing import Any, Deque, List, Optional, Sequence, Tuple

import numpy as np

#: Offsets handed out are multiples of this (enough for every dtype, and for SIMD loads).
ALIGN = 64
_F_GET_SEALS = 1034
_SEALS = 0x0001 | 0x0002 | 0x0004  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW


def _round(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    """A mapped arena and its allocator. Thread-safe."""

    def __init__(self, fd: int, size: int, usable: Optional[int] = None) -> None:
        """The arena of the memfd ``fd`` (taken) of ``size`` bytes; only its first ``usable``
        bytes hold tensors (a ring lies after them)."""
        try:
            import fcntl

            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError as e:
            os.close(fd)
            raise OSError(f"the arena fd has no seals: {e}") from e
        if seals & _SEALS != _SEALS:
            os.close(fd)
            raise OSError("the arena fd is not sealed against resizing")
        try:
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = size = size if usable is None else min(usable, size)
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        self.address = int(self._bytes.__array_interface__["data"][0])
        self._lock = threading.Lock()
        self._free: List[Tuple[int, int]] = [(0, size)]  # sorted, coalesced (offset, len)
        self._free_bytes = size
        #: Ranges freed by :meth:`Slot.release` (any thread, any time: finalizers), applied by
        #: the next allocator call. Not drained there: a lock taken without ``with`` could be
        #: left held by an exception.
        self._deferred: Deque[Tuple[int, int]] = collections.deque()

    # -- allocation ---------------------------------------------------------------------
    def alloc(self, nbytes: int, owner: Optional[List["Slot"]] = None) -> Optional["Slot"]:
        """A slot of at least ``nbytes`` (64-byte aligned), or ``None`` when no free range is
        large enough. ``owner``: a list the slot is appended to before its range leaves the
        free list, so that an exception landing in between loses nothing."""
        n = _round(nbytes)
        with self._lock:
            self._drain()
            for i, (off, ln) in enumerate(self._free):
                if ln >= n:
                    slot = Slot(self, off, n, nbytes)
                    if owner is not None:
                        owner.append(slot)
                    # From here to the claim, no call: nothing can interrupt it.
                    if ln == n:
                        del self._free[i]
                    else:
                        self._free[i] = (off + n, ln - n)
                    self._free_bytes -= n
                    slot._claims = 1
                    return slot
        return None

    def _drain(self) -> None:
        # A range leaves the queue only once it is in the free list; a drain cut short
        # between the two finds it there already the next time.
        deferred = self._deferred
        while deferred:
            off, ln = deferred[0]
            if not self._is_free(off, ln):
                self._insert(off, ln)
            deferred.popleft()

    def _is_free(self, off: int, ln: int) -> bool:
        """Whether ``off``..``off + ln`` lies within one free range."""
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] <= off:
                lo = mid + 1
            else:
                hi = mid
        return lo > 0 and off + ln <= free[lo - 1][0] + free[lo - 1][1]

    def _insert(self, off: int, ln: int) -> None:
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < off:
                lo = mid + 1
            else:
                hi = mid
        i = lo
        if i > 0 and free[i - 1][0] + free[i - 1][1] > off:
            raise AssertionError(f"arena range {off}+{ln} freed twice")
        if i < len(free) and off + ln > free[i][0]:
            raise AssertionError(f"arena range {off}+{ln} freed twice")
        self._free_bytes += ln
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:
            off, ln = free[i - 1][0], free[i - 1][1] + ln
            i -= 1
            del free[i]
        if i < len(free) and off + ln == free[i][0]:
            ln += free[i][1]
            del free[i]
        free.insert(i, (off, ln))

    def free_bytes(self) -> int:
        """Bytes not allocated (after applying queued frees)."""
        with self._lock:
            self._drain()
            return self._free_bytes

    def free_ranges(self) -> List[Tuple[int, int]]:
        """The free list, ``[(offset, length)]`` (whole: ``[(0, size)]``)."""
        with self._lock:
            self._drain()
            return list(self._free)

    # -- views ------------------------------------------------------------------------------
    def ndarray(self, offset: int, shape: Sequence[int], dtype: np.dtype[Any], writable: bool) -> np.ndarray[Any, Any]:
        """A numpy array over ``shape`` × ``dtype`` bytes at ``offset``, its own root: numpy
        views of it keep it (not the arena's whole mapping) alive, so a finalizer on it sees
        the last view die."""
        arr: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dtype=dtype, buffer=self._mm, offset=offset)
        if not writable:
            arr.flags.writeable = False
        return arr

    def offset_of(self, arr: np.ndarray[Any, Any]) -> Optional[int]:
        """The offset of a C-contiguous array's bytes in this arena, or ``None`` when they are
        not (all) in it."""
        if arr.base is None or not arr.flags.c_contiguous:
            return None  # an array that owns its memory is not in the arena
        addr = int(arr.__array_interface__["data"][0])
        off = addr - self.address
        if off < 0 or off + arr.nbytes > self.size:
            return None
        return off

    def copy_out(self, offset: int, nbytes: int) -> bytes:
        return self._mm[offset : offset + nbytes]


class Slot:
    """A range of the arena with a count of claims; freed when the last claim is released."""

    __slots__ = ("arena", "offset", "length", "nbytes", "_claims", "_lock", "__weakref__")

    def __init__(self, arena: Arena, offset: int, length: int, nbytes: int) -> None:
        self.arena = arena
        self.offset = offset
        self.length = length
        #: Bytes asked for (``length`` is rounded up).
        self.nbytes = nbytes
        #: 0 until the allocator has taken the range out of its free list.
        self._claims = 0
        # Re-entrant: a finalizer may release a claim in the middle of anything.
        self._lock = threading.RLock()

    def claim(self) -> None:
        with self._lock:
            if self._claims <= 0:
                raise AssertionError("claim on a freed slot")
            self._claims += 1

    def release(self) -> None:
        """Drops a claim; the last one queues the range's free. A release more than the
        claims (a cleanup run twice) gives nothing back twice."""
        with self._lock:
            self._claims -= 1
            if self._claims == 0:
                # Queued in the step that dropped the count (no call between to interrupt).
                self.arena._deferred.append((self.offset, self.length))

    def view(self, shape: Sequence[int], dtype: np.dtype[Any], at: int = 0, writable: bool = False) -> np.ndarray[Any, Any]:
        """An array over this slot's bytes from ``at``; it holds a claim until it (and every
        view of it) is garbage-collected."""
        arr = self.arena.ndarray(self.offset + at, shape, dtype, writable)
        self.claim()
        weakref.finalize(arr, self.release)
        return arr
