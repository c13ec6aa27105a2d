//! A load generator for rxd (like Triton's perf_analyzer), behind `rxctl bench` and the
//! project's benchmarks: closed-loop (N clients, each with one request in flight) or
//! open-loop (a request rate, in phases), inputs inline or through the arena, latency
//! percentiles, errors by code, and the mean batch size the daemon ran (from its counters).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rxd_protocol::{InferRequest, Tensor};
use serde::Serialize;

use crate::{ArenaBuf, Client, ClientError, ClientOptions};

/// How to load the daemon.
#[derive(Debug, Clone)]
pub struct Load {
    pub socket: PathBuf,
    pub model: String,
    pub inputs: Vec<Tensor>,
    /// Connections (closed loop: also requests in flight).
    pub concurrency: usize,
    /// Open loop: (requests per second, seconds) phases. Empty: closed loop.
    pub rate_phases: Vec<(f64, f64)>,
    /// Closed loop: how long.
    pub duration: Duration,
    /// Stop after this many requests (closed loop), if set.
    pub requests: Option<u64>,
    pub warmup: Duration,
    /// Inputs through the shared-memory arena (written once, referenced by every request).
    pub arena: bool,
    pub timeout_ms: Option<u64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub concurrency: usize,
    /// Offered rate for open-loop runs (mean over phases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_per_s: Option<f64>,
    pub arena: bool,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub throughput_per_s: f64,
    pub latency_ms: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Rows per batch the daemon ran during the run (all clients of the model).
    pub mean_batch_size: f64,
    /// Per phase of an open-loop run: (offered/s, achieved/s, p99 ms).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub offered_per_s: f64,
    pub throughput_per_s: f64,
    pub latency_ms: Latency,
}

fn latency(mut v: Vec<Duration>) -> Latency {
    if v.is_empty() {
        return Latency::default();
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |p: f64| ms(v[((v.len() - 1) as f64 * p).round() as usize]);
    Latency {
        p50: at(0.50),
        p90: at(0.90),
        p95: at(0.95),
        p99: at(0.99),
        mean: v.iter().map(|&d| ms(d)).sum::<f64>() / v.len() as f64,
        max: ms(*v.last().expect("non-empty")),
    }
}

/// One connection with its request ready (arena inputs written once).
struct Conn {
    client: Client,
    request: InferRequest,
    _bufs: Vec<ArenaBuf>,
}

/// Connection `index` sends inputs that differ from every other connection's in the lowest
/// byte of the first element, so that the daemon's identical-request coalescing does not
/// merge different clients' requests (a load generator must measure real runs).
async fn connect(load: &Load, index: usize) -> Result<Conn, ClientError> {
    let bytes: u64 = load
        .inputs
        .iter()
        .filter_map(crate::tensor::bytes)
        .map(|b| (b.len() as u64).next_multiple_of(64))
        .sum();
    let options = if load.arena {
        ClientOptions {
            arena_bytes: bytes + 4096,
            inline_threshold: 0,
            ..ClientOptions::default()
        }
    } else {
        ClientOptions::inline_only()
    };
    let client = Client::connect_with(&load.socket, options).await?;
    let mut bufs = Vec::new();
    let mut inputs = Vec::new();
    let distinct: Vec<Tensor> = load
        .inputs
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if let rxd_protocol::TensorData::Inline(b) = &mut t.data
                && let Some(first) = b.first_mut()
            {
                *first ^= (index % 251) as u8;
            }
            t
        })
        .collect();
    for t in &distinct {
        match (client.arena(), crate::tensor::bytes(t)) {
            (Some(arena), Some(b)) => {
                let mut buf = arena.alloc(b.len() as u64)?;
                buf.bytes_mut().copy_from_slice(b);
                inputs.push(buf.tensor(&t.name, t.dtype, t.shape.clone())?);
                bufs.push(buf);
            }
            _ => inputs.push(t.clone()),
        }
    }
    let mut request = InferRequest::new(load.model.clone(), inputs);
    request.timeout_ms = load.timeout_ms;
    Ok(Conn {
        client,
        request,
        _bufs: bufs,
    })
}

async fn batch_counters(client: &Client, model: &str) -> (u64, u64) {
    client
        .list_models()
        .await
        .ok()
        .and_then(|l| {
            l.into_iter()
                .filter(|m| m.name == model)
                .max_by_key(|m| m.batches)
        })
        .map_or((0, 0), |m| (m.batches, m.rows))
}

#[derive(Default)]
struct Tally {
    latencies: Vec<(Instant, Duration)>,
    errors: BTreeMap<String, u64>,
}

fn record(t: &mut Tally, start: Instant, result: Result<(), ClientError>) {
    match result {
        Ok(()) => t.latencies.push((start, start.elapsed())),
        Err(e) => {
            let name = e
                .code()
                .map_or_else(|| "client".to_string(), |c| c.name().to_string());
            *t.errors.entry(name).or_default() += 1;
        }
    }
}

/// Runs one load; `progress(done, elapsed)` is called about every 200 ms.
pub async fn run(
    load: &Load,
    progress: impl Fn(u64, Duration) + Send + Sync + 'static,
) -> Result<Report, ClientError> {
    let mut conns = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency.max(1) {
        let i = conns.len();
        conns.push(Arc::new(connect(load, i).await?));
    }
    let control = conns[0].client.clone();
    // Warm up (also teaches an adaptive scheduler the model's cost).
    let warm_end = Instant::now() + load.warmup;
    let mut warm = Vec::new();
    for c in &conns {
        let c = c.clone();
        warm.push(tokio::spawn(async move {
            while Instant::now() < warm_end {
                let _ = c.client.infer_request(c.request.clone()).await;
            }
        }));
    }
    for w in warm {
        let _ = w.await;
    }
    let (b0, r0) = batch_counters(&control, &load.model).await;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let ticker = {
        let (done, stop) = (done.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                progress(done.load(Ordering::Relaxed), started.elapsed());
            }
        })
    };
    let mut tallies = Vec::new();
    let mut phases_out = Vec::new();
    if load.rate_phases.is_empty() {
        let end = started + load.duration;
        let limit = load.requests;
        let mut tasks = Vec::new();
        for c in &conns {
            let (c, done) = (c.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                while Instant::now() < end && limit.is_none_or(|l| done.load(Ordering::Relaxed) < l)
                {
                    let s = Instant::now();
                    let r = c.client.infer_request(c.request.clone()).await.map(|_| ());
                    record(&mut t, s, r);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                t
            }));
        }
        for t in tasks {
            tallies.push(t.await.map_err(|e| ClientError::Protocol(e.to_string()))?);
        }
    } else {
        // Open loop: requests leave on schedule whatever the answers do, spread over the
        // connections (pipelined).
        let mut tasks = Vec::new();
        let mut at = started;
        let mut next = 0usize;
        let mut bounds = Vec::new();
        for &(rate, secs) in &load.rate_phases {
            let phase_end = at + Duration::from_secs_f64(secs);
            bounds.push((at, phase_end, rate));
            let gap = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            while at < phase_end {
                tokio::time::sleep_until(at.into()).await;
                let c = conns[next % conns.len()].clone();
                next += 1;
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    let mut t = Tally::default();
                    let s = Instant::now();
                    let r = c.client.infer_request(c.request.clone()).await.map(|_| ());
                    record(&mut t, s, r);
                    done.fetch_add(1, Ordering::Relaxed);
                    t
                }));
                at += gap;
            }
        }
        for t in tasks {
            tallies.push(t.await.map_err(|e| ClientError::Protocol(e.to_string()))?);
        }
        let all: Vec<(Instant, Duration)> = tallies
            .iter()
            .flat_map(|t| t.latencies.iter().copied())
            .collect();
        for (from, to, rate) in bounds {
            let mine: Vec<Duration> = all
                .iter()
                .filter(|(s, _)| *s >= from && *s < to)
                .map(|&(_, d)| d)
                .collect();
            let secs = (to - from).as_secs_f64();
            phases_out.push(PhaseReport {
                offered_per_s: rate,
                throughput_per_s: mine.len() as f64 / secs,
                latency_ms: latency(mine),
            });
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    let (b1, r1) = batch_counters(&control, &load.model).await;
    let mut errors = BTreeMap::new();
    let mut lat = Vec::new();
    for t in tallies {
        lat.extend(t.latencies.into_iter().map(|(_, d)| d));
        for (k, v) in t.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    let ok = lat.len() as u64;
    let requests = ok + errors.values().sum::<u64>();
    let offered = (!load.rate_phases.is_empty()).then(|| {
        let (n, s) = load
            .rate_phases
            .iter()
            .fold((0.0, 0.0), |(n, s), &(r, d)| (n + r * d, s + d));
        n / s
    });
    Ok(Report {
        model: load.model.clone(),
        concurrency: load.concurrency,
        offered_per_s: offered,
        arena: load.arena,
        duration_s: elapsed.as_secs_f64(),
        requests,
        ok,
        throughput_per_s: ok as f64 / elapsed.as_secs_f64(),
        latency_ms: latency(lat),
        errors,
        mean_batch_size: if b1 > b0 {
            (r1 - r0) as f64 / (b1 - b0) as f64
        } else {
            0.0
        },
        phases: phases_out,
    })
}
