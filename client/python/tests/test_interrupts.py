"""Asynchronous exceptions — a signal handler that raises, as Python's own SIGINT handler raises
KeyboardInterrupt — landing anywhere in a blocking call: before its request is sent, while it
is sent, while its thread reads for everyone, between an answer read and its bookkeeping, on
the socket and on the ring. Afterwards every call gets its own answer (equal to in-process ONNX
Runtime), nothing stays pending, no thread hangs and the arena is whole again."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

import rxd
from conftest import Daemon, arena_whole, reference

#: How long each case fires exceptions, and at most how many.
SECONDS = 2.5
ITERATIONS = 400


class Boom(Exception):
    """What the signal handler raises."""


Case = Tuple[str, Dict[str, np.ndarray], Dict[str, np.ndarray]]


def cases(rng: np.random.Generator) -> List[Case]:
    """Small inputs that travel inline (and fit a ring slot), and 221 KiB ones copied into the
    arena (slots held until the answer), each with its expected outputs."""
    out: List[Case] = []
    for _ in range(12):
        x = {"x": rng.standard_normal((3, 4, 5)).astype(np.float32)}
        out.append(("sigmoid", x, reference("sigmoid").run(x)))
    for _ in range(4):
        x = {"x": rng.random((2, 3, 48, 192), dtype=np.float32)}
        out.append(("ppocr_cls", x, reference("ppocr_cls").run(x)))
    return out


def same(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(np.array_equal(got[k], w) for k, w in want.items())


def ask(client: rxd.Client, case: Case, **kw: Any) -> Dict[str, np.ndarray]:
    model, x, _ = case
    with client.infer(model, x, **kw) as r:
        return {k: np.array(r[k]) for k in r.keys()}


def interrupted(client: rxd.Client, all_cases: List[Case], seed: int) -> Dict[str, int]:
    """Calls, each with a one-shot timer whose handler raises after 20 µs to 2 ms (log-uniform):
    before, during or after the call. Calls that return must return their own answer."""
    pick = random.Random(seed)
    seen = {"answered": 0, "interrupted": 0, "closed": 0}
    end = time.monotonic() + SECONDS
    for _ in range(ITERATIONS):
        if time.monotonic() > end:
            break
        link = client._link
        live = link is not None and not link.dead
        case = pick.choice(all_cases)
        delay = 20e-6 * math.exp(pick.random() * math.log(100))
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                got = ask(client, case)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Boom:
            seen["interrupted"] += 1
            # An exception that cut a send or a read short closes the connection: the next
            # call connects again.
            seen["closed"] += int(live and link is not None and link.dead)
            continue
        assert same(got, case[2]), f"{case[0]}: another call's answer"
        seen["answered"] += 1
    return seen


@pytest.mark.parametrize("threads", [0, 3], ids=["alone", "with-threads"])
@pytest.mark.parametrize("ring", [0, 4], ids=["socket", "ring"])
def test_exceptions_landing_anywhere_in_blocking_calls_leave_the_connection_whole(daemon: Daemon, ring: int, threads: int) -> None:
    rng = np.random.default_rng(41 + ring + threads)
    all_cases = cases(rng)
    errors: List[str] = []
    closed = [0]
    answered = [0]
    stop = threading.Event()

    def boom(signum: int, frame: Any) -> None:
        raise Boom()

    old = signal.signal(signal.SIGALRM, boom)
    try:
        with rxd.Client(daemon.socket, ring_entries=ring) as client:
            for case in all_cases:  # models loaded, output areas sized
                assert same(ask(client, case), case[2])

            def work(seed: int) -> None:
                # Other threads' calls beside the interrupted ones: each gets its own answer
                # (or, when an interrupted send or read had to close the connection, a clear
                # ConnectionClosed), none hangs.
                pick = random.Random(seed)
                try:
                    while not stop.is_set():
                        case = pick.choice(all_cases)
                        try:
                            got = ask(client, case, timeout=10.0)
                        except rxd.ConnectionClosed:
                            closed[0] += 1
                            continue
                        if not same(got, case[2]):
                            errors.append(f"thread {seed}, {case[0]}: another call's answer")
                        answered[0] += 1
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(f"thread {seed}: {e!r}")

            workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
            for t in workers:
                t.start()
            try:
                seen = interrupted(client, all_cases, seed=ring + threads)
            finally:
                stop.set()
                for t in workers:
                    t.join(30)
            assert not any(t.is_alive() for t in workers), "a thread hangs"
            assert not errors, errors[:5]
            # Most of the main thread's calls are cut short when others share the connection.
            assert seen["interrupted"] >= 50 and seen["answered"] >= (1 if threads else 10), seen
            assert answered[0] >= 3 * threads, (answered, closed)
            if ring:
                assert (client.ring_requests or 0) >= 5, "the ring went unused"
            print(f"ring={ring} threads={threads}: {seen}, {client.ring_requests} through the ring; the other threads: {answered[0]} answered, {closed[0]} ConnectionClosed")

            # The connection (or the one that replaced it) answers every call correctly, lets
            # the answers to the abandoned requests free their slots, and ends whole.
            for case in all_cases:
                assert same(ask(client, case, timeout=5.0), case[2])
            link = client._link
            assert link is not None

            def settled() -> bool:
                ask(client, all_cases[0], timeout=5.0)
                return not link.conn.pending

            deadline = time.monotonic() + 20
            while not settled():
                assert time.monotonic() < deadline, f"{len(link.conn.pending)} requests pending forever"
                time.sleep(0.02)
            assert link.reader is None
            assert arena_whole(client), client.arena_free_ranges()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
