"""The sans-IO pieces on their own: frame splitting, the arena allocator, output sizes."""

from __future__ import annotations

import os
import struct
from typing import Any, Dict

import msgpack
import numpy as np
import pytest

import rxd
from rxd import _shapes, _wire
from rxd._arena import Arena

YOLO = "(floor(floor(floor(height/2 - 1/2)/2)/2) + 1)*(floor(floor(floor(width/2 - 1/2)/2)/2) + 1) + (floor(floor(floor(floor(height/2 - 1/2)/2)/2)/2) + 1)*(floor(floor(floor(floor(width/2 - 1/2)/2)/2)/2) + 1) + (floor(floor(floor(floor(floor(height/2 - 1/2)/2)/2)/2)/2) + 1)*(floor(floor(floor(floor(floor(width/2 - 1/2)/2)/2)/2)/2) + 1)"


def test_formulas_of_input_dimensions_are_evaluated_exactly() -> None:
    assert _shapes.evaluate(YOLO, {"height": 320, "width": 320}) == 2100
    assert _shapes.evaluate(YOLO, {"height": 256, "width": 256}) == 1344
    assert _shapes.evaluate(YOLO, {"height": 333, "width": 111}) == 42 * 14 + 21 * 7 + 11 * 4
    assert _shapes.evaluate("ceiling(7/2) + Max(2, 3) - min(1, 4)", {}) == 6
    for bad in ["height + 1", "1/2", "2 - 3", "floor(", "sqrt(4)", "1/0"]:
        assert _shapes.evaluate(bad, {}) is None, bad


def test_output_area_from_names_formulas_and_the_warmup() -> None:
    yolo = {
        "inputs": [{"name": "images", "dtype": "float32", "dims": [-1, 3, -1, -1], "dim_names": ["batch", "", "height", "width"], "warmup_dims": [1, 3, 320, 320]}],
        "outputs": [{"name": "output0", "dtype": "float32", "dims": [-1, 22, -1], "dim_names": ["batch", "", YOLO], "warmup_dims": [1, 22, 2100]}],
    }
    assert _shapes.output_area_bytes(yolo, {"images": [2, 3, 256, 256]}, []) == 2 * 22 * 1344 * 4
    det = {
        "inputs": [{"name": "x", "dtype": "float32", "dims": [-1, 3, -1, -1], "dim_names": ["p.0", "", "p.1", "p.2"], "warmup_dims": [1, 3, 640, 640]}],
        "outputs": [{"name": "y", "dtype": "float32", "dims": [-1, 1, -1, -1], "dim_names": ["p.3", "", "p.4", "p.5"], "warmup_dims": [1, 1, 640, 640]}],
    }
    assert _shapes.output_area_bytes(det, {"x": [3, 3, 640, 640]}, []) == 3 * 640 * 640 * 4
    assert _shapes.output_area_bytes(det, {"x": [1, 3, 960, 960]}, []) is None


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


def test_frames_are_split_however_the_bytes_arrive() -> None:
    frames = [frame({"id": i, "outcome": {"ok": {"op": "status"}}}) for i in range(200)]
    frames.insert(50, frame({"id": 999, "blob": b"\x07" * 300_000}))  # larger than the scratch
    stream = b"".join(frames)
    for step in (1, 7, 4096, 1 << 20):
        reader = _wire.FrameReader(1 << 24)
        got = []
        pos = 0
        while pos < len(stream):
            buf = reader.get_buffer()
            n = min(len(buf), step, len(stream) - pos)
            buf[:n] = stream[pos : pos + n]
            pos += n
            got.extend(_wire.decode(b) for b in reader.buffer_updated(n))
        assert [g["id"] for g in got] == [f_id for f_id in list(range(50)) + [999] + list(range(50, 200))], step
        assert got[50]["blob"] == b"\x07" * 300_000
    reader = _wire.FrameReader(1000)
    buf = reader.get_buffer()
    buf[:4] = struct.pack("<I", 1001)
    with pytest.raises(_wire.FrameError):
        reader.buffer_updated(4)


def sealed_memfd(size: int) -> int:
    import fcntl

    fd = os.memfd_create("rxd-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, 1033, 0x0001 | 0x0002 | 0x0004)  # F_ADD_SEALS: seal, shrink, grow
    return fd


def test_the_allocator_aligns_coalesces_and_refuses_unsealed_arenas() -> None:
    arena = Arena(sealed_memfd(1 << 16), 1 << 16)
    a, b, c = arena.alloc(10), arena.alloc(100), arena.alloc(1000)
    assert a is not None and b is not None and c is not None
    assert [s.offset % 64 for s in (a, b, c)] == [0, 0, 0]
    assert arena.free_bytes() == (1 << 16) - 64 - 128 - 1024
    assert arena.alloc(1 << 16) is None
    b.release()
    a.release()
    c.release()
    assert arena.free_ranges() == [(0, 1 << 16)]
    view_slot = arena.alloc(4 * 6)
    assert view_slot is not None
    v = view_slot.view((2, 3), np.dtype(np.float32), writable=True)
    v[...] = 1.5
    view_slot.release()
    part = v[1]
    del v
    assert arena.free_ranges() != [(0, 1 << 16)]  # `part` still shows it
    assert float(part.sum()) == 4.5
    del part
    assert arena.free_ranges() == [(0, 1 << 16)]
    plain = os.memfd_create("rxd-test", os.MFD_CLOEXEC)
    os.ftruncate(plain, 4096)
    with pytest.raises(OSError, match="seal"):
        Arena(plain, 4096)


def test_a_request_from_a_template_is_the_message_encoded_in_full() -> None:
    """Infer frames filled in from a template (id, inline bytes, arena offsets, the output
    area's offset) decode to what encoding the whole message gives, whatever the request's
    options, placements and dtypes; requests that differ in any of them get their own."""
    from rxd._core import Call, Connection, Memory, Options

    arena = Arena(sealed_memfd(1 << 20), 1 << 20)
    conn = Connection({}, arena, Options(socket="unused", inline_threshold=1024), Memory())
    placed = arena.alloc(4 * 300)
    assert placed is not None
    in_arena = placed.view((300,), np.dtype(np.float32), writable=True)
    placed.release()
    in_arena[...] = 2.0
    signature = {
        "inputs": [{"name": "x", "dtype": "float32", "dims": [-1, 1000], "dim_names": ["batch", ""]}],
        "outputs": [{"name": "y", "dtype": "float32", "dims": [-1, 1000], "dim_names": ["batch", ""]}],
    }
    cases = [
        ({"x": np.arange(60, dtype=np.float32).reshape(3, 4, 5)}, {}),
        ({"x": np.arange(60, dtype=np.float32).reshape(3, 4, 5)[:, ::2]}, {}),  # not contiguous
        ({"a": np.array([True, False]), "b": np.arange(5, dtype=np.int64), "c": np.float16(1.5) * np.ones((2, 2), np.float16)}, {"version": 3, "outputs": ["y", "z"], "priority": 7, "timeout": 0.25}),
        ({"x": in_arena, "big": np.ones(1000, np.float32)}, {"priority": 0, "timeout": 0.0}),  # by reference, copied in
        ({"x": np.ones((4, 1000), np.float32)}, {"signature": signature}),  # an output area
        (np.ones((1, 1000), np.float32), {"signature": signature}),  # one array, named by the signature
    ]
    areas = 0
    for inputs, options in cases:
        kw: dict = {"version": None, "outputs": None, "priority": None, "timeout": None, "signature": None}
        kw.update(options)
        for _ in range(2):  # the template is made, then used
            call = conn.infer(conn.new("infer"), "m", inputs, copy=False, **kw)
            assert len(call.frame) == 1
            frame = bytes(call.frame[0])
            (n,) = struct.unpack_from("<I", frame)
            assert n == len(frame) - 4
            full = Call(call.id, "infer")
            full.area = call.area
            sig = kw["signature"]
            conn._build_infer(full, "m", inputs, kw["version"], kw["outputs"], kw["priority"], kw["timeout"], sig)
            want = _wire.decode(b"".join(full.frame)[4:])
            got = _wire.decode(frame[4:])
            # Each encoding copied inputs into slots and sized an output area of its own.
            held = {s.offset for s in call.held}
            for g, w in zip(got["body"]["args"]["inputs"], want["body"]["args"]["inputs"]):
                if "arena" in g["data"] and g["data"]["arena"]["offset"] != placed.offset:
                    assert g["data"]["arena"]["offset"] in held
                    w["data"]["arena"]["offset"] = g["data"]["arena"]["offset"]
            if call.area is not None:
                areas += 1
                assert full.area is not None and got["body"]["args"]["output_area"] == {"offset": call.area.offset, "len": call.area.nbytes}
                want["body"]["args"]["output_area"]["offset"] = call.area.offset
            assert got == want, (inputs, options)
            full.release()
            conn.pending.pop(call.id).release()
    assert areas == 4  # two requests with an output area in each of two cases
    assert len(conn.memory.templates) == len(cases)
    del in_arena, cases, inputs, call, full
    assert arena.free_ranges() == [(0, 1 << 20)]


def test_an_answer_like_the_last_one_is_cut_and_any_other_decoded_in_full() -> None:
    """The answer to a templated request whose bytes match the previous answer's everywhere
    but at the id and the inline outputs gives the same result as decoding it; any other
    answer (another version, another shape, an error) is decoded in full and learnt."""
    from rxd._core import Connection, Memory, Options

    conn = Connection({}, None, Options(socket="unused"), Memory())
    x = np.zeros((3, 4, 5), np.float32)

    def answer(rid: int, version: int = 1, shape: tuple = (3, 4, 5), ok: bool = True) -> bytes:
        y = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + rid
        outcome = {"ok": {"op": "infer", "args": {"model": "m", "version": version, "outputs": [
            {"name": "y", "dtype": "float32", "shape": list(shape), "data": {"inline": y.tobytes()}},
            {"name": "n", "dtype": "int64", "shape": [], "data": {"inline": np.int64(rid).tobytes()}},
        ]}}} if ok else {"err": {"code": 302, "message": "no such model"}}
        return frame({"id": rid, "outcome": outcome})

    def exchange(**kw: Any) -> Any:
        call = conn.infer(conn.new("infer"), "m", {"x": x}, version=None, outputs=None, priority=None, timeout=None, copy=False, signature=None)
        data = answer(call.id, **kw)
        buf = conn.reader.get_buffer()
        buf[: len(data)] = data
        assert conn.feed(len(data)) == [call]
        return call, conn.result(call) if kw.get("ok", True) else None

    for rid in range(1, 400):  # ids of every width up to two bytes
        kw: Dict[str, Any] = {}
        if rid % 50 == 7:
            kw = {"version": 2}
        elif rid % 50 == 8:
            kw = {"shape": (2, 5)}
        elif rid % 50 == 9:
            kw = {"ok": False}
        if kw.get("ok", True):
            call, got = exchange(**kw)
            cut = call.cuts is not None
            # Cut out only when the previous answer looked the same.
            assert cut == (rid > 1 and rid % 50 not in (7, 8, 9, 10)), rid
            shape = kw.get("shape", (3, 4, 5))
            np.testing.assert_array_equal(got["y"], np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + rid)
            assert got["n"].shape == () and int(got["n"]) == rid
            assert got.version == kw.get("version", 1) and got.model == "m" and got.dtypes == {"y": "float32", "n": "int64"}
        else:
            call = conn.infer(conn.new("infer"), "m", {"x": x}, version=None, outputs=None, priority=None, timeout=None, copy=False, signature=None)
            data = answer(call.id, ok=False)
            conn.reader.get_buffer()[: len(data)] = data
            conn.feed(len(data))
            with pytest.raises(rxd.RxdError) as e:
                conn.result(call)
            assert e.value.code == 302
    assert not conn.pending
