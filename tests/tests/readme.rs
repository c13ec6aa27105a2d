//! The README as a newcomer runs it: every ```sh block of README.md, extracted from the file
//! and run as written, in order, in one shell, in a fresh copy of the checkout (its tracked
//! files, git-initialised) — so the README cannot drift from what works.
//!
//! A block may be marked by an HTML comment on the line before it:
//! - `<!-- readme-test: skip (why) -->`: not run (it needs root, or is the test suite itself);
//!   the reason is required.
//! - `<!-- readme-test: background until "TEXT" -->`: started in the background (a daemon the
//!   README starts in its own terminal); the next block runs once its output shows TEXT.
//!
//! Reuses what is built: the copy gets `RXD_PREBUILT` (the binaries these tests run), so
//! `scripts/quickstart` links them instead of building in release mode, and its `.deps/` holds
//! links to the real ONNX Runtime library and model files (nothing is downloaded). Afterwards
//! the copy's tracked files must be unchanged: README steps must not dirty a checkout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rxd_e2e::*;

#[derive(Debug, PartialEq)]
enum Mode {
    Run,
    Skip(String),
    Background(String),
}

#[derive(Debug)]
struct Block {
    line: usize,
    mode: Mode,
    code: String,
}

/// The ```sh blocks of a Markdown text, each with the mark of the comment right before it.
fn sh_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```sh" {
            i += 1;
            continue;
        }
        let mark = i
            .checked_sub(1)
            .map(|j| lines[j].trim())
            .and_then(|l| l.strip_prefix("<!-- readme-test:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(str::trim);
        let mode = match mark {
            None => Mode::Run,
            Some(m) if m.starts_with("skip (") && m.ends_with(')') && m.len() > 7 => {
                Mode::Skip(m.to_string())
            }
            Some(m) => match m
                .strip_prefix("background until \"")
                .and_then(|r| r.strip_suffix('"'))
            {
                Some(until) => Mode::Background(until.to_string()),
                None => panic!("README.md line {i}: unknown readme-test mark '{m}'"),
            },
        };
        let start = i + 1;
        let end = start
            + lines[start..]
                .iter()
                .position(|l| l.trim_end() == "```")
                .unwrap_or_else(|| panic!("README.md line {}: unclosed block", i + 1));
        blocks.push(Block {
            line: i + 1,
            mode,
            code: lines[start..end].join("\n"),
        });
        i = end + 1;
    }
    blocks
}

/// The shell script that runs the blocks in order: background blocks are started and waited
/// for (until their output shows the text, failing if they exit first).
fn script(blocks: &[Block], logs: &Path) -> String {
    let mut s = String::from("set -euo pipefail\n");
    for (n, b) in blocks.iter().enumerate() {
        match &b.mode {
            Mode::Skip(_) => continue,
            Mode::Run => {
                s.push_str(&format!(
                    "echo '=== README.md line {}' >&2\nset -x\n{}\n{{ set +x; }} 2>/dev/null\n",
                    b.line, b.code
                ));
            }
            Mode::Background(until) => {
                let log = logs.join(format!("background-{n}.log"));
                let log = log.display();
                s.push_str(&format!(
                    "echo '=== README.md line {line} (in the background)' >&2\n\
                     ( set -x\n{code}\n) > '{log}' 2>&1 &\n\
                     bg=$!\n\
                     for _ in $(seq 3000); do\n\
                       grep -qF -- '{until}' '{log}' && break\n\
                       if ! kill -0 $bg 2>/dev/null; then\n\
                         echo 'README.md line {line}: exited before showing \"{until}\"' >&2\n\
                         cat '{log}' >&2; exit 1\n\
                       fi\n\
                       sleep 0.1\n\
                     done\n\
                     grep -qF -- '{until}' '{log}' || {{ echo 'README.md line {line}: never showed \"{until}\"' >&2; cat '{log}' >&2; exit 1; }}\n",
                    line = b.line,
                    code = b.code,
                ));
            }
        }
    }
    s.push_str("echo '=== README.md: every block ran' >&2\n");
    s
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=readme-test",
            "-c",
            "user.email=readme-test@localhost",
        ])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh copy of the checkout: its tracked files as they are now, in a new git repository,
/// and a `.deps/` of links to the ONNX Runtime library and the model files fetched here.
fn fresh_copy(to: &Path) {
    let root = repo_root();
    let listed = git(&root, &["ls-files", "-z"]);
    for rel in listed.split('\0').filter(|p| !p.is_empty()) {
        let from = root.join(rel);
        if !from.exists() {
            continue; // deleted in the working tree
        }
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&from, &dest).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    git(to, &["init", "-q"]);
    git(to, &["add", "-A"]);
    git(to, &["commit", "-q", "-m", "the checkout"]);
    let deps = to.join(".deps");
    std::fs::create_dir_all(&deps).unwrap();
    for entry in ["onnxruntime", "models"] {
        let real = root.join(".deps").join(entry);
        assert!(
            real.exists(),
            "{} missing; run scripts/fetch-deps",
            real.display()
        );
        std::os::unix::fs::symlink(real.canonicalize().unwrap(), deps.join(entry)).unwrap();
    }
}

/// Kills the process group of the script (the daemons it started) when the test ends.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let pg = nix::unistd::Pid::from_raw(self.0);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(500));
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
fn the_marks_are_read_and_skips_say_why() {
    let text = "a\n```sh\necho 1\n```\n<!-- readme-test: skip (needs root) -->\n```sh\nsudo x\n```\n\
                <!-- readme-test: background until \"serving\" -->\n```sh\nrxd\n```\n```rust\nfn x() {}\n```\n";
    let blocks = sh_blocks(text);
    let modes: Vec<&Mode> = blocks.iter().map(|b| &b.mode).collect();
    assert_eq!(
        modes,
        [
            &Mode::Run,
            &Mode::Skip("skip (needs root)".into()),
            &Mode::Background("serving".into())
        ]
    );
    assert_eq!(blocks[0].code, "echo 1");
    assert!(
        std::panic::catch_unwind(|| sh_blocks("<!-- readme-test: skip -->\n```sh\nx\n```\n"))
            .is_err(),
        "a skip without a reason"
    );
}

#[test]
fn every_command_of_the_readme_works_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    let runs = blocks.iter().filter(|b| b.mode == Mode::Run).count();
    assert!(
        runs >= 3,
        "the README's commands are in ```sh blocks: {blocks:#?}"
    );
    let skipped: Vec<&Block> = blocks
        .iter()
        .filter(|b| matches!(b.mode, Mode::Skip(_)))
        .collect();
    assert!(skipped.len() <= 2, "keep skips few: {skipped:#?}");

    let tmp = tempfile::Builder::new()
        .prefix("rxd-readme")
        .tempdir()
        .unwrap();
    let copy = tmp.path().join("rxd");
    let home = tmp.path().join("home");
    let logs = tmp.path().join("logs");
    for d in [&copy, &home, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    fresh_copy(&copy);
    let script_path = logs.join("readme.sh");
    std::fs::write(&script_path, script(&blocks, &logs)).unwrap();
    let prebuilt: PathBuf = bin("rxd").parent().unwrap().to_path_buf();

    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script_path)
        .current_dir(&copy)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("TMPDIR", tmp.path())
        .env("LANG", "C.UTF-8")
        .env("RXD_PREBUILT", &prebuilt)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.join("out.log")).unwrap())
        .stderr(std::fs::File::create(logs.join("err.log")).unwrap());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let _group = Group(child.id() as i32);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    let mut background = String::new();
    for e in std::fs::read_dir(&logs).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("background-") {
            background.push_str(&format!("--- {name} ---\n{}\n", read(&name)));
        }
    }
    assert!(
        status.success(),
        "a README command failed ({status}):\n--- stderr ---\n{}\n--- stdout ---\n{}\n{background}",
        read("err.log"),
        read("out.log"),
    );
    let out = read("out.log");
    assert!(out.contains("label int64 [1] = [7]"), "{out}");
    assert!(
        out.contains("random inputs: images float32 [1, 3, 320, 320]"),
        "{out}"
    );
    let cls = Path::new("/tmp/rxd-out/save_infer_model%2Fscale_0.tmp_1.npy");
    assert!(cls.is_file(), "{}", cls.display());
    // Nothing the README does changes the checkout.
    let dirty = git(&copy, &["status", "--porcelain", "--untracked-files=all"]);
    assert!(
        dirty.is_empty(),
        "the README's commands changed the checkout:\n{dirty}"
    );
    eprintln!("README ran in {:.1} s", started.elapsed().as_secs_f64());
}
