"""The daemon's replies as typed dictionaries (PROTOCOL.md names every key). They are the
decoded MessagePack maps themselves: keys the daemon adds later appear too, and optional keys
are absent (never ``None``) when the daemon does not report them."""

from __future__ import annotations

import sys
from typing import Dict, List

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict  # novm: only on 3.11+, else typing_extensions
else:  # pragma: no cover - Python 3.9 and 3.10
    from typing_extensions import NotRequired, TypedDict

__all__ = [
    "Capabilities",
    "CompressReply",
    "Dequantized",
    "DeviceLoad",
    "DeviceShare",
    "DeviceSummary",
    "GpuMetrics",
    "Health",
    "Latency",
    "MetricsReport",
    "ModelInfo",
    "ModelMetrics",
    "ModelSummary",
    "PublishReply",
    "Settings",
    "Status",
    "TensorSpec",
]


class ModelSummary(TypedDict):
    name: str
    version: int
    state: str
    error: NotRequired[str]
    instances: int
    device: str
    batchable: bool
    requests: int
    batches: int
    rows: int
    padded_rows: int
    batch_sizes: NotRequired[List[int]]
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    coalesced: int
    pinned: bool
    served: bool
    memory_bytes: NotRequired[int]
    estimated_bytes: NotRequired[int]
    arena_bytes: NotRequired[int]
    load_ms: NotRequired[int]
    loads: int
    idle_ms: NotRequired[int]
    evictions: int
    ep: NotRequired[str]
    fallback: NotRequired[str]
    node_placement: NotRequired[Dict[str, int]]
    nodes_on_cpu: NotRequired[List[str]]
    compression: NotRequired[str]
    shares: NotRequired[List["DeviceShare"]]
    share_evictions: NotRequired[int]


class DeviceShare(TypedDict):
    """A version's instances on one device (model.toml ``spread``)."""

    device: str
    instances: int
    batches: int
    rows: int
    memory_bytes: NotRequired[int]
    state: str
    error: NotRequired[str]


class TensorSpec(TypedDict):
    name: str
    dtype: str
    dims: List[int]
    dim_names: List[str]
    max_dims: NotRequired[List[int]]
    warmup_dims: NotRequired[List[int]]
    # Integer inputs: the constant the model's graph compares the input with (a sample rate),
    # which the daemon's warmup fills it with; use it when generating sample inputs.
    warmup_value: NotRequired[int]


class Settings(TypedDict):
    instances: int
    max_batch_rows: int
    max_queue_delay_us: int
    latency_target_ms: NotRequired[float]
    queue_capacity: int
    default_priority: int
    priority_aging_ms: int
    cache_bytes: int


class Dequantized(TypedDict):
    """What dequantize-at-load did to a weights-only model file."""

    folded: int
    remaining: int
    file_bytes: int
    served_bytes: int


class ModelInfo(ModelSummary):
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    settings: NotRequired[Settings]
    dequantized: NotRequired[Dequantized]


class Status(TypedDict):
    server: str
    protocol: int
    pid: int
    uptime_ms: int
    socket: str
    model_repository: str
    ort_version: str
    ort_library: str
    intra_op_threads: int
    models_ready: int
    models_failed: int
    connections: int
    requests_total: int
    requests_failed: int
    in_flight: int
    config: Dict[str, str]


class Health(TypedDict):
    state: str
    reasons: List[str]
    ready: bool
    models_loaded: int
    uptime_ms: int
    last_error: NotRequired[str]
    engine_running: bool
    models_servable: int
    workers: int
    queue_size: int
    models_memory_bytes: int
    rss_bytes: NotRequired[int]
    gpu_available: bool


class DeviceSummary(TypedDict):
    name: str
    kind: str
    ep: str
    adapter: NotRequired[str]
    error: NotRequired[str]
    memory_total_bytes: NotRequired[int]
    memory_used_bytes: NotRequired[int]
    budget_bytes: NotRequired[int]
    used_bytes: int
    free_bytes: NotRequired[int]
    models: List[str]
    capabilities: NotRequired[Capabilities]
    load: NotRequired[DeviceLoad]
    cores: NotRequired[str]


class Capabilities(TypedDict):
    """``native``, ``emulated`` (runs, converted: the CPU's float16), ``absent`` or ``unknown``."""

    float16: str
    int8: str


class DeviceLoad(TypedDict):
    busy_ratio: float
    rows_per_s: float
    window_s: float
    queue_depth: int
    busy_seconds_total: float
    rows_total: int
    batches_total: int


class Recent(TypedDict):
    count: int
    mean: NotRequired[float]
    p50: NotRequired[float]
    p95: NotRequired[float]
    p99: NotRequired[float]
    max: NotRequired[float]


class Latency(TypedDict):
    recent: Recent
    count: int
    sum: float
    buckets: List[List[float]]


class Rate(TypedDict):
    window_s: int
    requests_per_s: float
    errors_per_s: float
    batches_per_s: float
    rows_per_s: float


class ModelMetrics(TypedDict):
    name: str
    version: int
    state: str
    device: str
    instances: int
    queue_depth: int
    queue_capacity: int
    outcomes: Dict[str, int]
    batches: int
    rows: int
    padded_rows: int
    rates: List[Rate]
    queue: Latency
    compute: Latency
    total: Latency
    batch_rows: Latency
    cache_hits: int
    cache_misses: int
    cache_hit_rate: NotRequired[float]
    cache_bytes: int
    coalesced: int
    memory_bytes: NotRequired[int]
    loads: int
    load_failures: int
    evictions: int
    load_seconds_total: float
    settings: Settings


class Process(TypedDict, total=False):
    rss_bytes: int
    cpu_seconds: float
    threads: int
    open_fds: int


class GpuMetrics(TypedDict):
    id: str
    name: NotRequired[str]
    utilization: NotRequired[float]
    memory_used_bytes: NotRequired[int]
    memory_total_bytes: NotRequired[int]


class MetricsReport(TypedDict):
    uptime_ms: int
    process: Process
    requests_total: int
    errors: Dict[str, int]
    connections_open: int
    connections_total: int
    in_flight: int
    models: List[ModelMetrics]
    devices: List[DeviceSummary]
    gpus: List[GpuMetrics]


class CompressReply(TypedDict):
    model: str
    from_version: int
    published: NotRequired[int]
    size_before: int
    size_after: int
    latency_ms_before: float
    latency_ms_after: float
    min_top1: float
    min_cosine: float
    report: str
    passed: bool


class PublishReply(TypedDict):
    model: str
    version: int
    bytes: int
    summary: ModelSummary
