"""Errors are exceptions carrying the daemon's stable code, one class per code; a restarted
daemon is reconnected to; a peer that is not an admin is refused admin operations."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Iterator, List

import numpy as np
import pytest

import rxd
from conftest import Daemon, as_nobody, reference


def test_daemon_errors_raise_their_class_with_the_wire_code(daemon: Daemon) -> None:
    x = np.zeros((1, 3, 320, 320), np.float32)
    with rxd.Client(daemon.socket) as client:
        cases = [
            (lambda: client.infer("no_such_model", {"x": x}), rxd.UnknownModel, 300, rxd.ModelError),
            (lambda: client.infer("yolov8n", {"images": x[0]}), rxd.ShapeMismatch, 204, rxd.InvalidRequest),
            (lambda: client.infer("yolov8n", {"images": x.astype(np.float64)}), rxd.DtypeMismatch, 203, rxd.InvalidRequest),
            (lambda: client.infer("yolov8n", {"pictures": x}), rxd.UnknownInput, 202, rxd.InvalidRequest),
            (lambda: client.infer("silero_vad", {"input": np.zeros((1, 512), np.float32)}), rxd.MissingInput, 201, rxd.InvalidRequest),
            (lambda: client.infer("yolov8n", {"images": x}, outputs=["nope"]), rxd.UnknownOutput, 206, rxd.InvalidRequest),
            (lambda: client.infer("yolov8n", {"images": np.zeros((1, 3, 320, 9000), np.float32)}), rxd.TensorTooLarge, 207, rxd.InvalidRequest),
            (lambda: client.model_info("digits", 9), rxd.UnknownModel, 300, rxd.ModelError),
        ]
        for call, cls, code, base in cases:
            with pytest.raises(cls) as caught:
                call()
            e = caught.value
            assert e.code == code and isinstance(e, base) and isinstance(e, rxd.RxdError)
            assert e.name == cls.name and str(code) in str(e) and e.message
        assert client.health()["state"] in ("healthy", "degraded")  # the connection goes on


def test_every_wire_code_has_its_class() -> None:
    from rxd import errors

    for code, cls in [(100, rxd.MalformedMessage), (104, rxd.BadRequestId), (400, rxd.PermissionDenied), (500, rxd.Busy), (501, rxd.DeadlineExceeded), (502, rxd.ShuttingDown), (503, rxd.OverBudget), (504, rxd.UnreadAnswers), (505, rxd.ConnectionLimit), (506, rxd.ConnectionTimeout), (600, rxd.ArenaUnavailable), (601, rxd.ArenaOutOfRange), (602, rxd.ArenaMisaligned), (603, rxd.OutputRegionTooSmall), (900, rxd.InferenceFailed), (901, rxd.Internal)]:
        e = errors.from_wire({"code": code, "message": "m", "needed_bytes": 64})
        assert type(e) is cls and e.code == code and e.needed_bytes == 64
    unknown = errors.from_wire({"code": 777, "message": "new"})
    assert type(unknown) is rxd.RxdError and unknown.code == 777
    assert issubclass(rxd.Timeout, rxd.DeadlineExceeded) and issubclass(rxd.Timeout, TimeoutError)
    assert issubclass(rxd.Busy, rxd.Unavailable) and issubclass(rxd.ConnectionClosed, ConnectionError)


@pytest.fixture
def small() -> Iterator[Daemon]:
    """A daemon of its own (restarted by the tests), with a model queue of 2."""
    d = Daemon(["digits", "ppocr_det"], config="queue-capacity = 2")
    yield d
    d.close()


async def test_a_full_queue_is_busy_and_a_late_request_deadline_exceeded(small: Daemon) -> None:
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    async with rxd.AsyncClient(small.socket) as client:
        outcomes = await asyncio.gather(*(client.infer("ppocr_det", {"x": x}, copy=True) for _ in range(12)), return_exceptions=True)
        busy = [o for o in outcomes if isinstance(o, rxd.Busy)]
        ok = [o for o in outcomes if isinstance(o, rxd.Result)]
        assert busy and ok and len(busy) + len(ok) == 12, outcomes
        assert all(o.code == 500 for o in busy)
        # Queued behind a long run with a 1 ms deadline: answered deadline_exceeded, never run.
        # The long run must have started (a worker took its batch): a request queued beside it
        # before that could join its batch, and be answered only when the run ends.
        async def batches() -> int:
            return next(m["batches"] for m in await client.models() if m["name"] == "ppocr_det")

        before = await batches()
        first = asyncio.ensure_future(client.infer("ppocr_det", {"x": x}))
        for _ in range(1000):
            if await batches() > before:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(rxd.DeadlineExceeded) as late:
            await client.infer("ppocr_det", {"x": x}, timeout=0.001)
        assert late.value.code == 501 and not isinstance(late.value, rxd.Timeout)
        (await first).close()


def test_the_blocking_client_reconnects_after_a_restart(small: Daemon) -> None:
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    want = reference("digits").run({"input": x})
    with rxd.Client(small.socket, connect_timeout=30) as client:
        np.testing.assert_array_equal(client.infer("digits", {"input": x})["label"], want["label"])
        # A request in flight when the daemon dies fails; the next call connects again.
        big = np.random.default_rng(2).random((1, 3, 1600, 1600), dtype=np.float32)
        failures: List[BaseException] = []

        def slow() -> None:
            try:
                client.infer("ppocr_det", {"x": big})
            except BaseException as e:  # noqa: BLE001 - checked below
                failures.append(e)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        small.kill()
        t.join(30)
        assert len(failures) == 1 and isinstance(failures[0], rxd.ConnectionClosed), failures
        restart = threading.Timer(0.5, small.start)
        restart.start()
        got = client.infer("digits", {"input": x})  # waits for the daemon to come back
        restart.join()
        np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
        assert client.arena_bytes > 0 and client.status()["pid"] == small.pid


async def test_the_asyncio_client_reconnects_after_a_restart(small: Daemon) -> None:
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    want = reference("digits").run({"input": x})
    async with rxd.AsyncClient(small.socket, connect_timeout=30) as client:
        (await client.infer("digits", x)).close()
        pending = asyncio.ensure_future(client.infer("ppocr_det", {"x": np.zeros((1, 3, 1600, 1600), np.float32)}))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(small.stop)  # SIGTERM: what it read is answered, then it closes
        outcome = await asyncio.gather(pending, return_exceptions=True)
        assert isinstance(outcome[0], (rxd.Result, rxd.ConnectionClosed, rxd.ShuttingDown)), outcome
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, lambda: threading.Thread(target=small.start).start())
        got = await client.infer("digits", x)
        np.testing.assert_array_equal(got["label"], want["label"])


def test_a_peer_that_is_not_an_admin_is_refused_admin_operations(daemon: Daemon) -> None:
    def attempt() -> str:
        with rxd.Client(daemon.socket) as c:
            out = [type(c.infer("digits", np.zeros((1, 64), np.float32))).__name__]
            for op in (lambda: c.configure("digits", instances=2), lambda: c.unload("digits"), lambda: c.infer("digits", np.zeros((1, 64), np.float32), priority=200)):
                try:
                    op()
                    out.append("allowed")
                except rxd.PermissionDenied as e:
                    out.append(f"refused {e.code}")
            return ",".join(out)

    assert as_nobody(attempt) == "returned 'Result,refused 400,refused 400,refused 400'"
