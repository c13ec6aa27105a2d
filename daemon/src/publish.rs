//! `publish` (admin): writes a model file a client sent — inline, or from its arena — into the
//! repository as `<repository>/<model>/<version>/model.onnx`, then rescans the repository so
//! the version is served.
//!
//! The bytes are copied once out of the arena (which the client may still write) and every
//! check runs on that private copy: the size against `max-publish-bytes` before anything is
//! read, the model name against [`rxd_protocol::check_repository_name`], the version (≥ 1,
//! not on disk), and the bytes must parse as an ONNX model with a graph. The file is written
//! into a new directory with an unpredictable name, created exclusively (mode 0700) inside the
//! model's directory, fsynced, and that directory is renamed into place with
//! `RENAME_NOREPLACE` — a version appears whole or not at all, and nothing on disk is ever
//! replaced. Every step works relative to directory fds opened with `O_NOFOLLOW`: a symlink
//! planted at the model's directory, at the version, or at the file is refused, never followed.
//! Boundary: file writes only inside the repository; blocking (callers use `spawn_blocking`).

use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags, openat, renameat2};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use rxd_protocol::{ErrorCode, PublishReply, PublishRequest, TensorData, WireError};

use crate::SharedRef;
use crate::error::RequestError;

/// The default of `max-publish-bytes`: the largest model file `publish` accepts.
pub const DEFAULT_MAX_PUBLISH_BYTES: u64 = 256 << 20;

fn invalid(m: String) -> RequestError {
    RequestError::Invalid(m)
}

/// Checks what can be checked before any byte is read, then takes a private copy of the
/// file's bytes (from the frame, or out of the sender's arena).
pub fn take_bytes(
    shared: &SharedRef,
    req: PublishRequest,
    arena: Option<&Arc<rxd_shm::Mapping>>,
) -> Result<(PublishRequest, Vec<u8>), RequestError> {
    rxd_protocol::check_repository_name(&req.model)?;
    if req.version == Some(0) {
        return Err(invalid("versions start at 1".into()));
    }
    let limit = shared.config.max_publish_bytes;
    let len = match &req.data {
        TensorData::Inline(b) => b.len() as u64,
        TensorData::Arena(r) => r.len,
        _ => return Err(invalid("unknown data kind".into())),
    };
    if len > limit {
        return Err(invalid(format!(
            "the model file is {len} bytes; this daemon takes at most {limit} \
             (max-publish-bytes)"
        )));
    }
    let mut req = req;
    let bytes = match std::mem::replace(&mut req.data, TensorData::Inline(Vec::new())) {
        TensorData::Inline(b) => b,
        TensorData::Arena(r) => {
            let map = arena.ok_or_else(|| {
                RequestError::Wire(WireError::new(
                    ErrorCode::ArenaUnavailable,
                    "the file refers to the arena, but this connection has none",
                ))
            })?;
            map.read_out(r.offset, r.len).map_err(|e| {
                RequestError::Wire(WireError::new(
                    ErrorCode::ArenaOutOfRange,
                    format!("the file's range: {e}"),
                ))
            })?
        }
        _ => return Err(invalid("unknown data kind".into())),
    };
    Ok((req, bytes))
}

/// Writes the model and rescans the repository. Blocking.
pub fn publish(
    shared: &SharedRef,
    req: &PublishRequest,
    bytes: &[u8],
) -> Result<PublishReply, RequestError> {
    check_onnx(bytes)?;
    // One publish at a time: picking the next version and writing it are one step.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let root = shared.registry.root();
    let io = |what: &str, e: Errno| RequestError::Internal(format!("publish: {what}: {e}"));
    let repo = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(&format!("cannot open the repository {}", root.display()), e))?;
    let created = match mkdirat(&repo, req.model.as_str(), Mode::from_bits_truncate(0o755)) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(io("cannot create the model's directory", e)),
    };
    let model = open_dir(&repo, &req.model).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => invalid(format!(
            "{}/{} is not a directory (a symlink or a file): refused",
            root.display(),
            req.model
        )),
        e => io("cannot open the model's directory", e),
    })?;
    let (tmp, tmp_dir) =
        temp_dir(&model).map_err(|e| io("cannot create a temporary directory", e))?;
    let written = write_file(&tmp_dir, bytes);
    drop(tmp_dir);
    let placed = written.and_then(|()| place(&model, &tmp, req.version));
    let version = match placed {
        Ok(v) => v,
        Err(e) => {
            let _ = unlinkat(
                &model,
                format!("{tmp}/model.onnx").as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            let _ = unlinkat(&model, tmp.as_str(), UnlinkatFlags::RemoveDir);
            return Err(match e {
                Errno::EEXIST => invalid(format!(
                    "model '{}' version {} is already on disk: versions are never replaced",
                    req.model,
                    req.version.unwrap_or(0)
                )),
                e => io("cannot write the model", e),
            });
        }
    };
    let _ = fsync(&model);
    if created {
        let _ = fsync(&repo);
    }
    tracing::info!(model = %req.model, version, bytes = bytes.len(), "published");
    let models = shared
        .registry
        .reload()
        .map_err(|e| RequestError::Internal(format!("cannot read repository: {e}")))?;
    let summary = models
        .into_iter()
        .find(|m| m.name == req.model && m.version == version)
        .ok_or_else(|| {
            RequestError::Internal(format!(
                "published {}/{version}, but the rescan does not list it",
                req.model
            ))
        })?;
    Ok(PublishReply {
        model: req.model.clone(),
        version,
        bytes: bytes.len() as u64,
        summary,
    })
}

/// The bytes must be an ONNX model: a ModelProto with an IR version, an opset and a graph.
fn check_onnx(bytes: &[u8]) -> Result<(), RequestError> {
    let model = rxd_compress::onnx::Model::parse(bytes)
        .map_err(|e| invalid(format!("not an ONNX model: {e}")))?;
    if model.ir_version() == 0 || model.opset("").is_none() {
        return Err(invalid(
            "not an ONNX model: no IR version or no default-domain opset".into(),
        ));
    }
    Ok(())
}

/// Opens a directory entry of `dir` without following a symlink.
fn open_dir(dir: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// A new directory inside `model` with an unpredictable name (SipHash with the process's
/// random keys over a counter and the clock), created exclusively with mode 0700.
fn temp_dir(model: &OwnedFd) -> Result<(String, OwnedFd), Errno> {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let name = format!(".publish-{:016x}", h.finish());
        match mkdirat(model, name.as_str(), Mode::from_bits_truncate(0o700)) {
            Ok(()) => return Ok((name.clone(), open_dir(model, &name)?)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Writes `model.onnx` (created exclusively, never through a symlink) and fsyncs it; the
/// directory becomes readable by others (the daemon may serve from another uid).
fn write_file(dir: &OwnedFd, bytes: &[u8]) -> Result<(), Errno> {
    let fd = openat(
        dir,
        "model.onnx",
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, bytes)
        .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))?;
    fsync(file.as_fd())?;
    fchmod(dir, Mode::from_bits_truncate(0o755))?;
    fsync(dir)
}

/// Renames the temporary directory to the version (the one asked for, or one more than the
/// highest on disk), never replacing anything. Returns the version.
fn place(model: &OwnedFd, tmp: &str, version: Option<u64>) -> Result<u64, Errno> {
    if let Some(v) = version {
        renameat2(
            model,
            tmp,
            model,
            v.to_string().as_str(),
            RenameFlags::RENAME_NOREPLACE,
        )?;
        return Ok(v);
    }
    // Another writer (compress, an admin's copy) may take a number between the scan and the
    // rename: try the next one.
    for _ in 0..8 {
        let next = highest_version(model)? + 1;
        match renameat2(
            model,
            tmp,
            model,
            next.to_string().as_str(),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(next),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::EEXIST)
}

/// The highest numeric entry of the model's directory (0 when none).
fn highest_version(model: &OwnedFd) -> Result<u64, Errno> {
    let mut dir = nix::dir::Dir::openat(
        model,
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(dir
        .iter()
        .filter_map(|e| e.ok()?.file_name().to_str().ok()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_version_is_one_more_than_the_highest_number_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["1", "7", "03", ".publish-x", "latest"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            dir.path(),
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
        assert_eq!(highest_version(&fd).unwrap(), 7);
        let (tmp, tmp_dir) = temp_dir(&fd).unwrap();
        assert!(tmp.starts_with(".publish-") && tmp.len() > 20);
        write_file(&tmp_dir, b"bytes").unwrap();
        assert_eq!(place(&fd, &tmp, None).unwrap(), 8);
        assert_eq!(
            std::fs::read(dir.path().join("8/model.onnx")).unwrap(),
            b"bytes"
        );
        // A version on disk is never replaced, not even an empty directory.
        let (tmp, tmp_dir) = temp_dir(&fd).unwrap();
        write_file(&tmp_dir, b"other").unwrap();
        assert_eq!(place(&fd, &tmp, Some(1)), Err(Errno::EEXIST));
    }

    #[test]
    fn only_onnx_models_pass() {
        assert!(check_onnx(b"").is_err());
        assert!(check_onnx(b"not a model at all, just text").is_err());
        let digits = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/models/digits/1/model.onnx"),
        )
        .unwrap();
        check_onnx(&digits).unwrap();
        assert!(check_onnx(&digits[..digits.len() / 2]).is_err());
    }
}
