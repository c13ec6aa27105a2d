"""Outputs through the Python client are what in-process ONNX Runtime gives, bit for bit, on
the real models — through the shared-memory arena and inline, blocking and asyncio."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict

import numpy as np
import pytest

import rxd
from conftest import Daemon, arena_whole, reference

rng = np.random.default_rng(22)


def silero() -> Dict[str, np.ndarray]:
    return {
        "input": rng.uniform(-0.5, 0.5, (1, 512)).astype(np.float32),
        "state": rng.uniform(-0.1, 0.1, (2, 1, 128)).astype(np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


CASES: Dict[str, Callable[[], Dict[str, Any]]] = {
    "yolov8n": lambda: {"images": rng.random((1, 3, 320, 320), dtype=np.float32)},
    "ppocr_det": lambda: {"x": rng.random((1, 3, 640, 640), dtype=np.float32)},
    "ppocr_cls": lambda: {"x": rng.random((3, 3, 48, 192), dtype=np.float32)},
    "silero_vad": silero,
    "digits": lambda: {"input": rng.random((5, 64), dtype=np.float32) * 16},
}


def check(got: rxd.Result, want: Dict[str, np.ndarray], in_arena: bool) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
        if in_arena and w.nbytes >= 64 << 10:
            assert got.in_arena(name), f"{name} ({w.nbytes} bytes) came inline"
        if not in_arena:
            assert not got.in_arena(name)


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("arena", [True, False], ids=["arena", "inline"])
def test_blocking_outputs_equal_in_process_onnxruntime(daemon: Daemon, model: str, arena: bool) -> None:
    ref = reference(model)
    with rxd.Client(daemon.socket, arena_bytes=(64 << 20) if arena else 0) as client:
        assert client.arena_bytes == ((64 << 20) if arena else 0)
        for _ in range(2):  # the first call sizes the output area from the signature
            inputs = CASES[model]()
            with client.infer(model, inputs) as got:
                check(got, ref.run(inputs), arena)
        # Inputs written in place in the arena, outputs copied out.
        inputs = CASES[model]()
        placed = {}
        for k, v in inputs.items():
            placed[k] = client.empty(v.shape, v.dtype)
            placed[k][...] = v
            assert client.in_arena(placed[k]) == arena
        got = client.infer(model, placed, copy=True)
        want = ref.run(inputs)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].flags.writeable and not got.in_arena(name)
        del placed, got
        if arena:
            assert arena_whole(client)


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("arena", [True, False], ids=["arena", "inline"])
async def test_asyncio_outputs_equal_in_process_onnxruntime(daemon: Daemon, model: str, arena: bool) -> None:
    ref = reference(model)
    async with rxd.AsyncClient(daemon.socket, arena_bytes=(64 << 20) if arena else 0) as client:
        cases = [CASES[model]() for _ in range(6)]
        # Many requests in flight on one connection, answered in any order, matched by id.
        results = await asyncio.gather(*(client.infer(model, c) for c in cases))
        for inputs, got in zip(cases, results):
            want = ref.run(inputs)
            for name in want:
                # Concurrent requests may be batched together: equal to float rounding.
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
            got.close()
        inputs = CASES[model]()
        with await client.infer(model, inputs) as got:
            check(got, ref.run(inputs), arena)
        if arena:
            assert arena_whole(client)


def test_one_array_for_a_one_input_model_and_named_outputs(daemon: Daemon) -> None:
    x = rng.random((2, 64), dtype=np.float32) * 16
    want = reference("digits").run({"input": x})
    with rxd.Client(daemon.socket) as client:
        got = client.infer("digits", x, outputs=["probabilities"], priority=3, timeout=30.0)
        assert list(got) == ["probabilities"]
        np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
        with pytest.raises(rxd.ClientError):
            client.infer("silero_vad", np.zeros((1, 512), np.float32))  # three inputs


def test_an_output_view_feeds_the_next_request_by_reference(daemon: Daemon) -> None:
    # Every tensor through the arena (threshold 0): sigmoid's output, a view of the arena, goes
    # straight back as the next request's input, sent by reference.
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    ref = reference("sigmoid")
    want = ref.run({"x": ref.run({"x": x})["y"]})["y"]
    with rxd.Client(daemon.socket, inline_threshold=0) as client:
        with client.infer("sigmoid", {"x": x}) as first:
            y = first["y"]
            assert first.in_arena("y") and client.in_arena(y) and not y.flags.writeable
            with client.infer("sigmoid", {"x": y}) as second:
                assert second.in_arena("y")
                np.testing.assert_array_equal(second["y"], want)
        del y
        assert arena_whole(client)


def test_lists_and_unusual_layouts_are_sent_as_the_model_declares(daemon: Daemon) -> None:
    # A list takes the input's declared dtype (float32, not numpy's float64); strided,
    # Fortran-ordered, big-endian and broadcast arrays, and arena arrays that are not
    # contiguous or start mid-slot, all give in-process ONNX Runtime's outputs.
    base = rng.standard_normal((6, 4, 5)).astype(np.float32) * 10
    base[0, 0, :4] = [np.nan, np.inf, -np.inf, 1e-42]
    ref = reference("sigmoid")
    variants: Dict[str, Any] = {
        "list": base[:3].tolist(),
        "strided": base[::2],
        "fortran": np.asfortranarray(base[:3]),
        "big-endian": base[:3].astype(">f4"),
        "broadcast": np.broadcast_to(base[0], (3, 4, 5)),
    }
    for threshold in (0, 1 << 30):  # everything through the arena; everything inline
        with rxd.Client(daemon.socket, inline_threshold=threshold) as client:
            for name, value in variants.items():
                want = ref.run({"x": np.asarray(value, dtype=np.float32)})["y"]
                with client.infer("sigmoid", {"x": value}) as got:
                    assert got["y"].dtype == np.float32, name
                    np.testing.assert_array_equal(got["y"], want, err_msg=name)
            flat = client.empty(61, np.float32)
            flat[1:] = base[:3].reshape(-1)
            block = client.empty((2, 3, 4, 5), np.float32)
            block[...] = base.reshape(2, 3, 4, 5)
            placed = {
                "one element in": flat[1:].reshape(3, 4, 5),
                "a sub-block": block[1],
                "not contiguous": block.transpose(1, 0, 2, 3)[:, 0],
            }
            for name, value in placed.items():
                assert client.in_arena(value) == value.flags.c_contiguous, name
                with client.infer("sigmoid", {"x": value}) as got:
                    np.testing.assert_array_equal(got["y"], ref.run({"x": np.ascontiguousarray(value)})["y"], err_msg=name)
            del flat, block, placed, value
            assert arena_whole(client)
