//! Man pages and completions are generated from the same clap definitions as the flags.

use std::process::Command;

use rxd_e2e::*;

fn generate(binary: &str, what: &str) -> String {
    let out = Command::new(bin(binary))
        .args(["--generate", what])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 21: `rxctl --generate man | head` ends rxctl quietly (status 0, nothing on stderr)
/// when the reader closes, as ripgrep does, instead of a panic or a death by SIGPIPE.
#[test]
fn generating_into_a_closed_pipe_exits_quietly() {
    for what in ["man", "complete-bash"] {
        let mut cmd = Command::new(bin("rxctl"));
        cmd.args(["--generate", what]);
        let out = output_into_closed_pipe(cmd);
        assert_eq!(out.status.code(), Some(0), "--generate {what}: {out:?}");
        assert!(out.stderr.is_empty(), "--generate {what}: {out:?}");
    }
}

#[test]
fn man_pages_and_completions_come_from_the_flag_definitions() {
    let man = generate("rxd", "man");
    assert!(man.contains(".TH rxd 8"), "rxd is section 8");
    for flag in [
        "socket",
        "model\\-repository",
        "ort\\-library",
        "intra\\-op\\-threads",
        "check\\-config",
    ] {
        assert!(man.contains(flag), "rxd(8) lacks {flag}");
    }
    let man = generate("rxctl", "man");
    assert!(man.contains(".TH rxctl 1"));
    for cmd in [
        "status", "health", "models", "infer", "bench", "load", "unload",
    ] {
        assert!(man.contains(cmd), "rxctl(1) lacks {cmd}");
    }
    for (shell, marker) in [
        ("complete-bash", "complete -F"),
        ("complete-zsh", "#compdef rxctl"),
        ("complete-fish", "complete -c rxctl"),
    ] {
        let text = generate("rxctl", shell);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
        assert!(text.contains("bench"), "{shell} completes subcommands");
    }
    // rxd.toml(5) documents every key the config accepts.
    let page = std::fs::read_to_string(repo_root().join("packaging/rxd.toml.5")).unwrap();
    let config = std::fs::read_to_string(repo_root().join("packaging/rxd.toml")).unwrap();
    for line in config.lines() {
        if let Some(key) = line
            .strip_prefix('#')
            .and_then(|l| l.split(" = ").next())
            .filter(|k| !k.starts_with(' ') && !k.is_empty() && !k.contains(' '))
        {
            assert!(page.contains(key), "rxd.toml(5) lacks {key}");
        }
    }
}

#[test]
fn protocol_md_lists_every_error_code() {
    let doc = std::fs::read_to_string(repo_root().join("PROTOCOL.md")).unwrap();
    for code in rxd_protocol::ErrorCode::ALL
        .into_iter()
        .chain([rxd_protocol::ErrorCode::Internal])
    {
        let row = format!("| {} | `{}` |", code.as_u16(), code.name());
        assert!(doc.contains(&row), "PROTOCOL.md's error table lacks {row}");
    }
}

/// Every relative link of the user documentation (README.md, docs/*.md, BENCHMARKS.md) names
/// a file or folder that exists, and every `#anchor` names a heading of its page.
#[test]
fn documentation_links_resolve() {
    let root = repo_root();
    let mut pages = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    assert!(pages.len() > 5, "{pages:?}");
    // GitHub's anchors: lower case, spaces to '-', most punctuation dropped.
    let anchors = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix('#'))
            .map(|h| {
                h.trim_start_matches('#')
                    .trim()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect()
            })
            .collect()
    };
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let dir = page.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.contains(' ') {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            assert!(
                path.exists(),
                "{}: link to {target}: no such file",
                page.display()
            );
            if !anchor.is_empty() {
                let doc = std::fs::read_to_string(&path).unwrap();
                assert!(
                    anchors(&doc).iter().any(|a| a == anchor),
                    "{}: link to {target}: no such heading",
                    page.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} links");
}
