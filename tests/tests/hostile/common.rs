//! What every hostile-client test shares: a daemon other users can reach, connections made
//! as another user, a well-behaved bystander client that keeps checking answers while an
//! attack runs, and the daemon's fd count and resident memory before and after.
// Shared by every attack module; not each one uses every helper.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rxd_client::{DType, Tensor};
use rxd_e2e::*;

/// The unprivileged user attacks run as (`nobody` on Debian).
pub const NOBODY: u32 = 65534;

/// Hostile tests measure latency bounds and memory: they run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A daemon on `repo` whose socket any local user may connect to (mode 0666, directory
/// searchable), as on a shared machine.
pub fn shared_daemon(repo: &Path, config_toml: &str, extra: &[&str]) -> TestDaemon {
    shared_daemon_env(repo, &[], config_toml, extra)
}

/// [`shared_daemon`] with extra environment variables for the daemon (test hooks).
pub fn shared_daemon_env(
    repo: &Path,
    env: &[(&str, &str)],
    config_toml: &str,
    extra: &[&str],
) -> TestDaemon {
    let mut args = vec!["--socket-mode", "0666"];
    args.extend_from_slice(extra);
    let d = TestDaemon::start_env(repo, env, config_toml, &args);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A repository with the bundled digits model (and `extra` fetched models).
pub fn repo_with(extra: &[&str]) -> Repo {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    for m in extra {
        repo.link(m, 1, m);
    }
    // Writable by the daemon only; readable by all (the daemon may drop privileges).
    std::fs::set_permissions(repo.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    repo
}

/// A socket connected to `socket` by a process running as `uid`/`gid` with supplementary
/// `groups`; with `after_groups`, that process changes its groups once connected and stays
/// alive (holding its pid) until the returned [`Connector`] is dropped.
pub struct Connector {
    child: Child,
    /// Our end of the helper's stdin: it lives until this closes.
    _line: UnixStream,
    pub pid: u32,
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect_as_with(
    socket: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    after_groups: Option<&[u32]>,
) -> (UnixStream, Connector) {
    let list = |g: &[u32]| {
        if g.is_empty() {
            "-".to_string()
        } else {
            g.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(bin("rxd-connect-as"));
    cmd.arg(uid.to_string())
        .arg(gid.to_string())
        .arg(list(groups))
        .arg(socket);
    if let Some(a) = after_groups {
        cmd.arg(list(a));
    }
    let child = cmd
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rxd-connect-as");
    let pid = child.id();
    let mut buf = [0u8; 1];
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (_, fd) = rxd_shm::recv_with_fd(rxd_shm::raw(&ours), &mut buf).expect("connected fd");
    let stream = UnixStream::from(fd.expect("rxd-connect-as sent no fd"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let conn = Connector {
        child,
        _line: ours,
        pid,
    };
    (stream, conn)
}

/// A socket connected as `nobody` (no supplementary groups); the helper has exited.
pub fn connect_as_nobody(socket: &Path) -> RawConn {
    let (stream, conn) = connect_as_with(socket, NOBODY, NOBODY, &[], None);
    drop(conn);
    RawConn { stream }
}

/// The daemon's resident memory in bytes.
pub fn rss(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// Open file descriptors of the daemon.
pub fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The daemon's state before an attack.
pub struct Before {
    pub fds: usize,
    pub rss: u64,
}

pub fn before(d: &TestDaemon) -> Before {
    Before {
        fds: fds(d.pid()),
        rss: rss(d.pid()),
    }
}

/// One digits request with `rows` rows from the bundled test set, and its expected output
/// from ONNX Runtime in-process.
pub fn digits_case(rows: usize) -> (Tensor, Vec<Tensor>) {
    let all = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&all).unwrap()[..rows * 64 * 4].to_vec();
    let input = Tensor::inline("input", DType::Float32, vec![rows as u64, 64], bytes);
    let mut reference = Reference::new(&model_file("digits"));
    let want = reference.run(std::slice::from_ref(&input));
    (input, want)
}

/// What the bystander saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub ok: u64,
    pub wrong: u64,
    pub errors: Vec<String>,
    pub max_latency: Duration,
}

impl Seen {
    /// For an attack run without a bystander of its own (one served request, nothing else):
    /// [`assert_unharmed`]'s checks of the daemon stand in for it.
    pub fn no_bystander() -> Seen {
        Seen {
            ok: 1,
            ..Seen::default()
        }
    }
}

/// A well-behaved client (the test's own uid) that sends digits requests one after another
/// on fresh and kept connections while an attack runs, checking every answer.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

impl Bystander {
    pub fn start(socket: &Path) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let (input, want) = digits_case(4);
        let socket: PathBuf = socket.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut kept: Option<rxd_client::blocking::Client> = None;
            let mut n = 0u64;
            // At least one request, however soon the attack ends (a loaded machine may start
            // this thread late).
            loop {
                let t = Instant::now();
                // Every fourth request on a fresh connection: accepting must keep working too.
                if n.is_multiple_of(4) {
                    kept = None;
                }
                let client = match kept.take() {
                    Some(c) => Ok(c),
                    None => rxd_client::blocking::Client::connect_with(
                        &socket,
                        rxd_client::ClientOptions::inline_only(),
                    ),
                };
                let result = client.and_then(|c| {
                    let out = c.infer("digits", vec![input.clone()]);
                    kept = Some(c);
                    out
                });
                let took = t.elapsed();
                seen.max_latency = seen.max_latency.max(took);
                match result {
                    Ok(out) if out == want => seen.ok += 1,
                    Ok(_) => seen.wrong += 1,
                    Err(e) => seen.errors.push(e.to_string()),
                }
                n += 1;
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        Bystander {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The daemon survived the attack unharmed: still running, answering correctly, the bystander
/// served every time within `latency`, fds back to what they were (give the daemon a moment to
/// close what the attack opened), resident memory grown by at most `rss_slack`.
pub fn assert_unharmed(
    d: &mut TestDaemon,
    before: &Before,
    seen: &Seen,
    latency: Duration,
    rss_slack: u64,
) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died:\n{}",
        d.log_text()
    );
    assert!(seen.ok > 0, "the bystander was never served: {seen:?}");
    assert_eq!(seen.wrong, 0, "wrong answers: {seen:?}");
    assert!(seen.errors.is_empty(), "bystander errors: {seen:?}");
    assert!(
        seen.max_latency <= latency,
        "the bystander waited {:?} (bound {latency:?}): {seen:?}",
        seen.max_latency
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fds(d.pid());
        if now <= before.fds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon holds {now} fds, {} before the attack: {:?}",
            before.fds,
            d.fd_targets()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Memory held for requests goes once they are answered — by the thread that drops the
    // job, which a loaded machine may run a moment after the client read its answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let grown = rss(d.pid()).saturating_sub(before.rss);
        if grown <= rss_slack {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resident memory grew by {} MiB (bound {} MiB)",
            grown >> 20,
            rss_slack >> 20
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (input, want) = digits_case(2);
    let out = d.client_inline().infer("digits", vec![input]).unwrap();
    assert_eq!(out, want);
}

/// Resets the daemon's peak resident memory (`VmHWM`), so that [`peak_rss`] measures from now.
pub fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// The daemon's peak resident memory since [`reset_peak`].
pub fn peak_rss(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// A frame holding `msg`.
pub fn frame_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    rxd_protocol::frame::encode(msg).unwrap()
}

/// Reads every response until the daemon closes the connection (or `limit` passes). A
/// handshake error counts as an error response under id 0.
pub fn read_all(conn: &mut RawConn, limit: Duration) -> Vec<rxd_protocol::ResponseFrame> {
    use rxd_protocol::{HandshakeReply, Outcome, ResponseFrame, frame};
    conn.stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    while let Ok(body) = conn.read_body() {
        let r = match frame::decode::<ResponseFrame>(&body) {
            Ok(r) => r,
            Err(_) => match frame::decode::<HandshakeReply>(&body).unwrap() {
                HandshakeReply::Error(e) => ResponseFrame {
                    id: 0,
                    outcome: Outcome::Err(e.error),
                },
                HandshakeReply::Welcome(w) => panic!("a second welcome: {w:?}"),
            },
        };
        out.push(r);
    }
    out
}

/// The code of an error outcome (panics on success).
pub fn err_code(o: &rxd_protocol::Outcome) -> Option<rxd_protocol::ErrorCode> {
    match o {
        rxd_protocol::Outcome::Err(e) => e.kind(),
        rxd_protocol::Outcome::Ok(r) => panic!("expected an error, got {r:?}"),
    }
}
