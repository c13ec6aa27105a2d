//! Issue 22: `publish` writes a client's file into the model repository. Names that would
//! leave the repository, files over `max-publish-bytes` or not ONNX, peers that are not admins,
//! versions on disk and symlinks planted at the target are refused with nothing written; an
//! admin's file sent through the arena becomes a served version.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rxd_e2e::*;
use rxd_protocol::{
    ArenaRef, ErrorCode, InferRequest, Outcome, PublishRequest, Reply, Request, RequestFrame,
    TensorData,
};

use crate::common::*;

fn ask(conn: &mut RawConn, id: u64, body: Request) -> Outcome {
    conn.send(&RequestFrame { id, body });
    let r = conn.read_response();
    assert_eq!(r.id, id);
    r.outcome
}

fn publish(model: &str, version: Option<u64>, data: TensorData) -> Request {
    Request::Publish(PublishRequest {
        model: model.into(),
        version,
        data,
    })
}

#[track_caller]
fn refused(outcome: Outcome, code: ErrorCode) -> String {
    match outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind(), Some(code), "{e}");
            e.message
        }
        Outcome::Ok(r) => panic!("expected {code:?}, got an answer: {r:?}"),
    }
}

/// Every entry under `dir`, recursively, as paths relative to it (symlinks not followed).
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn publish_refuses_traversal_oversize_non_onnx_non_admins_and_planted_symlinks() {
    let _serial = serial();
    let repo = repo_with(&[]);
    let outside = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut d = shared_daemon(repo.path(), "max-publish-bytes = \"1MiB\"\n", &[]);
    let before = before(&d);
    let bystander = Bystander::start(&d.socket);
    let digits = std::fs::read(model_file("digits")).unwrap();
    let inline = |b: &[u8]| TensorData::Inline(b.to_vec());
    let mut admin = RawConn::connect(&d.socket).unwrap();
    let (welcome, fd) = admin.handshake_arena(1 << 20).unwrap();
    let map = rxd_shm::Mapping::map(fd.as_fd(), welcome.arena_bytes as usize).unwrap();
    let repo_before = tree(repo.path());
    // Where a name that escaped the repository would have written (the repository's parent is
    // the shared temporary directory: its other entries come and go with other programs).
    let parent = repo.path().parent().unwrap();
    let escapes = [
        parent.join("escaped"),
        parent.join("1"),
        std::path::PathBuf::from("/tmp/abs"),
    ];
    let escaped = || escapes.iter().map(|p| p.exists()).collect::<Vec<bool>>();
    let escaped_before = escaped();

    // Names that would leave the repository, or hide in it.
    for (i, name) in [
        "../escaped",
        "..",
        ".",
        "a/b",
        "/tmp/abs",
        ".hidden",
        "-x",
        "",
        "a\0b",
    ]
    .iter()
    .enumerate()
    {
        let m = refused(
            ask(
                &mut admin,
                1 + i as u64,
                publish(name, None, inline(&digits)),
            ),
            ErrorCode::InvalidRequest,
        );
        assert!(m.contains("repository directory"), "{m}");
    }
    // Over max-publish-bytes: refused before a byte is read (also from the arena).
    let m = refused(
        ask(
            &mut admin,
            20,
            publish("big", None, inline(&vec![0; (1 << 20) + 1])),
        ),
        ErrorCode::InvalidRequest,
    );
    assert!(m.contains("max-publish-bytes"), "{m}");
    let whole = ArenaRef {
        offset: 0,
        len: welcome.arena_bytes + 1,
    };
    refused(
        ask(
            &mut admin,
            21,
            publish("big", None, TensorData::Arena(whole)),
        ),
        ErrorCode::InvalidRequest,
    );
    // Not ONNX.
    let m = refused(
        ask(
            &mut admin,
            22,
            publish("text", None, inline(b"#!/bin/sh\nrm -rf /\n")),
        ),
        ErrorCode::InvalidRequest,
    );
    assert!(m.contains("not an ONNX model"), "{m}");
    refused(
        ask(
            &mut admin,
            23,
            publish("half", None, inline(&digits[..digits.len() / 2])),
        ),
        ErrorCode::InvalidRequest,
    );
    // A version on disk is never replaced; version 0 does not exist.
    refused(
        ask(&mut admin, 24, publish("digits", Some(1), inline(&digits))),
        ErrorCode::InvalidRequest,
    );
    refused(
        ask(&mut admin, 25, publish("digits", Some(0), inline(&digits))),
        ErrorCode::InvalidRequest,
    );
    // An arena range outside the arena.
    let past = ArenaRef {
        offset: welcome.arena_bytes - 16,
        len: 64,
    };
    refused(
        ask(
            &mut admin,
            26,
            publish("digits", None, TensorData::Arena(past)),
        ),
        ErrorCode::ArenaOutOfRange,
    );
    assert_eq!(
        tree(repo.path()),
        repo_before,
        "a refused publish wrote something"
    );
    assert_eq!(
        escaped(),
        escaped_before,
        "a refused publish wrote outside the repository"
    );

    // A peer that is not an admin, with a valid file.
    let mut nobody = connect_as_nobody(&d.socket);
    nobody.handshake().unwrap();
    refused(
        ask(&mut nobody, 1, publish("digits", None, inline(&digits))),
        ErrorCode::PermissionDenied,
    );
    refused(
        ask(&mut nobody, 2, publish("fresh", None, inline(&digits))),
        ErrorCode::PermissionDenied,
    );
    assert_eq!(tree(repo.path()), repo_before);

    // Symlinks planted at the model's directory and at a version: never followed.
    std::os::unix::fs::symlink(outside.path(), repo.path().join("planted")).unwrap();
    let m = refused(
        ask(&mut admin, 30, publish("planted", None, inline(&digits))),
        ErrorCode::InvalidRequest,
    );
    assert!(m.contains("symlink"), "{m}");
    std::os::unix::fs::symlink(outside.path(), repo.path().join("digits/2")).unwrap();
    refused(
        ask(&mut admin, 31, publish("digits", Some(2), inline(&digits))),
        ErrorCode::InvalidRequest,
    );
    assert!(tree(outside.path()).is_empty(), "written through a symlink");

    // An admin's file through the arena: the next free version, a plain file, served.
    map.copy_in(4096, &digits).unwrap();
    let data = TensorData::Arena(ArenaRef {
        offset: 4096,
        len: digits.len() as u64,
    });
    let reply = match ask(&mut admin, 40, publish("digits", None, data)) {
        Outcome::Ok(Reply::Publish(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((reply.version, reply.bytes), (3, digits.len() as u64));
    let file = repo.path().join("digits/3/model.onnx");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(std::fs::read(&file).unwrap(), digits);
    assert!(
        !tree(repo.path()).iter().any(|p| p.contains(".publish-")),
        "a temporary directory was left: {:?}",
        tree(repo.path())
    );
    assert!(tree(outside.path()).is_empty());
    let (input, want) = digits_case(3);
    let mut req = InferRequest::new("digits", vec![input]);
    req.version = Some(3);
    match ask(&mut admin, 41, Request::Infer(req)) {
        Outcome::Ok(Reply::Infer(r)) => {
            assert_eq!(r.version, 3);
            assert_eq!(r.outputs, want);
        }
        other => panic!("{other:?}"),
    }
    // A new model published inline is served on demand.
    match ask(&mut admin, 42, publish("fresh", None, inline(&digits))) {
        Outcome::Ok(Reply::Publish(r)) => assert_eq!(r.version, 1),
        other => panic!("{other:?}"),
    }
    let (input, want) = digits_case(2);
    let out = d.client_inline().infer("fresh", vec![input]).unwrap();
    assert_eq!(out, want);

    drop(admin);
    drop(nobody);
    let seen = bystander.stop();
    assert_unharmed(&mut d, &before, &seen, Duration::from_secs(5), 64 << 20);
}
