"""The shared-memory ring (PROTOCOL.md, "The ring") from Python: inferences made one at a time
go through shared memory and come back equal to in-process ONNX Runtime, bit for bit — small
inputs inline in the slot, large ones through the arena, outputs inline, in the arena, or
redirected to the socket when they do not fit a slot; calls from several threads at once share
the ring and the socket; a daemon that grants no ring leaves the socket serving."""

from __future__ import annotations

import threading
from typing import Dict, List

import numpy as np

import rxd
from conftest import Daemon, reference

rng = np.random.default_rng(26)


def test_one_call_at_a_time_goes_through_the_ring_and_equals_onnxruntime(daemon: Daemon) -> None:
    with rxd.Client(daemon.socket, ring_entries=4, ring_slot_bytes=4096) as c:
        assert c.welcome["ring"]["entries"] == 4
        ref = reference("digits")
        for i in range(200):
            x = rng.random((1 + i % 9, 64), dtype=np.float32) * 16
            got = c.infer("digits", {"input": x})
            want = ref.run({"input": x})
            for name, w in want.items():
                np.testing.assert_array_equal(got[name], w, err_msg=f"call {i}: {name}")
        assert c.ring_requests == 200
        # A 1.2 MB image through the arena, its outputs in the arena, the request in a slot.
        x = rng.random((1, 3, 320, 320), dtype=np.float32)
        got = c.infer("yolov8n", {"images": x})
        for name, w in reference("yolov8n").run({"images": x}).items():
            np.testing.assert_array_equal(got[name], w, err_msg=name)
        assert c.ring_requests == 201


def test_an_answer_larger_than_a_slot_comes_on_the_socket(daemon: Daemon) -> None:
    # An 80 KiB arena: 300 rows of digits (75 KiB) go through it, their scores (14 KiB) have
    # no room there and come inline: more than a 12 KiB slot, so the ring redirects them to
    # the socket.
    with rxd.Client(daemon.socket, arena_bytes=80 << 10, ring_entries=2, ring_slot_bytes=12 << 10) as c:
        ref = reference("digits")
        for rows in (300, 1, 300, 7):
            x = rng.random((rows, 64), dtype=np.float32) * 16
            got = c.infer("digits", {"input": x})
            for name, w in ref.run({"input": x}).items():
                np.testing.assert_array_equal(got[name], w, err_msg=f"{rows} rows: {name}")
        assert c.ring_requests == 4
        assert c._link.conn.ring.redirected == 2  # type: ignore[union-attr]


def test_threads_share_the_ring_and_the_socket(daemon: Daemon) -> None:
    ref = reference("digits")
    cases = [rng.random((1 + i % 5, 64), dtype=np.float32) * 16 for i in range(96)]
    wants = [ref.run({"input": x}) for x in cases]
    errors: List[str] = []
    with rxd.Client(daemon.socket, ring_entries=4) as c:

        first = threading.Event()

        def work(t: int) -> None:
            for i in range(t, len(cases), 6):
                got = c.infer("digits", {"input": cases[i]})
                first.set()
                for name, w in wants[i].items():
                    if not np.array_equal(got[name], w):
                        errors.append(f"case {i}: {name}")

        # One thread's first request is alone on the connection (so it takes the ring);
        # then the six share it. Started together, they could all find another's request in
        # flight every time, and none took the ring (seen once on a loaded machine).
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        threads[0].start()
        assert first.wait(30)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        used = c.ring_requests
        assert used is not None and 0 < used <= len(cases)


def test_no_ring_unless_asked_and_the_socket_without_one(daemon: Daemon) -> None:
    with rxd.Client(daemon.socket) as c:
        assert "ring" not in c.welcome and c.ring_requests is None
    x: Dict[str, np.ndarray] = {"input": rng.random((2, 64), dtype=np.float32)}
    with rxd.Client(daemon.socket, ring_entries=0) as c:
        out = c.infer("digits", x)
        np.testing.assert_array_equal(out["label"], reference("digits").run(x)["label"])
