"""A request's outputs: :class:`Result`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, AbstractSet, Any, Dict, Iterator, Mapping, Optional

import numpy as np

from . import errors

if TYPE_CHECKING:  # pragma: no cover
    from ._arena import Slot


class Result(Mapping[str, "np.ndarray[Any, Any]"]):
    """The outputs of one inference, by output name, in the model's output order.

    Outputs that came through the shared-memory arena are read-only numpy views of it — no
    copy. Their memory stays reserved while this result is open *or* any array showing it is
    alive, so a view never changes under its owner's feet; it is reused only after both.
    Close the result (``with client.infer(...) as r:``, or :meth:`close`) to let the memory go
    as soon as the arrays you took from it are gone; reading an output from a closed result
    raises :class:`rxd.ResultClosed`. ``infer(..., copy=True)`` gives owned, writable arrays
    instead, and frees the arena at once.
    """

    def __init__(
        self,
        model: str,
        version: int,
        outputs: Dict[str, "np.ndarray[Any, Any]"],
        dtypes: Dict[str, str],
        area: Optional["Slot"],
    ) -> None:
        #: The model and the version that answered.
        self.model = model
        self.version = version
        #: Each output's wire dtype (``float32``, ...); outputs of a dtype numpy has no type for
        #: (``bfloat16``, ``float8*``, 4-bit) are raw ``uint8`` bytes.
        self.dtypes = dtypes
        self._outputs: Optional[Dict[str, np.ndarray[Any, Any]]] = outputs
        self._area = area
        self._in_arena: AbstractSet[str] = frozenset() if area is None else {n for n, a in outputs.items() if _shows(a, area)}
        # Released when closed, or when this object is collected unclosed.
        self._finalizer = weakref.finalize(self, _release, area) if area is not None else None

    def __getitem__(self, name: str) -> "np.ndarray[Any, Any]":
        if self._outputs is None:
            raise errors.ResultClosed(f"output {name!r} read from a closed result of {self.model!r}")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        if self._outputs is None:
            raise errors.ResultClosed(f"a closed result of {self.model!r}")
        return iter(self._outputs)

    def __len__(self) -> int:
        return 0 if self._outputs is None else len(self._outputs)

    def __repr__(self) -> str:
        if self._outputs is None:
            return f"<rxd.Result {self.model}:{self.version} closed>"
        shapes = ", ".join(f"{n}: {self.dtypes.get(n, '?')}{list(a.shape)}" for n, a in self._outputs.items())
        return f"<rxd.Result {self.model}:{self.version} {{{shapes}}}>"

    @property
    def closed(self) -> bool:
        return self._outputs is None

    def in_arena(self, name: str) -> bool:
        """Whether output ``name`` is a view of the shared-memory arena (not a copy)."""
        return name in self._in_arena

    def copy(self) -> Dict[str, "np.ndarray[Any, Any]"]:
        """Every output as an owned, writable array."""
        return {n: np.array(a, copy=True) for n, a in self.items()}

    def close(self) -> None:
        """Drops this result's hold on its outputs' arena memory (arrays taken from it keep
        theirs until they are garbage-collected). Idempotent."""
        self._outputs = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Result":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(area: "Slot") -> None:
    area.release()


def _shows(arr: "np.ndarray[Any, Any]", area: "Slot") -> bool:
    addr = int(arr.__array_interface__["data"][0]) - area.arena.address
    return area.offset <= addr < area.offset + max(area.length, 1)
