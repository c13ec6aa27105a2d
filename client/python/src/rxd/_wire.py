"""The wire format (PROTOCOL.md): length-prefixed MessagePack frames, dtypes, the handshake.

Pure: no sockets here. Both clients feed received bytes to a :class:`FrameReader` and send
what :func:`encode` returns.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Tuple, Union

import msgpack  # type: ignore[import-untyped]
import numpy as np

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
#: The handshake frame is at most this large (both ways).
MAX_HANDSHAKE_FRAME = 4096
#: The default largest frame (the welcome says what the daemon takes).
DEFAULT_MAX_FRAME = 80 << 20
#: Outputs packed into an output area start at multiples of this.
OUTPUT_ALIGN = 64

# Wire dtype name -> numpy dtype (little-endian). Types numpy has no dtype for (bfloat16,
# float8 variants, 4-bit types) are not listed: such outputs come back as raw bytes (uint8).
_DTYPES: Dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
}
_NAMES: Dict[Tuple[str, int], str] = {(d.kind, d.itemsize): n for n, d in _DTYPES.items()}
# Bytes per element of every wire dtype; the 4-bit types pack two per byte (-1 marks them).
ELEMENT_SIZE: Dict[str, int] = {n: d.itemsize for n, d in _DTYPES.items()}
ELEMENT_SIZE.update(
    {
        "bfloat16": 2,
        "float8e4m3fn": 1,
        "float8e4m3fnuz": 1,
        "float8e5m2": 1,
        "float8e5m2fnuz": 1,
        "uint4": -1,
        "int4": -1,
        "float4e2m1": -1,
    }
)


def numpy_dtype(wire: str) -> Optional[np.dtype[Any]]:
    """The numpy dtype of a wire dtype name, or ``None`` when numpy has none."""
    return _DTYPES.get(wire)


def wire_dtype(dtype: np.dtype[Any]) -> str:
    """The wire name of a numpy dtype (byte order aside)."""
    name = _NAMES.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise TypeError(f"rxd has no dtype for numpy {dtype} (strings and objects are not served)")
    return name


def byte_len(wire: str, elements: int) -> int:
    """Bytes of ``elements`` elements of a wire dtype."""
    size = ELEMENT_SIZE.get(wire)
    if size is None:
        raise ValueError(f"unknown dtype {wire!r}")
    return (elements + 1) // 2 if size < 0 else elements * size


def encode(msg: Any) -> List[Union[bytes, memoryview]]:
    """A frame as buffers to send in order (header, body)."""
    body = msgpack.packb(msg, use_bin_type=True)
    return [HEADER.pack(len(body)), body]


def decode(body: Union[bytes, bytearray, memoryview]) -> Any:
    """The message in a frame body."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def hello(client: str, arena_bytes: int) -> bytes:
    body: bytes = msgpack.packb(
        {"protocol": PROTOCOL_VERSION, "client": client, "arena_bytes": int(arena_bytes)},
        use_bin_type=True,
    )
    return HEADER.pack(len(body)) + body


class FrameError(Exception):
    """The byte stream is not a stream of frames (a frame over the limit, a zero length)."""


class FrameReader:
    """Splits received bytes into frame bodies, sans IO. Read into :meth:`get_buffer` (with
    ``recv_into`` or an asyncio ``BufferedProtocol``), then call :meth:`buffer_updated`:
    small frames are staged in one scratch buffer (many per read); a large body is read
    straight into a buffer of its own size, without an extra copy."""

    _SCRATCH = 1 << 16

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._scratch = bytearray(self._SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._big: Optional[bytearray] = None
        self._big_got = 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_got :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._scratch) or self._start > len(self._scratch) // 2:
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> List[Union[bytes, bytearray]]:
        """Takes ``nbytes`` read into the last buffer; returns the frame bodies completed."""
        out: List[Union[bytes, bytearray]] = []
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got < len(self._big):
                return out
            out.append(self._big)
            self._big = None
            return out
        self._end += nbytes
        while self._end - self._start >= 4:
            (n,) = HEADER.unpack_from(self._scratch, self._start)
            if n == 0 or n > self.max_frame:
                raise FrameError(f"a frame of {n} bytes (the limit is {self.max_frame})")
            have = self._end - self._start - 4
            if have >= n:
                s = self._start + 4
                out.append(bytes(self._view[s : s + n]))
                self._start = s + n
                continue
            if n + 4 > len(self._scratch):
                # A large body: read the rest straight into its own buffer.
                big = bytearray(n)
                s = self._start + 4
                big[:have] = self._view[s : self._end]
                self._big, self._big_got = big, have
                self._start = self._end = 0
            break
        return out


def split_outcome(frame: Dict[str, Any]) -> Tuple[int, bool, Any]:
    """``(id, ok, reply args or error map)`` of a response frame."""
    rid = int(frame.get("id", 0))
    outcome = frame.get("outcome") or {}
    if "ok" in outcome:
        reply = outcome["ok"]
        return rid, True, reply.get("args") if isinstance(reply, dict) else None
    return rid, False, outcome.get("err") or {"code": 901, "message": "an answer without an outcome"}


def request(rid: int, op: str, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"op": op}
    if args is not None:
        body["args"] = args
    return {"id": rid, "body": body}
