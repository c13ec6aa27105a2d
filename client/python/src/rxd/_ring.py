"""The client side of the shared-memory submission/completion ring (PROTOCOL.md, "The ring"):
an inference whose frame fits a slot is written into the ring instead of the socket, and its
answer read from the ring's completion slot — by spinning on it a moment (a light model's
answer usually comes within it), then sleeping on its futex.

Memory order. Python has no atomics: the ring's words are read and written as aligned 4-byte
values (single loads and stores), and a system call stands in for the fences the protocol
asks for. After publishing a submission the client always wakes the daemon's futex (a
system call: the daemon, which may have gone to sleep just before, sees the new count); a
client about to sleep writes its wake flag and then sleeps in ``futex_wait``, which checks
the completion count in the kernel after taking a lock. Every sleep is bounded (50 ms), so
even a wake lost on a weakly ordered CPU costs a pause, never a hang.

Interruptions. An exception (a signal handler raising) may land between any two steps: a
submission is published by one store of the submission count, which the client alone writes,
so reading it back tells whether it went out (:meth:`Ring.settle`); a completion is consumed
only after its answer was handed out (:meth:`Ring.peek`, then :meth:`Ring.consume`).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import time
from typing import Any, Optional, Tuple

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# The ring's header (protocol/src/ring.rs).
SQ_TAIL, SQ_HEAD, SQ_WAKE, CQ_TAIL, CQ_HEAD, CQ_WAKE = 0, 64, 68, 128, 192, 196
HEADER_BYTES = 256

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_number() -> Optional[int]:
    """The futex system call's number here (None: an architecture this client does not know,
    so it asks for no ring)."""
    return _SYS_FUTEX.get(platform.machine())


class Ring:
    """A connection's ring, used by one thread at a time (the client's reader)."""

    def __init__(self, fd: int, size: int, grant: "dict[str, Any]", spin: float) -> None:
        self.entries = int(grant["entries"])
        self.slot = int(grant["slot_bytes"])
        self.base = int(grant["offset"])
        if (
            self.entries <= 0
            or self.entries & (self.entries - 1)
            or self.entries > 256
            or self.slot % 64
            or not 256 <= self.slot <= 1 << 20
            or self.base % 64
            or self.base + HEADER_BYTES + 2 * self.entries * self.slot > size
        ):
            raise ValueError(f"the daemon granted a ring the protocol does not allow: {grant}")
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.spin = spin
        self.sq_tail = 0
        self.cq_head = 0
        #: Requests sent through the ring so far, and answers of theirs redirected to the socket.
        self.submitted = 0
        self.redirected = 0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._futex = futex_number()
        buf = (ctypes.c_char * size).from_buffer(self._mm)
        self._addr = ctypes.addressof(buf)
        del buf  # no exported buffer kept: the map can close

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass

    # -- words ----------------------------------------------------------------------------
    def _get(self, word: int) -> int:
        return int(_U32.unpack_from(self._mm, self.base + word)[0])

    def _set(self, word: int, value: int) -> None:
        _U32.pack_into(self._mm, self.base + word, value & 0xFFFFFFFF)

    def _syscall(self, word: int, op: int, value: int, timeout: Optional[float]) -> None:
        if self._futex is None:
            if timeout:
                time.sleep(min(timeout, 0.001))
            return
        ts = None
        if timeout is not None:
            ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
        self._libc.syscall(
            ctypes.c_long(self._futex),
            ctypes.c_void_p(self._addr + self.base + word),
            ctypes.c_int(op),
            ctypes.c_uint(value),
            ctypes.byref(ts) if ts is not None else None,
            None,
            ctypes.c_uint(0),
        )

    # -- submitting ----------------------------------------------------------------------
    def submit(self, frame: Any) -> bool:
        """Writes a whole request frame (header and body) into the next submission slot and
        publishes it; False (nothing written) when it does not fit a slot or the queue is
        full."""
        n = len(frame)
        if n > self.slot:
            return False
        head = self._get(SQ_HEAD)
        if (self.sq_tail - head) & 0xFFFFFFFF >= self.entries:
            return False
        at = self.base + HEADER_BYTES + (self.sq_tail % self.entries) * self.slot
        self._mm[at : at + n] = frame
        tail = (self.sq_tail + 1) & 0xFFFFFFFF
        self._set(SQ_TAIL, tail)  # published
        self.sq_tail = tail
        self.submitted += 1
        self._syscall(SQ_TAIL, _FUTEX_WAKE, 1 << 30, None)
        return True

    def settle(self, before: int) -> bool:
        """After a :meth:`submit` that an exception cut short (``before``: ``sq_tail`` when it
        began): whether it published its request (the daemon answers it). If it did, the
        count is brought in line and the daemon woken (the submit may not have got to it)."""
        tail = self._get(SQ_TAIL)
        if tail == before:
            return False
        if self.sq_tail == before:
            self.sq_tail = tail
            self.submitted += 1
        self._syscall(SQ_TAIL, _FUTEX_WAKE, 1 << 30, None)
        return True

    # -- completing ----------------------------------------------------------------------
    def ready(self) -> bool:
        return self._get(CQ_TAIL) != self.cq_head

    def wait(self, deadline: Optional[float], spin: bool = True) -> bool:
        """Whether a completion is there: spins up to ``spin`` seconds first (when ``spin``),
        then sleeps on the completion count for at most 50 ms (or until ``deadline``).
        False: not yet — the caller looks at the socket (a daemon closing the connection
        says so there) and its deadline, and waits again."""
        if self.ready():
            return True
        if spin and self.spin > 0:
            end = time.perf_counter() + self.spin
            while time.perf_counter() < end:
                if self.ready():
                    return True
        nap = 0.05
        if deadline is not None:
            nap = min(nap, deadline - time.monotonic())
            if nap <= 0:
                return False
        self._set(CQ_WAKE, 1)
        self._syscall(CQ_TAIL, _FUTEX_WAIT, self.cq_head, nap)
        self._set(CQ_WAKE, 0)
        return self.ready()

    def peek(self) -> "Tuple[Optional[bytes], int]":
        """The completion at the head (there is one: :meth:`ready`), left there until
        :meth:`consume`: (its frame body, 0), or (None, request id) for a redirect (its answer
        comes on the socket)."""
        tail = self._get(CQ_TAIL)
        if not 0 < (tail - self.cq_head) & 0xFFFFFFFF <= self.entries:
            raise ValueError(f"the ring's completion count {tail} is not within {self.entries} of {self.cq_head}")
        at = self.base + HEADER_BYTES + (self.entries + self.cq_head % self.entries) * self.slot
        n = int(_U32.unpack_from(self._mm, at)[0])
        if n == 0:
            return None, int(_U64.unpack_from(self._mm, at + 4)[0])
        if n <= self.slot - 4:
            return self._mm[at + 4 : at + 4 + n], 0
        raise ValueError(f"a completion of {n} bytes does not fit the ring's slots")

    def consume(self, redirect: bool) -> None:
        """Drops the completion at the head (``redirect``: it was one)."""
        self.cq_head = (self.cq_head + 1) & 0xFFFFFFFF
        if redirect:
            self.redirected += 1
        self._set(CQ_HEAD, self.cq_head)

