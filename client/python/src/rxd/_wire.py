"""The wire format (PROTOCOL.md): length-prefixed MessagePack frames, dtypes, the handshake.

Pure: no sockets here. Both clients feed received bytes to a :class:`FrameReader` and send
what :func:`encode` returns.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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


#: An integer hole in a template: MessagePack's uint64 form (0xcf and 8 bytes, big-endian), which
#: has the same size whatever the value (PROTOCOL.md: integers may use any width).
U64 = struct.Struct(">BQ")
U64_SIZE = U64.size


def u64(value: int) -> bytes:
    """``value`` in MessagePack's fixed-size uint64 form (a template's integer hole)."""
    return U64.pack(0xCF, value)


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    return b"\xc5" + struct.pack(">H", n) if n < 1 << 16 else b"\xc6" + struct.pack(">I", n)


#: What fills a hole of an infer template: the request id, an input's bytes (inline), an
#: input's arena offset, the output area's offset.
INLINE = "inline"
ARENA = "arena"


def infer_template(
    model: str,
    version: Optional[int],
    outputs: Tuple[str, ...],
    priority: Optional[int],
    timeout_ms: Optional[int],
    tensors: Sequence[Tuple[str, str, Tuple[int, ...], str, int]],
    area_len: Optional[int],
) -> Tuple[Tuple[bytes, ...], int]:
    """An infer request frame (length header included) cut into constant pieces around its
    holes, for requests that differ only in the holes' contents: ``frame = c0 + h0 + c1 + h1 +
    ... + cN``, the holes being, in order, the id (:func:`u64`), then each tensor's data — its
    ``nbytes`` bytes (``INLINE``) or its arena offset (:func:`u64`, ``ARENA``) — then the output
    area's offset (:func:`u64`) when ``area_len`` is given. ``tensors``: ``(name, wire dtype,
    shape, INLINE or ARENA, nbytes)``. Returns the pieces and the frame's length.

    The message is the one :func:`request` would make for the same arguments (same keys in
    the same order), only with integers that fill holes in their uint64 form."""
    pack = msgpack.Packer(use_bin_type=True).pack
    pieces: List[bytes] = []
    cur = bytearray()
    holes = 0

    def hole(size: int) -> None:
        nonlocal cur, holes
        pieces.append(bytes(cur))
        cur = bytearray()
        holes += size

    cur += _map_header(2) + pack("id")
    hole(U64_SIZE)
    cur += pack("body") + _map_header(2) + pack("op") + pack("infer") + pack("args")
    extra = [version is not None, bool(outputs), priority is not None, timeout_ms is not None, area_len is not None]
    cur += _map_header(3 + sum(extra)) + pack("model") + pack(model) + pack("inputs") + _array_header(len(tensors))
    for name, wire, shape, kind, nbytes in tensors:
        cur += _map_header(4) + pack("name") + pack(name) + pack("dtype") + pack(wire)
        cur += pack("shape") + pack(list(shape)) + pack("data") + _map_header(1)
        if kind == INLINE:
            cur += pack("inline") + _bin_header(nbytes)
            hole(nbytes)
        else:
            cur += pack("arena") + _map_header(2) + pack("offset")
            hole(U64_SIZE)
            cur += pack("len") + pack(nbytes)
    cur += pack("inline_overflow") + pack(True)
    if version is not None:
        cur += pack("version") + pack(int(version))
    if outputs:
        cur += pack("outputs") + pack(list(outputs))
    if priority is not None:
        cur += pack("priority") + pack(int(priority))
    if timeout_ms is not None:
        cur += pack("timeout_ms") + pack(int(timeout_ms))
    if area_len is not None:
        cur += pack("output_area") + _map_header(2) + pack("offset")
        hole(U64_SIZE)
        cur += pack("len") + pack(int(area_len))
    pieces.append(bytes(cur))
    body = sum(len(p) for p in pieces) + holes
    pieces[0] = HEADER.pack(body) + pieces[0]
    return tuple(pieces), body + HEADER.size


#: How the daemon begins every answer: a map of two entries, ``id`` first.
ANSWER_HEAD = b"\x82\xa2id"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64_BARE = struct.Struct(">Q")


def read_uint(buf: Union[bytes, bytearray, memoryview], pos: int) -> Tuple[int, int]:
    """The unsigned MessagePack integer at ``pos`` and the position after it; ``(-1, pos)``
    when there is none."""
    m = buf[pos]
    if m < 0x80:
        return m, pos + 1
    if m == 0xCC:
        return buf[pos + 1], pos + 2
    if m == 0xCD:
        return _U16.unpack_from(buf, pos + 1)[0], pos + 3
    if m == 0xCE:
        return _U32.unpack_from(buf, pos + 1)[0], pos + 5
    if m == 0xCF:
        return _U64_BARE.unpack_from(buf, pos + 1)[0], pos + 9
    return -1, pos


def bin_spans(body: Union[bytes, bytearray, memoryview], message: Any) -> Optional[List[Tuple[int, int]]]:
    """Where each ``bin`` value of ``message`` — what :func:`decode` made of ``body`` — lies in
    ``body``: ``[(offset, length)]`` in wire order; ``None`` if the walk does not come out
    exactly (a message :func:`decode` would not give back byte for byte)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(body), 1 << 10))
    unpacker.feed(body)
    spans: List[Tuple[int, int]] = []

    def walk(value: Any) -> None:
        if type(value) is dict:
            if unpacker.read_map_header() != len(value):
                raise ValueError("a map with repeated keys")
            for item in value.values():
                unpacker.skip()
                walk(item)
        elif type(value) is list:
            unpacker.read_array_header()
            for item in value:
                walk(item)
        else:
            unpacker.skip()
            if type(value) is bytes:
                end = unpacker.tell()
                spans.append((end - len(value), len(value)))

    try:
        walk(message)
    except (ValueError, msgpack.ExtraData, msgpack.OutOfData, msgpack.UnpackException):
        return None
    if unpacker.tell() != len(body):
        return None
    return spans


def decode(body: Union[bytes, bytearray, memoryview]) -> Any:
    """The message in a frame body."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def hello(client: str, arena_bytes: int, ring: Optional[Tuple[int, int]] = None) -> bytes:
    """The Hello; ``ring``: (entries, slot bytes) of a ring to ask for."""
    msg: Dict[str, Any] = {"protocol": PROTOCOL_VERSION, "client": client, "arena_bytes": int(arena_bytes)}
    if ring is not None:
        msg["ring"] = {"entries": int(ring[0]), "slot_bytes": int(ring[1])}
    body: bytes = msgpack.packb(msg, use_bin_type=True)
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

    def buffer_updated(self, nbytes: int) -> List[memoryview]:
        """Takes ``nbytes`` read into the last buffer; returns the frame bodies completed. A
        small body is a view of the scratch buffer, valid until the next :meth:`get_buffer`:
        decode it before reading more."""
        self.received(nbytes)
        out: List[memoryview] = []
        body = self.next_body()
        while body is not None:
            out.append(body)
            self.consume()
            body = self.next_body()
        return out

    # The same in steps, for a reader that an exception may interrupt anywhere: a body stays
    # the next one until consumed, so one whose handling was cut short is handed out again.
    def received(self, nbytes: int) -> None:
        """Counts ``nbytes`` read into the last buffer."""
        if self._big is not None:
            self._big_got += nbytes
        else:
            self._end += nbytes

    def received_from(self, counts: List[int]) -> None:
        """Counts the reads whose byte counts ``counts`` holds, emptying it. Each count leaves
        the list in the step that counts it (no call between, where CPython could run a
        signal handler), so an interruption neither loses nor repeats one."""
        while counts:
            if self._big is not None:
                self._big_got += counts[0]
            else:
                self._end += counts[0]
            del counts[0]

    def next_body(self) -> Optional[memoryview]:
        """The next whole frame body received (valid until :meth:`get_buffer`), left in place
        until :meth:`consume`; None when none is whole yet."""
        big = self._big
        if big is not None:
            return memoryview(big) if self._big_got >= len(big) else None
        have = self._end - self._start - 4
        if have < 0:
            return None
        (n,) = HEADER.unpack_from(self._scratch, self._start)
        if n == 0 or n > self.max_frame:
            raise FrameError(f"a frame of {n} bytes (the limit is {self.max_frame})")
        s = self._start + 4
        if have >= n:
            return self._view[s : s + n]
        if n + 4 > len(self._scratch):
            # A large body: read the rest straight into its own buffer.
            big = bytearray(n)
            big[:have] = self._view[s : self._end]
            self._big, self._big_got, self._start, self._end = big, have, 0, 0
        return None

    def consume(self) -> None:
        """Drops the body :meth:`next_body` returned."""
        if self._big is not None:
            self._big = None
        else:
            (n,) = HEADER.unpack_from(self._scratch, self._start)
            self._start += 4 + n


def split_outcome(frame: Dict[str, Any]) -> Tuple[int, bool, Any]:
    """``(id, ok, reply args or error map)`` of a response frame."""
    rid = frame.get("id", 0)
    if type(rid) is not int:
        rid = int(rid)
    outcome = frame.get("outcome") or {}
    if "ok" in outcome:
        reply = outcome["ok"]
        return rid, True, reply.get("args") if type(reply) is dict else None
    return rid, False, outcome.get("err") or {"code": 901, "message": "an answer without an outcome"}


def request(rid: int, op: str, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"op": op}
    if args is not None:
        body["args"] = args
    return {"id": rid, "body": body}
