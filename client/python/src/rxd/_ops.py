"""Arguments of the control and admin requests, shared by both clients (sans IO)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from . import _wire, errors

#: A model file: its path, or its bytes.
PathOrBytes = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

#: The settings ``configure`` changes (PROTOCOL.md, "configure").
SETTINGS = (
    "instances",
    "max_batch_rows",
    "max_queue_delay_us",
    "latency_target_ms",
    "default_priority",
    "priority_aging_ms",
    "cache_bytes",
    "clear_cache",
    "retune",
    "device",
    "persist",
)


def model_ref(model: str, version: Optional[int] = None) -> Dict[str, Any]:
    args: Dict[str, Any] = {"model": model}
    if version is not None:
        args["version"] = int(version)
    return args


def configure_args(model: str, version: Optional[int], settings: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise errors.ClientError(f"unknown settings {unknown}; configure takes {list(SETTINGS)}")
    args = model_ref(model, version)
    args.update({k: v for k, v in settings.items() if v is not None})
    return args


def inline_tensors(arrays: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Arrays as inline wire tensors (what ``compress`` takes for evaluation and calibration)."""
    out: List[Dict[str, Any]] = []
    for name, value in (arrays or {}).items():
        a = np.ascontiguousarray(value)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out.append(
            {
                "name": name,
                "dtype": _wire.wire_dtype(a.dtype),
                "shape": [int(d) for d in a.shape],
                "data": {"inline": a.tobytes()},
            }
        )
    return out


def compress_args(
    model: str,
    strategy: str,
    *,
    version: Optional[int],
    calibration: Optional[Mapping[str, Any]],
    calibration_method: Optional[str],
    eval: Optional[Mapping[str, Any]],
    min_top1: Optional[float],
    min_cosine: Optional[float],
    dry_run: bool,
) -> Dict[str, Any]:
    args = model_ref(model, version)
    args["strategy"] = strategy
    cal = inline_tensors(calibration)
    if cal:
        args["calibration"] = cal
    ev = inline_tensors(eval)
    if ev:
        args["eval"] = ev
    if calibration_method is not None:
        args["calibration_method"] = calibration_method
    if min_top1 is not None:
        args["min_top1"] = float(min_top1)
    if min_cosine is not None:
        args["min_cosine"] = float(min_cosine)
    if dry_run:
        args["dry_run"] = True
    return args


def read_model_file(source: PathOrBytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(os.fspath(source), "rb") as f:
        return f.read()
