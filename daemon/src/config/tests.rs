use std::path::Path;

use super::file::{file_problems, key_of_toml_error};
use super::*;

fn opts_with(dir: &Path) -> ServeOpts {
    ServeOpts {
        model_repository: Some(dir.to_path_buf()),
        // Any existing file passes the existence check.
        ort_library: Some(dir.join("lib.so")),
        ..ServeOpts::default()
    }
}

#[test]
fn every_mistyped_key_is_a_problem_of_its_own_with_its_line() {
    let text = "io-threads = \"x\"\nsocket = '/tmp/s'\nmax-connections = \"y\"\n\
                log-level = 3\nsokcet = 1\n\n[[device]]\nname = \"gpu\"\nkind = 7\n";
    let problems = file_problems(text, Path::new("/etc/rxd/rxd.toml"));
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "io-threads",
            "max-connections",
            "log-level",
            "sokcet",
            "device[0].kind"
        ],
        "{problems:#?}"
    );
    let text: Vec<String> = problems.iter().map(Problem::to_string).collect();
    assert!(
        text[0].starts_with("io-threads: /etc/rxd/rxd.toml line 1: invalid type"),
        "{text:?}"
    );
    assert!(text[1].contains("line 3"), "{text:?}");
    assert!(text.iter().all(|t| !t.contains("config:")), "{text:?}");
    let broken = file_problems("socket = \n", Path::new("/x.toml"));
    assert_eq!(broken.len(), 1);
    assert!(
        broken[0].to_string().starts_with("/x.toml: not valid TOML"),
        "{broken:?}"
    );
}

#[test]
fn unknown_key_is_refused_and_named() {
    let err = parse_file("sokcet = '/tmp/x'\n").unwrap_err();
    assert!(err.contains("sokcet"), "{err}");
    assert_eq!(key_of_toml_error(&err), "sokcet");
}

#[test]
fn a_reload_names_every_changed_key_it_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.so"), b"").unwrap();
    let cfg = |text: &str| resolve(parse_file(text).unwrap(), &opts_with(dir.path()), None);
    let devices = "[[device]]\nname = 'cpu'\nkind = 'cpu'\nmemory-budget = '1GiB'\n\
                   [[device]]\nname = 'cpu2'\nkind = 'cpu'\n";
    let old = cfg(&format!("log-level = 'info'\npreload = ['a']\n{devices}")).unwrap();
    let same = cfg(&format!("log-level = 'info'\npreload = ['a']\n{devices}")).unwrap();
    assert!(old.needs_restart(&same).is_empty());
    // Reloadable: the preload list, load-on-demand, a device's budget.
    let reloadable = cfg(&format!(
        "log-level = 'info'\npreload = ['a', 'b']\nload-on-demand = false\n{}",
        devices.replace("1GiB", "2GiB")
    ))
    .unwrap();
    assert!(
        old.needs_restart(&reloadable).is_empty(),
        "{:?}",
        old.needs_restart(&reloadable)
    );
    let changed = cfg(&format!(
        "log-level = 'debug'\nload-timeout-secs = 5\nrun-memory-bytes = '1GiB'\n\
         preload = ['a']\n{}",
        devices.replace(
            "name = 'cpu2'\nkind = 'cpu'",
            "name = 'cpu2'\nkind = 'cpu'\ncpu-fallback = true"
        )
    ))
    .unwrap();
    assert_eq!(
        old.needs_restart(&changed),
        [
            "device.cpu2",
            "load-timeout-secs",
            "log-level",
            "run-memory-bytes"
        ]
    );
    let reordered = cfg(
        "log-level = 'info'\npreload = ['a']\n[[device]]\nname = 'cpu2'\n\
                         kind = 'cpu'\n[[device]]\nname = 'cpu'\nkind = 'cpu'\n\
                         memory-budget = '1GiB'\n",
    )
    .unwrap();
    assert_eq!(
        old.needs_restart(&reordered),
        ["device"],
        "the default device changed"
    );
}

#[test]
fn flags_override_file_and_defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.so"), b"").unwrap();
    let file = parse_file("socket = '/tmp/from-file.sock'\nmax-in-flight = 8\n").unwrap();
    let mut opts = opts_with(dir.path());
    opts.socket = Some("/tmp/from-flag.sock".into());
    let cfg = resolve(file, &opts, None).unwrap();
    assert_eq!(cfg.socket, PathBuf::from("/tmp/from-flag.sock"));
    assert_eq!(cfg.max_in_flight, 8);
    assert_eq!(cfg.socket_mode, 0o660);
    assert!(cfg.intra_op_threads >= 1);
}

#[test]
fn every_problem_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = parse_file(
        "socket-mode = 'rw'\nmax-connections = 0\nmax-frame-bytes = '1KiB'\nadmin-group = 'no-such-group-rxd'\n",
    )
    .unwrap();
    let mut opts = opts_with(dir.path());
    opts.model_repository = Some(dir.path().join("missing"));
    let err = resolve(file, &opts, None).unwrap_err();
    let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "socket-mode",
            "model-repository",
            "ort-library",
            "admin-group",
            "max-connections",
            "max-frame-bytes"
        ]
    );
}

#[test]
fn load_timeout_defaults_to_five_minutes_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.so"), b"").unwrap();
    let opts = opts_with(dir.path());
    let cfg = resolve(FileConfig::default(), &opts, None).unwrap();
    assert_eq!(cfg.load_timeout, Duration::from_secs(300));
    assert_eq!(cfg.in_force()["load-timeout-secs"], "300");
    let cfg = resolve(parse_file("load-timeout-secs = 20\n").unwrap(), &opts, None).unwrap();
    assert_eq!(cfg.load_timeout, Duration::from_secs(20));
    let err = resolve(parse_file("load-timeout-secs = 0\n").unwrap(), &opts, None).unwrap_err();
    assert_eq!(err.0[0].key, "load-timeout-secs");
}

#[test]
fn ort_library_resolution_order() {
    let dir = tempfile::tempdir().unwrap();
    let env_lib = dir.path().join("env.so");
    std::fs::write(&env_lib, b"").unwrap();
    let mut opts = opts_with(dir.path());
    opts.ort_library = None;
    let cfg = resolve(FileConfig::default(), &opts, Some(env_lib.clone())).unwrap();
    assert_eq!(cfg.ort_library, env_lib);
    // Without flag, config or env, the bundled path is used (and here it is missing).
    let err = resolve(FileConfig::default(), &opts, None).unwrap_err();
    assert!(err.0[0].message.contains(BUNDLED_ORT_LIBRARY));
}

#[test]
fn the_shipped_default_config_parses() {
    let text = include_str!("../../../packaging/rxd.toml");
    let file = parse_file(text).unwrap();
    assert!(
        file.socket.is_none(),
        "every key in the shipped file is commented out"
    );
    // Uncommented, every documented key is a real key.
    let uncommented: String = text
        .lines()
        .map(|l| {
            l.strip_prefix('#')
                .filter(|r| !r.starts_with(' ') && r.contains(" = "))
                .unwrap_or("")
        })
        .map(|l| format!("{}\n", l.split(" #").next().unwrap()))
        .collect();
    let file = parse_file(&uncommented).unwrap();
    assert_eq!(file.max_frame_bytes, Some(ByteSize(80 << 20)));
    assert_eq!(file.socket.as_deref(), Some(Path::new(DEFAULT_SOCKET)));
}

#[test]
fn byte_sizes() {
    assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize(512 << 20)));
    assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64 << 10)));
    assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
    assert!(ByteSize::parse("12 parsecs").is_err());
    assert!(ByteSize::parse("99999999999999T").is_err());
}

/// A machine made up for the test: the paths, groups and sizes it is given exist.
struct FakeHost {
    dirs: Vec<&'static str>,
    files: Vec<&'static str>,
    groups: Vec<(&'static str, u32)>,
}

impl Host for FakeHost {
    fn is_dir(&self, path: &Path) -> bool {
        self.dirs.iter().any(|d| path == Path::new(d))
    }
    fn is_file(&self, path: &Path) -> bool {
        self.files.iter().any(|f| path == Path::new(f))
    }
    fn cores(&self) -> u32 {
        6
    }
    fn allowed_cores(&self) -> Vec<usize> {
        (0..6).collect()
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self
            .groups
            .iter()
            .find(|(g, _)| *g == name)
            .map(|&(_, gid)| gid))
    }
    fn physical_memory(&self) -> Option<u64> {
        Some(8 << 30)
    }
    fn cache_directory(&self) -> Option<PathBuf> {
        Some("/var/cache/from-systemd".into())
    }
}

#[test]
fn a_device_lists_its_cores_as_ranges_or_numbers_among_those_rxd_may_use() {
    let host = FakeHost {
        dirs: vec!["/srv/models"],
        files: vec!["/opt/ort/libonnxruntime.so"],
        groups: vec![],
    };
    let opts = ServeOpts {
        model_repository: Some("/srv/models".into()),
        ..ServeOpts::default()
    };
    let resolve = |text: &str| {
        resolve_on(
            &host,
            parse_file(text).unwrap(),
            &opts,
            Some("/opt/ort/libonnxruntime.so".into()),
        )
    };
    let cfg = resolve(
        "[[device]]\nname = 'a'\ncores = '0-2, 4'\n\
         [[device]]\nname = 'b'\ncores = [5, 3, 3]\n[[device]]\nname = 'c'\n",
    )
    .unwrap();
    let cores: Vec<Option<Vec<usize>>> = cfg
        .devices
        .iter()
        .map(|d| d.cores.as_ref().map(|c| c.to_vec()))
        .collect();
    assert_eq!(cores, [Some(vec![0, 1, 2, 4]), Some(vec![3, 5]), None]);
    for (list, says) in [
        (
            "'4-9'",
            "rxd may not run on core 6, 7, 8, 9 (it may use 0-5)",
        ),
        ("'3-1'", "'3-1' is an empty range"),
        ("'1,x'", "'x' is not a core"),
        ("''", "is not a core"),
        ("[]", "no core listed"),
        ("[2000]", "core 2000 is out of range"),
    ] {
        let err = resolve(&format!("[[device]]\nname = 'a'\ncores = {list}\n")).unwrap_err();
        assert_eq!(err.0[0].key, "device.cores", "{list}: {err}");
        assert!(err.to_string().contains(says), "{list}: {err}");
    }
}

#[test]
fn validation_asks_the_host_about_the_machine() {
    let host = FakeHost {
        dirs: vec!["/srv/models"],
        files: vec!["/opt/ort/libonnxruntime.so"],
        groups: vec![("rxd-admin", 4242)],
    };
    let opts = ServeOpts {
        model_repository: Some("/srv/models".into()),
        ..ServeOpts::default()
    };
    let file = parse_file("admin-group = 'rxd-admin'\n").unwrap();
    let cfg = resolve_on(
        &host,
        file,
        &opts,
        Some("/opt/ort/libonnxruntime.so".into()),
    )
    .unwrap();
    assert_eq!(cfg.ort_library, Path::new("/opt/ort/libonnxruntime.so"));
    assert_eq!(cfg.intra_op_threads, 6, "every core by default");
    assert_eq!(cfg.admin_gid, Some(4242));
    assert_eq!(
        cfg.run_memory_bytes,
        Some(4 << 30),
        "half the memory by default"
    );
    assert_eq!(cfg.cache_directory, Path::new("/var/cache/from-systemd"));

    let file = parse_file("admin-group = 'wheel'\nmodel-repository = '/nowhere'\n").unwrap();
    let err = resolve_on(&host, file, &ServeOpts::default(), None).unwrap_err();
    let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["model-repository", "ort-library", "admin-group"]);
    assert!(
        err.to_string().contains("group 'wheel' does not exist"),
        "{err}"
    );
}

#[test]
fn a_device_kind_is_one_of_four_named_values() {
    let text = "[[device]]\nname = \"g\"\nkind = \"vulkan\"\n";
    let problems = file_problems(text, Path::new("/r.toml"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "device[0].kind");
    let m = &problems[0].message;
    assert!(m.contains("vulkan"), "{m}");
    for kind in ["cpu", "webgpu", "cuda", "tensorrt"] {
        assert!(m.contains(kind), "{m}");
        let ok = format!("[[device]]\nname = \"g\"\nkind = \"{kind}\"\n");
        assert!(parse_file(&ok).is_ok(), "{kind}");
    }
}
