//! Reload (SIGHUP and `rxctl reload`): a new version becomes ready before the old one stops
//! taking requests; no accepted request fails; removed models unload; RELOADING=1/READY=1.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rxd_client::{DType, Tensor};
use rxd_e2e::*;

#[test]
fn reload_under_load_switches_versions_without_failing_a_request() {
    let repo = Repo::new();
    repo.link("m", 1, "digits").link("gone", 1, "slice_first");
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let socket = dir.path().join("rxd.sock");
    let mut child = std::process::Command::new(bin("rxd"))
        .env_clear()
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .arg("--socket")
        .arg(&socket)
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--ort-library")
        .arg(ort_library())
        .arg("--intra-op-threads")
        .arg("1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let recv_until = |want: &str, buf: &mut [u8]| {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Ok(n) = notify.recv(buf)
                && String::from_utf8_lossy(&buf[..n]).contains(want)
            {
                return true;
            }
        }
        false
    };
    assert!(recv_until("READY=1", &mut buf));

    // Continuous load from two clients; every answer must be a success.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let v2_seen = Arc::new(AtomicU64::new(0));
    let x = Tensor::inline("input", DType::Float32, vec![1, 64], vec![0; 256]);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failed, v2, socket, x) = (
                stop.clone(),
                failed.clone(),
                v2_seen.clone(),
                socket.clone(),
                x.clone(),
            );
            std::thread::spawn(move || {
                let c = rxd_client::blocking::Client::connect(&socket).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match c.infer_request(rxd_protocol::InferRequest::new("m", vec![x.clone()])) {
                        Ok(r) if r.version == 2 => {
                            v2.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // A new version appears, a model leaves; SIGHUP.
    repo.link("m", 2, "digits");
    std::fs::remove_dir_all(repo.path().join("gone")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(recv_until("RELOADING=1", &mut buf), "no RELOADING=1");
    assert!(
        recv_until("READY=1", &mut buf),
        "no READY=1 after the reload"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(total > 20, "{total} requests");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );
    assert!(
        v2_seen.load(Ordering::Relaxed) > 0,
        "answers switched to version 2"
    );

    let c = rxd_client::blocking::Client::connect(&socket).unwrap();
    let models = c.list_models().unwrap();
    let state = |name: &str, v: u64| {
        models
            .iter()
            .find(|m| m.name == name && m.version == v)
            .map(|m| m.state)
    };
    assert_eq!(state("m", 2), Some(rxd_protocol::ModelState::Ready));
    assert_eq!(
        state("m", 1),
        Some(rxd_protocol::ModelState::Available),
        "{models:?}"
    );
    assert_eq!(
        state("gone", 1),
        None,
        "a model removed from disk is unloaded and forgotten"
    );

    // The same through rxctl reload: version 3 arrives.
    repo.link("m", 3, "digits");
    let out = std::process::Command::new(bin("rxctl"))
        .env_clear()
        .env("RXD_SOCKET", &socket)
        .arg("reload")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("m version 3: ready"));
    assert_eq!(
        c.infer_request(rxd_protocol::InferRequest::new("m", vec![x]))
            .unwrap()
            .version,
        3
    );
    let _ = child.kill();
    let _ = child.wait();
}
