"""Infer requests and answers of a kind seen before, without the full encoding and decoding:
a request's frame filled into its kind's :class:`Template` (the id, inline bytes and arena
offsets in fixed-width holes), and an answer matching the previous one of its template but
for the id and the inline outputs (:class:`Answer`) cut instead of decoded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _wire
from .result import Result

if TYPE_CHECKING:
    from ._core import Call

_DTYPES = _wire._DTYPES


def _aligned(n: int) -> int:
    a = _wire.OUTPUT_ALIGN
    return (n + a - 1) // a * a


#: A template's output area was sized from the model's signature (not the previous answer).
_BY_SIGNATURE = object()


class Template:
    """An infer frame for one kind of request (see :attr:`Memory.templates`), with the output
    area it asks for (``area``: bytes, or ``None``) and, lazily, the same frame without one
    (for when the arena has no room for the area)."""

    __slots__ = ("spec", "pieces", "area", "sized_by", "_bare", "answer", "unpaid")

    def __init__(self, spec: Tuple[Any, ...], area: Optional[int], sized_by: Any) -> None:
        self.spec = spec
        model, version, outputs, priority, timeout_ms, tensors = spec
        self.pieces, _ = _wire.infer_template(model, version, outputs, priority, timeout_ms, tensors, area)
        self.area = area
        self.sized_by = sized_by
        self._bare: Optional[Tuple[bytes, ...]] = None
        #: What the answers to these requests looked like last time (outputs inline).
        self.answer: Optional[Answer] = None
        #: Looks learnt in a row that no answer has matched since: answers that keep
        #: changing (an output whose shape varies) are not worth learning after a few.
        self.unpaid = 0

    def bare(self) -> Tuple[bytes, ...]:
        if self._bare is None:
            model, version, outputs, priority, timeout_ms, tensors = self.spec
            self._bare, _ = _wire.infer_template(model, version, outputs, priority, timeout_ms, tensors, None)
        return self._bare


class Answer:
    """An answer to a templated request, all outputs inline, as bytes: everything after its
    id, cut at its outputs' bytes. An answer whose bytes match this one's everywhere but at
    the id and those cuts is the same message with other output values: :meth:`cut` takes
    those out without decoding the message again."""

    __slots__ = ("size", "segments", "spans", "model", "version", "outputs", "dtypes", "total")

    def __init__(self, tail: Union[bytes, memoryview], spans: List[Tuple[int, int]], payload: Mapping[str, Any], total: int) -> None:
        self.size = len(tail)
        self.spans = spans
        segments = []
        at = 0
        for start, n in spans + [(len(tail), 0)]:
            if start > at:
                segments.append((at, bytes(tail[at:start])))
            at = start + n
        self.segments = segments
        self.model = payload.get("model", "")
        self.version = int(payload.get("version", 0))
        self.outputs: List[Tuple[str, Optional[np.dtype[Any]], List[int]]] = []
        self.dtypes: Dict[str, str] = {}
        for t in payload.get("outputs", ()):
            self.outputs.append((t["name"], _DTYPES.get(t["dtype"]), [int(d) for d in t["shape"]]))
            self.dtypes[t["name"]] = t["dtype"]
        self.total = total

    def cut(self, body: memoryview, at: int) -> Optional[List[bytes]]:
        """The outputs' bytes of ``body`` (its id ending at ``at``), or ``None`` when it is not
        an answer like this one."""
        if len(body) - at != self.size:
            return None
        for start, segment in self.segments:
            start += at
            if body[start : start + len(segment)] != segment:
                return None
        return [bytes(body[at + start : at + start + n]) for start, n in self.spans]

    def result(self, cuts: List[bytes], copy: bool) -> Result:
        arrays: Dict[str, np.ndarray[Any, Any]] = {}
        for (name, dtype, shape), raw in zip(self.outputs, cuts):
            arr = np.frombuffer(raw, dtype=np.uint8) if dtype is None else np.frombuffer(raw, dtype=dtype).reshape(shape)
            arrays[name] = arr.copy() if copy else arr
        return Result(self.model, self.version, arrays, dict(self.dtypes), None)


def learn_answer(call: "Call", body: Union[bytes, bytearray, memoryview], frame: Any) -> None:
    """After decoding an answer in full: remembers how it looks (:class:`Answer`) for the
    call's template, when its outputs all came inline."""
    template = call.template
    payload = call.payload
    if template is None or call.area is not None or not call.ok or type(payload) is not dict or template.unpaid >= 3:
        return
    outputs = payload.get("outputs")
    if type(outputs) is not list or not all(type(t) is dict and type(t.get("data")) is dict and type(t["data"].get("inline")) is bytes for t in outputs):
        return
    body = memoryview(body)
    if body[:4] != _wire.ANSWER_HEAD:
        return
    rid, at = _wire.read_uint(body, 4)
    spans = _wire.bin_spans(body, frame)
    if rid != call.id or spans is None or len(spans) != len(outputs):
        return
    total = sum(_aligned(n) for _, n in spans)
    template.unpaid += 1
    template.answer = Answer(body[at:], [(s - at, n) for s, n in spans], payload, total)
