"""The engine API of Python inference engines, over rxd: :class:`Engine` (one model) and
:class:`Server` (many). A thin facade: every figure comes from the daemon's own counters,
every setting is the daemon's run-time ``configure``; nothing runs in this process.

Outputs are owned numpy arrays by output name (``{"output0": array}``); for zero-copy views
of the shared-memory arena use :class:`rxd.Client` / :class:`rxd.AsyncClient` directly.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Union

import numpy as np

from . import errors
from ._core import Inputs
from ._ops import PathOrBytes
from .aio import AsyncClient
from .client import Client
from .types import MetricsReport, ModelMetrics, ModelSummary

Outputs = Dict[str, "np.ndarray[Any, Any]"]
SocketPath = Optional[Union[str, "os.PathLike[str]"]]

#: The result cache size :meth:`Engine.enable_caching` turns on (64 MiB).
DEFAULT_CACHE_BYTES = 64 << 20


class Engine:
    """One model served by rxd, with the interface of an in-process inference engine::

        engine = rxd.Engine("yolov8n")
        await engine.start()
        out = await engine.process_request({"images": x}, priority=5, timeout=10.0)
        engine.get_performance_metrics()["latency"]["p99_ms"]
        engine.scale_workers(2)                 # admin: two sessions serve the model
        await engine.stop()

    ``version``: a version (default: the one the daemon serves). Other keyword arguments go
    to the clients (``arena_bytes``, ``connect_timeout``, ...). The settings methods
    (``scale_workers``, ``set_batch_size``, caching, priority mode) are admin operations on
    the daemon, shared by every client of the model.
    """

    def __init__(self, model: str, socket: SocketPath = None, *, version: Optional[int] = None, **client_options: Any) -> None:
        self.model = model
        self.version = version
        self._socket = socket
        self._options = client_options
        self._async: Optional[AsyncClient] = None
        self._sync: Optional[Client] = None
        self._running = False
        self._started = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connects and makes sure the model is loaded (the daemon loads it on demand); its
        signature, asked for here, names the inputs and sizes the outputs' place in the arena
        from the first request on."""
        if self._async is None:
            self._async = AsyncClient(self._socket, **self._options)
        await self._async.connect()
        await self._async.model_info(self.model, self.version)
        self._running = True
        self._started = time.monotonic()

    async def stop(self) -> None:
        """Closes this engine's connections (the daemon and the model keep running)."""
        self._running = False
        if self._async is not None:
            await self._async.close()
            self._async = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def is_running(self) -> bool:
        return self._running

    def _client(self) -> Client:
        if self._sync is None:
            self._sync = Client(self._socket, **self._options)
        return self._sync

    # -- requests ------------------------------------------------------------------------------
    async def process_request(self, inputs: Inputs, priority: int = 5, timeout: Optional[float] = 10.0) -> Outputs:
        """Runs the model on ``inputs`` (``{name: array}``, or one array for a one-input model);
        higher ``priority`` runs first; a request not started within ``timeout`` seconds
        raises :class:`rxd.DeadlineExceeded`."""
        if self._async is None:
            await self.start()
        assert self._async is not None
        result = await self._async.infer(self.model, inputs, version=self.version, priority=priority, timeout=timeout, copy=True)
        return dict(result)

    def process_request_sync(self, inputs: Inputs, priority: int = 5, timeout: Optional[float] = 10.0) -> Outputs:
        """:meth:`process_request`, blocking."""
        result = self._client().infer(self.model, inputs, version=self.version, priority=priority, timeout=timeout, copy=True)
        return dict(result)

    def predict(self, inputs: Inputs) -> Outputs:
        """Runs the model on ``inputs`` (blocking), at the model's default priority."""
        return dict(self._client().infer(self.model, inputs, version=self.version, copy=True))

    # -- observability ---------------------------------------------------------------------------
    def get_performance_metrics(self) -> Dict[str, Any]:
        """The model's figures from the daemon's counters::

            {"throughput": {"requests_per_second", "batches_per_second", "average_batch_size", ...},
             "latency": {"mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms", ...},
             "resource_usage": {"rss_bytes", "cpu_seconds", "model_memory_bytes", ...},
             "batch_stats": {"total_batches", "total_requests", "successful_requests", ...},
             "cache_stats": {"hit_rate", "hits", "misses", "size_bytes", ...}}

        Rates are over the last 10 s, latency percentiles over the last 10–20 s (a request's
        queue wait plus its batch's compute), counts since the daemon started."""
        return model_stats(self._client().metrics(), self.model, self.version)

    def health_check(self) -> Dict[str, Any]:
        """``{"status": "healthy" | "degraded" | "unhealthy", ...}``: the daemon's health, and
        unhealthy when the model failed or the daemon cannot be reached."""
        try:
            c = self._client()
            health = c.health()
            model = _summary(c.models(), self.model, self.version)
            queue = _queue(c.metrics(), self.model, self.version)
        except errors.RxdError as e:
            return {"status": "unhealthy", "running": False, "reasons": [str(e)], "model": self.model}
        status = health["state"]
        reasons = list(health["reasons"])
        state = model["state"] if model is not None else "unknown"
        if model is None or state == "failed":
            status = "unhealthy"
            reasons.append(f"model {self.model!r} is {state}")
        return {
            "status": status,
            "running": self._running or self._sync is not None,
            "ready": health["ready"] and state == "ready",
            "model": self.model,
            "version": model["version"] if model is not None else None,
            "model_state": state,
            "models_loaded": health["models_loaded"],
            "workers": model["instances"] if model is not None else 0,
            "queue_size": queue,
            "memory_bytes": model.get("memory_bytes", 0) if model is not None else 0,
            "rss_bytes": health.get("rss_bytes"),
            "gpu_available": health["gpu_available"],
            "last_error": health.get("last_error"),
            "uptime_seconds": health["uptime_ms"] / 1000.0,
            "reasons": reasons,
        }

    def get_queue_size(self) -> int:
        """Requests of this model waiting for a worker now."""
        return _queue(self._client().metrics(), self.model, self.version)

    def get_worker_count(self) -> int:
        """Sessions (workers) serving the model."""
        model = _summary(self._client().models(), self.model, self.version)
        return model["instances"] if model is not None else 0

    # -- settings (admin) ----------------------------------------------------------------------
    def scale_workers(self, n: int) -> int:
        """Admin: ``n`` sessions serve the model (built beside the running ones, swapped in
        without dropping a request). Returns the count in force."""
        return int(self._client().configure(self.model, self.version, instances=int(n))["instances"])

    def set_batch_size(self, n: int) -> int:
        """Admin: the largest batch (rows) the daemon runs for this model."""
        return int(self._client().configure(self.model, self.version, max_batch_rows=int(n))["max_batch_rows"])

    def enable_caching(self, enabled: bool = True, size_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        """Admin: turns the model's result cache on (``size_bytes``) or off."""
        self._client().configure(self.model, self.version, cache_bytes=int(size_bytes) if enabled else 0)

    def clear_cache(self) -> None:
        """Admin: empties the model's result cache."""
        self._client().configure(self.model, self.version, clear_cache=True)

    def set_priority_mode(self, enabled: bool) -> None:
        """Admin: ``True``: strict priority (a higher priority always runs first; lower ones may
        wait indefinitely). ``False``: near first-come first-served (a waiting request gains a
        level per millisecond, so a priority is worth at most that many milliseconds)."""
        self._client().configure(self.model, self.version, priority_aging_ms=0 if enabled else 1)


class Server:
    """Many models served by rxd, with the interface of a multi-model inference server::

        server = rxd.Server()
        server.load_model("detector", "models/yolov8n.onnx")   # admin: published, loaded
        out = server.predict("detector", {"images": x})
        server.get_model_stats("detector")["latency"]["p50_ms"]
    """

    def __init__(self, socket: SocketPath = None, **client_options: Any) -> None:
        self._client = Client(socket, **client_options)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The blocking client underneath (zero-copy inference, every daemon operation)."""
        return self._client

    def load_model(self, name: str, path: PathOrBytes, *, version: Optional[int] = None) -> int:
        """Admin: publishes the ONNX file ``path`` into the daemon's repository as model
        ``name`` (a new version, by default the next one), loads it, and returns the version.
        Requests without a version get it from now on."""
        published = self._client.publish(name, path, version=version)
        v = int(published["version"])
        self._client.load(name, v)
        return v

    def unload_model(self, name: str, version: Optional[int] = None) -> None:
        """Admin: frees a model version's memory now (a later request loads it again)."""
        self._client.unload(name, version)

    def list_models(self) -> List[str]:
        """The names of the models the daemon serves."""
        return sorted({m["name"] for m in self._client.models()})

    def predict(self, name: str, inputs: Inputs, *, version: Optional[int] = None, priority: Optional[int] = None, timeout: Optional[float] = None) -> Outputs:
        """Runs model ``name`` on ``inputs`` (blocking); owned arrays by output name."""
        return dict(self._client.infer(name, inputs, version=version, priority=priority, timeout=timeout, copy=True))

    def get_server_stats(self) -> Dict[str, Any]:
        """The daemon's totals: uptime, requests, connections, memory, and per model its state,
        version, workers, requests and memory."""
        status = self._client.status()
        report = self._client.metrics()
        health = self._client.health()
        models: Dict[str, Dict[str, Any]] = {}
        for m in self._client.models():
            entry = models.get(m["name"])
            if entry is not None and entry["version"] > m["version"] and m["state"] != "ready":
                continue
            models[m["name"]] = {
                "version": m["version"],
                "state": m["state"],
                "workers": m["instances"],
                "requests": m["requests"],
                "memory_bytes": m.get("memory_bytes", 0),
                "pinned": m["pinned"],
            }
        ok = report["errors"]
        return {
            "status": health["state"],
            "uptime_seconds": report["uptime_ms"] / 1000.0,
            "requests_total": report["requests_total"],
            "requests_failed": status["requests_failed"],
            "errors": dict(ok),
            "in_flight": report["in_flight"],
            "connections": report["connections_open"],
            "models_loaded": health["models_loaded"],
            "workers": health["workers"],
            "queue_size": health["queue_size"],
            "memory": {
                "rss_bytes": report["process"].get("rss_bytes"),
                "models_bytes": health["models_memory_bytes"],
            },
            "devices": report["devices"],
            "models": models,
        }

    def get_model_stats(self, name: str, version: Optional[int] = None) -> Dict[str, Any]:
        """One model's figures, as :meth:`Engine.get_performance_metrics` gives them, with its
        state, version and workers."""
        stats = model_stats(self._client.metrics(), name, version)
        model = _summary(self._client.models(), name, version)
        if model is None:
            raise errors.UnknownModel(f"unknown model {name!r}")
        stats.update({"model": name, "version": model["version"], "state": model["state"], "workers": model["instances"]})
        return stats

    def load_and_optimize(
        self,
        name: str,
        path: PathOrBytes,
        calibration_data: Optional[Dict[str, Any]] = None,
        compression: Optional[str] = None,
        *,
        eval_data: Optional[Dict[str, Any]] = None,
        min_top1: Optional[float] = None,
        min_cosine: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Admin: publishes ``path`` as model ``name``, then compresses it — ``compression``
        (``int8-weights``, ``dynamic-int8``, ``fp16``, ``int4``, ``prune:S``, joined with
        ``+``; default ``static-int8`` with ``calibration_data``, else ``int8-weights``). The
        daemon compares the compressed model with the original on ``eval_data`` (default:
        random inputs) and serves it (as the next version) only if the accuracy report passes.
        Returns the versions, sizes, latencies and the report."""
        published = self._client.publish(name, path)
        version = int(published["version"])
        strategy = compression or ("static-int8" if calibration_data else "int8-weights")
        reply = self._client.compress(
            name, strategy, version=version, calibration=calibration_data, eval=eval_data,
            min_top1=min_top1, min_cosine=min_cosine,
        )
        return {
            "model": name,
            "version": version,
            "optimized_version": reply.get("published"),
            "strategy": strategy,
            "passed": reply["passed"],
            "size_before": reply["size_before"],
            "size_after": reply["size_after"],
            "compression_ratio": reply["size_before"] / max(1, reply["size_after"]),
            "latency_ms_before": reply["latency_ms_before"],
            "latency_ms_after": reply["latency_ms_after"],
            "accuracy": {"min_top1": reply["min_top1"], "min_cosine": reply["min_cosine"]},
            "report": reply["report"],
        }


def _pick(entries: List[Any], name: str, version: Optional[int]) -> Optional[Any]:
    """The entry of ``name`` (and ``version``; else the highest ready version, else the
    highest)."""
    mine = [e for e in entries if e["name"] == name and (version is None or e["version"] == version)]
    if not mine:
        return None
    ready = [e for e in mine if e["state"] == "ready"]
    return max(ready or mine, key=lambda e: e["version"])


def _summary(models: List[ModelSummary], name: str, version: Optional[int]) -> Optional[ModelSummary]:
    out: Optional[ModelSummary] = _pick(list(models), name, version)
    return out


def _queue(report: MetricsReport, name: str, version: Optional[int]) -> int:
    m: Optional[ModelMetrics] = _pick(list(report["models"]), name, version)
    return int(m["queue_depth"]) if m is not None else 0


def model_stats(report: MetricsReport, name: str, version: Optional[int]) -> Dict[str, Any]:
    """A model's figures in the engine API's layout, from a metrics report."""
    m: Optional[ModelMetrics] = _pick(list(report["models"]), name, version)
    process = report["process"]
    gpus = report["gpus"]
    utilization = [g["utilization"] for g in gpus if "utilization" in g]
    resource: Dict[str, Any] = {
        "rss_bytes": process.get("rss_bytes"),
        "cpu_seconds": process.get("cpu_seconds"),
        "threads": process.get("threads"),
        "open_fds": process.get("open_fds"),
        "model_memory_bytes": m.get("memory_bytes") if m is not None else None,
        "gpu_utilization": max(utilization) if utilization else None,
        "gpu_memory_used_bytes": sum(g.get("memory_used_bytes", 0) for g in gpus) if gpus else None,
        "gpus": gpus,
        "device": m["device"] if m is not None else None,
    }
    if m is None:
        zero_latency = {"mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "count": 0}
        return {
            "throughput": {"requests_per_second": 0.0, "batches_per_second": 0.0, "average_batch_size": 0.0, "rows_per_second": 0.0},
            "latency": zero_latency,
            "resource_usage": resource,
            "batch_stats": {"total_batches": 0, "total_requests": 0, "successful_requests": 0, "failed_requests": 0, "total_rows": 0, "padded_rows": 0, "average_batch_size": 0.0, "processing_time_ms": 0.0, "total_processing_time_s": 0.0},
            "cache_stats": {"hit_rate": 0.0, "hits": 0, "misses": 0, "size_bytes": 0, "capacity_bytes": 0, "enabled": False, "coalesced": 0},
        }
    rates = {r["window_s"]: r for r in m["rates"]}
    rate = rates.get(10) or (m["rates"][0] if m["rates"] else None)
    total = m["total"]["recent"]
    compute = m["compute"]
    outcomes = m["outcomes"]
    requests = sum(outcomes.values())
    ok = outcomes.get("ok", 0)
    mean_batch = m["rows"] / m["batches"] if m["batches"] else 0.0
    hits, misses = m["cache_hits"], m["cache_misses"]
    capacity = m["settings"]["cache_bytes"]
    return {
        "throughput": {
            "requests_per_second": rate["requests_per_s"] if rate else 0.0,
            "batches_per_second": rate["batches_per_s"] if rate else 0.0,
            "rows_per_second": rate["rows_per_s"] if rate else 0.0,
            "average_batch_size": mean_batch,
        },
        "latency": {
            "mean_ms": total.get("mean", 0.0),
            "p50_ms": total.get("p50", 0.0),
            "p95_ms": total.get("p95", 0.0),
            "p99_ms": total.get("p99", 0.0),
            "max_ms": total.get("max", 0.0),
            "count": total["count"],
            "queue_p50_ms": m["queue"]["recent"].get("p50", 0.0),
            "compute_p50_ms": compute["recent"].get("p50", 0.0),
        },
        "resource_usage": resource,
        "batch_stats": {
            "total_batches": m["batches"],
            "total_requests": requests,
            "successful_requests": ok,
            "failed_requests": requests - ok,
            "outcomes": dict(outcomes),
            "total_rows": m["rows"],
            "padded_rows": m["padded_rows"],
            "average_batch_size": mean_batch,
            "processing_time_ms": compute["recent"].get("mean", 0.0),
            "total_processing_time_s": compute["sum"],
        },
        "cache_stats": {
            "hit_rate": m.get("cache_hit_rate", hits / (hits + misses) if hits + misses else 0.0),
            "hits": hits,
            "misses": misses,
            "size_bytes": m["cache_bytes"],
            "capacity_bytes": capacity,
            "enabled": capacity > 0,
            "coalesced": m["coalesced"],
        },
    }
