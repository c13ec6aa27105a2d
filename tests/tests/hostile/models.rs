//! What the repository and a request's shapes can do to the daemon: model files that vanish
//! and come back.

use std::time::Duration;

use rxd_client::Tensor;
use rxd_e2e::*;
use rxd_protocol::{ErrorCode, InferRequest, ModelRef, Outcome, Reply, Request, RequestFrame};

use crate::common::*;

/// Sends one request on `conn` and reads its answer.
fn ask(conn: &mut RawConn, id: u64, body: Request) -> Outcome {
    conn.send(&RequestFrame { id, body });
    let r = conn.read_response();
    assert_eq!(r.id, id);
    r.outcome
}

fn infer(conn: &mut RawConn, id: u64, model: &str, inputs: Vec<Tensor>) -> Outcome {
    ask(conn, id, Request::Infer(InferRequest::new(model, inputs)))
}

/// An admin connection (the test's own uid) whose answers must come within 20 s.
fn admin(d: &TestDaemon) -> RawConn {
    let mut c = RawConn::connect(&d.socket).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    c.handshake().unwrap();
    c
}

fn model_ref(model: &str) -> ModelRef {
    ModelRef {
        model: model.into(),
        version: None,
    }
}

#[track_caller]
fn ok(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Ok(r) => r,
        Outcome::Err(e) => panic!("{e}"),
    }
}

/// A connection made as `nobody`, handshaken.
fn nobody(d: &TestDaemon) -> RawConn {
    let mut c = connect_as_nobody(&d.socket);
    c.handshake().unwrap();
    c
}

fn sigmoid_input() -> Tensor {
    f32_tensor("x", &[3, 4, 5], &random_f32(60, 3))
}

/// Regression (issue 19, item 9): requests racing a reload that removed a model started
/// on-demand loads of the deleted file and marked the version `failed`; after the file was
/// put back and the repository reloaded, requests kept getting `model_not_ready … failed`.
#[test]
fn a_model_removed_and_put_back_serves_again() {
    let _serial = serial();
    let repo = repo_with(&["sigmoid"]);
    let mut d = shared_daemon(repo.path(), "", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let dir = repo.path().join("sigmoid");
    let away = repo.path().join(".sigmoid-away");
    let mut control = admin(&d);
    ok(ask(&mut control, 1, Request::Unload(model_ref("sigmoid"))));
    let mut control_id = 1;
    let mut reload = || {
        control_id += 1;
        ok(ask(&mut control, control_id, Request::Reload));
    };
    let served = |c: &mut RawConn, id: u64| match infer(c, id, "sigmoid", vec![sigmoid_input()]) {
        Outcome::Ok(_) => {}
        other => panic!("sigmoid is not served again: {other:?}"),
    };

    // A request for a version whose file is gone starts no load and marks nothing failed.
    std::fs::rename(&dir, &away).unwrap();
    let mut c = nobody(&d);
    let e = match infer(&mut c, 1, "sigmoid", vec![sigmoid_input()]) {
        Outcome::Err(e) => e,
        Outcome::Ok(_) => panic!("served from a file that is gone"),
    };
    assert!(
        matches!(
            e.kind(),
            Some(ErrorCode::UnknownModel | ErrorCode::ModelNotReady)
        ),
        "{e}"
    );
    std::fs::rename(&away, &dir).unwrap();
    reload();
    served(&mut c, 2);

    // The race of the issue: requests while a reload removes the model.
    for round in 0..3u64 {
        std::fs::rename(&dir, &away).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racers: Vec<_> = (0..3)
            .map(|_| {
                let (socket, stop) = (d.socket.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut c = connect_as_nobody(&socket);
                    c.handshake().unwrap();
                    let mut id = 1;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = infer(&mut c, id, "sigmoid", vec![sigmoid_input()]);
                        id += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        reload();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in racers {
            r.join().unwrap();
        }
        std::fs::rename(&away, &dir).unwrap();
        reload();
        served(&mut c, 10 + round);
    }
    drop(reload);
    drop((c, control));

    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(2), 64 << 20);
}
