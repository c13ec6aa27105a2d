//! "The first hour without a stumble": rxctl and the load generator on every real model, as
//! a new user meets them, against the real daemon and real ONNX Runtime.

use std::time::Duration;

use rxd_client::bench::{Load, run};
use rxd_client::{DType, Tensor};
use rxd_e2e::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn silero_inputs() -> Vec<Tensor> {
    let audio: Vec<f32> = random_f32(512, 3).iter().map(|x| x * 2.0 - 1.0).collect();
    vec![
        f32_tensor("input", &[1, 512], &audio),
        f32_tensor("state", &[2, 1, 128], &[0.0; 256]),
        Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
    ]
}

/// Regression: `rxctl bench silero -i input=.. -i state=.. -i sr=.. -c 2` failed every
/// request of the second connection. The load generator made each connection's inputs
/// distinct by flipping the first byte of every input — turning the int64 sample rate 16000
/// into 16001, which sends Silero down its 8 kHz branch, where 512 samples break its LSTM. Only
/// float inputs are varied now, and per request.
#[test]
fn bench_of_silero_with_two_connections_sends_the_sample_rate_unchanged() {
    let repo = Repo::new();
    repo.link("silero_vad", 1, "silero_vad");
    let d = TestDaemon::start(repo.path(), &[]);
    let rt = runtime();
    for (arena, concurrency) in [(true, 2), (false, 2), (true, 3)] {
        let load = Load {
            concurrency,
            arena,
            duration: Duration::from_millis(700),
            warmup: Duration::from_millis(200),
            ..Load::new(&d.socket, "silero_vad", silero_inputs())
        };
        let r = rt.block_on(run(&load, |_, _| {})).unwrap();
        assert!(r.errors.is_empty(), "arena {arena}: {:?}", r.error_messages);
        assert!(r.ok > 10, "{r:?}");
        assert_eq!(r.varied_input.as_deref(), Some("input"));
    }
}

/// Silero compares its sample rate `sr` with 16000 and takes its 8 kHz branch otherwise,
/// where 16 kHz chunks (512 samples) break its LSTM. The daemon reads that constant from the
/// graph: it warms up and tunes with `sr` = 16000 (so warmup-dims of a 16 kHz chunk load — with
/// zeros the warmup failed, and so did the load), the model's description says so, and rxctl's
/// generated inputs use it (with random integers every request of a 512-sample bench failed).
#[test]
fn an_integer_input_the_graph_compares_with_a_constant_is_warmed_tuned_and_generated_with_it() {
    let repo = Repo::new();
    repo.link("silero_vad", 1, "silero_vad").settings(
        "silero_vad",
        "warmup-dims = { input = [1, 512], state = [2, 1, 128] }\n\
         batch-axes = { state = 1, stateN = 1 }\n",
    );
    let cache = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with(
        repo.path(),
        &["--intra-op-threads", "2"],
        &format!(
            "tune = true\ncache-directory = '{}'\n",
            cache.path().display()
        ),
    );
    let info = d.client().model_info("silero_vad", None).unwrap();
    let value = |name: &str| {
        let spec = info.inputs.iter().find(|t| t.name == name).unwrap();
        (spec.warmup_value, spec.warmup_dims.clone())
    };
    assert_eq!(value("sr"), (Some(16000), vec![]), "{info:?}");
    assert_eq!(value("input"), (None, vec![1, 512]), "{info:?}");
    assert_eq!(value("state").0, None);
    // The tuning measured that branch at batch sizes beyond one (with zeros every run of a
    // 512-sample chunk fails, and nothing would have been measured).
    let tuning = info.tuning.clone().expect("tuned");
    assert!(
        tuning
            .table
            .iter()
            .any(|c| c.rows >= 8 && c.items_per_s > 0.0),
        "{tuning:?}"
    );
    let out = d.rxctl(&["models", "silero_vad"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("warmup value 16000"), "{text}");
    // Generated inputs: no --input, 16 kHz chunks.
    let v = bench_json(
        &d,
        &[
            "silero_vad",
            "-c",
            "2",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
    );
    assert!(v["ok"].as_u64().unwrap() > 0, "{v}");
    // One generated request, of the warmup's shapes.
    let out = d.rxctl(&["--json", "infer", "silero_vad"]);
    assert!(out.status.success(), "{out:?}");
}

/// model.toml `warmup-values` wins over the graph's constant: with `sr = 8000` Silero warms up
/// on its 8 kHz branch (256-sample chunks load; 512-sample ones then fail the warmup, and with
/// it the load), and a name that is not an integer input fails the load, saying so.
#[test]
fn warmup_values_in_model_toml_win_over_the_graph_and_a_wrong_name_fails_the_load() {
    let dims = |n: u32| format!("warmup-dims = {{ input = [1, {n}], state = [2, 1, 128] }}\n");
    let repo = Repo::new();
    repo.link("eight", 1, "silero_vad")
        .settings(
            "eight",
            &format!("warmup-values = {{ sr = 8000 }}\n{}", dims(256)),
        )
        .link("wide", 1, "silero_vad")
        .settings(
            "wide",
            &format!("warmup-values = {{ sr = 8000 }}\n{}", dims(512)),
        )
        .link("float", 1, "silero_vad")
        .settings("float", "warmup-values = { input = 1 }\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let info = c.model_info("eight", None).unwrap();
    let sr = info.inputs.iter().find(|t| t.name == "sr").unwrap();
    assert_eq!(sr.warmup_value, Some(8000), "{info:?}");
    for (model, why) in [
        ("wide", "warmup"),
        (
            "float",
            "warmup-values names 'input', which is not an input of an integer type",
        ),
    ] {
        assert!(c.model_info(model, None).is_err(), "{model}");
        let models = c.list_models().unwrap();
        let m = models.iter().find(|m| m.name == model).unwrap();
        assert_eq!(m.state, rxd_protocol::ModelState::Failed, "{m:?}");
        let error = m.error.as_deref().unwrap_or("");
        assert!(error.contains(why), "{model}: {error}");
    }
}

/// `--requests N` sends exactly N measured requests whatever the concurrency, and the report
/// says what the warm-up sent (the daemon counts those too).
#[test]
fn bench_stops_at_exactly_n_requests_and_reports_its_warmup() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let rt = runtime();
    let input = example_npy("digit.npy", "input");
    let before = d.summaries()["digits"].requests;
    let load = Load {
        concurrency: 7,
        requests: Some(50),
        duration: Duration::from_secs(60),
        warmup: Duration::from_millis(300),
        ..Load::new(&d.socket, "digits", vec![input])
    };
    let r = rt.block_on(run(&load, |_, _| {})).unwrap();
    assert_eq!((r.requests, r.ok), (50, 50), "{r:?}");
    assert!(r.warmup_requests > 0);
    let after = d.summaries()["digits"].requests;
    assert_eq!(after - before, 50 + r.warmup_requests);
}

/// With the result cache on, a benchmark of identical requests is answered by the cache and
/// says so; by default every request differs, so the model runs for each.
#[test]
fn bench_varies_inputs_unless_asked_and_reports_what_the_cache_answered() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .settings("digits", "cache-bytes = \"16MiB\"\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let rt = runtime();
    let input = example_npy("digit.npy", "input");
    let base = Load {
        concurrency: 2,
        requests: Some(300),
        duration: Duration::from_secs(60),
        warmup: Duration::ZERO,
        ..Load::new(&d.socket, "digits", vec![input])
    };
    let varied = rt.block_on(run(&base, |_, _| {})).unwrap();
    assert_eq!(varied.ok, 300);
    assert_eq!(varied.cache_hits + varied.coalesced, 0, "{varied:?}");
    let same = Load {
        same_input: true,
        ..base
    };
    let same = rt.block_on(run(&same, |_, _| {})).unwrap();
    assert_eq!(same.ok, 300);
    assert!(
        same.answered_without_running() > 0.9,
        "identical requests: {same:?}"
    );
    assert_eq!(same.varied_input, None);
}

/// The fetched real models, as scripts/quickstart lays them out (with the settings of
/// examples/repository/).
const REAL: [&str; 5] = [
    "yolov8n",
    "ppocr_det",
    "ppocr_cls",
    "ppocr_rec",
    "silero_vad",
];

fn real_repo() -> Repo {
    let repo = Repo::new();
    for m in REAL {
        repo.example(m);
    }
    repo
}

/// `rxctl --json bench ARGS` against `d`: it succeeds and no request failed; its report.
fn bench_json(d: &TestDaemon, args: &[&str]) -> serde_json::Value {
    let all: Vec<&str> = ["--json", "bench"].iter().chain(args).copied().collect();
    let out = d.rxctl(&all);
    assert!(out.status.success(), "{args:?}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "{args:?}: {v}");
    v
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `rxctl infer MODEL` with no inputs works on every real model: inputs are generated at the
/// shape the daemon warmed the model up with (YOLOv8n's [1, 3, 320, 320], not [1, 3, 1, 1]),
/// and the output says they were random. `rxctl bench MODEL` too.
#[test]
fn rxctl_infer_and_bench_run_every_real_model_with_generated_inputs() {
    let repo = real_repo();
    let d = TestDaemon::start(repo.path(), &[]);
    for m in REAL {
        let out = d.rxctl(&["infer", m]);
        assert!(out.status.success(), "{m}: {out:?}");
        assert!(stdout(&out).starts_with("random inputs: "), "{m}: {out:?}");
        let out = d.rxctl(&["--json", "infer", m]);
        assert!(out.status.success(), "{m}: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let generated = v["generated_inputs"].as_array().unwrap();
        assert!(
            generated
                .iter()
                .all(|g| g["shape_from"] == "warmup" || g["shape_from"] == "fixed"),
            "{m}: {v}"
        );
        let v = bench_json(&d, &[m, "--duration", "0.5", "--warmup", "0.2", "-c", "2"]);
        assert!(v["ok"].as_u64().unwrap() > 0, "{m}: {v}");
    }
    let yolo = d.rxctl(&["--json", "infer", "yolov8n"]);
    let v: serde_json::Value = serde_json::from_slice(&yolo.stdout).unwrap();
    assert_eq!(
        v["generated_inputs"][0]["shape"],
        serde_json::json!([1, 3, 320, 320])
    );
    // --dim sets a generated input's shape; one that does not fit the model is a usage error.
    let out = d.rxctl(&["--json", "infer", "yolov8n", "--dim", "images=1x3x256x256"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 22, 1344]));
    for bad in [
        "images=1x3x256",
        "images=1x4x256x256",
        "nope=1",
        "images=1x3x9999x32",
    ] {
        let out = d.rxctl(&["infer", "yolov8n", "--dim", bad]);
        assert_eq!(out.status.code(), Some(64), "{bad}: {out:?}");
    }
}

/// Output names with a slash (PP-OCR's `save_infer_model/scale_0.tmp_1`, exporters'
/// `/model/Conv_output_0`) are written as one file inside `-o DIR` (`%2F` for the slash),
/// holding the output; `-o` naming a file is a usage error, before the model runs.
#[test]
fn rxctl_writes_outputs_with_slashes_in_their_names_inside_the_directory() {
    let repo = Repo::new();
    repo.example("ppocr_cls");
    let d = TestDaemon::start(repo.path(), &[]);
    let dir = d.dir.path().join("out");
    let out = d.rxctl(&["--json", "infer", "ppocr_cls", "-o", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = dir.join("save_infer_model%2Fscale_0.tmp_1.npy");
    assert_eq!(v["outputs"][0]["file"], file.display().to_string());
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let t = rxd_client::npy::read(
        "save_infer_model/scale_0.tmp_1",
        std::fs::File::open(&file).unwrap(),
    )
    .unwrap();
    assert_eq!(t.shape, vec![1, 2]);
    assert_eq!(
        serde_json::json!(
            rxd_client::tensor::to_array::<f32>(&t)
                .unwrap()
                .into_raw_vec_and_offset()
                .0
        ),
        v["outputs"][0]["values"]
    );
    let file_arg = d.dir.path().join("a-file");
    std::fs::write(&file_arg, b"").unwrap();
    let before = d.summaries()["ppocr_cls"].requests;
    let out = d.rxctl(&["infer", "ppocr_cls", "-o", file_arg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("names a directory"));
    assert_eq!(d.summaries()["ppocr_cls"].requests, before);
}

/// Bytes rxctl read from Unix sockets while running `args` under strace (one trace file per
/// thread, so no system call is split over two lines).
fn socket_bytes_read(d: &TestDaemon, args: &[&str]) -> (std::process::Output, u64) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("trace");
    let out = std::process::Command::new("strace")
        .args([
            "-ff",
            "-yy",
            "-qq",
            "-e",
            "trace=read,readv,recvfrom,recvmsg",
            "-o",
        ])
        .arg(&prefix)
        .arg(bin("rxctl"))
        .args(args)
        .env_clear()
        .env("RXD_SOCKET", &d.socket)
        .output()
        .expect("strace (apt install strace; .ci/run installs it)");
    let mut total = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines().filter(|l| l.contains("UNIX-STREAM")) {
            let n = line
                .rsplit("= ")
                .next()
                .and_then(|n| n.trim().parse::<u64>().ok());
            total += n.unwrap_or(0);
        }
    }
    (out, total)
}

/// A first request's outputs go through the shared-memory arena when their size can be known
/// before the run (here from the warmup: PP-OCR's detector names no dimension it shares with
/// its input; YOLOv8n's output is a formula of the input's height and width): strace counts
/// what rxctl reads from the socket. Before, a one-shot `rxctl infer ppocr_det` read its
/// 1.6 MB output through the socket.
#[test]
fn first_request_outputs_come_through_the_arena() {
    let repo = Repo::new();
    repo.example("ppocr_det").example("yolov8n");
    let d = TestDaemon::start(repo.path(), &[]);
    for (args, output_bytes) in [
        (vec!["infer", "ppocr_det"], 640 * 640 * 4),
        (
            vec!["infer", "yolov8n", "--dim", "images=1x3x256x256"],
            22 * 1344 * 4,
        ),
        (
            vec!["infer", "yolov8n", "--dim", "images=2x3x320x320"],
            2 * 22 * 2100 * 4,
        ),
    ] {
        let (out, read) = socket_bytes_read(&d, &args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            read < 16 << 10,
            "{args:?}: {read} bytes read from the socket for {output_bytes} bytes of outputs"
        );
        assert!(read > 500, "the trace saw the socket: {read}");
    }
    // An output whose size cannot be known gets no area and comes inline (the control: the
    // trace does see outputs that cross the socket).
    let (out, read) = socket_bytes_read(&d, &["infer", "ppocr_det", "--dim", "x=1x3x320x320"]);
    assert!(out.status.success(), "{out:?}");
    assert!(read > 320 * 320 * 4, "{read}");
}

/// When the output area a client guessed is too small (the previous call's size, for a larger
/// image), the outputs come inline in the same answer: the model runs once per request, and
/// the outputs are what in-process ONNX Runtime gives.
#[test]
fn a_short_output_area_falls_back_inline_without_running_twice() {
    let repo = Repo::new();
    repo.example("ppocr_det");
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client();
    let mut reference = Reference::new(&model_file("ppocr_det"));
    for (i, side) in [640u64, 960, 960].into_iter().enumerate() {
        let n = (3 * side * side) as usize;
        let x = f32_tensor("x", &[1, 3, side, side], &random_f32(n, i as u64));
        let before = d.summaries()["ppocr_det"].clone();
        let got = c.infer("ppocr_det", vec![x.clone()]).unwrap();
        let after = d.summaries()["ppocr_det"].clone();
        assert_eq!(after.requests - before.requests, 1, "side {side}");
        assert_eq!(after.batches - before.batches, 1, "side {side}: ran once");
        assert_eq!(got, reference.run(&[x]), "side {side}");
    }
}

/// A client's failing requests do not flood the log: ONNX Runtime's messages go through
/// tracing (no ANSI colour codes, rxd's format, the session named), once per code location
/// per 10 s, while the metrics count every failure. Before, each failed request printed ORT's
/// own coloured lines to stderr (26,467 lines from a 15 s bench).
#[test]
fn failing_requests_are_counted_in_metrics_not_logged_one_by_one() {
    let repo = Repo::new();
    repo.example("yolov8n");
    let d = TestDaemon::start(repo.path(), &[]);
    // A 1 × 1 image passes validation and fails inside the model (Concat of mismatched maps).
    let load = Load {
        concurrency: 2,
        requests: Some(400),
        duration: Duration::from_secs(60),
        warmup: Duration::ZERO,
        ..Load::new(
            &d.socket,
            "yolov8n",
            vec![f32_tensor("images", &[1, 3, 1, 1], &[0.5; 3])],
        )
    };
    let r = runtime().block_on(run(&load, |_, _| {})).unwrap();
    assert_eq!(r.errors.get("inference_failed"), Some(&400), "{r:?}");
    let m = d.client_inline().metrics().unwrap();
    let y = m.models.iter().find(|x| x.name == "yolov8n").unwrap();
    assert_eq!(y.outcomes.get("inference_failed"), Some(&400));
    let log = d.log_text();
    assert!(!log.contains('\x1b'), "ANSI escapes in the log");
    // (The harness logs at debug level, where ORT's set-up information shows as DEBUG.)
    let ort: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" onnxruntime: ") && !l.contains(" DEBUG "))
        .collect();
    assert!(
        !ort.is_empty() && ort.len() <= 3,
        "{} lines from ONNX Runtime:\n{}",
        ort.len(),
        ort.join("\n")
    );
    assert!(
        ort[0].contains("WARN") && ort[0].contains("session=\"yolov8n:1\""),
        "{}",
        ort[0]
    );
}

/// Log lines read as sentences, not Rust debug output, and a failed load is logged once;
/// `configure --persist` writes sizes as people write them.
#[test]
fn the_log_says_what_happened_once_and_in_words() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .write("broken", 1, b"not an ONNX file");
    let d = TestDaemon::start(repo.path(), &[]);
    let out = d.rxctl(&[
        "configure",
        "digits",
        "--cache-bytes",
        "64MiB",
        "--instances",
        "2",
        "--persist",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.rxctl(&["unload", "digits"]).status.success());
    let toml = std::fs::read_to_string(repo.path().join("digits/model.toml")).unwrap();
    assert!(toml.contains("cache-bytes = \"64MiB\""), "{toml}");
    let log = d.log_text();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broken") && (l.contains(" WARN ") || l.contains(" ERROR ")))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(failed[0].contains("load failed"), "{}", failed[0]);
    let info: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    for l in &info {
        for debug in ["Some(", "None", "Configure {", "{\""] {
            assert!(!l.contains(debug), "Rust debug output in the log: {l}");
        }
    }
    assert!(
        info.iter().any(|l| l
            .contains("settings changed: instances 2, cache-bytes 64MiB, written to model.toml")),
        "{log}"
    );
    assert!(
        info.iter()
            .any(|l| l.contains("model unloaded (every version)"))
    );
}

/// One JSON document, whole stdout (trailing lines or a progress line would fail to parse).
fn one_json(what: &str, out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not one JSON document ({e}):\n{}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Every `--json` prints exactly one JSON document on stdout, successes and failures alike,
/// for rxctl's commands and for `rxd compress` (whose progress lines used to come before and
/// after the object).
#[test]
fn every_json_output_is_one_json_document() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let digit = repo_root().join("examples/data/digit.npy");
    let input = format!("input={}", digit.display());
    let out_dir = d.dir.path().join("out");
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["status"], 0),
        (vec!["health"], 0),
        (vec!["models"], 0),
        (vec!["models", "digits"], 0),
        (vec!["infer", "digits", "-i", &input], 0),
        (vec!["infer", "digits", "-o", out_dir.to_str().unwrap()], 0),
        (
            vec!["bench", "digits", "--requests", "20", "--warmup", "0"],
            0,
        ),
        (
            vec![
                "bench",
                "digits",
                "-c",
                "1,2",
                "--requests",
                "10",
                "--warmup",
                "0",
            ],
            0,
        ),
        (
            vec!["bench", "digits", "--rate", "50:0.2", "--warmup", "0"],
            0,
        ),
        (vec!["devices"], 0),
        (vec!["metrics"], 0),
        (vec!["configure", "digits", "--max-batch-rows", "8"], 0),
        (vec!["load", "digits"], 0),
        (vec!["pin", "digits"], 0),
        (vec!["unpin", "digits"], 0),
        (vec!["reload"], 0),
        (vec!["model", "compress", "digits", "--dry-run"], 0),
        (vec!["unload", "digits"], 0),
        (vec!["infer", "nope"], 1),
        (vec!["infer", "digits", "-i", "input=/nonexistent.npy"], 65),
        (vec!["metrics", "--prometheus"], 64),
        (vec!["top"], 64),
    ];
    for (args, code) in cases {
        let mut all = vec!["--json"];
        all.extend(&args);
        let out = d.rxctl(&all);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let v = one_json(&format!("rxctl {args:?}"), &out);
        if code != 0 {
            assert_eq!(v["exit_code"], code, "{args:?}: {v}");
            assert!(v["error"].is_string(), "{args:?}: {v}");
        }
    }
    let unknown = one_json("unknown model", &d.rxctl(&["--json", "infer", "nope"]));
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("the daemon serves: digits"),
        "{unknown}"
    );

    // rxd compress: written, refused by its report, and a usage error.
    let model = model_file("digits");
    let eval = format!(
        "input={}",
        repo_root()
            .join("examples/data/digits_test_x.npy")
            .display()
    );
    let compress = |strategy: &str, eval: &str| {
        std::process::Command::new(bin("rxd"))
            .args(["compress", "--json", "--ort-library"])
            .arg(ort_library())
            .arg(&model)
            .arg("-o")
            .arg(d.dir.path().join("out.onnx"))
            .args(["--strategy", strategy, "--eval", eval])
            .output()
            .unwrap()
    };
    let ok = compress("int8-weights", &eval);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let v = one_json("rxd compress", &ok);
    assert_eq!(v["written"], true, "{v}");
    assert_eq!(v["report"]["passed"], true, "{v}");
    assert!(
        !String::from_utf8_lossy(&ok.stderr).is_empty(),
        "progress goes to stderr"
    );
    let refused = compress("prune:0.9", &eval);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let v = one_json("rxd compress (refused)", &refused);
    assert_eq!(
        (v["written"].clone(), v["report"]["passed"].clone()),
        (false.into(), false.into()),
        "{v}"
    );
    let usage = compress("int8-weights", "x=/nonexistent.npy");
    assert_eq!(usage.status.code(), Some(64), "{usage:?}");
    let v = one_json("rxd compress (usage)", &usage);
    assert!(
        v["error"].as_str().unwrap().contains("its inputs: input"),
        "a wrong --eval name lists the model's inputs: {v}"
    );
}

/// Smaller stumbles: `rxctl top` without a terminal is a usage error that points at `rxctl
/// metrics` (not "daemon unreachable"), `rxctl metrics` is not top's screen, an unknown model
/// lists the models there are, a socket the user may not open is exit 77 with the group to
/// join, `rxd compress` on a file that is not ONNX says so (65).
#[test]
fn small_stumbles_have_precise_answers() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let top = d.rxctl(&["top"]);
    assert_eq!(top.status.code(), Some(64), "{top:?}");
    assert!(String::from_utf8_lossy(&top.stderr).contains("rxctl metrics"));
    let metrics = d.rxctl(&["metrics"]);
    assert!(metrics.status.success());
    assert!(
        !stdout(&metrics).contains("q quits"),
        "{}",
        stdout(&metrics)
    );
    let unknown = d.rxctl(&["infer", "digit"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("the daemon serves: digits"),
        "{unknown:?}"
    );
    // Another user, not in the socket's group (the test runs as root, which no mode stops).
    if nix::unistd::Uid::effective().is_root() {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("rxctl"))
            .arg("status")
            .env("RXD_SOCKET", &d.socket)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(77), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("group rxd"),
            "{out:?}"
        );
    }
    // check-config names every mistyped key, not just the first, each once.
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "io-threads = \"x\"\nmax-connections = \"y\"\nlog-level = 3\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("rxd"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (line, key) in lines
        .iter()
        .zip(["io-threads", "max-connections", "log-level"])
    {
        assert!(line.starts_with(&format!("rxd: config: {key}: ")), "{err}");
    }
    assert!(!err.contains("config: config:"), "{err}");
    let not_onnx = d.dir.path().join("notes.txt");
    std::fs::write(&not_onnx, "these are notes, not a model\n").unwrap();
    let out = std::process::Command::new(bin("rxd"))
        .arg("compress")
        .arg(&not_onnx)
        .arg("-o")
        .arg(d.dir.path().join("x.onnx"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an ONNX model"),
        "{out:?}"
    );
}

/// Issue 21: `rxctl models | head -1` and the like: when stdout's reader has gone, rxctl ends
/// quietly with status 0 and nothing on stderr (not a panic, not a death by SIGPIPE).
#[test]
fn rxctl_into_a_closed_pipe_exits_quietly() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    for args in [
        &["models"][..],
        &["--json", "metrics"],
        &["metrics", "--prometheus"],
        &["infer", "digits"],
    ] {
        let out = output_into_closed_pipe(d.rxctl_command(args));
        assert_eq!(out.status.code(), Some(0), "rxctl {args:?}: {out:?}");
        assert!(out.stderr.is_empty(), "rxctl {args:?}: {out:?}");
    }
}

/// Inputs for `model` from `seed`: of the shapes the examples serve (the detector smaller, to
/// keep the test short), floats random, Silero's sample rate 16000 and its state small.
fn real_inputs(model: &str, seed: u64) -> Vec<Tensor> {
    let image = |name: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        f32_tensor(name, shape, &random_f32(n, seed))
    };
    match model {
        "sigmoid" => vec![image("x", &[3, 4, 5])],
        "mul_1" => vec![image("X", &[3, 2])],
        "yolov8n" => vec![image("images", &[1, 3, 320, 320])],
        "ppocr_det" => vec![image("x", &[1, 3, 128, 160])],
        "ppocr_cls" => vec![image("x", &[1, 3, 48, 192])],
        "ppocr_rec" => vec![image("x", &[1, 3, 48, 320])],
        "silero_vad" => {
            let audio: Vec<f32> = random_f32(512, seed)
                .iter()
                .map(|x| x * 2.0 - 1.0)
                .collect();
            let state: Vec<f32> = random_f32(256, seed + 1).iter().map(|x| x * 0.1).collect();
            vec![
                f32_tensor("input", &[1, 512], &audio),
                f32_tensor("state", &[2, 1, 128], &state),
                Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec()),
            ]
        }
        other => panic!("no inputs for {other}"),
    }
}

/// Regression (issue 26): the load generator and concurrent requests work on every model of the
/// models set — the fetched real ones and ONNX Runtime's own datasets — including Silero VAD,
/// a stateful model whose batch axis is not the first of every input (`state` [2, batch, 128],
/// `sr` a scalar; its example model.toml says where the rows are, tests/batch_axes.rs). Four
/// connections (two through the arena, two
/// inline) send distinct requests at once, and one request identical on all four (coalesced);
/// every answer equals in-process ONNX Runtime on the same inputs. Then `bench` runs each model
/// at 2 and 3 connections without an error, and `--rows` is refused (usage) where rows are not
/// the first dimension of every input, instead of failing every request.
#[test]
fn issue_26_bench_and_concurrent_requests_answer_every_real_model_as_in_process_ort() {
    let models = ["sigmoid", "mul_1"].into_iter().chain(REAL);
    let repo = Repo::new();
    for m in models.clone() {
        repo.example(m);
    }
    let d = TestDaemon::start(repo.path(), &[]);
    let rt = runtime();
    for m in models {
        let mut reference = Reference::new(&model_file(m));
        let answers = rt.block_on(async {
            let tasks: Vec<_> = (0..4u64)
                .map(|c| {
                    let socket = d.socket.clone();
                    tokio::spawn(async move {
                        let options = if c % 2 == 0 {
                            rxd_client::ClientOptions {
                                inline_threshold: 0,
                                ..rxd_client::ClientOptions::default()
                            }
                        } else {
                            rxd_client::ClientOptions::inline_only()
                        };
                        let client = rxd_client::Client::connect_with(&socket, options)
                            .await
                            .unwrap();
                        let seeds = [10 * c + 1, 10 * c + 2, 999, 10 * c + 3];
                        let calls = seeds.map(|seed| {
                            let client = client.clone();
                            tokio::spawn(async move {
                                let got = client.infer(m, real_inputs(m, seed)).await;
                                (seed, got.unwrap_or_else(|e| panic!("{m} seed {seed}: {e}")))
                            })
                        });
                        let mut answers = Vec::new();
                        for call in calls {
                            answers.push(call.await.unwrap());
                        }
                        answers
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        assert_eq!(answers.len(), 16, "{m}");
        for (seed, got) in answers {
            let want = reference.run(&real_inputs(m, seed));
            assert_eq!(got.len(), want.len(), "{m} seed {seed}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((&g.name, g.dtype, &g.shape), (&w.name, w.dtype, &w.shape));
                let diff = max_rel_diff(g, w);
                assert!(diff <= 1e-4, "{m} seed {seed} '{}': {diff}", g.name);
            }
        }
        for (arena, concurrency) in [(true, 2), (false, 3)] {
            let load = Load {
                concurrency,
                arena,
                duration: Duration::from_millis(400),
                warmup: Duration::from_millis(100),
                ..Load::new(&d.socket, m, real_inputs(m, 7))
            };
            let r = rt.block_on(run(&load, |_, _| {})).unwrap();
            assert!(
                r.errors.is_empty(),
                "{m} arena {arena}: {:?}",
                r.error_messages
            );
            assert!(r.ok > 0, "{m}: {r:?}");
        }
    }
    assert!(
        d.summaries()["silero_vad"].batchable,
        "batch-axes in examples/repository/silero_vad/model.toml"
    );
    let out = d.rxctl(&["bench", "silero_vad", "--rows", "2", "--duration", "0.2"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'state'") && err.contains("--dim"), "{err}");
    // Where every input is batch-first, --rows sets the batch.
    bench_json(
        &d,
        &[
            "ppocr_cls",
            "--rows",
            "3",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
    );
}
