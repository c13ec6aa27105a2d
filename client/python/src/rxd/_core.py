"""The protocol core both clients share, sans IO: one connection's state (welcome, arena,
requests in flight by id), turning calls into frames — inputs placed in the arena or inline,
output areas sized; an infer request like one seen before filled into its frame's template
rather than encoded again — and answers into results or exceptions.

The blocking client calls it under its lock; the asyncio client from its event loop.

Asynchronous exceptions (a signal handler raising, KeyboardInterrupt) may land between any two
steps of the blocking client: a call is made (:meth:`Connection.new`) before it takes anything,
knows whether its request went out (:attr:`Call.sent`), and is given up (:meth:`Connection.give_up`)
forgotten when it never went out, abandoned when it did; an answer is handed out by steps that
can be run again (:meth:`Connection.take_frames`, :meth:`Connection.take_body`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import msgpack  # type: ignore[import-untyped]
import numpy as np

from . import _shapes, _wire, errors
from ._arena import Arena, Slot
from .result import Result
from ._template import _BY_SIGNATURE, Answer, Template, _aligned, learn_answer

#: What infer() takes as inputs: arrays by input name (or one array for a one-input model).
Inputs = Union[Mapping[str, Any], np.ndarray]
#: A model and the version asked for.
Key = Tuple[str, Optional[int]]


@dataclass
class Options:
    """How a client connects (see :class:`rxd.Client`)."""

    socket: str
    arena_bytes: int = 64 << 20
    inline_threshold: int = 64 << 10
    client_name: str = "rxd-python"
    connect_timeout: float = 10.0
    reconnect: bool = True
    arena_fallback: bool = True
    #: A shared-memory ring to ask for (entries; 0: none), its slots' size, and how long the
    #: blocking client spins on it for an answer before it sleeps (seconds).
    ring_entries: int = 0
    ring_slot_bytes: int = 16 << 10
    ring_spin: float = 50e-6


@dataclass
class Memory:
    """What a client learns about models, kept across reconnects: signatures (for output
    areas and input names), the output bytes each model needed last time, and the templates
    of its requests' frames with the look of their answers."""

    signatures: Dict[Key, Optional[Dict[str, Any]]] = field(default_factory=dict)
    output_sizes: Dict[Key, int] = field(default_factory=dict)
    #: Output area sizes computed from a signature, by model, input shapes and outputs asked
    #: for (a request of a shape seen before does not evaluate the signature again).
    areas: Dict[Tuple[Key, Tuple[Tuple[str, Tuple[int, ...]], ...], Tuple[str, ...]], Optional[int]] = field(default_factory=dict)

    #: Infer frames cut into constant pieces around their holes (:func:`rxd._wire.infer_template`),
    #: by model, version, outputs asked for, priority, timeout and the inputs' names, dtypes,
    #: shapes and placements: a request like one seen before fills the holes instead of
    #: encoding its message again.
    templates: Dict[Tuple[Any, ...], "Template"] = field(default_factory=dict)

    def forget(self, key: Key) -> None:
        """The signature of ``key`` proved wrong (a new version?): ask for it again."""
        self.signatures.pop(key, None)
        self.areas = {k: v for k, v in self.areas.items() if k[0] != key}
        self.templates = {k: v for k, v in self.templates.items() if (k[0], k[1]) != key}

    def learn(self, key: Key, signature: Optional[Dict[str, Any]]) -> None:
        """``signature`` is ``key``'s (asked for by the user): what was built on an older one goes."""
        self.forget(key)
        self.signatures[key] = signature

    def area_bytes(self, key: Key, signature: Dict[str, Any], shapes: Dict[str, List[int]], wanted: List[str]) -> Optional[int]:
        """:func:`rxd._shapes.output_area_bytes`, remembered."""
        k = (key, tuple((n, tuple(v)) for n, v in shapes.items()), tuple(wanted))
        try:
            return self.areas[k]
        except KeyError:
            pass
        if len(self.areas) >= 4096:
            self.areas.clear()
        n = self.areas[k] = _shapes.output_area_bytes(signature, shapes, wanted)
        return n


#: Where a request stands (:attr:`Call.sent`): not sent (the daemon knows nothing of it), being
#: sent (an exception now leaves it unknown), sent (the daemon answers it).
UNSENT, SENDING, SENT = 0, 1, 2


class Call:
    """One request in flight: its frame, what it holds until the answer, and the answer."""

    __slots__ = (
        "id", "op", "frame", "held", "keep", "area", "key", "copy", "done", "ok", "payload",
        "abandoned", "waiter", "signature", "template", "answer", "cuts", "sent", "tail",
    )

    def __init__(self, rid: int, op: str) -> None:
        self.id = rid
        self.op = op
        self.frame: List[Union[bytes, memoryview]] = []
        #: Arena slots the request uses (input copies, the output area): released when the
        #: answer comes, also if the caller stopped waiting.
        self.held: List[Slot] = []
        #: The caller's arrays the daemon reads from the arena until it answers.
        self.keep: List[Any] = []
        self.area: Optional[Slot] = None
        self.key: Optional[Key] = None
        self.copy = False
        self.done = False
        self.ok = False
        self.payload: Any = None
        self.abandoned = False
        #: The asyncio future (asyncio client) waiting for the answer.
        self.waiter: Any = None
        self.signature: Optional[Dict[str, Any]] = None
        #: The template the request was made from; when the answer looked as the template's
        #: previous one did, that look and the outputs' bytes cut from the answer.
        self.template: Optional[Template] = None
        self.answer: Optional[Answer] = None
        self.cuts: Optional[List[bytes]] = None
        #: UNSENT, SENDING or SENT; ``tail``: the ring's submission count before this
        #: request's submission (-1: not through the ring).
        self.sent = UNSENT
        self.tail = -1

    def release(self) -> None:
        """The daemon answered (or the connection is gone): let go of what the request held.
        Run again after an interruption, it releases nothing twice that matters (a slot's
        surplus release gives nothing back)."""
        for s in self.held:
            s.release()
        self.held = []
        self.keep = []


class Connection:
    """One connection's protocol state."""

    def __init__(self, welcome: Mapping[str, Any], arena: Optional[Arena], options: Options, memory: Memory) -> None:
        self.welcome = dict(welcome)
        self.arena = arena
        self.options = options
        self.memory = memory
        self.max_frame = max(int(welcome.get("max_frame_bytes", 0)), _wire.DEFAULT_MAX_FRAME)
        self.max_in_flight = int(welcome.get("max_in_flight", 256)) or 256
        self.reader = _wire.FrameReader(self.max_frame)
        self.pending: Dict[int, Call] = {}
        self.closed: Optional[str] = None
        self._next = 1
        #: The connection's ring (:mod:`rxd._ring`), when asked for and granted; the blocking
        #: client uses it.
        self.ring: Any = None

    # -- building requests --------------------------------------------------------------
    # A call is made first (new), holding nothing; then its request is built (control,
    # publish, infer), which registers it as pending last.
    def new(self, op: str) -> Call:
        """A new call (its id), holding nothing yet."""
        if self.closed is not None:
            raise errors.ConnectionClosed(self.closed)
        rid = self._next
        self._next = rid + 1 if rid < (1 << 63) else 1
        return Call(rid, op)

    def control(self, call: Call, args: Optional[Dict[str, Any]] = None) -> Call:
        call.frame = _wire.encode(_wire.request(call.id, call.op, args))
        self.pending[call.id] = call
        return call

    def publish(self, call: Call, model: str, data: Union[bytes, memoryview], version: Optional[int]) -> Call:
        """A publish request whose file goes through the arena when it fits there."""
        args: Dict[str, Any] = {"model": model}
        if version is not None:
            args["version"] = int(version)
        try:
            slot = self.arena.alloc(len(data), call.held) if self.arena is not None and len(data) > 0 else None
            if slot is not None and self.arena is not None:
                dst = self.arena.ndarray(slot.offset, (len(data),), np.dtype(np.uint8), writable=True)
                dst[:] = np.frombuffer(data, dtype=np.uint8)
                del dst
                args["data"] = {"arena": {"offset": slot.offset, "len": len(data)}}
            else:
                args["data"] = {"inline": data}
            call.frame = _wire.encode(_wire.request(call.id, "publish", args))
        except BaseException:
            call.release()
            raise
        self.pending[call.id] = call
        return call

    def infer(
        self,
        call: Call,
        model: str,
        inputs: Inputs,
        *,
        version: Optional[int],
        outputs: Optional[Sequence[str]],
        priority: Optional[int],
        timeout: Optional[float],
        copy: bool,
        signature: Optional[Dict[str, Any]],
    ) -> Call:
        """An infer request: inputs placed (arena arrays by reference, large arrays copied
        into the arena once, the rest inline), an output area sized when the outputs' size
        can be known (from ``signature`` or the previous call)."""
        call.key = (model, version)
        call.copy = copy
        call.signature = signature
        try:
            if not self._fill_template(call, model, inputs, version, outputs, priority, timeout, signature):
                self._build_infer(call, model, inputs, version, outputs, priority, timeout, signature)
        except BaseException:
            call.release()
            raise
        self.pending[call.id] = call
        return call

    def _fill_template(
        self,
        call: Call,
        model: str,
        inputs: Inputs,
        version: Optional[int],
        outputs: Optional[Sequence[str]],
        priority: Optional[int],
        timeout: Optional[float],
        signature: Optional[Dict[str, Any]],
    ) -> bool:
        """The frame of an infer request whose inputs are all numpy arrays of a dtype the wire
        has (in their byte order), made from the :class:`Template` of requests of its kind:
        only the id, the inputs' bytes or arena offsets and the output area's offset are
        written. Places the inputs as :meth:`_build_infer` does. ``False`` (nothing done) for
        any other request, which :meth:`_build_infer` encodes in full."""
        if type(inputs) is dict:
            named: Mapping[str, Any] = inputs
        elif type(inputs) is np.ndarray:
            named = named_inputs(inputs, signature)
        else:
            return False
        if priority is not None and not 0 <= priority <= 255:
            return False  # _build_infer says what is wrong
        wires = _FAST_WIRE
        arena = self.arena
        threshold = self.options.inline_threshold
        tensors = []
        holes: List[Any] = [_wire.u64(call.id)]
        for name, a in named.items():
            wire = wires.get(a.dtype) if type(a) is np.ndarray else None
            if wire is None:
                call.release()  # what earlier inputs took
                return False
            nbytes = a.nbytes
            if arena is not None:
                off = arena.offset_of(a) if a.base is not None else None
                if off is not None and off % a.itemsize == 0:
                    call.keep.append(a)
                    tensors.append((name, wire, a.shape, _wire.ARENA, nbytes))
                    holes.append(_wire.u64(off))
                    continue
                slot = arena.alloc(nbytes, call.held) if nbytes >= threshold else None
                if slot is not None:
                    dst = arena.ndarray(slot.offset, a.shape, a.dtype, writable=True)
                    np.copyto(dst, a, casting="no")
                    del dst
                    tensors.append((name, wire, a.shape, _wire.ARENA, nbytes))
                    holes.append(_wire.u64(slot.offset))
                    continue
            tensors.append((name, wire, a.shape, _wire.INLINE, nbytes))
            holes.append(a if a.flags.c_contiguous else np.ascontiguousarray(a))
        timeout_ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        spec = (model, version, tuple(outputs) if outputs else (), priority, timeout_ms, tuple(tensors))
        memory = self.memory
        key = (model, version)
        t = memory.templates.get(spec)
        if t is None or (t.sized_by is not _BY_SIGNATURE and t.sized_by != memory.output_sizes.get(key)):
            t = self._template(spec, key, signature)
        pieces = t.pieces
        if t.area is not None and arena is not None:
            area = arena.alloc(t.area, call.held)
            if area is None:
                pieces = t.bare()
            else:
                call.area = area
                holes.append(_wire.u64(area.offset))
        parts: List[Any] = [None] * (2 * len(holes) + 1)
        parts[0::2] = pieces
        parts[1::2] = holes
        call.frame = [b"".join(parts)]
        call.template = t
        return True

    def _template(self, spec: Tuple[Any, ...], key: Key, signature: Optional[Dict[str, Any]]) -> "Template":
        """A new :class:`Template` for requests like ``spec``, with the output area
        :meth:`_build_infer` would ask for."""
        memory = self.memory
        sized_by: Any = _BY_SIGNATURE
        estimate = None
        if self.arena is not None:
            tensors = spec[5]
            shapes = {t[0]: [int(d) for d in t[2]] for t in tensors}
            estimate = memory.area_bytes(key, signature, shapes, list(spec[2])) if signature else None
            if estimate is None:
                sized_by = estimate = memory.output_sizes.get(key)
        area = estimate if estimate is not None and estimate >= self.options.inline_threshold else None
        if len(memory.templates) >= 1024:
            memory.templates.clear()
        t = memory.templates[spec] = Template(spec, area, sized_by)
        return t

    def _build_infer(
        self,
        call: Call,
        model: str,
        inputs: Inputs,
        version: Optional[int],
        outputs: Optional[Sequence[str]],
        priority: Optional[int],
        timeout: Optional[float],
        signature: Optional[Dict[str, Any]],
    ) -> None:
        named = named_inputs(inputs, signature)
        declared = input_dtypes(signature) if signature and not all(isinstance(v, np.ndarray) for v in named.values()) else {}
        arena = self.arena
        threshold = self.options.inline_threshold
        tensors: List[Dict[str, Any]] = []
        shapes: Dict[str, List[int]] = {}
        for name, value in named.items():
            a = as_array(value, declared.get(name))
            wire = _wire.wire_dtype(a.dtype)
            shape = [int(d) for d in a.shape]
            shapes[name] = shape
            data: Dict[str, Any]
            off = arena.offset_of(a) if arena is not None else None
            if off is not None and off % max(1, a.dtype.itemsize) == 0:
                # Already in the arena (client.empty(), or an output of an earlier request):
                # sent by reference, kept alive until the answer.
                data = {"arena": {"offset": off, "len": a.nbytes}}
                call.keep.append(a)
            else:
                slot = arena.alloc(a.nbytes, call.held) if arena is not None and a.nbytes >= threshold else None
                if slot is not None and arena is not None:
                    dst = arena.ndarray(slot.offset, a.shape, a.dtype, writable=True)
                    np.copyto(dst, a, casting="no")
                    del dst
                    data = {"arena": {"offset": slot.offset, "len": a.nbytes}}
                else:
                    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                    data = {"inline": memoryview(flat.data)}
            tensors.append({"name": name, "dtype": wire, "shape": shape, "data": data})
        args: Dict[str, Any] = {"model": model, "inputs": tensors, "inline_overflow": True}
        if version is not None:
            args["version"] = int(version)
        wanted = list(outputs or [])
        if wanted:
            args["outputs"] = wanted
        if priority is not None:
            if not 0 <= int(priority) <= 255:
                raise errors.ClientError(f"priority {priority} is not in 0..=255")
            args["priority"] = int(priority)
        if timeout is not None:
            args["timeout_ms"] = max(0, math.ceil(timeout * 1000))
        if arena is not None:
            key = (model, version)
            estimate = self.memory.area_bytes(key, signature, shapes, wanted) if signature else None
            if estimate is None:
                estimate = self.memory.output_sizes.get(key)
            if estimate is not None and estimate >= threshold:
                area = arena.alloc(estimate, call.held)
                if area is not None:
                    call.area = area
                    args["output_area"] = {"offset": area.offset, "len": area.nbytes}
        call.frame = _wire.encode(_wire.request(call.id, "infer", args))

    # -- answers ----------------------------------------------------------------------------
    def feed(self, nbytes: int) -> List[Call]:
        """Takes ``nbytes`` read into ``reader.get_buffer()``; returns the calls answered (calls
        whose caller stopped waiting are released here instead). An answer that looks like
        the previous answer to its template (:class:`Answer`) is cut, any other decoded."""
        answered: List[Call] = []
        for body in self.reader.buffer_updated(nbytes):
            call = self.take_body(body)
            if call is not None:
                answered.append(call)
        return answered

    def take_frames(self) -> None:
        """Hands out every whole answer the frame reader holds (read by the blocking client).
        Each is consumed only once handed out: one whose handing out an exception cut short is
        handed out again by the next reader (:meth:`take_body` may take an answer twice)."""
        reader = self.reader
        body = reader.next_body()
        while body is not None:
            self.take_body(body)
            reader.consume()
            body = reader.next_body()

    def take_body(self, body: Any) -> Optional[Call]:
        """One answer's frame body (from the socket or the ring): the call it answers, when
        its caller still waits (a call given up is released here instead). The call leaves
        ``pending`` last, so an answer taken again after an interruption completes it the same
        way, and one taken again after that is ignored."""
        pending = self.pending
        if len(body) > 13 and body[:4] == _ANSWER_HEAD:
            # An answer to a templated request that looks like the last one: its outputs
            # are cut out, the rest is known.
            rid, at = _read_uint(body, 4)
            call = pending.get(rid)
            template = call.template if call is not None else None
            answer = template.answer if template is not None else None
            if answer is not None and call is not None and template is not None:
                cuts = answer.cut(body, at)
                if cuts is not None:
                    template.unpaid = 0
                    call.done = call.ok = True
                    call.answer, call.cuts = answer, cuts
                    return self._settled(rid, call)
        frame = _unpackb(body, raw=False, strict_map_key=False)
        if type(frame) is not dict:
            raise _wire.FrameError("a response that is not a map")
        rid, ok, payload = _wire.split_outcome(frame)
        if rid == 0:
            # About the connection itself; the daemon closes it after most of these.
            if not ok:
                self.closed = str(errors.from_wire(payload))
            return None
        call = pending.get(rid)
        if call is None:
            return None
        call.done, call.ok, call.payload = True, ok, payload
        if call.template is not None:
            learn_answer(call, body, frame)
        return self._settled(rid, call)

    def _settled(self, rid: int, call: Call) -> Optional[Call]:
        """``call`` is answered: no longer pending; returned to its waiter, or, abandoned, its
        arena ranges released (before it leaves ``pending``: an exception between the two
        leaves it to ``fail_all``, not leaked) and ``None``."""
        if call.abandoned:
            call.release()
            self.pending.pop(rid, None)
            return None
        self.pending.pop(rid, None)
        return call

    def fail_all(self, reason: str) -> List[Call]:
        """The connection is gone: every call in flight fails. The daemon may still touch their
        arena ranges, but this arena takes no new allocations (a new connection maps a new
        one); arrays already showing it stay valid."""
        self.closed = self.closed or reason
        calls = list(self.pending.values())
        self.pending.clear()
        for c in calls:
            c.done, c.ok = True, False
            c.payload = None
            c.held = []  # never reused: the arena is retired with the connection
            c.keep = []
        return [c for c in calls if not c.abandoned]

    def abandon(self, call: Call) -> None:
        """The caller stopped waiting (timeout, cancellation, an exception): what the request
        holds is released when its answer comes (at once if it already came)."""
        if call.done:
            call.release()
        else:
            call.abandoned = True

    def give_up(self, call: Call) -> bool:
        """The caller stopped waiting, wherever it was (timeout, an exception landing at any
        point): a call answered is released; one whose request never went out is forgotten
        (nothing will answer it); one sent is abandoned (:meth:`abandon`). Idempotent. False:
        its request was being sent, how much of it went out is not known — nothing may follow
        it on this connection."""
        if call.done:
            call.release()
        elif call.sent == UNSENT:
            call.release()
            call.done = True
            self.pending.pop(call.id, None)
        elif call.sent == SENT:
            call.abandoned = True
        else:
            return False
        return True

    def outcome(self, call: Call) -> Any:
        """The reply's args of an answered control call, or its exception."""
        call.release()
        if call.ok:
            return call.payload
        if call.payload is None:
            raise errors.ConnectionClosed(self.closed or "the connection closed")
        raise errors.from_wire(call.payload)

    def result(self, call: Call) -> Result:
        """The :class:`Result` of an answered infer call (or its exception)."""
        answer = call.answer
        if answer is not None and call.cuts is not None:
            call.release()
            if call.key is not None:
                self.memory.output_sizes[call.key] = answer.total
            return answer.result(call.cuts, call.copy)
        if not call.ok:
            if call.payload is None:
                call.release()
                raise errors.ConnectionClosed(self.closed or "the connection closed")
            call.release()
            raise errors.from_wire(call.payload)
        area = call.area
        hold = area is not None and not call.copy
        try:
            if hold and area is not None:
                # The Result takes over the request's claim on the output area (with copy=True
                # the outputs are copied out and the area goes back with the request's slots).
                call.held.remove(area)
            res, total, overflowed = build_result(call.payload, area, call.copy, hold)
        except BaseException:
            if hold and area is not None:
                area.release()
            raise
        finally:
            call.release()
        if call.key is not None:
            self.memory.output_sizes[call.key] = total
            if overflowed and call.signature is not None:
                # The signature's estimate was short (a new version?): ask again next time.
                self.memory.forget(call.key)
        return res


#: Wire dtype names by numpy dtype, for the dtypes sent as they are (little-endian or
#: single-byte); any other array goes through :func:`as_array`.
_FAST_WIRE: Dict[np.dtype[Any], str] = {d: n for n, d in _wire._DTYPES.items()}
_DTYPES = _wire._DTYPES
_unpackb = msgpack.unpackb
_ANSWER_HEAD = memoryview(_wire.ANSWER_HEAD)
_read_uint = _wire.read_uint


def as_array(value: Any, declared: Optional[np.dtype[Any]] = None) -> np.ndarray[Any, Any]:
    """``value`` as a little-endian array. A value that is not a numpy array (a list, a
    number) takes the input's ``declared`` dtype when the model's signature is known (a list of
    floats would otherwise be float64); an array keeps its own dtype, checked by the daemon."""
    if declared is not None and not isinstance(value, np.ndarray):
        a = np.asarray(value, dtype=declared)
    else:
        a = np.asarray(value)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def named_inputs(inputs: Inputs, signature: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(inputs, Mapping):
        return inputs
    names = [i["name"] for i in (signature or {}).get("inputs", [])]
    if len(names) != 1:
        raise errors.ClientError(
            "inputs must be a mapping {input name: array}"
            + (f" (the model has inputs {names})" if names else "")
        )
    return {names[0]: inputs}


def input_dtypes(signature: Optional[Mapping[str, Any]]) -> Dict[str, np.dtype[Any]]:
    """The numpy dtype of each input the signature declares (those numpy has a type for)."""
    out: Dict[str, np.dtype[Any]] = {}
    for spec in (signature or {}).get("inputs", []):
        dt = _wire.numpy_dtype(str(spec.get("dtype", "")))
        if dt is not None:
            out[str(spec["name"])] = dt
    return out


def needs_signature(inputs: Inputs) -> bool:
    return not isinstance(inputs, Mapping)


def build_result(
    payload: Mapping[str, Any], area: Optional[Slot], copy: bool, hold: bool
) -> Tuple[Result, int, bool]:
    """Outputs as numpy arrays: views into ``area`` (holding claims on it) or copies; inline
    outputs over the received bytes. Returns the result, the output bytes (64-byte aligned, for
    sizing the next area) and whether an output that should have been in the area came inline."""
    arrays: Dict[str, np.ndarray[Any, Any]] = {}
    dtypes: Dict[str, str] = {}
    total = 0
    overflowed = False
    align = _wire.OUTPUT_ALIGN - 1
    for t in payload.get("outputs", ()):
        name, wire, shape = t["name"], t["dtype"], t["shape"]
        dtype = _DTYPES.get(wire)
        data = t["data"]
        dtypes[name] = wire
        raw = data.get("inline") if type(data) is dict else None
        if raw is not None:
            overflowed |= area is not None
            total += (len(raw) + align) & ~align
            if dtype is None:
                arr = np.frombuffer(raw, dtype=np.uint8)
            else:
                arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
            arrays[name] = arr.copy() if copy else arr
            continue
        shape = [int(d) for d in shape]
        ref = data.get("arena") if isinstance(data, dict) else None
        if ref is None or area is None:
            raise errors.ProtocolError(f"output {name!r} is in the arena, where none was asked for")
        off, ln = int(ref["offset"]), int(ref["len"])
        at = off - area.offset
        if at < 0 or at + ln > area.nbytes:
            raise errors.ProtocolError(f"output {name!r} lies outside its output area")
        total += _aligned(ln)
        view_dtype = dtype if dtype is not None else np.dtype(np.uint8)
        view_shape = shape if dtype is not None else [ln]
        if copy:
            tmp = area.arena.ndarray(off, view_shape, view_dtype, writable=False)
            arrays[name] = tmp.copy()
            del tmp
        else:
            arrays[name] = area.view(view_shape, view_dtype, at=at)
    res = Result(payload.get("model", ""), int(payload.get("version", 0)), arrays, dtypes, area if hold else None)
    return res, total, overflowed


#: Builds a call on a connection (used by both clients to retry on a fresh connection).
Builder = Callable[[Connection], Call]
