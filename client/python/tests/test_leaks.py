"""No leaks: requests that are cancelled, time out or meet exceptions give their arena slots
back (once the daemon has answered them), the daemon's fds stay flat, and a view of the arena
never changes or disappears under its owner."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from typing import Any, Dict, List

import numpy as np
import pytest

import rxd
from conftest import Daemon, arena_whole, reference


class Boom(Exception):
    """An exception of the caller's own."""


def wait_for(cond: Any, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def fds_settle(daemon: Daemon, want: int) -> None:
    wait_for(lambda: daemon.fds() <= want, f"the daemon holds {daemon.fds()} fds, {want} before")


def cls_input(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    return {"x": rng.random((2, 3, 48, 192), dtype=np.float32)}  # 221 KiB: through the arena


async def test_1000_requests_with_cancellations_timeouts_and_exceptions_leak_nothing(daemon: Daemon) -> None:
    rng = np.random.default_rng(1)
    pick = random.Random(1)
    baseline = daemon.fds()
    ref = reference("ppocr_cls")
    fixed = cls_input(rng)
    want = ref.run(fixed)["save_infer_model/scale_0.tmp_1"]
    seen: Dict[str, int] = {}

    async with rxd.AsyncClient(daemon.socket, inline_threshold=0) as client:
        connected = daemon.fds()
        assert arena_whole(client)

        async def one(kind: str) -> None:
            placed = None
            try:
                if kind == "ok":
                    with await client.infer("ppocr_cls", fixed) as r:
                        np.testing.assert_allclose(r["save_infer_model/scale_0.tmp_1"], want, rtol=1e-5, atol=1e-6)
                elif kind == "arena-input":
                    placed = client.empty((2, 3, 48, 192))
                    placed[...] = fixed["x"]
                    r = await client.infer("ppocr_cls", {"x": placed})
                    del r  # never closed: collected
                elif kind == "cancel":
                    task = asyncio.ensure_future(client.infer("ppocr_cls", cls_input(rng)))
                    await asyncio.sleep(pick.random() * 0.003)
                    task.cancel()
                    try:
                        (await task).close()
                    except asyncio.CancelledError:
                        pass
                elif kind == "wait-for":
                    await asyncio.wait_for(client.infer("ppocr_cls", cls_input(rng)), pick.random() * 0.004)
                elif kind == "deadline":
                    await client.infer("ppocr_cls", cls_input(rng), timeout=0.0005)
                elif kind == "raise-holding":
                    with await client.infer("ppocr_cls", fixed) as r:
                        _ = r["save_infer_model/scale_0.tmp_1"]
                        raise Boom()
                elif kind == "bad-dtype":
                    await client.infer("ppocr_cls", {"x": fixed["x"].astype(np.float64)})
                elif kind == "unsendable":
                    # One input placed in the arena, then one that cannot be sent at all.
                    await client.infer("silero_vad", {"input": np.zeros((1, 512), np.float32), "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(["x"])})
                seen[kind + ":ok"] = seen.get(kind + ":ok", 0) + 1
            except (asyncio.TimeoutError, rxd.DeadlineExceeded, Boom, rxd.DtypeMismatch, TypeError) as e:
                seen[f"{kind}:{type(e).__name__}"] = seen.get(f"{kind}:{type(e).__name__}", 0) + 1
            finally:
                del placed

        kinds = ["ok", "arena-input", "cancel", "wait-for", "deadline", "raise-holding", "bad-dtype", "unsendable"]
        for _ in range(25):
            await asyncio.gather(*(one(pick.choice(kinds)) for _ in range(40)))
        assert sum(seen.values()) == 1000, seen
        # Every kind happened, and the abandoned ones really were given up mid-flight.
        assert all(any(k.startswith(kind + ":") for k in seen) for kind in kinds), seen
        assert seen.get("cancel:ok", 0) < 125 and seen.get("wait-for:TimeoutError", 0) > 0, seen
        # Answers to abandoned requests may still be on their way: their slots come back then.
        proto = client._proto
        assert proto is not None
        deadline = time.monotonic() + 20
        while proto.conn.pending:
            assert time.monotonic() < deadline, f"{len(proto.conn.pending)} requests never answered"
            await asyncio.sleep(0.02)
        gc.collect()
        assert arena_whole(client), client.arena_free_ranges()
        assert daemon.fds() <= connected, "the daemon's fds moved while the client was connected"
    fds_settle(daemon, baseline)


def test_blocking_threads_with_timeouts_and_exceptions_leak_nothing(daemon: Daemon) -> None:
    baseline = daemon.fds()
    errors: List[BaseException] = []
    outcomes: Dict[str, int] = {}
    lock = threading.Lock()
    with rxd.Client(daemon.socket, inline_threshold=0) as client:
        connected = daemon.fds()

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            pick = random.Random(seed)
            for _ in range(60):
                kind = pick.choice(["ok", "deadline", "raise", "det"])
                try:
                    if kind == "ok":
                        client.infer("ppocr_cls", cls_input(rng)).close()
                    elif kind == "deadline":
                        client.infer("ppocr_cls", cls_input(rng), timeout=0.0005)
                    elif kind == "raise":
                        with client.infer("ppocr_cls", cls_input(rng)) as r:
                            _ = r["save_infer_model/scale_0.tmp_1"]
                            raise Boom()
                    else:
                        # Long runs that others' short deadlines queue behind (client-side
                        # waits end at timeout + 0.5 s).
                        client.infer("ppocr_det", {"x": rng.random((1, 3, 640, 640), dtype=np.float32)}, timeout=0.01)
                    name = kind + ":ok"
                except (rxd.DeadlineExceeded, Boom) as e:
                    name = f"{kind}:{type(e).__name__}"
                except BaseException as e:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(e)
                    return
                with lock:
                    outcomes[name] = outcomes.get(name, 0) + 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sum(outcomes.values()) == 240, outcomes
        assert outcomes.get("raise:Boom", 0) > 0, outcomes
        link = client._link
        assert link is not None
        wait_for(lambda: not link.conn.pending or bool(client.status()) and not link.conn.pending, "answers never came")
        assert arena_whole(client), client.arena_free_ranges()
        assert daemon.fds() <= connected
    fds_settle(daemon, baseline)


async def test_asyncio_answers_resume_their_tasks_however_they_are_awaited(daemon: Daemon) -> None:
    """An answer resumes its task straight from the read callback: tasks awaiting directly,
    through ``wait_for``, ``gather`` and ``shield`` each get their own answer, also while
    other tasks' requests time out or are cancelled, and the connection ends whole."""
    ref = reference("sigmoid")
    rng = np.random.default_rng(7)
    async with rxd.AsyncClient(daemon.socket) as client:

        async def one(k: int) -> None:
            x = rng.standard_normal((3, 4, 5)).astype(np.float32)
            want = ref.run({"x": x})["y"]
            if k % 4 == 0:
                r = await client.infer("sigmoid", {"x": x})
            elif k % 4 == 1:
                r = await asyncio.wait_for(client.infer("sigmoid", {"x": x}), 30)
            elif k % 4 == 2:
                r = await asyncio.shield(client.infer("sigmoid", {"x": x}))
            else:
                (r,) = await asyncio.gather(client.infer("sigmoid", {"x": x}))
            with r:
                np.testing.assert_allclose(r["y"], want, rtol=1e-6)

        async def abandoned() -> None:
            x = rng.random((1, 3, 640, 640), dtype=np.float32)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.infer("ppocr_det", {"x": x}), 0.001)
            task = asyncio.ensure_future(client.infer("ppocr_det", {"x": x}))
            await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        for _ in range(5):
            await asyncio.gather(abandoned(), *(one(k) for k in range(40)))
        for k in range(200):  # one at a time: answers like the last, cut out
            await one(k)
        proto = client._proto
        assert proto is not None
        while proto.conn.pending:
            await asyncio.sleep(0.02)
        assert arena_whole(client), client.arena_free_ranges()


def test_threads_sharing_a_blocking_client_each_get_their_own_answers(daemon: Daemon) -> None:
    """A thread alone on a connection reads its answer itself, straight after sending; when
    others join, one reads for all. Every answer reaches the thread that asked — small inline
    requests going in and out of the single-thread path, beside slow requests that keep the
    reader's role taken for a while."""
    ref = reference("sigmoid")
    errors: List[BaseException] = []
    with rxd.Client(daemon.socket) as client:
        x0 = np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5)
        np.testing.assert_array_equal(client.infer("sigmoid", {"x": x0}, copy=True)["y"], ref.run({"x": x0})["y"])

        def small(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for i in range(150):
                    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
                    with client.infer("sigmoid", {"x": x}) as r:
                        np.testing.assert_array_equal(r["y"], ref.run({"x": x})["y"])
                    if i % 50 == 0:
                        time.sleep(0.01)  # now and then alone on the connection
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def slow() -> None:
            rng = np.random.default_rng(99)
            try:
                for _ in range(3):
                    client.infer("ppocr_det", {"x": rng.random((1, 3, 640, 640), dtype=np.float32)}).close()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=small, args=(k,)) for k in range(3)] + [threading.Thread(target=slow)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        link = client._link
        assert link is not None and not link.conn.pending and link.reader is None
        assert arena_whole(client), client.arena_free_ranges()


def test_an_exception_while_a_lone_thread_reads_frees_its_slots(daemon: Daemon) -> None:
    """A thread alone on the connection that is interrupted while it waits for its answer (here
    by a signal handler's exception) gives up its request: its arena slots come back when the
    answer does, read by the next request."""
    import signal

    x = np.random.default_rng(5).random((1, 3, 640, 640), dtype=np.float32)  # copied into the arena

    def interrupt(signum: int, frame: Any) -> None:
        raise Boom()

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with rxd.Client(daemon.socket) as client:
            client.infer("ppocr_det", {"x": x}).close()  # loaded, and the output area sized
            for _ in range(3):
                signal.setitimer(signal.ITIMER_REAL, 0.005)
                with pytest.raises(Boom):
                    client.infer("ppocr_det", {"x": x}).close()
                    time.sleep(1)  # answered before the alarm: wait for it here instead
            signal.setitimer(signal.ITIMER_REAL, 0)
            link = client._link
            assert link is not None and link.reader is None
            s = np.zeros((3, 4, 5), np.float32)
            wait_for(lambda: (client.infer("sigmoid", {"x": s}).close(), not link.conn.pending)[1], "the abandoned answers never came")
            assert arena_whole(client), client.arena_free_ranges()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_view_never_changes_and_outlives_its_result_safely(daemon: Daemon) -> None:
    rng = np.random.default_rng(3)
    x = rng.random((1, 3, 320, 320), dtype=np.float32)
    want = reference("yolov8n").run({"images": x})["output0"]
    with rxd.Client(daemon.socket) as client:
        result = client.infer("yolov8n", {"images": x})
        view = result["output0"]
        assert result.in_arena("output0") and not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0, 0] = 1.0  # read-only: nobody writes the daemon's answer by mistake
        part = view[0, :4]  # a numpy view of the view
        result.close()
        with pytest.raises(rxd.ResultClosed):
            result["output0"]
        # The range stays reserved while any array shows it: later requests (whose outputs
        # would otherwise reuse the range first) never change it.
        held = client.arena_free_bytes()
        assert held < client.arena_bytes
        for _ in range(20):
            y = rng.random((1, 3, 320, 320), dtype=np.float32)
            client.infer("yolov8n", {"images": y}).close()
        np.testing.assert_array_equal(view, want)
        del view
        gc.collect()
        assert client.arena_free_bytes() == held, "freed while a view of the view was alive"
        np.testing.assert_array_equal(part, want[0, :4])
        del part
        assert arena_whole(client)

        # A result dropped without being closed gives its range back too.
        r2 = client.infer("yolov8n", {"images": x})
        v2 = r2["output0"]
        del r2
        gc.collect()
        np.testing.assert_array_equal(v2, want)
        assert not arena_whole(client)
        del v2
        assert arena_whole(client)
