"""The blocking client, :class:`Client`."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from . import _handshake, _wire, errors
from ._core import SENDING, SENT, UNSENT, Call, Connection, Inputs, Key, Memory, Options, needs_signature
from . import _ops
from ._ops import PathOrBytes, read_model_file
from .result import Result
from .types import CompressReply, DeviceSummary, Health, MetricsReport, ModelInfo, ModelSummary, PublishReply, Settings, Status

T = TypeVar("T")

#: Model errors a signature lookup passes on (the request would fail the same way); other
#: lookup failures only mean the output area is not sized.
_MODEL_ERRORS = (errors.UnknownModel, errors.LoadFailed, errors.OverBudget, errors.ModelNotReady)


class _Link:
    """One connection: the socket and its protocol state."""

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.send_lock = threading.Lock()
        #: The call whose thread reads the socket (and the ring's completions) for everyone
        #: (leader/followers): the reader's role, owned by a call so that giving the call up
        #: gives the role back, wherever an exception interrupted it.
        self.reader: Optional[Call] = None
        #: The byte counts of the reader's reads not yet counted by the frame reader, and of
        #: the sends of the frame being sent (under ``send_lock``): each lands here from the
        #: system call without a step between (list.extend over map: C calling C), so an
        #: exception raised after the call still knows what it did.
        self.got: List[int] = []
        self.sent: List[int] = []
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        self.dead = False


class Client:
    """A blocking connection to rxd. Thread-safe: any number of threads may call it at once;
    their requests are in flight together on the one connection and answers are matched by
    id (the waiting thread reads the socket itself, no extra thread).

    ``socket``: the daemon's socket (default ``$RXD_SOCKET``, else ``/run/rxd/rxd.sock``).
    ``arena_bytes``: the shared-memory arena to ask for (0: none; if the daemon refuses it the
    client connects without one unless ``arena_fallback=False``). Arrays of at least
    ``inline_threshold`` bytes go through the arena; smaller ones inline. ``reconnect``: after
    the daemon restarts or closes the connection, the next call connects again (waiting up to
    ``connect_timeout`` for the daemon to come back); calls in flight when it went away raise
    :class:`rxd.ConnectionClosed`. ``ring_entries``: ask for a shared-memory ring of that many
    entries (PROTOCOL.md, "The ring"; 0, the default: none): an inference made while no
    other call of this client is in flight, whose frame fits a slot (``ring_slot_bytes``),
    goes through shared memory and its answer is picked up there, spinning ``ring_spin``
    seconds before sleeping — for light models called one at a time, the socket's round trip
    is most of the cost. Other calls use the socket as always.
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
        ring_entries: int = 0,
        ring_slot_bytes: int = 16 << 10,
        ring_spin: float = 50e-6,
    ) -> None:
        from . import __version__

        self._options = Options(
            socket=_handshake.socket_path(socket),
            arena_bytes=int(arena_bytes),
            inline_threshold=int(inline_threshold),
            client_name=client_name or f"rxd-python {__version__}",
            connect_timeout=float(connect_timeout),
            reconnect=reconnect,
            arena_fallback=arena_fallback,
            ring_entries=int(ring_entries),
            ring_slot_bytes=int(ring_slot_bytes),
            ring_spin=float(ring_spin),
        )
        self._memory = Memory()
        self._lock = threading.Lock()
        #: Locks that threads waiting for their answers sleep on, each held until ``_wake``
        #: releases it. Not a Condition: Condition.wait lets the lock go in a step that an
        #: exception can separate from its ``try``, so that the ``with`` around the wait then
        #: releases a lock another thread holds.
        self._parked: List["threading.Lock"] = []
        self._connect_lock = threading.Lock()
        self._closed = False
        self._link: Optional[_Link] = None
        self._link = self._open(self._options.connect_timeout)

    # -- connection ---------------------------------------------------------------------------
    def _open(self, timeout: float) -> _Link:
        sock, conn = _handshake.connect_blocking(self._options, self._memory, timeout)
        return _Link(sock, conn)

    def _ensure(self) -> _Link:
        link = self._link
        if link is not None and not link.dead:
            return link
        if self._closed:
            raise errors.ConnectionClosed("the client is closed")
        if not self._options.reconnect:
            raise errors.ConnectionClosed(
                (link.conn.closed if link is not None else None) or "not connected (reconnect=False)"
            )
        with self._connect_lock:
            link = self._link
            if link is not None and not link.dead:
                return link
            deadline = time.monotonic() + self._options.connect_timeout
            delay = 0.02
            while True:
                try:
                    new = self._open(max(0.05, deadline - time.monotonic()))
                    break
                except (OSError, errors.ConnectionClosed, errors.ShuttingDown) as e:
                    if time.monotonic() + delay > deadline:
                        raise errors.ConnectionClosed(
                            f"cannot reconnect to {self._options.socket}: {e}"
                        ) from e
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
            with self._lock:
                self._link = new
            return new

    def _broken(self, link: _Link, reason: str) -> None:
        with self._lock:
            self._fail(link, reason)
        try:
            link.sock.close()
        except OSError:
            pass

    def _fail(self, link: _Link, reason: str) -> None:
        """Under the lock: the connection is unusable; every call in flight fails, and a
        thread waiting in poll() on the socket wakes (the socket is shut down)."""
        if link.dead:
            return
        link.dead = True
        link.conn.fail_all(reason)
        self._wake()
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Closes the connection. Arrays from results stay readable until collected."""
        self._closed = True
        link = self._link
        if link is not None:
            self._broken(link, "the client was closed")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def welcome(self) -> Dict[str, Any]:
        """What the daemon said in the handshake (``server``, ``max_frame_bytes``, ...)."""
        return self._ensure().conn.welcome

    @property
    def arena_bytes(self) -> int:
        """The size of the arena the daemon granted (0: none)."""
        arena = self._ensure().conn.arena
        return 0 if arena is None else arena.size

    @property
    def ring_requests(self) -> Optional[int]:
        """Inferences sent through the shared-memory ring on the current connection (None:
        it has no ring — not asked for, or not granted)."""
        ring = self._ensure().conn.ring
        return None if ring is None else int(ring.submitted)

    def arena_free_bytes(self) -> int:
        """Bytes of the arena not in use (0 without an arena)."""
        arena = self._ensure().conn.arena
        return 0 if arena is None else arena.free_bytes()

    def arena_free_ranges(self) -> List[Tuple[int, int]]:
        """The arena's free list as ``[(offset, length)]``; ``[(0, arena_bytes)]`` when nothing
        is in use."""
        arena = self._ensure().conn.arena
        return [] if arena is None else arena.free_ranges()

    # -- arrays in the arena ----------------------------------------------------------------------
    def empty(self, shape: Union[int, Sequence[int]], dtype: Any = np.float32) -> "np.ndarray[Any, Any]":
        """A writable array in the shared-memory arena: fill it in place and pass it to
        :meth:`infer`, which sends it without any copy. Its memory is reserved until it (and
        every view of it) is garbage-collected. Without an arena, or when the arena is full,
        an ordinary array (sent as any other: copied once into the arena, or inline)."""
        return _empty(self._ensure().conn, shape, dtype)

    def zeros(self, shape: Union[int, Sequence[int]], dtype: Any = np.float32) -> "np.ndarray[Any, Any]":
        """:meth:`empty`, filled with zeros."""
        a = self.empty(shape, dtype)
        a[...] = 0
        return a

    def in_arena(self, array: "np.ndarray[Any, Any]") -> bool:
        """Whether ``array`` lies in this connection's arena (and would be sent by reference)."""
        arena = self._ensure().conn.arena
        return arena is not None and arena.offset_of(np.asarray(array)) is not None

    # -- requests -------------------------------------------------------------------------------
    # Asynchronous exceptions (a signal handler raising, KeyboardInterrupt) may land between any
    # two steps of a call (CPython runs signal handlers at calls, function entries and
    # backward jumps). Whatever a call has done is recorded where its cleanup finds it: the
    # call exists (holding nothing) before it takes anything; whether its request went out is
    # Call.sent, settled from the counts of its sends (link.sent); the reader's role is owned
    # by the call; the counts of reads land in link.got, and answers are handed out by steps
    # that the next reader completes (_leftovers). _give_up, in one turn of the lock, gives the
    # role back, forgets a request never sent and abandons one sent; only a frame cut off in
    # the middle of its send closes the connection (the stream's framing is lost).
    def _roundtrip(self, op: str, build: Callable[[Connection, Call], Call], timeout: Optional[float]) -> Tuple[Connection, Call]:
        link = self._link
        if link is None or link.dead:
            link = self._ensure()
        conn = link.conn
        call: Optional[Call] = None
        try:
            with self._lock:
                call = conn.new(op)
                build(conn, call)
                self._alone(link, call)
            self._exchange(link, call, timeout)
        except BaseException:
            if call is not None:
                self._give_up(link, call)
            raise
        return conn, call

    def _alone(self, link: _Link, call: Call) -> bool:
        """Under the lock, just after ``call`` was made: when it is alone on the connection (the
        usual case of one thread), it takes the reader's role now, so that its thread reads
        its answer without another turn of the lock. Only alone: the daemon has nothing else
        to send that a send blocked on a full socket could keep unread."""
        if link.reader is None and not link.dead:
            self._leftovers(link)
            if len(link.conn.pending) == 1 and not link.dead:
                link.reader = call
                return True
        return False

    def _leftovers(self, link: _Link) -> None:
        """Under the lock, by a thread about to read while no other does: answers an
        interrupted reader left behind — whole frames read and not handed out, the ring's
        completions (answers to calls given up on the ring)."""
        conn = link.conn
        try:
            if link.got:
                conn.reader.received_from(link.got)
            conn.take_frames()
            ring = conn.ring
            while ring is not None and ring.ready():
                body, _ = ring.peek()
                if body is not None:
                    conn.take_body(body)
                ring.consume(body is None)
        except (_wire.FrameError, ValueError) as e:
            self._fail(link, f"undecodable answer: {e}")

    def _give_up(self, link: _Link, call: Call) -> None:
        """The caller of ``call`` stops waiting (a timeout, an exception landing anywhere):
        see above. Idempotent."""
        with self._lock:
            if link.reader is call:
                link.reader = None
            self._wake()  # also those a wake cut short by this exception left asleep
            ring = link.conn.ring
            if call.sent == SENDING and call.tail >= 0 and ring is not None:
                call.sent = SENT if ring.settle(call.tail) else UNSENT
            lost = not link.conn.give_up(call)
            if lost:
                self._fail(link, "an exception interrupted a send on the connection")
        if lost:
            try:
                link.sock.close()
            except OSError:
                pass

    def _exchange(self, link: _Link, call: Call, timeout: Optional[float]) -> None:
        """Sends ``call`` and waits for its answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with link.send_lock:
            if not call.done:  # else the connection failed: its outcome says so
                sent = link.sent
                sent.clear()
                call.sent = SENDING
                try:
                    _send_all(link.sock, call.frame, sent)
                except OSError as e:
                    self._broken(link, f"the connection broke: {e}")
                except BaseException:
                    n = sum(sent)
                    if n == 0:
                        call.sent = UNSENT
                    elif n == sum(memoryview(b).nbytes for b in call.frame):
                        call.sent = SENT
                    else:  # part of the frame went: nothing may follow it
                        self._broken(link, "an exception interrupted a send on the connection")
                    raise
                call.sent = SENT
        call.frame = []
        self._wait(link, call, deadline, timeout)

    def _exchange_ring(self, link: _Link, call: Call, timeout: Optional[float]) -> bool:
        """As the reader, alone: sends an inference through the ring and waits for its answer
        there (the socket read meanwhile whenever it has something: another thread's answer,
        or the daemon closing). False: it does not fit the ring; nothing was sent."""
        ring = link.conn.ring
        data = b"".join(call.frame)
        call.tail = ring.sq_tail
        call.sent = SENDING
        if not ring.submit(data):
            call.sent = UNSENT
            call.tail = -1
            return False
        call.sent = SENT
        call.frame = []
        deadline = None if timeout is None else time.monotonic() + timeout
        spin = True
        while not call.done:
            if ring.wait(deadline, spin):
                broken: Optional[str] = None
                with self._lock:
                    try:
                        body, rid = ring.peek()
                        if body is not None:
                            link.conn.take_body(body)
                        elif rid == call.id:
                            # Redirected: the answer comes on the socket. (A redirect of
                            # another call's, given up, is the socket reader's affair.)
                            link.reader = None
                            self._wake()
                        ring.consume(body is None)
                    except (_wire.FrameError, ValueError) as e:
                        broken = f"undecodable answer: {e}"
                if broken is not None:
                    self._broken(link, broken)
                elif link.reader is not call:
                    self._wait(link, call, deadline, timeout)
                    return True
                continue
            spin = False
            if link.poll.poll(0):
                self._pump(link)
            if link.dead:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.Timeout(f"no answer within {timeout} s")
        with self._lock:
            if link.reader is call:
                link.reader = None
                self._wake()
        return True

    def _recv(self, link: _Link) -> Optional[str]:
        """As the reader: one read from the socket into the frame reader, counted; the reason
        the connection broke, if it did. An exception that interrupts a blocked read has read
        nothing; one raised just after it finds the count in ``link.got``."""
        reader = link.conn.reader
        got = link.got
        try:
            got.extend(map(link.sock.recv_into, (reader.get_buffer(),)))
        except OSError as e:
            return f"the connection broke: {e}"
        n = got[-1]
        reader.received_from(got)
        if n == 0:
            return link.conn.closed or "the daemon closed the connection"
        return None

    def _pump(self, link: _Link) -> None:
        """As the reader, keeping the role: one read of what the socket has (it has
        something), the answers handed out."""
        self._hand_out(link, self._recv(link), None)

    def _hand_out(self, link: _Link, broken: Optional[str], leaving: Optional[Call]) -> None:
        """After a read: the whole frames handed out, the waiters woken, and the reader's role
        given up when ``leaving`` holds it; the connection failed if it broke."""
        with self._lock:
            if leaving is not None and link.reader is leaving:
                link.reader = None
            try:
                link.conn.take_frames()
            except (_wire.FrameError, ValueError) as e:
                broken = f"undecodable answer: {e}"
            self._wake()
        if broken is not None:
            self._broken(link, broken)

    def _wake(self) -> None:
        """Under the lock: lets the threads waiting for answers look again (one of them may
        take the reader's role). Each is let go before it leaves the list, so an exception
        between leaves it to the next wake, which tolerates finding it let go."""
        parked = self._parked
        while parked:
            try:
                parked[-1].release()
            except RuntimeError:
                pass  # let go by a wake cut short
            parked.pop()

    def _wait(self, link: _Link, call: Call, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Until ``call`` is answered: reads the socket while no other thread does (taking the
        reader's role, unless it holds it already), else waits for the reader to hand out the
        answers."""
        while True:
            if link.reader is not call:
                with self._lock:
                    if call.done:
                        return
                    if link.reader is None and not link.dead:
                        link.reader = call
                        self._leftovers(link)
                        if call.done:
                            link.reader = None
                            self._wake()
                            return
                        park = None
                    else:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise errors.Timeout(f"no answer within {timeout} s")
                        park = threading.Lock()
                        park.acquire()
                        self._parked.append(park)
                if park is not None:
                    # Holding nothing: an exception here leaves at most a stale lock in the
                    # list, let go by the next wake.
                    park.acquire(True, -1 if remaining is None else remaining)
                    continue
            self._read(link, call, deadline)
            if call.done:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.Timeout(f"no answer within {timeout} s")

    def _read(self, link: _Link, call: Call, deadline: Optional[float]) -> None:
        """As the reader (``link.reader`` is ``call``): reads what the socket has (waiting until
        ``deadline``), hands out the answers and gives up the reader's role, in one go."""
        broken: Optional[str] = None
        if deadline is None or link.poll.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1)):
            broken = self._recv(link)
        self._hand_out(link, broken, call)

    def _control(self, op: str, args: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Any:
        conn, call = self._roundtrip(op, lambda c, call: c.control(call, args), timeout)
        return conn.outcome(call)

    def infer(
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
        """Runs ``model`` on ``inputs`` (``{input name: array}``, or one array for a model with
        one input) and returns its outputs (:class:`rxd.Result`, by output name).

        ``version``: a version (default: the one the daemon serves). ``outputs``: the outputs
        wanted (default all). ``priority``: 0–255, higher first (non-admins up to the daemon's
        ``max-peer-priority``, 15 by default). ``timeout``: seconds; a request that has not
        started running by then is answered :class:`rxd.DeadlineExceeded`, and the call waits
        no longer than that for its answer (:class:`rxd.Timeout`). ``copy``: owned, writable
        arrays instead of views of the arena.

        Arrays from :meth:`empty` (or outputs of an earlier result) are sent by reference;
        other arrays of at least ``inline_threshold`` bytes are copied into the arena once;
        smaller ones travel inline. Outputs come through the arena when their size is known
        before the run (from the model's signature, or the previous call)."""
        key: Key = (model, version)
        signatures = self._memory.signatures
        signature = signatures[key] if key in signatures else self._signature(model, version, inputs, timeout)
        link = self._link
        if link is None or link.dead:
            link = self._ensure()
        conn = link.conn
        call: Optional[Call] = None
        try:
            with self._lock:
                call = conn.new("infer")
                conn.infer(
                    call, model, inputs, version=version, outputs=outputs, priority=priority,
                    timeout=timeout, copy=copy, signature=signature,
                )
                reading = self._alone(link, call)
            wait = None if timeout is None else timeout + max(0.5, timeout)
            if not (reading and conn.ring is not None and self._exchange_ring(link, call, wait)):
                self._exchange(link, call, wait)
            return conn.result(call)
        except BaseException:
            if call is not None:
                self._give_up(link, call)
            raise

    def _signature(
        self, model: str, version: Optional[int], inputs: Inputs, timeout: Optional[float]
    ) -> Optional[Dict[str, Any]]:
        # Asked once per model (and version): it may load the model, as the request would —
        # not for a request with a deadline (the lookup would not respect it) nor one naming a
        # version (unless the inputs' names must come from it).
        key: Key = (model, version)
        if key in self._memory.signatures:
            return self._memory.signatures[key]
        if not needs_signature(inputs) and (timeout is not None or version is not None):
            return None
        try:
            info: Optional[Dict[str, Any]] = self._control("model_info", _ops.model_ref(model, version))
        except _MODEL_ERRORS:
            raise
        except errors.RxdError:
            info = None
        self._memory.signatures[key] = info
        return info

    # -- control and observability ------------------------------------------------------------
    def models(self) -> List[ModelSummary]:
        """Every model version the daemon knows, with its state and counters."""
        out: List[ModelSummary] = self._control("list_models")["models"]
        return out

    def model_info(self, model: str, version: Optional[int] = None) -> ModelInfo:
        """A model version's signature (inputs, outputs, limits) and state; loads it if needed,
        as a request would. Remembered as the signature later requests use (for input names,
        the dtype of lists, and the output area)."""
        info: ModelInfo = self._control("model_info", _ops.model_ref(model, version))
        self._memory.learn((model, version), dict(info))
        return info

    def status(self) -> Status:
        """What the daemon is and serves (version, uptime, configuration in force, counters)."""
        out: Status = self._control("status")
        return out

    def health(self) -> Health:
        """``state`` healthy/degraded/unhealthy with ``reasons``, workers, queue, memory."""
        out: Health = self._control("health")
        return out

    def metrics(self) -> MetricsReport:
        """Every metric: process, per model (rates, latency percentiles, batches, cache),
        devices, GPUs."""
        out: MetricsReport = self._control("metrics")
        return out

    def devices(self) -> List[DeviceSummary]:
        """Devices with their memory budgets and resident models."""
        out: List[DeviceSummary] = self._control("devices")["devices"]
        return out

    # -- admin --------------------------------------------------------------------------------------
    def load(self, model: str, version: Optional[int] = None) -> ModelSummary:
        """Admin: loads a model version (evicting idle ones if its device's budget needs room)."""
        out: ModelSummary = self._control("load", _ops.model_ref(model, version))
        return out

    def unload(self, model: str, version: Optional[int] = None) -> ModelSummary:
        """Admin: unloads a model version now (a later request may load it again)."""
        out: ModelSummary = self._control("unload", _ops.model_ref(model, version))
        return out

    def pin(self, model: str, version: Optional[int] = None) -> ModelSummary:
        """Admin: keeps a model version resident (never evicted); loads it if needed."""
        out: ModelSummary = self._control("pin", _ops.model_ref(model, version))
        return out

    def unpin(self, model: str, version: Optional[int] = None) -> ModelSummary:
        """Admin: lets a pinned version be evicted again."""
        out: ModelSummary = self._control("unpin", _ops.model_ref(model, version))
        return out

    def reload(self) -> List[ModelSummary]:
        """Admin: re-reads the configuration and the repository, as SIGHUP does."""
        out: List[ModelSummary] = self._control("reload")["models"]
        return out

    def rebalance(self, model: Optional[str] = None) -> List[ModelSummary]:
        """Admin: places the resident versions of ``model`` (all models without one) again
        over the devices their model.toml allows (``spread``); returns them with their
        ``shares``."""
        args = {} if model is None else {"model": model}
        out: List[ModelSummary] = self._control("rebalance", args)["models"]
        return out

    def configure(self, model: str, version: Optional[int] = None, **settings: Any) -> Settings:
        """Admin: changes a model version's settings at run time — ``instances`` (workers),
        ``max_batch_rows``, ``max_queue_delay_us``, ``latency_target_ms`` (0: adaptive
        batching off), ``default_priority``, ``priority_aging_ms`` (0: strict priority),
        ``cache_bytes`` (0: cache off), ``clear_cache``, ``device``, ``persist``, ``retune``
        (measure the model again and serve with what load-time tuning chooses). Returns the
        settings in force."""
        out: Settings = self._control("configure", _ops.configure_args(model, version, settings))
        return out

    def compress(
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
        """Admin: compresses a repository model (``int8-weights``, ``dynamic-int8``, ``int4``,
        ``fp16``, ``fp16-weights``, ``prune:S``, joined with ``+``; or ``static-int8`` with
        ``calibration`` arrays by input name). The daemon compares it with the original on
        ``eval`` inputs (default: random ones) and publishes it as the next version only if
        the report passes ``min_top1``/``min_cosine`` (default 0.99)."""
        args = _ops.compress_args(
            model, strategy, version=version, calibration=calibration,
            calibration_method=calibration_method, eval=eval, min_top1=min_top1,
            min_cosine=min_cosine, dry_run=dry_run,
        )
        out: CompressReply = self._control("compress", args)
        return out

    def publish(self, model: str, source: PathOrBytes, *, version: Optional[int] = None) -> PublishReply:
        """Admin: publishes an ONNX model file (a path, or its bytes) into the daemon's
        repository as ``version`` (default: one more than the highest on disk) and has the
        daemon rescan it. The bytes go through the arena (on a connection with an arena of
        their size when this one's is too small); the daemon writes them atomically."""
        data = read_model_file(source)
        link = self._ensure()
        arena = link.conn.arena
        fits = arena is not None and arena.free_bytes() >= len(data) + 64
        if not fits and len(data) + 4096 > link.conn.max_frame:
            with Client(
                self._options.socket,
                arena_bytes=len(data) + 4096,
                client_name=self._options.client_name,
                connect_timeout=self._options.connect_timeout,
                reconnect=False,
            ) as side:
                return side.publish(model, data, version=version)
        conn, call = self._roundtrip("publish", lambda c, call: c.publish(call, model, data, version), None)
        out: PublishReply = conn.outcome(call)
        return out


def _empty(conn: Connection, shape: Union[int, Sequence[int]], dtype: Any) -> "np.ndarray[Any, Any]":
    dt = np.dtype(dtype)
    _wire.wire_dtype(dt)
    dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    arena = conn.arena
    slot = arena.alloc(nbytes) if arena is not None else None
    if slot is None:
        return np.empty(dims, dtype=dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    try:
        return slot.view(dims, dt.newbyteorder("<") if dt.byteorder == ">" else dt, writable=True)
    finally:
        slot.release()  # the array's own claim keeps it


def _send_all(sock: socket.socket, bufs: Sequence[Union[bytes, memoryview]], sent: List[int]) -> None:
    """Sends a frame, appending each send's byte count to ``sent`` from the call itself
    (list.extend over map), so that an exception tells how much of the frame went out."""
    data: Optional[Union[bytes, memoryview]]
    if len(bufs) == 1 and len(bufs[0]) <= 1 << 16:
        data = bufs[0]
    else:
        total = sum(len(b) for b in bufs)
        data = b"".join(bufs) if total <= 1 << 16 else None
    if data is not None:
        size = memoryview(data).nbytes  # in bytes, whatever the view's format
        sent.extend(map(sock.send, (data,)))
        if sent[-1] < size:  # rare: a full socket buffer
            rest = memoryview(data).cast("B")
            while sum(sent) < size:
                sent.extend(map(sock.send, (rest[sum(sent) :],)))
        return
    views: List[memoryview] = [memoryview(b).cast("B") for b in bufs]
    while views:
        sent.extend(map(sock.sendmsg, (views,)))
        n = sent[-1]
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


