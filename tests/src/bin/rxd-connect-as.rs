//! Test helper: connects to an rxd socket as another user and hands the connected socket back
//! to the test over stdin (a Unix socket), so that the daemon sees that user's credentials
//! (SO_PEERCRED/SO_PEERGROUPS are taken at connect time) while the test drives the connection.
//!
//! `rxd-connect-as UID GID GROUPS SOCKET [AFTER_GROUPS]` — GROUPS and AFTER_GROUPS are
//! comma-separated gids (`-` for none). With AFTER_GROUPS the process keeps root as its saved
//! uid, connects, then changes its supplementary groups to AFTER_GROUPS and drops root for good:
//! /proc/PID/status then shows groups the socket was never connected with (what a reused pid
//! looks like to a daemon that reads /proc). The process stays alive until stdin closes, so its
//! pid stays in use. Must start as root.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

fn gids(s: &str) -> Vec<Gid> {
    if s == "-" {
        return Vec::new();
    }
    s.split(',')
        .map(|g| Gid::from_raw(g.parse().expect("gid")))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: rxd-connect-as UID GID GROUPS SOCKET [AFTER_GROUPS]");
        std::process::exit(64);
    }
    let uid = Uid::from_raw(args[1].parse().expect("uid"));
    let gid = Gid::from_raw(args[2].parse().expect("gid"));
    let after = args.get(5).map(|s| gids(s));
    let root = Uid::from_raw(0);
    setgroups(&gids(&args[3])).expect("setgroups");
    setresgid(gid, gid, gid).expect("setresgid");
    // Keep root as the saved uid only when the groups change after the connect.
    let saved = if after.is_some() { root } else { uid };
    setresuid(uid, uid, saved).expect("setresuid");
    let sock = UnixStream::connect(&args[4]).expect("connect");
    if let Some(after) = after {
        setresuid(root, root, root).expect("regain root");
        setgroups(&after).expect("setgroups after connect");
        setresuid(uid, uid, uid).expect("drop root");
    }
    let stdin = std::io::stdin();
    rxd_shm::send_with_fd(rxd_shm::raw(&stdin.as_fd()), b"x", sock.as_fd()).expect("send fd");
    drop(sock);
    // Stay alive (the pid in use) until the test closes its end.
    let mut buf = [0u8; 1];
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
}
