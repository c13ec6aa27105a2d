"""rxd — the Python client of the rxd local inference daemon.

Blocking and asyncio clients over the daemon's Unix socket, numpy arrays in and out through
a shared-memory arena (no copies), and the engine API Python inference engines offer::

    import numpy as np
    import rxd

    with rxd.Client() as client:                       # $RXD_SOCKET or /run/rxd/rxd.sock
        x = client.empty((1, 3, 320, 320), np.float32)  # lives in the shared arena
        x[...] = 0.5                                    # fill in place
        with client.infer("yolov8n", {"images": x}) as result:
            boxes = result["output0"]                   # a view of the arena, no copy

See :class:`Client`, :class:`AsyncClient`, :class:`Result`, :class:`Engine`, :class:`Server`
and the exceptions in :mod:`rxd.errors`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio import AsyncClient
from .client import Client
from .engine import Engine, Server
from .errors import (
    ArenaError,
    ArenaMisaligned,
    ArenaOutOfRange,
    ArenaUnavailable,
    BadRequestId,
    Busy,
    ClientError,
    ConnectionClosed,
    ConnectionLimit,
    ConnectionTimeout,
    DataLengthMismatch,
    DeadlineExceeded,
    DtypeMismatch,
    FrameTooLarge,
    HandshakeRequired,
    InferenceFailed,
    Internal,
    InvalidRequest,
    LoadFailed,
    MalformedMessage,
    MissingInput,
    ModelError,
    ModelNotReady,
    OutputRegionTooSmall,
    OverBudget,
    PermissionDenied,
    ProtocolError,
    ResultClosed,
    RxdError,
    ServerError,
    ShapeMismatch,
    ShuttingDown,
    TensorTooLarge,
    Timeout,
    Unavailable,
    UnexpectedFd,
    UnknownInput,
    UnknownModel,
    UnknownOutput,
    UnreadAnswers,
    UnsupportedVersion,
)
from .result import Result

__all__ = [
    "ArenaError",
    "ArenaMisaligned",
    "ArenaOutOfRange",
    "ArenaUnavailable",
    "AsyncClient",
    "BadRequestId",
    "Busy",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "ConnectionLimit",
    "ConnectionTimeout",
    "DataLengthMismatch",
    "DeadlineExceeded",
    "DtypeMismatch",
    "Engine",
    "FrameTooLarge",
    "HandshakeRequired",
    "InferenceFailed",
    "Internal",
    "InvalidRequest",
    "LoadFailed",
    "MalformedMessage",
    "MissingInput",
    "ModelError",
    "ModelNotReady",
    "OutputRegionTooSmall",
    "OverBudget",
    "PermissionDenied",
    "ProtocolError",
    "Result",
    "ResultClosed",
    "RxdError",
    "Server",
    "ServerError",
    "ShapeMismatch",
    "ShuttingDown",
    "TensorTooLarge",
    "Timeout",
    "Unavailable",
    "UnexpectedFd",
    "UnknownInput",
    "UnknownModel",
    "UnknownOutput",
    "UnreadAnswers",
    "UnsupportedVersion",
    "__version__",
]
