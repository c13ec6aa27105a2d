//! Issue 6 (first part): the units, sd_notify, the watchdog and socket activation, with real
//! `systemd-analyze` and `systemd-socket-activate` and a NOTIFY_SOCKET the test binds itself.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rxd_e2e::*;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The units with ExecStart pointing at the binary under test.
fn units(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let service = std::fs::read_to_string(repo_root().join("systemd/rxd.service"))
        .unwrap()
        .replace("/usr/bin/rxd", bin("rxd").to_str().unwrap());
    let s = dir.join("rxd.service");
    std::fs::write(&s, service).unwrap();
    let k = dir.join("rxd.socket");
    std::fs::copy(repo_root().join("systemd/rxd.socket"), &k).unwrap();
    (s, k)
}

#[test]
fn units_verify_cleanly_and_the_service_is_hardened() {
    assert!(
        have("systemd-analyze"),
        "systemd-analyze missing (apt-get install systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = units(dir.path());
    // Man pages come with the .deb; everything else must verify without a word on stderr.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&socket)
        .arg(&service)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&service)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for rxd.service:").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    assert!(score <= 1.5, "exposure {score} > 1.5");
    for key in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "ExecReload=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "User=rxd",
        "RuntimeDirectory=",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "Environment=ORT_DISABLE_TELEMETRY=1",
        "DeviceAllow=char-drm",
        "DeviceAllow=/dev/kfd",
        "DeviceAllow=/dev/nvidiactl",
    ] {
        assert!(
            std::fs::read_to_string(&service).unwrap().contains(key),
            "{key}"
        );
    }
    let sock = std::fs::read_to_string(&socket).unwrap();
    assert!(sock.contains("SocketMode=0660") && sock.contains("SocketGroup=rxd"));
}

/// Collects notifications until `pred` holds for one of them or the time runs out.
fn wait_for(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = pred(&m);
            seen.push(m);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn socket_activation_readiness_watchdog_and_stopping() {
    assert!(
        have("systemd-socket-activate"),
        "systemd-socket-activate missing (apt-get install systemd)"
    );
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rxd.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.path().join("rxd.log");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg("--setenv=ORT_DISABLE_TELEMETRY=1")
        .arg(bin("rxd"))
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--ort-library")
        .arg(ort_library())
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The activator binds the socket and starts rxd on the first connection.
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "activator did not bind"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let inode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let first = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let c = rxd_client::blocking::Client::connect(&socket).unwrap();
            c.infer(
                "digits",
                vec![rxd_client::Tensor::inline(
                    "input",
                    rxd_client::DType::Float32,
                    vec![1, 64],
                    vec![0; 256],
                )],
            )
            .unwrap()
            .len()
        }
    });
    let mut seen = Vec::new();
    assert!(
        wait_for(&notify, &mut seen, Duration::from_secs(60), |m| m
            .contains("READY=1")),
        "no READY=1: {seen:?}"
    );
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=serving 1 model(s)"), "{ready}");
    // Ready means serving: the connection made before start is answered on the passed socket.
    assert_eq!(first.join().unwrap(), 2);
    let c = rxd_client::blocking::Client::connect(&socket).unwrap();
    assert!(c.status().is_ok());
    assert_eq!(
        std::fs::metadata(&socket)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        inode,
        "rxd served on the passed socket, it did not bind its own"
    );
    // Watchdog pings every 200 ms while healthy.
    let mut pings = 0;
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        if wait_for(&notify, &mut seen, Duration::from_millis(300), |m| {
            m == "WATCHDOG=1"
        }) {
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} pings in 2 s");
    // SIGTERM: STOPPING=1, exit 0, and the socket (the activator's) is left alone.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_for(&notify, &mut seen, Duration::from_secs(30), |m| m
        .contains("STOPPING=1")));
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("serving on the socket passed by systemd")
    );
}

#[test]
fn a_wedged_worker_stops_the_watchdog_pings_and_health_says_why() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .link("slice_first", 1, "slice_first");
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = dir.path().join("rxd.sock");
    let config = dir.path().join("rxd.toml");
    std::fs::write(&config, "watchdog-stuck-secs = 1\n").unwrap();
    let mut child = Command::new(bin("rxd"))
        .env_clear()
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "300000")
        // Test hook: the digits workers hang on their first batch.
        .env("RXD_TEST_WEDGE", "digits")
        .args([
            "--config",
            config.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--ort-library")
        .arg(ort_library())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    assert!(wait_for(&notify, &mut seen, Duration::from_secs(60), |m| m
        .contains("READY=1")));
    assert!(
        wait_for(&notify, &mut seen, Duration::from_secs(2), |m| m
            == "WATCHDOG=1"),
        "pings while healthy"
    );
    // Wedge a digits worker with one request (it never answers).
    let socket2 = socket.clone();
    std::thread::spawn(move || {
        let c = rxd_client::blocking::Client::connect(&socket2).unwrap();
        let _ = c.infer(
            "digits",
            vec![rxd_client::Tensor::inline(
                "input",
                rxd_client::DType::Float32,
                vec![1, 64],
                vec![0; 256],
            )],
        );
    });
    // After the 1 s stuck limit, pings stop.
    std::thread::sleep(Duration::from_millis(1800));
    let mut later = Vec::new();
    wait_for(&notify, &mut later, Duration::from_millis(100), |_| false); // drain what was queued
    later.clear();
    assert!(
        !wait_for(&notify, &mut later, Duration::from_millis(1200), |m| m
            == "WATCHDOG=1"),
        "pings went on: {later:?}"
    );
    // Health names the stuck model; other models still serve.
    let c = rxd_client::blocking::Client::connect(&socket).unwrap();
    let h = c.health().unwrap();
    assert_eq!(h.state, rxd_protocol::HealthState::Unhealthy);
    assert!(
        h.reasons
            .iter()
            .any(|r| r.contains("digits") && r.contains("stuck")),
        "{h:?}"
    );
    let out = c
        .infer("slice_first", vec![f32_tensor("x", &[1, 2], &[1.0, 2.0])])
        .unwrap();
    assert_eq!(out.len(), 1);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn under_systemd_logs_go_to_the_journal_with_fields() {
    // The journal's socket, played by the test (this machine runs no journald).
    let journal_dir = Path::new("/run/systemd/journal");
    let journal = journal_dir.join("socket");
    assert!(
        !journal.exists(),
        "a journald is running here; this test needs its socket path free"
    );
    std::fs::create_dir_all(journal_dir).unwrap();
    let sock = UnixDatagram::bind(&journal).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(journal.clone());
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let stream = format!(
        "{}:{}",
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta)
    );
    let mut child = Command::new(bin("rxd"))
        .env_clear()
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("JOURNAL_STREAM", stream)
        .arg("--socket")
        .arg(dir.path().join("rxd.sock"))
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--ort-library")
        .arg(ort_library())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let has = |e: &[(String, String)], k: &str, v: &str| e.iter().any(|(a, b)| a == k && b == v);
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !entries.iter().any(|e| has(e, "MESSAGE", "model ready")) {
        if let Ok(n) = sock.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let ready = entries
        .iter()
        .find(|e| has(e, "MESSAGE", "model ready"))
        .unwrap_or_else(|| panic!("no 'model ready' entry: {entries:?}"));
    for (k, v) in [
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "rxd"),
        ("MODEL", "digits"),
        ("VERSION", "1"),
    ] {
        assert!(has(ready, k, v), "{k}={v} missing in {ready:?}");
    }
    assert!(
        std::fs::read_to_string(&stderr_path).unwrap().is_empty(),
        "logs went to the journal, not stderr"
    );
}

/// Parses one datagram of journald's native protocol: `KEY=value\n`, or `KEY\n` + u64 LE length
/// + bytes + `\n`.
fn journal_fields(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(nl) = b.iter().position(|&c| c == b'\n') {
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into(),
                String::from_utf8_lossy(&line[eq + 1..]).into(),
            ));
            b = &b[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            if rest.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            out.push((key, String::from_utf8_lossy(value).into()));
            b = &rest[8 + len + 1..];
        }
    }
    out
}
