"""Output sizes known before a run, so that a first request can give the daemon an output area
in the arena large enough (the same rules as the Rust client's ``rxd_client::shapes``), from a
model's signature (``model_info``) and the request's input shapes:

- a fixed dimension is its size;
- a dynamic dimension with the symbolic name of an input's dimension has that size;
- a dimension ONNX Runtime inferred as a formula of input dimensions
  (``(floor(height/2 - 1/2) + 1)*...``) is evaluated exactly, in rational arithmetic;
- otherwise the shape the output had in the daemon's batch-1 warmup, when every input has its
  warmup shape (the batch excepted, which scales a dynamic first dimension).

Anything else is unknown. A guess is never trusted for correctness: the daemon sends an output
that does not fit the area inline (``inline_overflow``).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import _wire


def output_area_bytes(
    info: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], wanted: Sequence[str]
) -> Optional[int]:
    """Bytes of an output area for the outputs named in ``wanted`` (empty: all), each 64-byte
    aligned; ``None`` when some output's size is unknown before the run."""
    total = 0
    for spec in info.get("outputs", []):
        if wanted and spec["name"] not in wanted:
            continue
        shape = output_shape(info, spec, shapes)
        if shape is None:
            return None
        elements = 1
        for d in shape:
            elements *= d
        try:
            n = _wire.byte_len(spec["dtype"], elements)
        except ValueError:
            return None
        total += (n + _wire.OUTPUT_ALIGN - 1) // _wire.OUTPUT_ALIGN * _wire.OUTPUT_ALIGN
    return total


def output_shape(
    info: Mapping[str, Any], spec: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]
) -> Optional[List[int]]:
    """The shape output ``spec`` of ``info``'s model will have for inputs of ``shapes``."""
    variables: Dict[str, int] = {}
    for inp in info.get("inputs", []):
        shape = shapes.get(inp["name"])
        if shape is None:
            continue
        for name, size in zip(inp.get("dim_names", []), shape):
            if name and name not in variables:
                variables[name] = int(size)
    warm = _warm_batch(info, shapes)
    out: List[int] = []
    names = spec.get("dim_names", [])
    warmup = spec.get("warmup_dims", [])
    for i, d in enumerate(spec.get("dims", [])):
        if d >= 0:
            out.append(int(d))
            continue
        name = names[i] if i < len(names) else ""
        if name in variables:
            out.append(variables[name])
            continue
        if name:
            v = evaluate(name, variables)
            if v is not None:
                out.append(v)
                continue
        if warm is None or i >= len(warmup):
            return None
        w = int(warmup[i])
        if i == 0:
            if w != 1:
                return None
            out.append(warm)
        else:
            out.append(w)
    return out


def _warm_batch(info: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    batch: Optional[int] = None
    for inp in info.get("inputs", []):
        shape = shapes.get(inp["name"])
        if shape is None:
            return None
        warm = inp.get("warmup_dims", [])
        dims = inp.get("dims", [])
        if len(shape) != len(dims) or len(warm) != len(shape):
            if not dims and not shape:
                continue  # a scalar
            return None
        for i, (got, w) in enumerate(zip(shape, warm)):
            if i == 0 and dims[0] < 0 and w == 1:
                if batch is None:
                    batch = int(got)
                elif batch != got:
                    return None
            elif got != w:
                return None
    return 1 if batch is None else batch


def evaluate(text: str, variables: Mapping[str, int]) -> Optional[int]:
    """A dimension formula's value over ``variables``; ``None`` when it names something
    unknown, is malformed, or is not a non-negative integer."""
    p = _Parser(text, variables)
    try:
        v = p.expr()
        p.skip()
        if p.i != len(p.s):
            return None
    except (_Fail, ZeroDivisionError):
        return None
    if v.denominator != 1 or v < 0:
        return None
    return int(v)


class _Fail(Exception):
    pass


class _Parser:
    def __init__(self, s: str, variables: Mapping[str, int]) -> None:
        self.s = s
        self.i = 0
        self.vars = variables

    def skip(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def eat(self, c: str) -> bool:
        self.skip()
        if self.s.startswith(c, self.i):
            self.i += 1
            return True
        return False

    def expr(self) -> Fraction:
        v = self.term()
        while True:
            if self.eat("+"):
                v += self.term()
            elif self.eat("-"):
                v -= self.term()
            else:
                return v

    def term(self) -> Fraction:
        v = self.factor()
        while True:
            if self.eat("*"):
                v *= self.factor()
            elif self.eat("/"):
                v /= self.factor()
            else:
                return v

    def factor(self) -> Fraction:
        self.skip()
        if self.eat("-"):
            return -self.factor()
        if self.eat("("):
            v = self.expr()
            if not self.eat(")"):
                raise _Fail
            return v
        start = self.i
        if self.i < len(self.s) and self.s[self.i].isdigit():
            while self.i < len(self.s) and self.s[self.i].isdigit():
                self.i += 1
            return Fraction(int(self.s[start : self.i]))
        while self.i < len(self.s) and (self.s[self.i].isascii() and (self.s[self.i].isalnum() or self.s[self.i] in "_.")):
            self.i += 1
        if self.i == start:
            raise _Fail
        name = self.s[start : self.i]
        if self.eat("("):
            args = [self.expr()]
            while self.eat(","):
                args.append(self.expr())
            if not self.eat(")"):
                raise _Fail
            if name == "floor" and len(args) == 1:
                return Fraction(args[0].numerator // args[0].denominator)
            if name in ("ceiling", "ceil") and len(args) == 1:
                return Fraction(-(-args[0].numerator // args[0].denominator))
            if name in ("max", "Max") and len(args) == 2:
                return max(args)
            if name in ("min", "Min") and len(args) == 2:
                return min(args)
            raise _Fail
        if name not in self.vars:
            raise _Fail
        return Fraction(self.vars[name])
