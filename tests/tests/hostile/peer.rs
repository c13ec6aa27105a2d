//! Who a peer is: admin rights come from the credentials the socket was connected with, never
//! from a pid that may have been reused by the time the daemon accepts.

use std::time::Duration;

use rxd_e2e::*;
use rxd_protocol::{ErrorCode, Outcome, Request, RequestFrame};

use crate::common::*;

/// `users` on Debian; configured as the admin group.
const ADMIN_GID: u32 = 100;

fn reload_as(conn: &mut RawConn) -> Outcome {
    conn.handshake().unwrap();
    conn.send(&RequestFrame {
        id: 1,
        body: Request::Reload,
    });
    conn.read_response().outcome
}

/// Regression (issue 19, item 2): the admin-group check read /proc/PID/status at accept time.
/// A non-admin that connected, then had its pid taken by an admin-group member's process (here:
/// the same process joining the group after connecting, which /proc cannot tell apart) before
/// the daemon accepted was treated as admin.
#[test]
fn admin_rights_come_from_the_socket_not_from_a_reused_pid() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let mut d = shared_daemon(
        repo.path(),
        "admin-group = \"users\"\nmax-connections = 1\n",
        &[],
    );
    let b = before(&d);

    // A member of the admin group that connected as one is admin (the check can say yes).
    let (stream, helper) = connect_as_with(&d.socket, NOBODY, NOBODY, &[ADMIN_GID], None);
    drop(helper);
    match reload_as(&mut RawConn { stream }) {
        Outcome::Ok(_) => {}
        Outcome::Err(e) => panic!("an admin-group member was refused: {e}"),
    }

    // Hold the only connection slot so that the attacker waits in the listen backlog.
    let mut hold = RawConn::connect(&d.socket).unwrap();
    hold.handshake().unwrap();
    let (stream, helper) = connect_as_with(&d.socket, NOBODY, NOBODY, &[], Some(&[ADMIN_GID]));
    let status = std::fs::read_to_string(format!("/proc/{}/status", helper.pid)).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Groups:") && l.contains(&ADMIN_GID.to_string())),
        "the helper's pid now looks like an admin-group member"
    );
    drop(hold); // the daemon accepts the attacker now, its pid alive and in the group
    match reload_as(&mut RawConn { stream }) {
        Outcome::Err(e) => assert_eq!(e.kind(), Some(ErrorCode::PermissionDenied), "{e}"),
        Outcome::Ok(_) => panic!("a peer that connected without the admin group got admin rights"),
    }
    drop(helper);
    // (One connection at a time: the checks after the attack stand in for a bystander.)
    let seen = Seen::no_bystander();
    assert_unharmed(&mut d, &b, &seen, Duration::from_secs(2), 32 << 20);
}
