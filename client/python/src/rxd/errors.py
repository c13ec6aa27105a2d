"""Exceptions. Every error the daemon answers is an :class:`RxdError` carrying the stable
wire code (``err.code``, ``err.name``); there is one subclass per code, grouped by class of
error, so ``except rxd.Busy`` and ``except rxd.ModelError`` both work. Match on classes or
codes, never on messages.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class RxdError(Exception):
    """An error from rxd (or from this client about rxd).

    ``code`` is the wire error code (PROTOCOL.md, "Error codes"), or ``None`` for errors of
    this client that have none (:class:`ConnectionClosed`, :class:`ClientError`).
    """

    code: Optional[int] = None
    name: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        needed_bytes: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: For ``output_region_too_small``: the bytes the output (or area) needed.
        self.needed_bytes = needed_bytes

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.name} ({self.code}): {self.message}"


# Classes of errors.
class ProtocolError(RxdError):
    """The connection broke the protocol (100–105)."""


class InvalidRequest(RxdError):
    """The request is well-formed but wrong (200–207)."""

    code = 200
    name = "invalid_request"


class ModelError(RxdError):
    """The model is unknown, not ready or failed to load (300–302)."""


class Unavailable(RxdError):
    """The daemon cannot serve this now: busy, past the deadline, stopping, over budget
    (500–506). Retrying later may succeed."""


class ArenaError(RxdError):
    """A shared-memory arena problem (600–603)."""


class ServerError(RxdError):
    """The daemon failed (900–901)."""


class MalformedMessage(ProtocolError):
    """The frame body is not a valid message."""

    code = 100
    name = "malformed_message"


class FrameTooLarge(ProtocolError):
    """A frame over the limit; the connection closed."""

    code = 101
    name = "frame_too_large"


class UnsupportedVersion(ProtocolError):
    """The daemon does not speak this protocol version."""

    code = 102
    name = "unsupported_version"


class HandshakeRequired(ProtocolError):
    """A request before the handshake, or a second Hello."""

    code = 103
    name = "handshake_required"


class BadRequestId(ProtocolError):
    """Request id 0 or already in flight."""

    code = 104
    name = "bad_request_id"


class UnexpectedFd(ProtocolError):
    """A file descriptor after the handshake."""

    code = 105
    name = "unexpected_fd"


class MissingInput(InvalidRequest):
    """A model input was not given."""

    code = 201
    name = "missing_input"


class UnknownInput(InvalidRequest):
    """An input name the model does not have."""

    code = 202
    name = "unknown_input"


class DtypeMismatch(InvalidRequest):
    """An input's dtype differs from the model's."""

    code = 203
    name = "dtype_mismatch"


class ShapeMismatch(InvalidRequest):
    """Rank or a fixed dimension differs, or a dimension is 0."""

    code = 204
    name = "shape_mismatch"


class DataLengthMismatch(InvalidRequest):
    """Byte length is not elements × dtype size."""

    code = 205
    name = "data_length_mismatch"


class UnknownOutput(InvalidRequest):
    """A requested output the model does not have."""

    code = 206
    name = "unknown_output"


class TensorTooLarge(InvalidRequest):
    """A tensor over the limits (the model's max_dims, …)."""

    code = 207
    name = "tensor_too_large"


class UnknownModel(ModelError):
    """No such model or version."""

    code = 300
    name = "unknown_model"


class ModelNotReady(ModelError):
    """The version exists but is not ready."""

    code = 301
    name = "model_not_ready"


class LoadFailed(ModelError):
    """Loading the model failed."""

    code = 302
    name = "load_failed"


class PermissionDenied(RxdError):
    """An admin operation (or priority) by a peer that is not an admin."""

    code = 400
    name = "permission_denied"


class Busy(Unavailable):
    """The model's queue is full; retry later."""

    code = 500
    name = "busy"


class DeadlineExceeded(Unavailable):
    """The request's timeout passed before it ran (or before its answer came)."""

    code = 501
    name = "deadline_exceeded"


class ShuttingDown(Unavailable):
    """The daemon is stopping."""

    code = 502
    name = "shutting_down"


class OverBudget(Unavailable):
    """The model does not fit its device's memory budget."""

    code = 503
    name = "over_budget"


class UnreadAnswers(Unavailable):
    """This connection left too many answers unread; this one was dropped."""

    code = 504
    name = "unread_answers"


class ConnectionLimit(Unavailable):
    """This user holds its share of connections."""

    code = 505
    name = "connection_limit"


class ConnectionTimeout(Unavailable):
    """A handshake, frame or idle timeout closed the connection."""

    code = 506
    name = "connection_timeout"


class ArenaUnavailable(ArenaError):
    """No arena, or the arena asked for was refused."""

    code = 600
    name = "arena_unavailable"


class ArenaOutOfRange(ArenaError):
    """A reference outside the arena."""

    code = 601
    name = "arena_out_of_range"


class ArenaMisaligned(ArenaError):
    """A reference not aligned for its dtype."""

    code = 602
    name = "arena_misaligned"


class OutputRegionTooSmall(ArenaError):
    """An output region or area is too small (see needed_bytes)."""

    code = 603
    name = "output_region_too_small"


class InferenceFailed(ServerError):
    """ONNX Runtime failed while running the model."""

    code = 900
    name = "inference_failed"


class Internal(ServerError):
    """A bug or unexpected condition in the daemon."""

    code = 901
    name = "internal"


class Timeout(DeadlineExceeded, TimeoutError):
    """No answer came within the call's ``timeout`` (raised by this client; the request's
    arena slots are freed when its answer comes)."""


class ConnectionClosed(RxdError, ConnectionError):
    """The connection to the daemon closed before the answer came (the daemon stopped or
    restarted, or closed this connection). The next call reconnects."""


class ClientError(RxdError, ValueError):
    """This client refused a call before sending it (an input it cannot send, a closed
    result, ...)."""


class ResultClosed(ClientError):
    """An output was read from a :class:`rxd.Result` after it was closed."""


_BY_CODE: Dict[int, Type[RxdError]] = {
    int(c.code or 0): c
    for c in [
        MalformedMessage, FrameTooLarge, UnsupportedVersion, HandshakeRequired, BadRequestId,
        UnexpectedFd, InvalidRequest, MissingInput, UnknownInput, DtypeMismatch, ShapeMismatch,
        DataLengthMismatch, UnknownOutput, TensorTooLarge, UnknownModel, ModelNotReady,
        LoadFailed, PermissionDenied, Busy, DeadlineExceeded, ShuttingDown, OverBudget,
        UnreadAnswers, ConnectionLimit, ConnectionTimeout, ArenaUnavailable, ArenaOutOfRange,
        ArenaMisaligned, OutputRegionTooSmall, InferenceFailed, Internal,
    ]
}


def from_wire(err: Dict[str, object]) -> RxdError:
    """The exception for a wire ``Error`` map (``code``, ``message``, ``needed_bytes``)."""
    code = err.get("code")
    message = str(err.get("message", ""))
    needed = err.get("needed_bytes")
    needed_bytes = needed if isinstance(needed, int) else None
    if not isinstance(code, int):
        return ProtocolError(f"an error without a code: {message}")
    cls = _BY_CODE.get(code)
    if cls is None:
        e = RxdError(message, code=code, needed_bytes=needed_bytes)
        e.name = f"error_{code}"
        return e
    return cls(message, needed_bytes=needed_bytes)


def error_class(code: int) -> Type[RxdError]:
    """The exception class for a wire code (:class:`RxdError` for codes this client does not
    know)."""
    return _BY_CODE.get(code, RxdError)
