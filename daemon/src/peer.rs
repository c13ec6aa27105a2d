//! Who is on the other end of a connection (SO_PEERCRED) and whether they may run admin
//! operations. Identity is taken once, at accept, from the kernel; nothing a client sends can
//! change it.

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
    /// membership (primary or supplementary) in `admin_gid`.
    pub fn identify(
        stream: &UnixStream,
        own_uid: u32,
        admin_gid: Option<u32>,
    ) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let in_group =
            |g: u32| gid == g || pid.is_some_and(|p| supplementary_groups(p).contains(&g));
        let admin = uid == 0 || uid == own_uid || admin_gid.is_some_and(in_group);
        Ok(Peer {
            uid,
            gid,
            pid,
            admin,
        })
    }
}

/// The supplementary groups of a live process (`Groups:` in /proc/PID/status); empty when the
/// process is gone.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_groups_are_read() {
        let pid = std::process::id() as i32;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let expected = line.split_whitespace().count() - 1;
        assert_eq!(supplementary_groups(pid).len(), expected);
        assert!(supplementary_groups(i32::MAX).is_empty());
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
