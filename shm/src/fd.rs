//! File descriptors between processes: an arena's memfd sent and received over a Unix socket
//! (SCM_RIGHTS), reads that close any fd that was not expected, a peer's groups taken from
//! the socket, and the listening socket a service manager passed at start (socket
//! activation: an fd handed over across exec rather than over a socket).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Sends `bytes` with `fd` attached (SCM_RIGHTS) in one `sendmsg`. Returns bytes sent; the
/// caller sends the rest (if any) with plain writes. Works on non-blocking sockets
/// (`WouldBlock` is returned as an error).
pub fn send_with_fd(sock: RawFd, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(bytes)];
    Ok(sendmsg::<()>(
        sock,
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

/// Receives into `buf` with `recvmsg`, taking at most one passed fd (extra fds are closed).
/// Returns the bytes read and the fd, if one came.
pub fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in our fd table for this message
                // (SCM_RIGHTS); nothing else owns it, so wrapping it transfers ownership once.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err(io::Error::other("ancillary data truncated"));
    }
    let first = if fds.is_empty() {
        None
    } else {
        Some(fds.swap_remove(0))
    };
    Ok((n, first))
}

/// `SO_PEERGROUPS` (Linux ≥ 4.13); the same number on every architecture rxd builds for
/// except mips and sparc, which it does not.
#[cfg(not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64")))]
const SO_PEERGROUPS: nix::libc::c_int = 59;

/// The supplementary groups of a connected Unix socket's peer as they were when it connected
/// (`SO_PEERGROUPS`): taken from the socket, so a peer that has exited, or whose pid now
/// belongs to another process, cannot lend its groups to anyone.
pub fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 64];
    loop {
        let mut len = nix::libc::socklen_t::try_from(groups.len() * size_of::<nix::libc::gid_t>())
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes; the kernel writes
        // at most `len` bytes into it and stores the size it needs (or wrote) in `len`.
        let rc = unsafe {
            nix::libc::getsockopt(
                sock.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<nix::libc::gid_t>();
        if rc == 0 {
            groups.truncate(n.min(groups.len()));
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` says how much is needed.
        if err.raw_os_error() == Some(nix::libc::ERANGE) && n > groups.len() && n <= 1 << 16 {
            groups.resize(n, 0);
            continue;
        }
        return Err(err);
    }
}

/// The most fds one message can carry (the kernel's `SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// What [`recv_taking_fds`] read: bytes, and any fds that came with them.
pub struct Received {
    pub bytes: usize,
    /// The fds that came, now owned by the caller. Closing one may block the thread that
    /// closes it (the last reference to a socket lingering on unsent data, a file on a FUSE
    /// mount whose server does not answer): where no fds are expected, hand them to a
    /// thread that may block.
    pub fds: Vec<OwnedFd>,
    /// The kernel had to discard fds for lack of room (`MSG_CTRUNC`; not with room for a
    /// whole message's worth, as here).
    pub truncated: bool,
}

/// Receives into `buf` with `recvmsg` where no fds are expected, with room for every fd a
/// message can carry: the kernel discarding fds itself would close them on this thread.
pub fn recv_taking_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in our fd table for this message
                // (SCM_RIGHTS); nothing else owns it: wrapping it takes ownership once.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// `SO_PASSRIGHTS` (Linux ≥ 6.16), the same number on every architecture rxd builds for
/// (as [`SO_PEERGROUPS`]).
#[cfg(not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64")))]
const SO_PASSRIGHTS: nix::libc::c_int = 83;

/// Makes the kernel refuse fds sent to `sock` from now on (`SO_PASSRIGHTS` off: the sender's
/// `sendmsg` fails with `EPERM`). `Ok(false)` where the kernel lacks the option (before
/// 6.16): fds sent are then received, and the reader must dispose of them.
pub fn refuse_passed_fds(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let off: nix::libc::c_int = 0;
    // SAFETY: `sock` is a live fd; the option value is a c_int of the size given.
    let rc = unsafe {
        nix::libc::setsockopt(
            sock.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&raw const off).cast(),
            size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(nix::libc::ENOPROTOOPT) {
        return Ok(false);
    }
    Err(err)
}

/// Makes closing `fd`, if it is a socket, abort its connection rather than wait for unsent
/// data to go (`SO_LINGER` on, 0 s): a socket a peer set to linger would otherwise block the
/// thread that closes it for the time the peer chose. Not a socket: nothing to do.
pub fn close_without_lingering(fd: &OwnedFd) {
    let _ = nix::sys::socket::setsockopt(
        fd,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// Convenience for fd-generic callers.
pub fn raw(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

/// The listening socket passed by systemd socket activation (`LISTEN_FDS=1`, fd 3), when
/// `listen_pid` is this process. Checked to be a listening Unix stream socket before it is
/// adopted; `None` otherwise (the fd is then left alone).
pub fn activated_listener(
    listen_pid: Option<u32>,
    listen_fds: Option<u32>,
) -> io::Result<Option<std::os::unix::net::UnixListener>> {
    use nix::sys::socket::{AddressFamily, SockType, getsockname, getsockopt, sockopt};
    if listen_pid != Some(std::process::id()) || listen_fds.unwrap_or(0) == 0 {
        return Ok(None);
    }
    if listen_fds != Some(1) {
        return Err(io::Error::other(
            "socket activation passed more than one fd; expected one",
        ));
    }
    const FIRST: RawFd = 3;
    // SAFETY: a borrow only for the checks below; fd 3 is ours by the LISTEN_FDS protocol
    // (LISTEN_PID is this process) and stays open while borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(FIRST) };
    let is_stream = getsockopt(&fd, sockopt::SockType)? == SockType::Stream;
    let listening = getsockopt(&fd, sockopt::AcceptConn)?;
    let unix = getsockname::<nix::sys::socket::UnixAddr>(FIRST)
        .map(|a| nix::sys::socket::SockaddrLike::family(&a) == Some(AddressFamily::Unix))
        .unwrap_or(false);
    if !(is_stream && listening && unix) {
        return Err(io::Error::other(
            "fd 3 from socket activation is not a listening Unix stream socket",
        ));
    }
    // SAFETY: fd 3 was handed to this process by the service manager (checked above to be a
    // listening Unix stream socket) and nothing else in the process owns it; ownership moves
    // into the listener exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(FIRST) };
    Ok(Some(std::os::unix::net::UnixListener::from(owned)))
}

/// `stream` registered with the current tokio runtime for `interest` only (tokio's own
/// `UnixStream` always registers for both directions). Must be called within a runtime.
pub fn watch(
    stream: std::os::unix::net::UnixStream,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::unix::net::UnixStream>> {
    // SAFETY: a std `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns
    // that same descriptor, until the stream is dropped — which the `AsyncFd` does only after
    // taking it out of the runtime's registration.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(stream, interest) }?)
}

/// Peeks at a socket without waiting: how many bytes wait (0: the peer closed), or
/// `WouldBlock` when none do yet.
pub fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    let mut one = [0u8; 1];
    Ok(recv(
        fd.as_raw_fd(),
        &mut one,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    )?)
}
