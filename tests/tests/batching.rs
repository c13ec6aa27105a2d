//! Issue 4: batching across connections, deadlines, backpressure and priorities, against the
//! real daemon.

use std::time::Duration;

use rxd_client::{ClientError, DType, ErrorCode, Tensor};
use rxd_e2e::*;
use rxd_protocol::{InferRequest, Outcome, Reply, Request, RequestFrame};

fn code_of(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn model_stats(d: &TestDaemon, name: &str) -> rxd_protocol::ModelSummary {
    d.summaries().remove(name).unwrap()
}

/// `clients` concurrent connections each send one single-row request; returns each answer.
fn concurrent_single_rows(d: &TestDaemon, model: &str, inputs: Vec<Tensor>) -> Vec<Vec<Tensor>> {
    let socket = d.socket.clone();
    let model = model.to_string();
    rt().block_on(async move {
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|t| {
                let (socket, model) = (socket.clone(), model.clone());
                tokio::spawn(async move {
                    let c = rxd_client::Client::connect(&socket).await.unwrap();
                    c.infer(&model, vec![t]).await.unwrap()
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    })
}

fn close(a: &[u8], b: &[u8]) -> bool {
    let f = |x: &[u8]| {
        x.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    f(a).iter()
        .zip(f(b))
        .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

/// `n` clients each send one random 3x48x192 crop (seeds from `seed`) to `ppocr_cls`; every
/// answer must equal an unbatched in-process ORT run on the same crop.
fn concurrent_crops_equal_in_process_ort(d: &TestDaemon, n: u64, seed: u64) {
    let crops: Vec<Tensor> = (0..n)
        .map(|i| f32_tensor("x", &[1, 3, 48, 192], &random_f32(3 * 48 * 192, seed + i)))
        .collect();
    let mut reference = Reference::new(&model_file("ppocr_cls"));
    let want: Vec<Vec<Tensor>> = crops
        .iter()
        .map(|c| reference.run(std::slice::from_ref(c)))
        .collect();
    let got = concurrent_single_rows(d, "ppocr_cls", crops);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g[0].shape, w[0].shape);
        assert!(
            close(
                rxd_client::tensor::bytes(&g[0]).unwrap(),
                rxd_client::tensor::bytes(&w[0]).unwrap()
            ),
            "request {i}: the batched output differs from the unbatched run"
        );
    }
}

#[test]
fn batched_results_equal_unbatched_in_process_ort_row_by_row() {
    let repo = Repo::new();
    // Wait up to 50 ms for batches of up to 8 rows, so concurrent requests are batched.
    repo.link("ppocr_cls", 1, "ppocr_cls")
        .settings(
            "ppocr_cls",
            "max-batch-rows = 8\nmax-queue-delay-us = 50000\n",
        )
        .link("digits", 1, "digits")
        .settings(
            "digits",
            "max-batch-rows = 16\nmax-queue-delay-us = 50000\n",
        );
    let d = TestDaemon::start(repo.path(), &[]);

    // PP-OCR direction classifier: 16 clients, one 3x48x192 crop each.
    concurrent_crops_equal_in_process_ort(&d, 16, 100);
    let s = model_stats(&d, "ppocr_cls");
    assert!(s.batchable);
    assert_eq!((s.requests, s.rows), (16, 16));
    assert!(
        s.batches < 16,
        "requests were batched: {} batches for 16 requests",
        s.batches
    );

    // The digits MLP, with requests of several rows each: limits count rows.
    let x = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&x).unwrap();
    let parts: Vec<Tensor> = (0..8)
        .map(|i| {
            Tensor::inline(
                "input",
                DType::Float32,
                vec![3, 64],
                bytes[i * 768..(i + 1) * 768].to_vec(),
            )
        })
        .collect();
    let mut reference = Reference::new(&model_file("digits"));
    let want: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| reference.run(std::slice::from_ref(p)))
        .collect();
    let got = concurrent_single_rows(&d, "digits", parts);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g[0], w[0], "labels");
        assert!(close(
            rxd_client::tensor::bytes(&g[1]).unwrap(),
            rxd_client::tensor::bytes(&w[1]).unwrap()
        ));
    }
    let s = model_stats(&d, "digits");
    assert_eq!(s.rows, 24);
    assert!(
        s.batches < 8 && s.batches >= 2,
        "16-row batches of 3-row requests: {} batches",
        s.batches
    );
}

#[test]
fn adaptive_mode_batches_a_backlog_and_answers_equal_in_process_ort() {
    let repo = Repo::new();
    // A latency target and no static wait: batch sizes come from the measured cost alone.
    repo.link("ppocr_cls", 1, "ppocr_cls").settings(
        "ppocr_cls",
        "instances = 1\nmax-batch-rows = 16\nlatency-target-ms = 500\ncoalesce-max-bytes = 0\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    concurrent_crops_equal_in_process_ort(&d, 48, 300);
    let s = model_stats(&d, "ppocr_cls");
    assert_eq!((s.requests, s.rows), (48, 48));
    // One worker, 48 requests at once: while it runs one batch the rest queue, and the
    // adaptive mode runs the backlog in batches (never over the limit).
    assert!(
        s.batches < 48 && s.batches >= 3,
        "{} batches for 48 requests (limit 16 rows)",
        s.batches
    );
}

#[test]
fn batches_padded_to_configured_sizes_answer_only_the_real_rows() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits").settings(
        "digits",
        "max-batch-rows = 16\nbatch-sizes = [4, 16]\nmax-queue-delay-us = 50000\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    let x = example_npy("digits_test_x.npy", "input");
    let bytes = rxd_client::tensor::bytes(&x).unwrap();
    let rows = |from: usize, n: usize| {
        Tensor::inline(
            "input",
            DType::Float32,
            vec![n as u64, 64],
            bytes[from * 256..(from + n) * 256].to_vec(),
        )
    };
    let mut reference = Reference::new(&model_file("digits"));
    let check = |got: &[Tensor], want: &[Tensor]| {
        assert_eq!(got[0], want[0], "labels");
        assert_eq!(got[1].shape, want[1].shape);
        assert!(close(
            rxd_client::tensor::bytes(&got[1]).unwrap(),
            rxd_client::tensor::bytes(&want[1]).unwrap()
        ));
    };
    // Alone: 3 rows run as 4, 5 rows as 16; the answers hold only the real rows.
    let c = d.client_inline();
    for (from, n) in [(0, 3), (3, 5)] {
        let want = reference.run(&[rows(from, n)]);
        check(&c.infer("digits", vec![rows(from, n)]).unwrap(), &want);
    }
    let s = model_stats(&d, "digits");
    assert_eq!(s.batch_sizes, vec![4, 16]);
    assert_eq!((s.rows, s.padded_rows), (8, 1 + 11));
    // Concurrent 3-row requests batched and padded: each answer is its own rows.
    let parts: Vec<Tensor> = (0..6).map(|i| rows(10 + 3 * i, 3)).collect();
    let want: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| reference.run(std::slice::from_ref(p)))
        .collect();
    let got = concurrent_single_rows(&d, "digits", parts);
    for (g, w) in got.iter().zip(&want) {
        check(g, w);
    }
    let s = model_stats(&d, "digits");
    assert_eq!(s.rows, 8 + 18);
    assert!(s.batches < 2 + 6, "batched: {} batches", s.batches);
    // Every batch ran at 4 or 16 rows: rows + padding add up to a sum of those.
    let run = s.rows + s.padded_rows;
    assert!(s.padded_rows > 12 && run.is_multiple_of(4), "{s:?}");
    let out = d.rxctl(&["models", "digits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("batches padded to 4/16 rows"), "{text}");
}

#[test]
fn a_request_past_its_deadline_is_answered_and_never_run() {
    let repo = Repo::new();
    // Batches wait up to 300 ms to fill: a 50 ms deadline passes while waiting.
    repo.link("digits", 1, "digits").settings(
        "digits",
        "max-batch-rows = 64\nmax-queue-delay-us = 300000\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    let c = d.client_inline();
    let x = Tensor::inline("input", DType::Float32, vec![1, 64], vec![0; 256]);
    let mut req = InferRequest::new("digits", vec![x.clone()]);
    req.timeout_ms = Some(50);
    let t = std::time::Instant::now();
    assert_eq!(
        code_of(c.infer_request(req).unwrap_err()),
        ErrorCode::DeadlineExceeded
    );
    assert!(
        t.elapsed() < Duration::from_millis(290),
        "answered at the deadline, not after the wait"
    );
    let s = model_stats(&d, "digits");
    assert_eq!(
        (s.requests, s.rows, s.batches),
        (1, 0, 0),
        "the expired request never ran"
    );
    // Without a deadline it runs after the wait.
    assert_eq!(c.infer("digits", vec![x]).unwrap().len(), 2);
    assert_eq!(model_stats(&d, "digits").rows, 1);
}

#[test]
fn a_full_queue_answers_busy_at_once_and_drops_nothing() {
    let repo = Repo::new();
    repo.link("digits", 1, "digits").settings(
        "digits",
        "queue-capacity = 3\nmax-batch-rows = 64\nmax-queue-delay-us = 400000\ncoalesce-max-bytes = 0\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    let x = Tensor::inline("input", DType::Float32, vec![1, 64], vec![0; 256]);
    for id in 1..=5 {
        raw.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new("digits", vec![x.clone()])),
        });
    }
    // Two over capacity are refused at once; the three queued run when the wait ends.
    let mut busy = Vec::new();
    let mut ok = Vec::new();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        let r = raw.read_response();
        match r.outcome {
            Outcome::Err(e) if e.kind() == Some(ErrorCode::Busy) => {
                assert!(
                    t.elapsed() < Duration::from_millis(300),
                    "busy must not wait"
                );
                busy.push(r.id)
            }
            Outcome::Ok(Reply::Infer(_)) => ok.push(r.id),
            other => panic!("{other:?}"),
        }
    }
    busy.sort();
    ok.sort();
    assert_eq!(busy, vec![4, 5]);
    assert_eq!(ok, vec![1, 2, 3]);
    let s = model_stats(&d, "digits");
    assert_eq!(
        (s.rows, s.batches),
        (3, 1),
        "the three queued requests ran as one batch"
    );
}

#[test]
fn higher_priority_requests_run_first() {
    let repo = Repo::new();
    // No batching: one request per run, one worker.
    repo.link("yolov8n", 1, "yolov8n")
        .settings("yolov8n", "max-batch-rows = 1\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    let image = f32_tensor("images", &[1, 3, 320, 320], &random_f32(3 * 320 * 320, 3));
    let mut frames = Vec::new();
    // Request 1 occupies the worker; then 4 low-priority and 4 high-priority ones queue.
    for id in 1..=9u64 {
        let mut req = InferRequest::new("yolov8n", vec![image.clone()]);
        req.priority = Some(match id {
            1 => 0,
            2..=5 => 1,
            _ => 9,
        });
        rxd_protocol::frame::encode_into(
            &RequestFrame {
                id,
                body: Request::Infer(req),
            },
            &mut frames,
        )
        .unwrap();
    }
    raw.send_raw(&frames).unwrap();
    let order: Vec<u64> = (0..9)
        .map(|_| {
            let r = raw.read_response();
            assert!(matches!(r.outcome, Outcome::Ok(_)), "{:?}", r.outcome);
            r.id
        })
        .collect();
    // FIFO within a level; the high ones before the low ones (all queued within a few ms,
    // far less than the 100 ms aging step).
    assert_eq!(&order[1..5], &[6, 7, 8, 9], "{order:?}");
    assert_eq!(&order[5..], &[2, 3, 4, 5], "{order:?}");
}

#[test]
fn rxctl_bench_reports_what_the_daemon_did() {
    let repo = Repo::new();
    repo.link("ppocr_cls", 1, "ppocr_cls")
        .settings("ppocr_cls", "instances = 2\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let out = d.rxctl(&[
        "--json",
        "bench",
        "ppocr_cls",
        "-c",
        "8",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests > 10, "{v}");
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0);
    for p in ["p50", "p90", "p95", "p99"] {
        assert!(v["latency_ms"][p].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(v["latency_ms"]["p50"].as_f64() <= v["latency_ms"]["p99"].as_f64());
    assert_eq!(v["errors"], serde_json::json!({}));
    // 8 clients on 2 workers: the daemon batched (and the count matches its own counters).
    let batch = v["mean_batch_size"].as_f64().unwrap();
    assert!(batch > 1.0, "{v}");
    let s = model_stats(&d, "ppocr_cls");
    assert!(
        s.requests >= requests,
        "daemon saw {} requests, bench counted {requests}",
        s.requests
    );
    // Errors are counted by code: a deadline of 0 ms expires everything.
    let out = d.rxctl(&[
        "--json",
        "bench",
        "ppocr_cls",
        "-c",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--timeout-ms",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["errors"]["deadline_exceeded"].as_u64().unwrap() > 0,
        "{v}"
    );
}

/// Sends `xs` pipelined on `raw` and checks every answer against in-process ORT's.
fn pipelined(raw: &mut RawConn, xs: &[Tensor], want: &[Vec<Tensor>], next_id: &mut u64) {
    for x in xs {
        *next_id += 1;
        raw.send(&RequestFrame {
            id: *next_id,
            body: Request::Infer(InferRequest::new("digits", vec![x.clone()])),
        });
    }
    for i in 0..xs.len() {
        let r = raw.read_response();
        let at = (r.id - (*next_id - xs.len() as u64) - 1) as usize;
        match r.outcome {
            Outcome::Ok(Reply::Infer(r)) => assert_eq!(r.outputs, want[at], "answer {i}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn coalescing_goes_quiet_on_a_stream_without_duplicates_and_wakes_when_they_come() {
    // Numbers of coalesce::Listen.
    const QUIET_AFTER: u64 = 1024;
    const LISTEN_EVERY: u64 = 512;
    let repo = Repo::new();
    // Identical requests sent together meet in flight (a batch waits 20 ms to fill).
    repo.link("digits", 1, "digits").settings(
        "digits",
        "max-queue-delay-us = 20000
",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    let mut reference = Reference::new(&model_file("digits"));
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    let mut id = 0;

    // A stream without duplicates: keyed, nothing joins, until keying goes quiet (and its
    // first keyed window passes).
    let distinct: Vec<Tensor> = (0..QUIET_AFTER + 64)
        .map(|i| f32_tensor("input", &[1, 64], &random_f32(64, 1000 + i)))
        .collect();
    for chunk in distinct.chunks(64) {
        let want: Vec<Vec<Tensor>> = chunk
            .iter()
            .map(|x| reference.run(std::slice::from_ref(x)))
            .collect();
        pipelined(&mut raw, chunk, &want, &mut id);
    }
    let s = model_stats(&d, "digits");
    assert_eq!((s.coalesced, s.rows), (0, QUIET_AFTER + 64), "{s:?}");

    // Duplicates come: while quiet, eight identical requests sent together run eight times
    // (outside a keyed window); within one listening period, a window keys them and they
    // run once; from then on every request is keyed again.
    let x = example_npy("digit.npy", "input");
    let want = vec![reference.run(std::slice::from_ref(&x)); 8];
    let same = vec![x.clone(); 8];
    let mut sent = 0u64;
    let mut quiet_runs = Vec::new();
    loop {
        let before = model_stats(&d, "digits");
        pipelined(&mut raw, &same, &want, &mut id);
        sent += 8;
        let after = model_stats(&d, "digits");
        if after.coalesced > before.coalesced {
            break;
        }
        quiet_runs.push(after.rows - before.rows);
        assert!(
            sent <= LISTEN_EVERY + 16,
            "no duplicates coalesced after {sent} identical requests: {after:?}"
        );
    }
    assert!(
        !quiet_runs.is_empty() && quiet_runs.iter().all(|&r| r == 8),
        "while quiet every request runs: {quiet_runs:?}"
    );
    for _ in 0..4 {
        let before = model_stats(&d, "digits");
        pipelined(&mut raw, &same, &want, &mut id);
        let after = model_stats(&d, "digits");
        assert_eq!(
            (after.coalesced - before.coalesced, after.rows - before.rows),
            (7, 1),
            "{after:?}"
        );
    }
}

#[test]
fn identical_requests_coalesce_and_the_cache_answers_repeats_byte_identically() {
    let repo = Repo::new();
    // Requests wait 150 ms for a batch, so identical ones meet in flight.
    repo.link("digits", 1, "digits").settings(
        "digits",
        "max-queue-delay-us = 150000\ncache-bytes = '1MiB'\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    let x = example_npy("digit.npy", "input");
    let want = Reference::new(&model_file("digits")).run(std::slice::from_ref(&x));

    // 8 identical requests in flight at once: one run, eight identical answers.
    let mut raw = RawConn::connect(&d.socket).unwrap();
    raw.handshake().unwrap();
    for id in 1..=8 {
        raw.send(&RequestFrame {
            id,
            body: Request::Infer(InferRequest::new("digits", vec![x.clone()])),
        });
    }
    for _ in 0..8 {
        match raw.read_response().outcome {
            Outcome::Ok(Reply::Infer(r)) => assert_eq!(r.outputs, want),
            other => panic!("{other:?}"),
        }
    }
    let s = model_stats(&d, "digits");
    assert_eq!((s.coalesced, s.rows), (7, 1), "{s:?}");

    // A repeat is a cache hit: answered without running, byte-identical.
    let c = d.client_inline();
    assert_eq!(c.infer("digits", vec![x.clone()]).unwrap(), want);
    let s = model_stats(&d, "digits");
    assert_eq!((s.cache_hits, s.rows), (1, 1), "{s:?}");
    assert!(s.cache_bytes >= 48, "{s:?}");
    // The hit can also be delivered into the client's arena.
    let ca = d.client();
    let mut area = ca.arena().unwrap().alloc(4096).unwrap();
    let req = InferRequest::new("digits", vec![x.clone()]);
    let r = ca
        .infer_into(req, rxd_client::OutputBufs::area(&mut area))
        .unwrap();
    for (g, w) in r.outputs.iter().zip(&want) {
        assert_eq!(
            area.output_bytes(g).unwrap(),
            rxd_client::tensor::bytes(w).unwrap()
        );
    }
    // A different input misses and runs.
    let mut y = x.clone();
    if let rxd_protocol::TensorData::Inline(b) = &mut y.data {
        b[0] ^= 0x40;
    }
    c.infer("digits", vec![y]).unwrap();
    let s = model_stats(&d, "digits");
    assert_eq!((s.cache_hits, s.rows), (2, 2), "{s:?}");
    assert!(s.cache_misses >= 2, "{s:?}");
}
