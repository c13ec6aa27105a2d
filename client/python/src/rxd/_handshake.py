"""The handshake, shared by both clients: the Hello, the welcome (read with ``recvmsg`` so that
the arena's memfd passed with it is not lost), the arena mapped."""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, Optional, Tuple

from . import _wire, errors
from ._arena import Arena
from ._core import Connection, Memory, Options
from ._ring import Ring, futex_number


class WelcomeReader:
    """Collects the welcome frame and any fd that came with it, from ``recvmsg`` reads."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: List[int] = []

    def want(self) -> int:
        """Bytes still needed (0: complete)."""
        if len(self.buf) < 4:
            return 4 - len(self.buf)
        n: int = _wire.HEADER.unpack_from(self.buf, 0)[0]
        if n == 0 or n > _wire.MAX_HANDSHAKE_FRAME:
            raise errors.ProtocolError(f"a handshake frame of {n} bytes")
        return 4 + n - len(self.buf)

    def read(self, sock: socket.socket) -> bool:
        """One ``recvmsg``; True once the frame is whole. Raises on EOF."""
        msg, fds, _flags, _addr = socket.recv_fds(sock, self.want(), 4, socket.MSG_CMSG_CLOEXEC)
        self.fds.extend(fds)
        if not msg:
            self.close_fds()
            raise errors.ConnectionClosed("the daemon closed the connection in the handshake")
        self.buf += msg
        return self.want() == 0

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def finish(self, options: Options, memory: Memory) -> Connection:
        """The connection the welcome opens (its arena mapped), or the handshake's error."""
        try:
            reply = _wire.decode(bytes(self.buf[4:]))
            if not isinstance(reply, dict):
                raise errors.ProtocolError("the handshake reply is not a map")
            if "error" in reply:
                raise errors.from_wire(reply["error"])
            welcome: Dict[str, Any] = reply.get("welcome") or {}
            if int(welcome.get("protocol", 0)) != _wire.PROTOCOL_VERSION:
                raise errors.ProtocolError(f"the daemon answered protocol {welcome.get('protocol')}")
            size = int(welcome.get("arena_bytes", 0))
            grant = welcome.get("ring") if options.ring_entries > 0 else None
            arena: Optional[Arena] = None
            ring: Optional[Ring] = None
            if size > 0:
                if not self.fds:
                    raise errors.ProtocolError("an arena was granted but no fd came with the welcome")
                fd = self.fds.pop(0)
                if isinstance(grant, dict):
                    try:
                        ring = Ring(fd, size, grant, options.ring_spin)
                    except (ValueError, KeyError, TypeError) as e:
                        os.close(fd)
                        raise errors.ProtocolError(str(e)) from e
                # The tensors' part: before the ring (none when that part is empty).
                usable = int(grant["offset"]) if ring is not None and isinstance(grant, dict) else size
                if usable > 0:
                    arena = Arena(fd, size, usable)  # takes the fd
                else:
                    os.close(fd)
            conn = Connection(welcome, arena, options, memory)
            conn.ring = ring
            return conn
        finally:
            self.close_fds()


def socket_path(path: Optional["os.PathLike[str] | str"]) -> str:
    """The socket to use: ``path``, else ``$RXD_SOCKET``, else ``/run/rxd/rxd.sock``."""
    if path is not None:
        return os.fspath(path)
    return os.environ.get("RXD_SOCKET") or "/run/rxd/rxd.sock"


def new_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def connect_blocking(options: Options, memory: Memory, timeout: float) -> Tuple[socket.socket, Connection]:
    """Connects and shakes hands (asking for the arena; without one if the daemon refuses it
    and ``arena_fallback`` is set)."""
    arena_bytes = options.arena_bytes
    ring: Optional[Tuple[int, int]] = None
    if options.ring_entries > 0 and futex_number() is not None:
        ring = (options.ring_entries, options.ring_slot_bytes)
    while True:
        sock = new_socket()
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(options.socket)
            sock.sendall(_wire.hello(options.client_name, arena_bytes, ring))
            reader = WelcomeReader()
            while not reader.read(sock):
                pass
            conn = reader.finish(options, memory)
            sock.settimeout(None)
            return sock, conn
        except errors.ArenaUnavailable:
            sock.close()
            if (arena_bytes == 0 and ring is None) or not options.arena_fallback:
                raise
            # Without shared memory: no arena, no ring.
            arena_bytes, ring = 0, None
        except socket.timeout as e:
            sock.close()
            raise errors.Timeout(f"no welcome from {options.socket} within {timeout:.1f} s") from e
        except BaseException:
            sock.close()
            raise
