"""One Python client on `sigmoid`, one call at a time: p50 and p99 through the socket and
through the shared-memory ring (`ring_entries=4`), beside in-process ONNX Runtime.

Run from client/python/tests (it uses the tests' daemon fixture), with the package installed
(scripts/test-python installs it into .deps/pyenv):
    cd client/python/tests && RXD_BIN=$PWD/../../../target/release/rxd \
        RXD_REPO_ROOT=$PWD/../../.. ../../../.deps/pyenv/bin/python ../bench/ring.py
"""
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np  # noqa: E402
import rxd  # noqa: E402
from conftest import Daemon, reference  # noqa: E402

d = Daemon(["sigmoid", "digits"])
try:
    x = np.random.default_rng(1).random((3, 4, 5), dtype=np.float32)
    ref = reference("sigmoid")
    t0 = []
    for _ in range(3000):
        a = time.perf_counter(); ref.run({"x": x}); t0.append(time.perf_counter() - a)
    res = {"in-process onnxruntime": np.median(t0) * 1e6}
    for name, kw in [("socket", {}), ("ring", {"ring_entries": 4})]:
        with rxd.Client(d.socket, **kw) as c:
            for _ in range(500):
                c.infer("sigmoid", {"x": x})
            ts = []
            for _ in range(5000):
                a = time.perf_counter(); c.infer("sigmoid", {"x": x}); ts.append(time.perf_counter() - a)
            res[name] = np.median(ts) * 1e6
            res[name + " p99"] = np.percentile(ts, 99) * 1e6
            if kw:
                assert c.ring_requests and c.ring_requests >= 5500
    for k, v in res.items():
        print(f"{k}: {v:.1f} us")
finally:
    d.close()
