"""The asyncio client, :class:`AsyncClient`: the same protocol core as the blocking client,
driven by an asyncio ``BufferedProtocol`` (answers are read straight into their buffers)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _handshake, _ops, _wire, errors
from ._core import Call, Connection, Inputs, Key, Memory, Options, needs_signature
from ._ops import PathOrBytes, read_model_file
from .client import _MODEL_ERRORS, _empty
from .result import Result
from .types import (
    CompressReply,
    DeviceSummary,
    Health,
    MetricsReport,
    ModelInfo,
    ModelSummary,
    PublishReply,
    Settings,
    Status,
)


class _Answer:
    """The answer to one request, awaited by the task that sent it: a future, duck-typed as
    asyncio allows (``_asyncio_future_blocking``, what ``asyncio.isfuture`` looks for), that
    the protocol completes when it reads the answer. :meth:`resume` runs the awaiting task's
    wake-up at once, from the read callback: an ``asyncio.Future`` would schedule it, which
    costs every answer one more turn of the event loop (an ``epoll_wait`` and the loop's
    bookkeeping). Completed any other way (:meth:`set_result`, :meth:`cancel`) it schedules
    its callbacks as an ``asyncio.Future`` does, so ``wait_for``, cancellation and timeouts
    behave as with one."""

    _asyncio_future_blocking = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = 0  # 0: waiting, 1: answered, 2: cancelled
        self._callbacks: List[Tuple[Callable[[Any], Any], Any]] = []
        self._message: Optional[str] = None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != 0

    def cancelled(self) -> bool:
        return self._state == 2

    def result(self) -> None:
        self.exception()

    def exception(self) -> Optional[BaseException]:
        if self._state == 2:
            raise asyncio.CancelledError() if self._message is None else asyncio.CancelledError(self._message)
        if self._state == 0:
            raise asyncio.InvalidStateError("no answer yet")
        return None

    def add_done_callback(self, fn: Callable[[Any], Any], *, context: Any = None) -> None:
        if self._state:
            self._loop.call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], Any]) -> int:
        kept = [(f, c) for f, c in self._callbacks if f != fn]
        removed = len(self._callbacks) - len(kept)
        self._callbacks = kept
        return removed

    def cancel(self, msg: Optional[str] = None) -> bool:
        if self._state:
            return False
        self._state, self._message = 2, msg
        self._schedule()
        return True

    def set_result(self, _: None = None) -> None:
        """Answered (or failed: the call says which); callbacks scheduled."""
        if not self._state:
            self._state = 1
            self._schedule()

    def _schedule(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn, ctx in callbacks:
            self._loop.call_soon(fn, self, context=ctx)

    def resume(self) -> None:
        """Answered: runs the callbacks (the awaiting task's next step) now. Only from a
        callback of the event loop, outside any task — the protocol's read callback."""
        if self._state:
            return
        self._state = 1
        callbacks, self._callbacks = self._callbacks, []
        for fn, ctx in callbacks:
            try:
                if ctx is None:
                    fn(self)
                else:
                    ctx.run(fn, self)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as e:  # as the event loop does for a failing callback
                self._loop.call_exception_handler({"message": "exception in an answer's callback", "exception": e, "future": self})

    def __await__(self) -> Any:
        if not self._state:
            self._asyncio_future_blocking = True
            yield self
        if not self._state:
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: Optional[asyncio.Transport] = None
        self.lost = False
        self._drained: Optional[asyncio.Future[None]] = None
        self.loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            answered = self.conn.feed(nbytes)
        except (_wire.FrameError, ValueError) as e:
            self._lose(f"undecodable answer: {e}")
            if self.transport is not None:
                self.transport.abort()
            return
        for call in answered:
            w = call.waiter
            if w is not None:
                w.resume()

    def eof_received(self) -> Optional[bool]:
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._lose(self.conn.closed or (f"the connection broke: {exc}" if exc else "the daemon closed the connection"))
        if not self.gone.done():
            self.gone.set_result(None)

    def _lose(self, reason: str) -> None:
        self.lost = True
        for call in self.conn.fail_all(reason):
            w = call.waiter
            if w is not None and not w.done():
                w.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def send(self, frame: Sequence[Union[bytes, memoryview]]) -> None:
        assert self.transport is not None
        if len(frame) == 1:
            self.transport.write(frame[0])
        elif len(frame) == 2 and len(frame[1]) <= 1 << 16:
            self.transport.write(b"".join(frame))  # one send for a small frame, not two
        else:
            for b in frame:
                self.transport.write(b)

    @property
    def paused(self) -> bool:
        """The transport's buffer is full: wait for :meth:`drain` before sending more."""
        return self._drained is not None and not self._drained.done()

    async def drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            await self._drained


class AsyncClient:
    """An asyncio connection to rxd. Any number of tasks may await requests at once; they are
    in flight together on the one connection and answers are matched by id. Cancelling a
    task that awaits an answer frees what its request holds in the arena as soon as the
    daemon has answered it (the daemon may read and write those ranges until then).

    Same options as :class:`rxd.Client`. Connect with ``await client.connect()`` or
    ``async with rxd.AsyncClient(...) as client:`` (a first request also connects).
    """

    def __init__(
        self,
        socket: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        arena_bytes: int = 64 << 20,
        inline_threshold: int = 64 << 10,
        client_name: Optional[str] = None,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        arena_fallback: bool = True,
    ) -> None:
        from . import __version__

        self._options = Options(
            socket=_handshake.socket_path(socket),
            arena_bytes=int(arena_bytes),
            inline_threshold=int(inline_threshold),
            client_name=client_name or f"rxd-python {__version__} (asyncio)",
            connect_timeout=float(connect_timeout),
            reconnect=reconnect,
            arena_fallback=arena_fallback,
        )
        self._memory = Memory()
        self._proto: Optional[_Protocol] = None
        self._connecting: Optional[asyncio.Lock] = None
        self._signatures: Dict[Key, "asyncio.Future[Optional[Dict[str, Any]]]"] = {}
        self._closed = False
        self._ever = False

    # -- connection ---------------------------------------------------------------------------
    async def connect(self) -> "AsyncClient":
        """Connects (and shakes hands) if not connected."""
        await self._ensure()
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; requests in flight raise :class:`rxd.ConnectionClosed`."""
        self._closed = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto._lose("the client was closed")
            proto.transport.close()
            # The socket is closed once the loop has flushed what is queued for it.
            try:
                await asyncio.wait_for(asyncio.shield(proto.gone), 5.0)
            except asyncio.TimeoutError:
                proto.transport.abort()

    async def _open(self, timeout: float) -> _Protocol:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        arena_bytes = self._options.arena_bytes
        while True:
            sock = _handshake.new_socket()
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, self._options.socket), timeout)
                await loop.sock_sendall(sock, _wire.hello(self._options.client_name, arena_bytes))
                reader = _handshake.WelcomeReader()
                while True:
                    try:
                        if reader.read(sock):
                            break
                    except BlockingIOError:
                        await _readable(loop, sock, deadline)
                conn = reader.finish(self._options, self._memory)
                _, proto = await loop.create_unix_connection(lambda: _Protocol(conn), sock=sock)
                return proto
            except errors.ArenaUnavailable:
                sock.close()
                if arena_bytes == 0 or not self._options.arena_fallback:
                    raise
                arena_bytes = 0
            except asyncio.TimeoutError as e:
                sock.close()
                raise errors.Timeout(f"no welcome from {self._options.socket} within {timeout:.1f} s") from e
            except BaseException:
                sock.close()
                raise

    async def _ensure(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._closed:
            raise errors.ConnectionClosed("the client is closed")
        if self._ever and not self._options.reconnect:
            raise errors.ConnectionClosed(
                (proto.conn.closed if proto is not None else None) or "not connected (reconnect=False)"
            )
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and not proto.lost:
                return proto
            deadline = time.monotonic() + self._options.connect_timeout
            delay = 0.02
            while True:
                try:
                    proto = await self._open(max(0.05, deadline - time.monotonic()))
                    break
                except (OSError, errors.ConnectionClosed, errors.ShuttingDown) as e:
                    if not self._ever or time.monotonic() + delay > deadline:
                        if not self._ever:
                            raise
                        raise errors.ConnectionClosed(f"cannot reconnect to {self._options.socket}: {e}") from e
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            self._proto = proto
            self._ever = True
            return proto

    def _conn(self) -> Connection:
        if self._proto is None:
            raise errors.ConnectionClosed("not connected: await client.connect() first")
        return self._proto.conn

    @property
    def welcome(self) -> Dict[str, Any]:
        """What the daemon said in the handshake."""
        return self._conn().welcome

    @property
    def arena_bytes(self) -> int:
        arena = self._conn().arena
        return 0 if arena is None else arena.size

    def arena_free_bytes(self) -> int:
        arena = self._conn().arena
        return 0 if arena is None else arena.free_bytes()

    def arena_free_ranges(self) -> List[Tuple[int, int]]:
        arena = self._conn().arena
        return [] if arena is None else arena.free_ranges()

    def empty(self, shape: Union[int, Sequence[int]], dtype: Any = np.float32) -> "np.ndarray[Any, Any]":
        """A writable array in the shared-memory arena, sent without a copy (see
        :meth:`rxd.Client.empty`). Needs a connection: ``await client.connect()`` first."""
        return _empty(self._conn(), shape, dtype)

    def zeros(self, shape: Union[int, Sequence[int]], dtype: Any = np.float32) -> "np.ndarray[Any, Any]":
        a = self.empty(shape, dtype)
        a[...] = 0
        return a

    def in_arena(self, array: "np.ndarray[Any, Any]") -> bool:
        arena = self._conn().arena
        return arena is not None and arena.offset_of(np.asarray(array)) is not None

    # -- requests -----------------------------------------------------------------------------
    async def _roundtrip(self, build: Callable[[Connection], Call], timeout: Optional[float]) -> Tuple[Connection, Call]:
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._ensure()
        conn = proto.conn
        call = build(conn)
        await self._exchange(proto, call, timeout)
        return conn, call

    @staticmethod
    async def _exchange(proto: _Protocol, call: Call, timeout: Optional[float]) -> None:
        """Sends ``call`` and waits for its answer."""
        waiter = _Answer(proto.loop)
        call.waiter = waiter
        try:
            proto.send(call.frame)
            call.frame = []
            if proto.paused:
                await proto.drain()
            if timeout is None:
                await waiter
            else:
                try:
                    await asyncio.wait_for(waiter, timeout)
                except asyncio.TimeoutError:
                    raise errors.Timeout(f"no answer within {timeout} s") from None
        except BaseException:
            proto.conn.abandon(call)
            raise

    async def _control(self, op: str, args: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Any:
        conn, call = await self._roundtrip(lambda c: c.control(c.new(op), args), timeout)
        return conn.outcome(call)

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: Optional[int] = None,
        outputs: Optional[Sequence[str]] = None,
        priority: Optional[int] = None,
        timeout: Optional[float] = None,
        copy: bool = False,
    ) -> Result:
        """Runs ``model`` on ``inputs``; see :meth:`rxd.Client.infer`."""
        key: Key = (model, version)
        if key in self._memory.signatures:  # the usual case: no coroutine for the lookup
            signature = self._memory.signatures[key]
        else:
            signature = await self._signature(model, version, inputs, timeout)
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._ensure()
        conn = proto.conn
        call = conn.infer(
            conn.new("infer"), model, inputs, version=version, outputs=outputs, priority=priority,
            timeout=timeout, copy=copy, signature=signature,
        )
        if timeout is None:
            # The usual case, without another coroutine: _exchange's steps.
            waiter = call.waiter = _Answer(proto.loop)
            try:
                proto.send(call.frame)
                call.frame = []
                if proto.paused:
                    await proto.drain()
                await waiter
            except BaseException:
                conn.abandon(call)
                raise
        else:
            await self._exchange(proto, call, timeout + max(0.5, timeout))
        return conn.result(call)

    async def _signature(
        self, model: str, version: Optional[int], inputs: Inputs, timeout: Optional[float]
    ) -> Optional[Dict[str, Any]]:
        key: Key = (model, version)
        if key in self._memory.signatures:
            return self._memory.signatures[key]
        if not needs_signature(inputs) and (timeout is not None or version is not None):
            return None
        pending = self._signatures.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Optional[Dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._signatures[key] = fut
        try:
            info: Optional[Dict[str, Any]] = await self._control("model_info", _ops.model_ref(model, version))
        except _MODEL_ERRORS as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        except errors.RxdError:
            info = None
        except BaseException as e:
            fut.set_exception(errors.ConnectionClosed(f"the signature lookup failed: {e!r}"))
            fut.exception()
            raise
        finally:
            self._signatures.pop(key, None)
        self._memory.signatures[key] = info
        fut.set_result(info)
        return info

    # -- control and observability --------------------------------------------------------------
    async def models(self) -> List[ModelSummary]:
        """Every model version the daemon knows, with its state and counters."""
        out: List[ModelSummary] = (await self._control("list_models"))["models"]
        return out

    async def model_info(self, model: str, version: Optional[int] = None) -> ModelInfo:
        """A model version's signature and state (loads it if needed); remembered as the
        signature later requests use."""
        out: ModelInfo = await self._control("model_info", _ops.model_ref(model, version))
        self._memory.learn((model, version), dict(out))
        return out

    async def status(self) -> Status:
        out: Status = await self._control("status")
        return out

    async def health(self) -> Health:
        out: Health = await self._control("health")
        return out

    async def metrics(self) -> MetricsReport:
        out: MetricsReport = await self._control("metrics")
        return out

    async def devices(self) -> List[DeviceSummary]:
        out: List[DeviceSummary] = (await self._control("devices"))["devices"]
        return out

    # -- admin ------------------------------------------------------------------------------------
    async def load(self, model: str, version: Optional[int] = None) -> ModelSummary:
        out: ModelSummary = await self._control("load", _ops.model_ref(model, version))
        return out

    async def unload(self, model: str, version: Optional[int] = None) -> ModelSummary:
        out: ModelSummary = await self._control("unload", _ops.model_ref(model, version))
        return out

    async def pin(self, model: str, version: Optional[int] = None) -> ModelSummary:
        out: ModelSummary = await self._control("pin", _ops.model_ref(model, version))
        return out

    async def unpin(self, model: str, version: Optional[int] = None) -> ModelSummary:
        out: ModelSummary = await self._control("unpin", _ops.model_ref(model, version))
        return out

    async def reload(self) -> List[ModelSummary]:
        out: List[ModelSummary] = (await self._control("reload"))["models"]
        return out

    async def rebalance(self, model: Optional[str] = None) -> List[ModelSummary]:
        """Admin: places versions again over their devices; see :meth:`rxd.Client.rebalance`."""
        args = {} if model is None else {"model": model}
        out: List[ModelSummary] = (await self._control("rebalance", args))["models"]
        return out

    async def configure(self, model: str, version: Optional[int] = None, **settings: Any) -> Settings:
        """Admin: changes a model version's settings; see :meth:`rxd.Client.configure`."""
        out: Settings = await self._control("configure", _ops.configure_args(model, version, settings))
        return out

    async def compress(
        self,
        model: str,
        strategy: str = "int8-weights",
        *,
        version: Optional[int] = None,
        calibration: Optional[Mapping[str, Any]] = None,
        calibration_method: Optional[str] = None,
        eval: Optional[Mapping[str, Any]] = None,
        min_top1: Optional[float] = None,
        min_cosine: Optional[float] = None,
        dry_run: bool = False,
    ) -> CompressReply:
        """Admin: compresses a repository model; see :meth:`rxd.Client.compress`."""
        args = _ops.compress_args(
            model, strategy, version=version, calibration=calibration,
            calibration_method=calibration_method, eval=eval, min_top1=min_top1,
            min_cosine=min_cosine, dry_run=dry_run,
        )
        out: CompressReply = await self._control("compress", args)
        return out

    async def publish(self, model: str, source: PathOrBytes, *, version: Optional[int] = None) -> PublishReply:
        """Admin: publishes a model file into the repository; see :meth:`rxd.Client.publish`."""
        data = read_model_file(source)
        proto = await self._ensure()
        arena = proto.conn.arena
        fits = arena is not None and arena.free_bytes() >= len(data) + 64
        if not fits and len(data) + 4096 > proto.conn.max_frame:
            side = AsyncClient(
                self._options.socket,
                arena_bytes=len(data) + 4096,
                client_name=self._options.client_name,
                connect_timeout=self._options.connect_timeout,
                reconnect=False,
            )
            async with side:
                return await side.publish(model, data, version=version)
        conn, call = await self._roundtrip(lambda c: c.publish(c.new("publish"), model, data, version), None)
        out: PublishReply = conn.outcome(call)
        return out


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
    finally:
        loop.remove_reader(sock.fileno())
