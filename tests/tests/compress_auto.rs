//! Issue 24.1: `rxd compress --strategy auto` on a real model with real ONNX Runtime — it
//! tries the candidates, judges each against the original on `--eval` and times it at batch 1
//! against the original, writes the smallest that passes (or the one `--objective` prefers),
//! refuses naming what every candidate missed, lists every candidate in its JSON; and
//! `compress = "auto"` in model.toml goes through the same job in the daemon. Calibration,
//! evaluation and the held-out judging set are disjoint parts of the digits test split.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rxd_compress::report::{self, Input};
use rxd_e2e::*;
use rxd_protocol::Tensor;

/// The digits test split (360 items) in three disjoint parts by item index: calibration
/// (i % 4 == 0), evaluation (1, 2) and held out for judging here (3).
fn digits_parts() -> [Input; 3] {
    let x = report::read_npy(
        "input",
        &repo_root().join("examples/data/digits_test_x.npy"),
    )
    .unwrap();
    let report::Data::F32(d) = &x.data else {
        panic!("float32 expected")
    };
    let per = d.len() / x.shape[0] as usize;
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for (i, item) in d.chunks_exact(per).enumerate() {
        let k = match i % 4 {
            0 => 0,
            3 => 2,
            _ => 1,
        };
        parts[k].extend_from_slice(item);
    }
    parts.map(|data| Input {
        name: x.name.clone(),
        shape: vec![(data.len() / per) as i64, per as i64],
        data: report::Data::F32(data),
    })
}

fn tensor(i: &Input) -> Tensor {
    let report::Data::F32(d) = &i.data else {
        panic!("float32 expected")
    };
    let shape: Vec<u64> = i.shape.iter().map(|&v| v as u64).collect();
    f32_tensor(&i.name, &shape, d)
}

fn write_npy(dir: &Path, file: &str, i: &Input) -> PathBuf {
    let mut bytes = Vec::new();
    rxd_protocol::npy::write(&tensor(i), &mut bytes).unwrap();
    let p = dir.join(file);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// `rxd compress digits -o OUT --strategy auto --json` with `args`.
fn auto(out: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let o = Command::new(bin("rxd"))
        .env("ORT_DYLIB_PATH", ort_library())
        .env("ORT_DISABLE_TELEMETRY", "1")
        .arg("compress")
        .arg(model_file("digits"))
        .arg("-o")
        .arg(out)
        .args(["--strategy", "auto", "--json"])
        .args(args)
        .output()
        .unwrap();
    let doc = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {o:?}"));
    (o, doc)
}

/// Labels (the first output, int64) of a digits model on the inputs.
fn labels(model: &Path, x: &Input) -> Vec<i64> {
    let out = Reference::new(model).run(&[tensor(x)]);
    let b = rxd_client::tensor::bytes(&out[0]).unwrap();
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn auto_writes_the_smallest_variant_that_passes_and_it_answers_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let [cal, eval, held] = digits_parts();
    let cal = write_npy(dir.path(), "cal.npy", &cal);
    let ev = write_npy(dir.path(), "eval.npy", &eval);
    let cal_arg = format!("input={}", cal.display());
    let eval_arg = format!("input={}", ev.display());
    let out = dir.path().join("auto.onnx");
    let (o, doc) = auto(&out, &["--calibration", &cal_arg, "--eval", &eval_arg]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(doc["written"], true, "{doc}");
    assert_eq!(doc["passed"], true, "{doc}");
    // The JSON lists every candidate, static-int8 too (calibration was given), in order.
    let table = &doc["auto"];
    let rows = table["candidates"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, rxd_compress::auto::candidates(true), "{table}");
    let chosen = table["chosen"].as_u64().unwrap() as usize;
    let won = &rows[chosen];
    assert_eq!(table["chosen_strategy"], won["strategy"], "{table}");
    assert_eq!(won["state"], "measured", "{won}");
    // The winner is smaller, meets every check and is not slower at batch 1.
    let size = won["size_ratio"].as_f64().unwrap();
    assert!(size < 1.0, "{won}");
    assert!(
        won["latency_ratio"].as_f64().unwrap() <= rxd_compress::auto::LATENCY_TOLERANCE,
        "{won}"
    );
    assert_eq!(won["latency_items"], 1, "measured at batch 1: {won}");
    let checks = won["checks"].as_array().unwrap();
    assert!(
        checks.iter().any(|c| c["check"] == "top-1"),
        "the classifier output is judged by its top-1: {won}"
    );
    for c in checks {
        // A check without a minimum is shown, not judged.
        assert!(
            c["minimum"].is_null() || c["value"].as_f64() >= c["minimum"].as_f64(),
            "{c}"
        );
    }
    // The weights-only forms are tried as the file runs and dequantized at load: the same
    // file (size), the float model in memory, judged on what the daemon would run.
    for name in ["int8-weights", "int8-weights+fp16-weights"] {
        let row = |n: &str| rows.iter().find(|r| r["strategy"] == n).unwrap();
        let (file, load) = (row(name), row(&format!("{name}@load")));
        assert_eq!(load["state"], "measured", "{load}");
        assert_eq!(load["size_ratio"], file["size_ratio"], "{load} vs {file}");
        let memory = load["memory_ratio"].as_f64().unwrap();
        assert!(
            memory > 3.0 * load["size_ratio"].as_f64().unwrap(),
            "dequantized, the weights are float in memory: {load}"
        );
        assert!(
            file["memory_ratio"].as_f64().unwrap() < memory,
            "{file} vs {load}"
        );
    }
    // No passing candidate is smaller beyond the size objective's tolerance, and none as
    // small is faster.
    let passing = |r: &&serde_json::Value| {
        r["state"] == "measured"
            && r["latency_ratio"].as_f64().unwrap() <= rxd_compress::auto::LATENCY_TOLERANCE
            && r["size_ratio"].as_f64().unwrap() < 1.0
            && r["checks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["minimum"].is_null() || c["value"].as_f64() >= c["minimum"].as_f64())
    };
    let latency = won["latency_ratio"].as_f64().unwrap();
    for r in rows.iter().filter(passing) {
        let s = r["size_ratio"].as_f64().unwrap();
        assert!(
            s * rxd_compress::auto::SIZE_TOLERANCE >= size,
            "{r} vs {won}"
        );
        if s <= size {
            assert!(
                r["latency_ratio"].as_f64().unwrap() >= latency,
                "{r} vs {won}"
            );
        }
    }
    // What was written is the winner, and the table went to stderr for people.
    let written = std::fs::read(&out).unwrap();
    let original = std::fs::metadata(model_file("digits")).unwrap().len();
    assert_eq!(doc["size_after"].as_u64().unwrap(), written.len() as u64);
    assert!(
        (written.len() as f64 / original as f64 - size).abs() < 1e-9,
        "{doc}"
    );
    assert!(err.contains("auto (size objective)"), "{err}");
    assert!(
        err.contains(&format!("chosen: {}", won["strategy"].as_str().unwrap())),
        "{err}"
    );
    // Judged here with in-process ONNX Runtime on the held-out third: the same digits.
    let (want, got) = (labels(&model_file("digits"), &held), labels(&out, &held));
    assert_eq!(want.len(), 90);
    let same = want.iter().zip(&got).filter(|(a, b)| a == b).count();
    assert!(
        same * 100 >= want.len() * 99,
        "{same} of {} labels agree",
        want.len()
    );

    // --objective latency: the fastest passing candidate.
    let fast = dir.path().join("fast.onnx");
    let (o, doc) = auto(
        &fast,
        &[
            "--objective",
            "latency",
            "--eval",
            &eval_arg,
            "--search-budget",
            "120",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let table = &doc["auto"];
    assert_eq!(table["objective"], "latency");
    let rows = table["candidates"].as_array().unwrap();
    // Without calibration inputs static-int8 is not a candidate.
    assert!(
        rows.iter().all(|r| r["strategy"] != "static-int8"),
        "{table}"
    );
    let won = &rows[table["chosen"].as_u64().unwrap() as usize];
    let latency = won["latency_ratio"].as_f64().unwrap();
    for r in rows.iter().filter(passing) {
        assert!(
            r["latency_ratio"].as_f64().unwrap() >= latency,
            "{r} vs {won}"
        );
    }
    assert!(fast.is_file());
}

/// `auto` on `eval` with `flag` set to a limit no candidate meets (0.5 for latency, 0.1 for
/// size): exit 1, nothing written, the error names the limit (`what`: latency or size) and
/// every measured candidate, whose JSON row carries the limit as `field`.
fn refused_at_limit(out: &Path, eval: &Path, flag: &str, field: &str, what: &str) {
    let limit = if what == "size" { 0.1 } else { 0.5 };
    let (o, doc) = auto(
        out,
        &[
            "--eval",
            &format!("input={}", eval.display()),
            flag,
            &limit.to_string(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(!out.exists());
    let error = doc["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("is at most {limit}× the original's {what}")),
        "{error}"
    );
    let rows = doc["auto"]["candidates"].as_array().unwrap();
    let measured: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["state"] == "measured").collect();
    assert!(measured.len() >= 5, "{doc}");
    for r in &measured {
        assert_eq!(r[field], limit, "{r}");
        let s = r["strategy"].as_str().unwrap();
        assert!(
            error.contains(&format!("{s}: ")) && error.contains(&format!("(more than {limit}×)")),
            "{s}: {error}"
        );
    }
}

#[test]
fn auto_refuses_when_nothing_meets_the_thresholds_and_names_what_each_candidate_missed() {
    let dir = tempfile::tempdir().unwrap();
    let [cal, eval, _] = digits_parts();
    let cal = write_npy(dir.path(), "cal.npy", &cal);
    let ev = write_npy(dir.path(), "eval.npy", &eval);
    let out = dir.path().join("auto.onnx");
    let (o, doc) = auto(
        &out,
        &[
            "--calibration",
            &format!("input={}", cal.display()),
            "--eval",
            &format!("input={}", ev.display()),
            // No variant agrees on more than every digit.
            "--min-top1",
            "1.01",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(!out.exists());
    assert_eq!(doc["written"], false, "{doc}");
    assert_eq!(doc["passed"], false, "{doc}");
    assert_eq!(doc["exit_code"], 1, "{doc}");
    let table = &doc["auto"];
    assert!(table["chosen"].is_null(), "{table}");
    let rows = table["candidates"].as_array().unwrap();
    assert_eq!(rows.len(), rxd_compress::auto::candidates(true).len());
    // Every candidate that ran missed the top-1 threshold, and the error names each one.
    let error = doc["error"].as_str().unwrap();
    assert!(error.contains("no candidate"), "{error}");
    let mut measured = 0;
    for r in rows {
        let s = r["strategy"].as_str().unwrap();
        assert!(error.contains(&format!("{s}: ")), "{s}: {error}");
        if r["state"] == "measured" {
            measured += 1;
            assert!(
                r["checks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["check"] == "top-1" && c["minimum"] == 1.01),
                "{r}"
            );
        }
    }
    assert!(measured >= 5, "{table}");
    assert!(error.contains("top-1 100.00 % < 101.00 %"), "{error}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refused: no candidate"), "{err}");

    // Asked for a model twice as fast, or a tenth of the file: no form of an MLP this small
    // is either, so it refuses, naming each candidate's miss against the limit.
    refused_at_limit(&out, &ev, "--max-latency", "latency_limit", "latency");
    refused_at_limit(&out, &ev, "--max-size", "size_limit", "size");

    // Without --eval the accuracy of any pick would be unverified: a usage error, nothing
    // tried; --objective belongs to auto only.
    let o = Command::new(bin("rxd"))
        .env("ORT_DYLIB_PATH", ort_library())
        .arg("compress")
        .arg(model_file("digits"))
        .arg("-o")
        .arg(&out)
        .args(["--strategy", "auto"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--eval"),
        "{o:?}"
    );
    let o = Command::new(bin("rxd"))
        .env("ORT_DYLIB_PATH", ort_library())
        .arg("compress")
        .arg(model_file("digits"))
        .arg("-o")
        .arg(&out)
        .args(["--strategy", "fp16", "--objective", "size"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(!out.exists());
}

#[test]
fn auto_runs_out_of_budget_by_skipping_candidates_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let [_, eval, _] = digits_parts();
    let ev = write_npy(dir.path(), "eval.npy", &eval);
    let out = dir.path().join("auto.onnx");
    let (o, doc) = auto(
        &out,
        &[
            "--eval",
            &format!("input={}", ev.display()),
            "--search-budget",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let rows = doc["auto"]["candidates"].as_array().unwrap();
    assert_eq!(rows.len(), rxd_compress::auto::candidates(false).len());
    for r in rows {
        assert_eq!(r["state"], "skipped", "{r}");
        assert!(r["why"].as_str().unwrap().contains("time budget"), "{r}");
    }
    assert!(!out.exists());
}

#[test]
fn compress_auto_in_model_toml_serves_the_chosen_variant_and_says_its_accuracy_is_unverified() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits")
        .settings("digits", "compress = 'auto'\n")
        .link("as_is", 1, "digits")
        .settings("as_is", "compress = 'auto'\ndequantize-at-load = false\n");
    let cache = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with(
        repo.path(),
        &[],
        &format!("cache-directory = '{}'\n", cache.path().display()),
    );
    let c = d.client();
    let info = c.model_info("digits", None).unwrap();
    let note = info.summary.compression.unwrap_or_default();
    assert!(note.starts_with("served compressed (auto chose "), "{note}");
    assert!(note.contains("accuracy unverified"), "{note}");
    // A weights-only winner is what the daemon then dequantizes at load.
    assert_eq!(
        note.contains("@load"),
        info.dequantized.is_some(),
        "{note}: {:?}",
        info.dequantized
    );
    // Where the file would be served as it is, auto does not try what only dequantizing at
    // load makes fast.
    let info = c.model_info("as_is", None).unwrap();
    let note = info.summary.compression.unwrap_or_default();
    assert!(note.starts_with("served compressed (auto chose "), "{note}");
    assert!(!note.contains("@load"), "{note}");
    assert!(info.dequantized.is_none());
    // The same labels as the original on the 360 test digits.
    let x = example_npy("digits_test_x.npy", "input");
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&x));
    assert_eq!(c.infer("digits", vec![x]).unwrap()[0], want[0]);
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("compressed"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 2, "one per model: {cached:?}");
    let original = std::fs::metadata(model_file("digits")).unwrap().len();
    for f in &cached {
        assert!(std::fs::metadata(f).unwrap().len() < original);
    }
}

/// The three parts the tests use share no item.
#[test]
fn the_parts_are_disjoint_and_cover_the_split() {
    let [a, b, c] = digits_parts();
    assert_eq!((a.shape[0], b.shape[0], c.shape[0]), (90, 180, 90));
    let rows = |i: &Input| -> Vec<Vec<u32>> {
        let report::Data::F32(d) = &i.data else {
            unreachable!()
        };
        d.chunks_exact(64)
            .map(|r| r.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    let (ra, rb, rc) = (rows(&a), rows(&b), rows(&c));
    // Items, not just indices, differ (the split has no duplicate digit images across parts).
    let overlap = ra
        .iter()
        .filter(|r| rb.contains(r) || rc.contains(r))
        .count()
        + rb.iter().filter(|r| rc.contains(r)).count();
    assert_eq!(overlap, 0);
}

#[test]
fn rxctl_model_compress_auto_publishes_the_winner_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let [cal, eval, held] = digits_parts();
    let cal = format!("input={}", write_npy(dir.path(), "cal.npy", &cal).display());
    let ev = format!(
        "input={}",
        write_npy(dir.path(), "eval.npy", &eval).display()
    );
    let repo = Repo::new();
    repo.link("digits", 1, "digits");
    let d = TestDaemon::start(repo.path(), &[]);
    let out = d.rxctl(&[
        "model",
        "compress",
        "digits",
        "--strategy",
        "auto:latency",
        "--calibration",
        &cal,
        "-i",
        &ev,
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("auto (latency objective)"), "{text}");
    for s in rxd_compress::auto::candidates(true) {
        assert!(text.contains(&format!("\n  {s} ")), "{s}: {text}");
    }
    assert!(text.contains("wins: the fastest"), "{text}");
    assert!(text.contains("published as version 2"), "{text}");
    // Version 2 answers like the original on the held-out digits (in-process ONNX Runtime
    // on the published file).
    let v2 = repo.path().join("digits/2/model.onnx");
    let (want, got) = (labels(&model_file("digits"), &held), labels(&v2, &held));
    let same = want.iter().zip(&got).filter(|(a, b)| a == b).count();
    assert!(same * 100 >= want.len() * 99, "{same} of {}", want.len());
    assert!(
        std::fs::metadata(&v2).unwrap().len()
            < std::fs::metadata(model_file("digits")).unwrap().len()
    );
}
