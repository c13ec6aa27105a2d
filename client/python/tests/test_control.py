"""Control and observability, blocking and asyncio, against the real daemon: each operation
does what it says — the model list, a signature, status, health, metrics that move after
requests, devices, load/unload/pin/unpin, configure, reload, compress — and versions are
served as asked."""

from __future__ import annotations

import shutil
import time
from typing import Iterator

import numpy as np
import pytest

import rxd
from conftest import ROOT, Daemon, model_file, reference

RELU = ROOT / "tests/models/relu/1/model.onnx"


@pytest.fixture(scope="module")
def ctl() -> Iterator[Daemon]:
    """A daemon of this module's own: the tests unload, pin and publish."""
    d = Daemon(["digits", "sigmoid"])
    yield d
    d.close()


def state(models: list, name: str, version: int = 1) -> dict:  # type: ignore[type-arg]
    return next(m for m in models if m["name"] == name and m["version"] == version)


def test_blocking_control_and_observability(ctl: Daemon) -> None:
    x = np.random.default_rng(9).standard_normal((3, 4, 5)).astype(np.float32)
    with rxd.Client(ctl.socket) as c:
        assert {("digits", 1), ("sigmoid", 1)} <= {(m["name"], m["version"]) for m in c.models()}
        info = c.model_info("sigmoid")
        assert [(i["name"], i["dtype"], i["dims"]) for i in info["inputs"]] == [("x", "float32", [3, 4, 5])]
        assert [o["name"] for o in info["outputs"]] == ["y"] and info["state"] == "ready"

        status = c.status()
        assert status["pid"] == ctl.pid and status["model_repository"] == str(ctl.repo)
        assert status["ort_version"].startswith("1.31")
        health = c.health()
        assert health["state"] in ("healthy", "degraded") and health["ready"] and health["workers"] >= 1

        before = c.metrics()
        for _ in range(5):
            c.infer("sigmoid", {"x": x}).close()
        after = c.metrics()
        assert after["requests_total"] - before["requests_total"] >= 5
        mine = [m for m in after["models"] if m["name"] == "sigmoid"]
        assert mine and sum(mine[0]["outcomes"].values()) >= 5
        # A batch's latencies are recorded by its worker once the batch is done, which can be
        # after its answers went out: soon, not at once.
        deadline = time.monotonic() + 5
        while next(m for m in c.metrics()["models"] if m["name"] == "sigmoid")["total"]["count"] < 5:
            assert time.monotonic() < deadline, "the latency histogram never counted 5 requests"
            time.sleep(0.01)
        assert after["process"]["rss_bytes"] > 0

        devices = c.devices()
        cpu = [d for d in devices if d["kind"] == "cpu"]
        assert cpu and "sigmoid" in " ".join(cpu[0]["models"])
        assert cpu[0]["capabilities"] == {"float16": "emulated", "int8": "native"}
        assert cpu[0]["load"]["rows_total"] >= 5 and 0 <= cpu[0]["load"]["busy_ratio"] <= 1

        # Admin operations (the tests run as the daemon's own user).
        assert c.unload("digits")["state"] != "ready"
        assert state(c.models(), "digits")["state"] != "ready"
        assert c.load("digits")["state"] == "ready"
        assert c.pin("digits")["pinned"] and state(c.models(), "digits")["pinned"]
        assert not c.unpin("digits")["pinned"] and not state(c.models(), "digits")["pinned"]
        settings = c.configure("digits", max_queue_delay_us=700, default_priority=9)
        assert settings["max_queue_delay_us"] == 700 and settings["default_priority"] == 9
        assert c.model_info("digits")["settings"]["default_priority"] == 9

        # A file placed in the repository by hand is served after reload.
        (ctl.repo / "relu" / "1").mkdir(parents=True)
        shutil.copy(RELU, ctl.repo / "relu" / "1" / "model.onnx")
        assert "relu" not in {m["name"] for m in c.models()}
        assert "relu" in {m["name"] for m in c.reload()}
        # Nothing here is spread over several devices: rebalance answers the residents as
        # they are.
        placed = c.rebalance("digits")
        assert [m["name"] for m in placed] == ["digits"] and not placed[0].get("shares")
        with pytest.raises(rxd.UnknownModel):
            c.rebalance("no_such_model")
        y = np.array([[-1.5, 0.0, 2.5]], np.float32)
        np.testing.assert_array_equal(c.infer("relu", {"x": y})["y"], np.maximum(y, 0))


def test_versions_are_served_as_asked(ctl: Daemon) -> None:
    x = np.random.default_rng(10).standard_normal((3, 4, 5)).astype(np.float32)
    r = np.random.default_rng(11).standard_normal((4, 5)).astype(np.float32)
    with rxd.Client(ctl.socket) as c:
        assert c.publish("twins", RELU)["version"] == 1
        assert c.publish("twins", model_file("sigmoid").read_bytes())["version"] == 2
        # The version policy serves the latest; an older one is served once an admin loads it.
        with pytest.raises(rxd.ModelNotReady):
            c.infer("twins", {"x": r}, version=1)
        assert c.load("twins", 1)["state"] == "ready"
        with c.infer("twins", {"x": r}, version=1) as got:
            assert got.version == 1
            np.testing.assert_array_equal(got["y"], np.maximum(r, 0))
        with c.infer("twins", {"x": x}) as got:  # no version: the highest
            assert got.version == 2
            np.testing.assert_array_equal(got["y"], reference("sigmoid").run({"x": x})["y"])
        with pytest.raises(rxd.UnknownModel):
            c.infer("twins", {"x": x}, version=3)


async def test_asyncio_control_and_observability(ctl: Daemon) -> None:
    x = np.random.default_rng(12).random((2, 64), dtype=np.float32) * 16
    async with rxd.AsyncClient(ctl.socket) as c:
        assert "digits" in {m["name"] for m in await c.models()}
        assert (await c.model_info("digits"))["inputs"][0]["name"] == "input"
        assert (await c.status())["pid"] == ctl.pid
        assert (await c.health())["state"] in ("healthy", "degraded")
        before = (await c.metrics())["requests_total"]
        (await c.infer("digits", x)).close()
        assert (await c.metrics())["requests_total"] > before
        assert any(d["kind"] == "cpu" for d in await c.devices())
        assert (await c.unload("digits"))["state"] != "ready"
        assert (await c.load("digits"))["state"] == "ready"
        assert (await c.pin("digits"))["pinned"]
        assert not (await c.unpin("digits"))["pinned"]
        assert (await c.configure("digits", max_batch_rows=5))["max_batch_rows"] == 5
        assert any(m["name"] == "digits" for m in await c.reload())
        assert any(m["name"] == "digits" for m in await c.rebalance())
        report = await c.compress("digits", "int8-weights", eval={"input": x}, dry_run=True)
        assert report["size_after"] < report["size_before"] and not report.get("published")
        assert [m["version"] for m in await c.models() if m["name"] == "digits"] == [1]
