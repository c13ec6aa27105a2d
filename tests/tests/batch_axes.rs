//! Batching a model whose rows are not along dimension 0 of every tensor (model.toml
//! `batch-axes`, and rank-0 inputs shared by a batch): Silero VAD, whose state is
//! `[2, batch, 128]` and whose sample rate is a scalar, against the real daemon and in-process
//! ONNX Runtime.

use rxd_client::{ClientOptions, DType, Tensor};
use rxd_e2e::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A daemon serving Silero VAD batched along its state's rows, waiting up to
/// 20 ms for batches of up to 16 rows to fill; `extra`: more model.toml lines.
fn silero_daemon(extra: &str) -> (Repo, TestDaemon) {
    let repo = Repo::new();
    repo.link("silero_vad", 1, "silero_vad").settings(
        "silero_vad",
        &format!(
            "warmup-dims = {{ input = [1, 256], state = [2, 1, 128] }}\n\
             batch-axes = {{ state = 1, stateN = 1 }}\n\
             max-batch-rows = 16\n\
             max-queue-delay-us = 20000\n{extra}"
        ),
    );
    let d = TestDaemon::start(repo.path(), &[]);
    (repo, d)
}

/// One request of `rows` audio streams: `samples` samples each at sample rate `sr`, with a
/// state of its own (all drawn from `seed`).
fn request(rows: u64, samples: u64, sr: i64, seed: u64) -> Vec<Tensor> {
    let n = (rows * samples) as usize;
    let audio: Vec<f32> = random_f32(n, seed).iter().map(|x| x * 2.0 - 1.0).collect();
    let state: Vec<f32> = random_f32(256 * rows as usize, seed + 7)
        .iter()
        .map(|x| x * 0.2 - 0.1)
        .collect();
    vec![
        f32_tensor("input", &[rows, samples], &audio),
        f32_tensor("state", &[2, rows, 128], &state),
        Tensor::inline("sr", DType::Int64, vec![], sr.to_le_bytes().to_vec()),
    ]
}

/// Requests of several streams, sample rates and chunk sizes from eight connections at once
/// (half through the arena, half inline) to one worker that waits for batches to fill: every
/// answer — the speech probability and the new state, whose rows are along dimension 1 —
/// equals in-process ONNX Runtime run on that request alone; requests were batched (fewer
/// batches than requests); and requests that differ only in their sample rate (a shared,
/// rank-0 input) were never run together: the 8 kHz and 16 kHz answers at 256 samples would
/// differ from their references if one batch had run with the other's rate.
#[test]
fn silero_requests_batch_along_the_state_rows_and_answer_as_alone() {
    let (_repo, d) = silero_daemon("");
    let summary = &d.summaries()["silero_vad"];
    assert!(summary.batchable, "batch-axes makes it batchable");
    // (rows, samples, sample rate)
    let kinds: [(u64, u64, i64); 5] = [
        (1, 512, 16000),
        (1, 256, 16000),
        (1, 256, 8000),
        (2, 512, 16000),
        (3, 256, 8000),
    ];
    let per_connection = 10u64;
    let rt = runtime();
    let answers = rt.block_on(async {
        let tasks: Vec<_> = (0..8u64)
            .map(|c| {
                let socket = d.socket.clone();
                tokio::spawn(async move {
                    let options = if c % 2 == 0 {
                        ClientOptions {
                            inline_threshold: 0,
                            ..ClientOptions::default()
                        }
                    } else {
                        ClientOptions::inline_only()
                    };
                    let client = rxd_client::Client::connect_with(&socket, options)
                        .await
                        .unwrap();
                    let calls: Vec<_> = (0..per_connection)
                        .map(|i| {
                            let client = client.clone();
                            let seed = 1000 * c + 10 * i;
                            let (rows, samples, sr) = kinds[((c + i) % 5) as usize];
                            tokio::spawn(async move {
                                let inputs = request(rows, samples, sr, seed);
                                let got = client.infer("silero_vad", inputs.clone()).await;
                                (inputs, got.unwrap_or_else(|e| panic!("seed {seed}: {e}")))
                            })
                        })
                        .collect();
                    let mut out = Vec::new();
                    for call in calls {
                        out.push(call.await.unwrap());
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(answers.len(), 80);
    let mut reference = Reference::new(&model_file("silero_vad"));
    for (inputs, got) in &answers {
        let want = reference.run(inputs);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.name, g.dtype, &g.shape), (&w.name, w.dtype, &w.shape));
            let diff = max_rel_diff(g, w);
            assert!(
                diff <= 1e-5,
                "{:?} sr {:?}: '{}' differs by {diff}",
                inputs[0].shape,
                inputs[2].data,
                g.name
            );
        }
    }
    let after = &d.summaries()["silero_vad"];
    let rows: u64 = (0..8u64)
        .flat_map(|c| (0..per_connection).map(move |i| kinds[((c + i) % 5) as usize].0))
        .sum();
    assert_eq!(after.rows, rows + summary.rows, "every row ran once");
    assert!(
        after.batches - summary.batches < 80,
        "requests ran in batches: {} batches for 80 requests",
        after.batches - summary.batches
    );
}

/// Requests whose every input lies in the client's arena, the rank-0 sample rate too, with
/// coalescing off (so nothing copies them out of the arena on the way): they batch as inline
/// ones do (the daemon copies a small shared input into the request before comparing it),
/// and each answer equals in-process ONNX Runtime's. Before, such a request ran alone.
#[test]
fn silero_requests_with_the_sample_rate_in_the_arena_batch_without_coalescing() {
    let (_repo, d) = silero_daemon("coalesce-max-bytes = 0\n");
    let before = d.summaries()["silero_vad"].batches;
    let rt = runtime();
    let answers = rt.block_on(async {
        let client = rxd_client::Client::connect_with(
            &d.socket,
            ClientOptions {
                inline_threshold: 0,
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        let calls: Vec<_> = (0..32u64)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let inputs = request(1, 256, 8000, 500 + 10 * i);
                    let got = client.infer("silero_vad", inputs.clone()).await.unwrap();
                    (inputs, got)
                })
            })
            .collect();
        let mut out = Vec::new();
        for call in calls {
            out.push(call.await.unwrap());
        }
        out
    });
    let mut reference = Reference::new(&model_file("silero_vad"));
    for (inputs, got) in &answers {
        for (g, w) in got.iter().zip(&reference.run(inputs)) {
            assert_eq!((&g.name, &g.shape), (&w.name, &w.shape));
            assert!(max_rel_diff(g, w) <= 1e-5, "'{}' differs", g.name);
        }
    }
    let batches = d.summaries()["silero_vad"].batches - before;
    assert!(
        batches <= 8,
        "32 single-stream requests sent together ran in {batches} batches"
    );
}

/// Settings that do not fit the model fail its load with a reason naming them.
#[test]
fn batch_axes_that_do_not_fit_fail_the_load_by_name() {
    let repo = Repo::new();
    repo.link("silero_vad", 1, "silero_vad")
        .settings(
            "silero_vad",
            "warmup-dims = { input = [1, 512], state = [2, 1, 128] }\n\
             batch-axes = { state = 3 }\n",
        )
        .link("digits", 1, "digits")
        .settings("digits", "shared-inputs = [\"nope\"]\n");
    let d = TestDaemon::start(repo.path(), &[]);
    let s = d.summaries();
    let error = |m: &str| s[m].error.clone().unwrap_or_default();
    assert!(
        error("silero_vad").contains("dimension 3"),
        "{:?}",
        s["silero_vad"]
    );
    assert!(error("digits").contains("'nope'"), "{:?}", s["digits"]);
}

/// A request whose values make ONNX Runtime fail (an index out of range) fails alone: the
/// requests batched beside it are run again one by one and answered, never failed with it.
#[test]
fn a_request_that_fails_its_batch_fails_alone() {
    let repo = Repo::new();
    repo.write("gather", 1, &gather_model()).settings(
        "gather",
        "max-batch-rows = 32\nmax-queue-delay-us = 30000\n",
    );
    let d = TestDaemon::start(repo.path(), &[]);
    assert!(d.summaries()["gather"].batchable);
    let index = |i: i64| Tensor::inline("index", DType::Int64, vec![1], i.to_le_bytes().to_vec());
    let rt = runtime();
    let before = d.summaries()["gather"].batches;
    let results = rt.block_on(async {
        let client = rxd_client::Client::connect_with(&d.socket, ClientOptions::inline_only())
            .await
            .unwrap();
        let calls: Vec<_> = (0..24i64)
            .map(|i| {
                let client = client.clone();
                // Every sixth request asks for an element the table does not have.
                let idx = if i % 6 == 5 { 4 + i } else { i % 4 };
                tokio::spawn(async move { (idx, client.infer("gather", vec![index(idx)]).await) })
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    });
    for (idx, result) in results {
        match result {
            Ok(outputs) if idx < 4 => {
                assert_eq!(
                    tensor_f32(&outputs[0]),
                    vec![10.0 * (idx + 1) as f32],
                    "index {idx}"
                )
            }
            Err(e) if idx >= 4 => {
                assert_eq!(
                    e.code(),
                    Some(rxd_client::ErrorCode::InferenceFailed),
                    "{e}"
                )
            }
            other => panic!("index {idx}: {other:?}"),
        }
    }
    let batches = d.summaries()["gather"].batches - before;
    assert!(batches < 24, "the requests were batched: {batches} batches");
}

/// A request whose inputs disagree on their rows (one audio stream, two states) cannot batch:
/// the scheduler counts it one row, alone. With `batch-sizes` set it was padded to a batch
/// size, run, and answered one row of what the padded run gave — an answer of nobody's
/// inputs. It now runs as it is, unpadded: ONNX Runtime's error is its answer; and requests
/// whose rows agree still answer as in-process ONNX Runtime does, padded.
#[test]
fn a_request_whose_inputs_disagree_on_rows_is_not_padded_into_an_answer() {
    let (_repo, d) = silero_daemon("batch-sizes = [4, 16]\n");
    let c = d.client_inline();
    let mut bad = request(1, 256, 8000, 3);
    bad[1] = f32_tensor("state", &[2, 2, 128], &random_f32(512, 9));
    let e = c.infer("silero_vad", bad).unwrap_err();
    assert_eq!(
        e.code(),
        Some(rxd_client::ErrorCode::InferenceFailed),
        "{e}"
    );
    let good = request(3, 256, 8000, 5);
    let want = Reference::new(&model_file("silero_vad")).run(&good);
    let got = c.infer("silero_vad", good).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.name, &g.shape), (&w.name, &w.shape));
        assert!(max_rel_diff(g, w) <= 1e-5, "'{}' differs", g.name);
    }
}
