"""Two or more versions of the Python client side by side on one daemon, in one process: the
one-client sigmoid loop of ``bench.py`` (blocking and asyncio) for each version, in-process
ONNX Runtime and ``rxctl bench -c 1`` as the yardsticks, in alternating rounds, so that a change to the client's
per-request path is judged against its old self under the same load.

    python compare.py [LABEL=]OLD_SRC [LABEL=]NEW_SRC ...

Each argument is a source tree of the package (the folder holding ``rxd/``, e.g. an older
commit's ``client/python/src`` from ``git archive``), optionally named by a label; each is
imported under a name of its own. Prints, per path, the median, lowest and first-quartile p50 over the rounds (µs), and
the median added p50 (the path's p50 minus in-process ORT's of the same round) over the Rust
async client's.
Environment: ``RXD_BIN``, ``RXCTL_BIN``, ``RXD_REPO_ROOT`` as for ``bench.py``;
``RXD_COMPARE_ROUNDS`` (default 16) and ``RXD_COMPARE_N`` (requests per round and path,
default 600).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from bench import ort_session, rust_bench  # noqa: E402
from conftest import Daemon, model_file  # noqa: E402

ROUNDS = int(os.environ.get("RXD_COMPARE_ROUNDS", "16"))
N = int(os.environ.get("RXD_COMPARE_N", "600"))


def load(trees: List[str]) -> List[Any]:
    """Each tree's ``rxd`` package, copied into a scratch folder as ``rxd_v<k>`` (its imports
    are relative, so it runs under any name)."""
    scratch = tempfile.mkdtemp(prefix="rxd-compare-")
    sys.path.insert(0, scratch)
    mods = []
    for k, tree in enumerate(trees):
        shutil.copytree(pathlib.Path(tree) / "rxd", pathlib.Path(scratch) / f"rxd_v{k}")
        mods.append(importlib.import_module(f"rxd_v{k}"))
    return mods


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    labels = [a.split("=", 1)[0] if "=" in a else a for a in sys.argv[1:]]
    trees = [a.split("=", 1)[1] if "=" in a else a for a in sys.argv[1:]]
    mods = load(trees)
    d = Daemon(["sigmoid"])
    x = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
    p50s: Dict[str, List[float]] = {}
    loop = asyncio.new_event_loop()

    def blocking(client: Any) -> float:
        out = []
        for i in range(N // 10):
            client.infer("sigmoid", {"x": x}).close()
        for i in range(N):
            x.flat[0] = i % 97
            t = time.perf_counter()
            client.infer("sigmoid", {"x": x}).close()
            out.append(time.perf_counter() - t)
        return float(np.percentile(out, 50))

    async def asyncio_run(client: Any) -> float:
        out = []
        for i in range(N // 10):
            (await client.infer("sigmoid", {"x": x})).close()
        for i in range(N):
            x.flat[0] = i % 97
            t = time.perf_counter()
            (await client.infer("sigmoid", {"x": x})).close()
            out.append(time.perf_counter() - t)
        return float(np.percentile(out, 50))

    session = ort_session(model_file("sigmoid"), 1)

    def in_process() -> float:
        out = []
        for i in range(N):
            x.flat[0] = i % 97
            t = time.perf_counter()
            session.run(None, {"x": x})
            out.append(time.perf_counter() - t)
        return float(np.percentile(out, 50))

    try:
        clients = []
        for k, m in enumerate(mods):
            a = m.AsyncClient(d.socket)
            loop.run_until_complete(a.connect())
            clients.append((labels[k], m.Client(d.socket), a))
        for r in range(ROUNDS):
            p50s.setdefault("in-process ORT", []).append(in_process())
            report = rust_bench(d, "sigmoid", concurrency=1, requests=N)
            p50s.setdefault("Rust async client (rxctl bench -c 1)", []).append(report["latency_ms"]["p50"] / 1e3)
            for name, c, a in clients if r % 2 == 0 else clients[::-1]:
                p50s.setdefault(f"{name}: Client", []).append(blocking(c))
                p50s.setdefault(f"{name}: AsyncClient", []).append(loop.run_until_complete(asyncio_run(a)))
        for _, c, a in clients:
            c.close()
            loop.run_until_complete(a.close())
    finally:
        loop.close()
        d.close()
    print(f"sigmoid, one client, p50 µs over {ROUNDS} alternating rounds of {N} requests\n")
    print("| path | median | lowest | first quartile | added / Rust async's |")
    print("|---|---:|---:|---:|---:|")
    ort = p50s["in-process ORT"]
    rust = statistics.median(r - o for r, o in zip(p50s["Rust async client (rxctl bench -c 1)"], ort))
    for name, v in p50s.items():
        added = statistics.median(p - o for p, o in zip(v, ort))
        ratio = "" if name == "in-process ORT" else f"{added / rust:.2f}"
        v = sorted(v)
        print(f"| {name} | {statistics.median(v) * 1e6:.1f} | {v[0] * 1e6:.1f} | {v[len(v) // 4] * 1e6:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
