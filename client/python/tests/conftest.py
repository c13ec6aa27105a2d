"""The real daemon for the Python client's tests: `rxd` built from this repository
(``target/debug/rxd``, or ``$RXD_BIN``), ONNX Runtime's library and the models that
``scripts/fetch-deps`` put under ``.deps/``, and in-process ONNX Runtime (the ``onnxruntime``
package, the same release) as the reference. Nothing is mocked."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional

import msgpack
import numpy as np
import pytest

ROOT = pathlib.Path(os.environ.get("RXD_REPO_ROOT") or pathlib.Path(__file__).resolve().parents[3])
ORT_LIBRARY = ROOT / ".deps/onnxruntime/libonnxruntime.so.1.31.1"
#: Models the tests serve, with the settings scripts/quickstart gives them.
MODELS = ["digits", "sigmoid", "yolov8n", "ppocr_det", "ppocr_cls", "silero_vad"]


def rxd_binary() -> pathlib.Path:
    if os.environ.get("RXD_BIN"):
        return pathlib.Path(os.environ["RXD_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    return target / "debug" / "rxd"


def model_file(name: str) -> pathlib.Path:
    bundled = ROOT / "examples/models" / name / "1/model.onnx"
    if bundled.is_file():
        return bundled
    return ROOT / ".deps/models" / name / "1/model.onnx"


def make_repo(directory: pathlib.Path, models: List[str]) -> None:
    for m in models:
        d = directory / m / "1"
        d.mkdir(parents=True)
        (d / "model.onnx").symlink_to(model_file(m))
        toml = ROOT / "examples/repository" / m / "model.toml"
        if toml.is_file():
            shutil.copy(toml, directory / m / "model.toml")


class Daemon:
    """A running rxd on a temporary repository and socket; killed at the end."""

    def __init__(self, models: List[str], config: str = "", extra: Optional[List[str]] = None) -> None:
        for p in (rxd_binary(), ORT_LIBRARY):
            if not p.exists():
                pytest.fail(f"{p} missing: run scripts/test (it fetches .deps and builds rxd)")
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="rxd-py-"))
        os.chmod(self.dir, 0o755)
        self.repo = self.dir / "repo"
        self.repo.mkdir()
        os.chmod(self.repo, 0o755)
        make_repo(self.repo, models)
        self.socket = str(self.dir / "rxd.sock")
        self.config = self.dir / "rxd.toml"
        self.config.write_text(config + "\n")
        self.extra = extra or []
        self.log = self.dir / "rxd.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def start(self) -> None:
        env = {"PATH": "/usr/bin:/bin", "ORT_DISABLE_TELEMETRY": "1", "TMPDIR": str(self.dir)}
        cmd = [
            str(rxd_binary()), "--config", str(self.config), "--socket", str(self.socket),
            "--socket-mode", "0666", "--model-repository", str(self.repo),
            "--ort-library", str(ORT_LIBRARY), "--intra-op-threads", "1", *self.extra,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"rxd exited ({self.proc.returncode}):\n{self.log.read_text()}")
            if handshake_ok(self.socket):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"rxd not ready:\n{self.log.read_text()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def handshake_ok(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            body = msgpack.packb({"protocol": 1, "client": "test-probe", "arena_bytes": 0})
            s.sendall(struct.pack("<I", len(body)) + body)
            header = s.recv(4, socket.MSG_WAITALL)
            return len(header) == 4
    except OSError:
        return False


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One daemon for the session, serving every test model (admin: the tests run as the
    daemon's own user)."""
    d = Daemon(MODELS)
    yield d
    d.close()


class Reference:
    """In-process ONNX Runtime with the daemon's settings in the tests (one intra-op thread),
    so outputs must agree bit for bit."""

    def __init__(self, name: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file(name)), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {k: np.asarray(v) for k, v in inputs.items()})))


_REFS: Dict[str, Reference] = {}


def reference(name: str) -> Reference:
    if name not in _REFS:
        _REFS[name] = Reference(name)
    return _REFS[name]


def arena_whole(client: object) -> bool:
    """The client's arena free list is one range covering all of it."""
    import gc

    gc.collect()
    size = client.arena_bytes  # type: ignore[attr-defined]
    return client.arena_free_ranges() == [(0, size)]  # type: ignore[attr-defined]


NOBODY = 65534


def as_nobody(fn: "Callable[[], object]") -> str:
    """Runs ``fn`` in a child process whose uid and gid are ``nobody`` (no supplementary
    groups) — a peer the daemon does not count as an admin — and returns what it returned, or
    ``raised <ExceptionClass>: message``. Needs root (CI runs the tests as root)."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = f"returned {fn()!r}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"raised {type(e).__name__}: {e}"
        os.write(w, out.encode()[:60000])
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()
