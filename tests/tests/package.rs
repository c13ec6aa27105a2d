//! Issue 6: the .deb in a clean Debian 12 chroot (debootstrap minbase): install, user, the
//! daemon started with the unit's own ExecStart line, group access to the socket, purge.
//! Needs root, debootstrap and a built package (`packaging/build-deb`). Ignored by default;
//! `.ci/run` runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rxd_e2e::{repo_root, target_dir};

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Chroot {
    dir: PathBuf,
}

impl Chroot {
    fn new() -> Chroot {
        let dir = std::env::temp_dir().join(format!("rxd-chroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ok(Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&dir)
            .arg("http://deb.debian.org/debian"));
        ok(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(dir.join("proc")));
        Chroot { dir }
    }

    fn cmd(&self, user: Option<(&str, &str)>) -> Command {
        let mut c = Command::new("chroot");
        if let Some((spec, groups)) = user {
            c.arg(format!("--userspec={spec}"));
            if !groups.is_empty() {
                c.arg(format!("--groups={groups}"));
            }
        }
        c.arg(&self.dir)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.join("proc")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn package() -> PathBuf {
    // packaging/build-deb writes it under cargo's target directory, the one this test runs from.
    let dir = target_dir().join("debian");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
        .unwrap_or_else(|| panic!("no .deb in {}; run packaging/build-deb", dir.display()))
}

#[test]
#[ignore = "needs root, debootstrap and packaging/build-deb; run by .ci/run"]
fn the_deb_installs_serves_and_purges_cleanly_in_a_fresh_debian_12() {
    let deb = package();
    let files: Vec<String> = ok(Command::new("dpkg-deb").arg("-c").arg(&deb))
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| {
            l.split_whitespace()
                .last()
                .map(|p| p.trim_start_matches('.').to_string())
        })
        .collect();
    assert!(files.iter().any(|f| f == "/usr/bin/rxd"));
    let root = Chroot::new();
    std::fs::copy(&deb, root.path("/tmp/rxd.deb")).unwrap();
    ok(root.cmd(None).args(["dpkg", "-i", "/tmp/rxd.deb"]));

    // The user and group exist; the binaries run.
    assert!(ok(root.cmd(None).args(["getent", "passwd", "rxd"])).starts_with("rxd:"));
    assert!(ok(root.cmd(None).args(["rxd", "--version"])).contains("rxd"));
    assert!(root.path("/var/lib/rxd/models").is_dir());
    // The socket is enabled (the service is not: the first client starts it).
    assert!(
        root.path("/etc/systemd/system/sockets.target.wants/rxd.socket")
            .symlink_metadata()
            .is_ok(),
        "rxd.socket not enabled"
    );
    assert!(
        root.path("/etc/systemd/system/multi-user.target.wants/rxd.service")
            .symlink_metadata()
            .is_err()
    );
    assert!(root.path("/etc/rxd/rxd.toml").is_file());

    // The daemon, started the way the unit starts it (its ExecStart line, as User=rxd, with
    // the runtime directory systemd would create), serves the packaged configuration.
    let unit = std::fs::read_to_string(root.path("/usr/lib/systemd/system/rxd.service")).unwrap();
    let exec: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    ok(root.cmd(None).args([
        "install", "-d", "-o", "rxd", "-g", "rxd", "-m", "0755", "/run/rxd",
    ]));
    let mut daemon = root
        .cmd(Some(("rxd:rxd", "")))
        .args(&exec)
        .env("ORT_DISABLE_TELEMETRY", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(root.path("/tmp/rxd.log")).unwrap())
        .spawn()
        .unwrap();
    let socket = root.path("/run/rxd/rxd.sock");
    let start = Instant::now();
    while !socket.exists() {
        if let Some(s) = daemon.try_wait().unwrap() {
            panic!(
                "rxd exited ({s}): {}",
                std::fs::read_to_string(root.path("/tmp/rxd.log")).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));

    // A member of group rxd can use it; another user cannot even connect.
    ok(root.cmd(None).args(["useradd", "-m", "-G", "rxd", "alice"]));
    ok(root.cmd(None).args(["useradd", "-m", "bob"]));
    let status = ok(root.cmd(Some(("alice:alice", "rxd"))).args([
        "rxctl",
        "--socket",
        "/run/rxd/rxd.sock",
        "status",
    ]));
    assert!(
        status.contains("rxd 0.1.0") && status.contains("/var/lib/rxd/models"),
        "{status}"
    );
    let denied = run(root.cmd(Some(("bob:bob", ""))).args([
        "rxctl",
        "--socket",
        "/run/rxd/rxd.sock",
        "status",
    ]));
    // EX_NOPERM, with the hint a user needs.
    assert_eq!(denied.status.code(), Some(77), "{denied:?}");
    let said = String::from_utf8_lossy(&denied.stderr);
    assert!(
        said.contains("permission denied") && said.contains("usermod -aG rxd"),
        "{denied:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(daemon.wait().unwrap().code(), Some(0));

    // Purge leaves no file of the package behind (and no config or state).
    ok(root.cmd(None).args(["dpkg", "--purge", "rxd"]));
    for f in &files {
        assert!(
            !Path::new(&root.path(f)).exists(),
            "{f} left behind after purge"
        );
    }
    for d in [
        "/etc/rxd",
        "/var/lib/rxd",
        "/usr/lib/rxd",
        "/etc/systemd/system/sockets.target.wants/rxd.socket",
    ] {
        assert!(!root.path(d).exists(), "{d} left behind after purge");
    }
}

#[test]
#[ignore = "needs root, debootstrap, systemd-nspawn and packaging/build-deb; run by .ci/run"]
fn the_service_serves_under_its_sandbox_with_systemd_as_pid_1() {
    // A booted container (systemd-nspawn -b): the unit's sandbox and syscall filter really
    // apply, socket activation and Type=notify really happen.
    let deb = package();
    let dir = std::env::temp_dir().join(format!("rxd-nspawn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    ok(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus",
            "bookworm",
        ])
        .arg(&dir)
        .arg("http://deb.debian.org/debian"));
    let nspawn = |args: &[&str]| {
        let mut c = Command::new("systemd-nspawn");
        c.args(["--register=no", "--keep-unit", "--quiet", "-D"])
            .arg(&dir)
            .args(args);
        c
    };
    let check = dir.join("opt/check");
    std::fs::create_dir_all(&check).unwrap();
    std::fs::copy(&deb, check.join("rxd.deb")).unwrap();
    std::fs::copy(
        repo_root().join("examples/data/digit.npy"),
        check.join("digit.npy"),
    )
    .unwrap();
    ok(&mut nspawn(&["dpkg", "-i", "/opt/check/rxd.deb"]));
    let models = dir.join("var/lib/rxd/models/digits/1");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(
        repo_root().join("examples/models/digits/1/model.onnx"),
        models.join("model.onnx"),
    )
    .unwrap();
    ok(&mut nspawn(&[
        "chown",
        "-R",
        "rxd:rxd",
        "/var/lib/rxd/models",
    ]));
    // A one-shot unit in the container: use the daemon through its socket, record, power off.
    std::fs::write(
        dir.join("etc/systemd/system/rxd-check.service"),
        "[Unit]\nRequires=rxd.socket\nAfter=rxd.socket\n\n[Service]\nType=oneshot\n\
         ExecStart=/bin/sh -c 'rxctl --socket /run/rxd/rxd.sock --json infer digits --input input=/opt/check/digit.npy > /opt/check/out.json 2>/opt/check/err; \
         systemctl show rxd.service -p ActiveState -p NRestarts > /opt/check/state'\n\
         ExecStartPost=/bin/systemctl poweroff\n",
    )
    .unwrap();
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/rxd-check.service",
        wants.join("rxd-check.service"),
    )
    .unwrap();
    let boot = run(Command::new("timeout")
        .arg("300")
        .arg("systemd-nspawn")
        .args(["--register=no", "--keep-unit", "--quiet", "-b", "-D"])
        .arg(&dir));
    assert!(
        boot.status.success(),
        "{}",
        String::from_utf8_lossy(&boot.stdout)
    );
    let out = std::fs::read_to_string(check.join("out.json")).unwrap_or_default();
    let err = std::fs::read_to_string(check.join("err")).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(v["outputs"][0]["values"][0], 7, "{v}");
    let state = std::fs::read_to_string(check.join("state")).unwrap();
    assert!(
        state.contains("ActiveState=active") && state.contains("NRestarts=0"),
        "{state}"
    );
}
