//! Who is on the other end of a connection (SO_PEERCRED, SO_PEERGROUPS) and whether they may
//! run admin operations. Identity is taken once, at accept, from the socket: what the kernel
//! recorded when the peer connected. Nothing a client sends, and no later state of its pid,
//! can change it.

use tokio::net::UnixStream;

/// A connected peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub admin: bool,
}

impl Peer {
    /// Reads the peer's credentials and decides admin rights: uid 0, the daemon's own uid, or
    /// membership (primary or supplementary) in `admin_gid`. Everything comes from the socket
    /// — SO_PEERCRED and SO_PEERGROUPS, fixed when the peer connected — never from
    /// /proc/PID, whose pid may belong to another process by the time the daemon accepts.
    pub fn identify(
        stream: &UnixStream,
        own_uid: u32,
        admin_gid: Option<u32>,
    ) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let admin = uid == 0
            || uid == own_uid
            || admin_gid.is_some_and(|g| gid == g || socket_groups(stream).contains(&g));
        Ok(Peer {
            uid,
            gid,
            pid,
            admin,
        })
    }
}

/// The peer's supplementary groups as of its connect; none if the kernel cannot say (then only
/// the primary group counts, which never grants more than the peer had).
fn socket_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsFd;
    rxd_shm::peer_groups(stream.as_fd()).unwrap_or_else(|e| {
        tracing::warn!("cannot read the peer's groups (SO_PEERGROUPS): {e}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn groups_are_read_from_the_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = socket_groups(&a);
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn root_and_own_uid_are_admin() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let p = Peer::identify(&a, me, None).unwrap();
        assert_eq!(p.uid, me);
        assert!(p.admin);
        assert_eq!(p.pid, Some(std::process::id() as i32));
        // A different daemon uid and no admin group: only root stays admin.
        let p = Peer::identify(&a, me.wrapping_add(1), None).unwrap();
        assert_eq!(p.admin, me == 0);
    }
}
