"""The engine facade does what each method says, against the real daemon: metrics move after
requests, settings change what the daemon reports, publish + predict works, and a peer that is
not an admin cannot publish."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator

import numpy as np
import pytest

import rxd
from conftest import Daemon, as_nobody, model_file, reference


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    """A daemon of this module's own: the tests change its models' settings."""
    d = Daemon(["digits", "ppocr_cls", "ppocr_det"])
    yield d
    d.close()


def until(cond: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


async def test_engine_requests_and_metrics_from_the_daemons_counters(served: Daemon) -> None:
    rng = np.random.default_rng(5)
    ref = reference("ppocr_cls")
    engine = rxd.Engine("ppocr_cls", served.socket)
    await engine.start()
    assert engine.is_running
    before = engine.get_performance_metrics()
    xs = [rng.random((1, 3, 48, 192), dtype=np.float32) for _ in range(24)]
    outs = await asyncio.gather(*(engine.process_request({"x": x}, priority=5, timeout=10.0) for x in xs))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out["save_infer_model/scale_0.tmp_1"], ref.run({"x": x})["save_infer_model/scale_0.tmp_1"], rtol=1e-5, atol=1e-6)
        assert out["save_infer_model/scale_0.tmp_1"].flags.writeable  # owned arrays
    sync = engine.process_request_sync(xs[0], priority=2)  # one array: the model's one input
    np.testing.assert_array_equal(sync["save_infer_model/scale_0.tmp_1"], ref.run({"x": xs[0]})["save_infer_model/scale_0.tmp_1"])
    np.testing.assert_array_equal(engine.predict({"x": xs[1]})["save_infer_model/scale_0.tmp_1"], ref.run({"x": xs[1]})["save_infer_model/scale_0.tmp_1"])
    # Nested lists, as engine users pass them: the signature start() asked for gives the dtype.
    listed = await engine.process_request({"x": xs[2].tolist()})
    np.testing.assert_array_equal(listed["save_infer_model/scale_0.tmp_1"], ref.run({"x": xs[2]})["save_infer_model/scale_0.tmp_1"])

    after = engine.get_performance_metrics()
    assert set(after) == {"throughput", "latency", "resource_usage", "batch_stats", "cache_stats"}
    assert after["batch_stats"]["total_requests"] - before["batch_stats"]["total_requests"] == 27
    assert after["batch_stats"]["successful_requests"] - before["batch_stats"]["successful_requests"] == 27
    assert after["batch_stats"]["total_batches"] > before["batch_stats"]["total_batches"]
    # Rates count complete seconds: within two, the burst shows.
    until(lambda: engine.get_performance_metrics()["throughput"]["requests_per_second"] > 0, "no request rate", 3.0)
    rates = engine.get_performance_metrics()["throughput"]
    assert rates["batches_per_second"] > 0 and rates["requests_per_second"] <= 27
    assert after["throughput"]["average_batch_size"] >= 1.0
    lat = after["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] and lat["mean_ms"] > 0
    assert after["resource_usage"]["rss_bytes"] > 10 << 20
    assert after["resource_usage"]["model_memory_bytes"] > 0
    assert {"hit_rate", "hits", "misses", "size_bytes"} <= set(after["cache_stats"])

    health = engine.health_check()
    assert health["status"] in ("healthy", "degraded") and health["model_state"] == "ready"
    assert health["workers"] == engine.get_worker_count() >= 1 and health["running"]
    await engine.stop()
    assert not engine.is_running


async def test_engine_settings_change_the_daemon(served: Daemon) -> None:
    rng = np.random.default_rng(6)
    async with rxd.Engine("ppocr_det", served.socket) as engine:
        with rxd.Client(served.socket) as client:
            def settings() -> Any:
                return client.model_info("ppocr_det")["settings"]

            # Workers: built beside the running session and swapped in.
            assert engine.scale_workers(2) == 2
            until(lambda: engine.get_worker_count() == 2, "two workers never served")
            assert engine.health_check()["workers"] == 2
            assert engine.scale_workers(1) == 1
            until(lambda: engine.get_worker_count() == 1, "back to one worker")

            assert engine.set_batch_size(3) == 3 and settings()["max_batch_rows"] == 3
            engine.set_priority_mode(True)
            assert settings()["priority_aging_ms"] == 0
            engine.set_priority_mode(False)
            assert settings()["priority_aging_ms"] == 1

            # The result cache: a repeat is a hit; cleared, it holds nothing; off, capacity 0.
            engine.enable_caching(True, size_bytes=16 << 20)
            x = {"x": rng.random((1, 3, 320, 320), dtype=np.float32)}
            first = engine.predict(x)
            again = engine.predict(x)
            np.testing.assert_array_equal(first["sigmoid_0.tmp_0"], again["sigmoid_0.tmp_0"])
            cache = engine.get_performance_metrics()["cache_stats"]
            assert cache["hits"] >= 1 and cache["hit_rate"] > 0 and cache["size_bytes"] > 0
            assert cache["capacity_bytes"] == 16 << 20 and cache["enabled"]
            engine.clear_cache()
            assert engine.get_performance_metrics()["cache_stats"]["size_bytes"] == 0
            engine.enable_caching(False)
            assert not engine.get_performance_metrics()["cache_stats"]["enabled"]

            # The queue: many slow requests at once wait for the one worker.
            big = {"x": rng.random((1, 3, 960, 960), dtype=np.float32)}
            flood = [asyncio.ensure_future(engine.process_request(big, timeout=60.0)) for _ in range(6)]
            await asyncio.sleep(0.3)
            seen = await asyncio.to_thread(engine.get_queue_size)
            await asyncio.gather(*flood)
            assert seen >= 1
            assert engine.get_queue_size() == 0


def test_server_publishes_predicts_optimizes_and_reports(served: Daemon) -> None:
    x = np.random.default_rng(7).random((4, 64), dtype=np.float32) * 16
    want = reference("digits").run({"input": x})
    with rxd.Server(served.socket) as server:
        v = server.load_model("handwriting", model_file("digits"))
        assert v == 1 and "handwriting" in server.list_models()
        out = server.predict("handwriting", {"input": x})
        np.testing.assert_array_equal(out["label"], want["label"])
        assert server.load_model("handwriting", model_file("digits")) == 2  # the next version
        stats = server.get_model_stats("handwriting")
        assert stats["version"] == 2 and stats["state"] == "ready" and stats["workers"] >= 1
        server.predict("handwriting", x)
        assert server.get_model_stats("handwriting")["batch_stats"]["total_requests"] >= 1
        totals = server.get_server_stats()
        assert totals["models"]["handwriting"]["version"] == 2
        assert totals["requests_total"] >= 2 and totals["uptime_seconds"] > 0
        assert totals["memory"]["rss_bytes"] > 0 and totals["status"] in ("healthy", "degraded")

        report = server.load_and_optimize("handwriting_q", model_file("digits"), compression="int8-weights", eval_data={"input": x})
        assert report["version"] == 1 and report["passed"], report["report"]
        assert report["optimized_version"] == 2 and report["size_after"] < report["size_before"]
        q = server.predict("handwriting_q", {"input": x})  # served: the compressed version
        assert (q["label"] == want["label"]).mean() >= 0.75
        assert server.get_model_stats("handwriting_q")["version"] == 2
    with rxd.Client(served.socket) as c:  # its INT8 weights were made float again at load
        dq = c.model_info("handwriting_q")["dequantized"]
        assert dq["folded"] > 0 and dq["remaining"] == 0 and dq["served_bytes"] > 3 * dq["file_bytes"], dq


def test_a_peer_that_is_not_an_admin_cannot_publish(served: Daemon) -> None:
    path = str(model_file("digits"))

    def publish() -> Any:
        with rxd.Server(served.socket) as server:
            return server.load_model("intruder", path)

    out = as_nobody(publish)
    assert out.startswith("raised PermissionDenied: permission_denied (400)"), out
    assert not (served.repo / "intruder").exists()
    with rxd.Client(served.socket) as client:
        assert "intruder" not in {m["name"] for m in client.models()}
