//! A load generator for rxd (like Triton's perf_analyzer), behind `rxctl bench` and the
//! project's benchmarks: closed-loop (N clients, each with one request in flight) or
//! open-loop (a request rate, in phases), inputs inline or through the arena, latency
//! percentiles, errors by code, and what the daemon did meanwhile (from its counters): the
//! mean batch size it ran, and how many requests its result cache or coalescing answered.
//!
//! Every request differs from every other one unless [`Load::same_input`]: a request number
//! is written into the lowest bytes of the first elements of the largest floating-point input
//! (a relative change below 1 % of those elements), so that the daemon's result cache and
//! identical-request coalescing do not answer a benchmark without running the model. Integer
//! and boolean inputs are never changed: they are often categorical (a sample rate, token ids,
//! lengths) and a model given another value may take another path or fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rxd_protocol::{DType, InferRequest, ModelSummary, Tensor};
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
    /// Closed loop: stop after exactly this many requests, if set.
    pub requests: Option<u64>,
    pub warmup: Duration,
    /// Inputs through the shared-memory arena (written once, referenced by every request).
    pub arena: bool,
    pub timeout_ms: Option<u64>,
    /// Send the same inputs in every request (measures the result cache and coalescing).
    pub same_input: bool,
}

impl Load {
    /// A closed-loop load of one connection for 5 s after 1 s of warm-up, through the arena,
    /// every request distinct.
    pub fn new(socket: impl Into<PathBuf>, model: &str, inputs: Vec<Tensor>) -> Load {
        Load {
            socket: socket.into(),
            model: model.into(),
            inputs,
            concurrency: 1,
            rate_phases: Vec::new(),
            duration: Duration::from_secs(5),
            requests: None,
            warmup: Duration::from_secs(1),
            arena: true,
            timeout_ms: None,
            same_input: false,
        }
    }
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
    /// Whether every request carried the same inputs (`--same-input`).
    pub same_input: bool,
    /// The input whose first elements were changed per request (absent: none was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub varied_input: Option<String>,
    /// Requests sent during the warm-up (not in these figures; the daemon counts them).
    pub warmup_requests: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub throughput_per_s: f64,
    pub latency_ms: Latency,
    pub errors: BTreeMap<String, u64>,
    /// The first error's message, for each code in `errors`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_messages: BTreeMap<String, String>,
    /// Rows per batch the daemon ran during the run (all clients of the model).
    pub mean_batch_size: f64,
    /// Requests the daemon answered from its result cache during the run (all clients).
    pub cache_hits: u64,
    /// Requests the daemon answered by joining an identical one in flight (all clients).
    pub coalesced: u64,
    /// Per phase of an open-loop run: (offered/s, achieved/s, p99 ms).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseReport>,
}

impl Report {
    /// The share of the run's requests that the daemon answered without running the model
    /// (result cache or coalescing).
    pub fn answered_without_running(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        ((self.cache_hits + self.coalesced) as f64 / self.requests as f64).min(1.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub offered_per_s: f64,
    pub throughput_per_s: f64,
    pub latency_ms: Latency,
}

fn latency(mut v: Vec<Duration>) -> Latency {
    let Some(&max) = v.iter().max() else {
        return Latency::default();
    };
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |p: f64| ms(v[((v.len() - 1) as f64 * p).round() as usize]);
    Latency {
        p50: at(0.50),
        p90: at(0.90),
        p95: at(0.95),
        p99: at(0.99),
        mean: v.iter().map(|&d| ms(d)).sum::<f64>() / v.len() as f64,
        max: ms(max),
    }
}

/// Bytes of each element's low end that a request number may change: 2 of a float32 or a
/// float64 (its lowest mantissa bits), 1 of a float16; none for other dtypes.
fn stamp_width(dtype: DType) -> usize {
    match dtype {
        DType::Float32 | DType::Float64 => 2,
        DType::Float16 => 1,
        _ => 0,
    }
}

/// Writes request number `n` into the lowest bytes of the first elements of `bytes` (elements
/// of `elem` bytes, `width` bytes each), 32 bits in all where there are enough elements.
fn stamp(bytes: &mut [u8], elem: usize, width: usize, n: u32) {
    let mut digits = n.to_le_bytes().into_iter();
    for chunk in bytes.chunks_exact_mut(elem) {
        for b in &mut chunk[..width] {
            match digits.next() {
                Some(d) => *b = d,
                None => return,
            }
        }
    }
}

/// The input varied per request: the largest floating-point one.
fn varied_input(inputs: &[Tensor]) -> Option<usize> {
    inputs
        .iter()
        .enumerate()
        .filter(|(_, t)| stamp_width(t.dtype) > 0)
        .filter_map(|(i, t)| crate::tensor::bytes(t).map(|b| (i, b.len())))
        .filter(|&(_, len)| len > 0)
        .max_by_key(|&(_, len)| len)
        .map(|(i, _)| i)
}

/// The varied input of one connection: its bytes, and arena buffers holding a copy of them
/// that no request in flight uses (each request takes one and gives it back when answered).
struct Varied {
    index: usize,
    template: Tensor,
    elem: usize,
    width: usize,
    spare: Mutex<Vec<ArenaBuf>>,
}

/// One connection with its inputs ready (arena inputs written once).
struct Conn {
    client: Client,
    /// The request every request starts from (the varied input is replaced per request).
    request: InferRequest,
    varied: Option<Varied>,
    _bufs: Vec<ArenaBuf>,
}

impl Conn {
    /// Sends request number `n` and waits for its answer.
    async fn send(&self, n: u64) -> Result<(), ClientError> {
        let Some(v) = &self.varied else {
            return self
                .client
                .infer_request(self.request.clone())
                .await
                .map(|_| ());
        };
        let n = n as u32;
        let mut request = self.request.clone();
        let taken = self.client.arena().and_then(|arena| {
            let spare = lock(&v.spare).pop();
            let bytes = crate::tensor::bytes(&v.template)?;
            let mut buf = match spare {
                Some(b) => b,
                None => {
                    let mut b = arena.alloc(bytes.len() as u64).ok()?;
                    b.bytes_mut().copy_from_slice(bytes);
                    b
                }
            };
            stamp(buf.bytes_mut(), v.elem, v.width, n);
            let t = buf
                .tensor(&v.template.name, v.template.dtype, v.template.shape.clone())
                .ok()?;
            Some((t, buf))
        });
        let held = match taken {
            Some((t, buf)) => {
                request.inputs[v.index] = t;
                Some(buf)
            }
            None => {
                // Inline (no arena, or no room in it): a copy with the request's number.
                let mut t = v.template.clone();
                if let rxd_protocol::TensorData::Inline(b) = &mut t.data {
                    stamp(b, v.elem, v.width, n);
                }
                request.inputs[v.index] = t;
                None
            }
        };
        let result = self.client.infer_request(request).await.map(|_| ());
        if let Some(buf) = held {
            lock(&v.spare).push(buf);
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Arena copies of the varied input each connection may have in flight at once: one in a
/// closed loop; in an open loop up to 8, within 64 MiB (more requests in flight send it
/// inline).
fn varied_copies(load: &Load, bytes: u64) -> u64 {
    if load.rate_phases.is_empty() {
        1
    } else {
        ((64 << 20) / bytes.max(1)).clamp(1, 8)
    }
}

async fn connect(load: &Load) -> Result<Conn, ClientError> {
    let varied = if load.same_input {
        None
    } else {
        varied_input(&load.inputs)
    };
    let size =
        |t: &Tensor| crate::tensor::bytes(t).map_or(0, |b| (b.len() as u64).next_multiple_of(64));
    let bytes: u64 = load
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| match varied {
            Some(v) if v == i => size(t) * varied_copies(load, size(t)),
            _ => size(t),
        })
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
    for (i, t) in load.inputs.iter().enumerate() {
        match (client.arena(), crate::tensor::bytes(t)) {
            (Some(arena), Some(b)) if varied != Some(i) => {
                let mut buf = arena.alloc(b.len() as u64)?;
                buf.bytes_mut().copy_from_slice(b);
                inputs.push(buf.tensor(&t.name, t.dtype, t.shape.clone())?);
                bufs.push(buf);
            }
            _ => inputs.push(t.clone()),
        }
    }
    let varied = varied.map(|index| {
        let template = load.inputs[index].clone();
        let elem = (template.dtype.bits() / 8).max(1) as usize;
        Varied {
            index,
            width: stamp_width(template.dtype),
            elem,
            template,
            spare: Mutex::new(Vec::new()),
        }
    });
    let mut request = InferRequest::new(load.model.clone(), inputs);
    request.timeout_ms = load.timeout_ms;
    Ok(Conn {
        client,
        request,
        varied,
        _bufs: bufs,
    })
}

/// The daemon's counters for the model's busiest version.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    batches: u64,
    rows: u64,
    cache_hits: u64,
    coalesced: u64,
}

async fn counters(client: &Client, model: &str) -> Counters {
    client
        .list_models()
        .await
        .ok()
        .and_then(|l| {
            l.into_iter()
                .filter(|m| m.name == model)
                .max_by_key(|m| m.requests)
        })
        .map_or_else(Counters::default, |m: ModelSummary| Counters {
            batches: m.batches,
            rows: m.rows,
            cache_hits: m.cache_hits,
            coalesced: m.coalesced,
        })
}

#[derive(Default)]
struct Tally {
    latencies: Vec<(Instant, Duration)>,
    errors: BTreeMap<String, u64>,
    messages: BTreeMap<String, String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, m) in other.messages {
            self.messages.entry(k).or_insert(m);
        }
    }
}

fn record(t: &mut Tally, start: Instant, result: Result<(), ClientError>) {
    match result {
        Ok(()) => t.latencies.push((start, start.elapsed())),
        Err(e) => {
            let name = e
                .code()
                .map_or_else(|| "client".to_string(), |c| c.name().to_string());
            *t.errors.entry(name.clone()).or_default() += 1;
            t.messages.entry(name).or_insert_with(|| e.to_string());
        }
    }
}

/// Runs one load; `progress(done, elapsed)` is called about every 200 ms.
pub async fn run(
    load: &Load,
    progress: impl Fn(u64, Duration) + Send + Sync + 'static,
) -> Result<Report, ClientError> {
    if load.concurrency == 0 {
        return Err(ClientError::Protocol(
            "a load needs at least one connection".into(),
        ));
    }
    let mut conns = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        conns.push(Arc::new(connect(load).await?));
    }
    let control = conns[0].client.clone();
    // Request numbers, shared by every connection: each request's inputs are its own.
    let numbers = Arc::new(AtomicU64::new(0));
    // Warm up (also teaches an adaptive scheduler the model's cost).
    let warm_start = Instant::now();
    let warm_end = warm_start + load.warmup;
    let warm_sent = Arc::new(AtomicU64::new(0));
    let mut warm = Vec::new();
    for c in &conns {
        let (c, numbers, sent) = (c.clone(), numbers.clone(), warm_sent.clone());
        warm.push(tokio::spawn(async move {
            while Instant::now() < warm_end {
                let _ = c.send(numbers.fetch_add(1, Ordering::Relaxed)).await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in warm {
        let _ = w.await;
    }
    let warmup_s = warm_start.elapsed().as_secs_f64();
    let before = counters(&control, &load.model).await;
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
    let mut tally = Tally::default();
    let mut phases_out = Vec::new();
    if load.rate_phases.is_empty() {
        let end = started + load.duration;
        let limit = load.requests;
        // A request is sent only once it has claimed one of the `limit` places.
        let claimed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in &conns {
            let (c, done, claimed, numbers) =
                (c.clone(), done.clone(), claimed.clone(), numbers.clone());
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                while Instant::now() < end
                    && limit.is_none_or(|l| claimed.fetch_add(1, Ordering::Relaxed) < l)
                {
                    let s = Instant::now();
                    let r = c.send(numbers.fetch_add(1, Ordering::Relaxed)).await;
                    record(&mut t, s, r);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                t
            }));
        }
        for t in tasks {
            tally.merge(t.await.map_err(|e| ClientError::Protocol(e.to_string()))?);
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
                let (done, numbers) = (done.clone(), numbers.clone());
                tasks.push(tokio::spawn(async move {
                    let mut t = Tally::default();
                    let s = Instant::now();
                    let r = c.send(numbers.fetch_add(1, Ordering::Relaxed)).await;
                    record(&mut t, s, r);
                    done.fetch_add(1, Ordering::Relaxed);
                    t
                }));
                at += gap;
            }
        }
        for t in tasks {
            tally.merge(t.await.map_err(|e| ClientError::Protocol(e.to_string()))?);
        }
        for (from, to, rate) in bounds {
            let mine: Vec<Duration> = tally
                .latencies
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
    let after = counters(&control, &load.model).await;
    let lat: Vec<Duration> = tally.latencies.iter().map(|&(_, d)| d).collect();
    let ok = lat.len() as u64;
    let requests = ok + tally.errors.values().sum::<u64>();
    let offered = (!load.rate_phases.is_empty()).then(|| {
        let (n, s) = load
            .rate_phases
            .iter()
            .fold((0.0, 0.0), |(n, s), &(r, d)| (n + r * d, s + d));
        n / s
    });
    let batches = after.batches.saturating_sub(before.batches);
    let varied = conns[0].varied.as_ref().map(|v| v.template.name.clone());
    Ok(Report {
        model: load.model.clone(),
        concurrency: load.concurrency,
        offered_per_s: offered,
        arena: load.arena,
        same_input: load.same_input,
        varied_input: varied,
        warmup_requests: warm_sent.load(Ordering::Relaxed),
        warmup_s,
        duration_s: elapsed.as_secs_f64(),
        requests,
        ok,
        throughput_per_s: ok as f64 / elapsed.as_secs_f64(),
        latency_ms: latency(lat),
        errors: tally.errors,
        error_messages: tally.messages,
        mean_batch_size: if batches > 0 {
            after.rows.saturating_sub(before.rows) as f64 / batches as f64
        } else {
            0.0
        },
        cache_hits: after.cache_hits.saturating_sub(before.cache_hits),
        coalesced: after.coalesced.saturating_sub(before.coalesced),
        phases: phases_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_request_number_changes_only_the_low_mantissa_bytes_of_the_first_float_elements() {
        let mut b = f32s(&[1.0, 2.0, 3.0]);
        stamp(&mut b, 4, 2, 0x0403_0201);
        let got: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&b[..2], &[1, 2]);
        assert_eq!(&b[4..6], &[3, 4]);
        assert_eq!(got[2], 3.0, "only as many elements as 32 bits need");
        for (g, w) in got.iter().zip([1.0f32, 2.0]) {
            assert!(((g - w) / w).abs() < 0.01, "{g} vs {w}");
        }
        // Different numbers give different bytes; the same number the same bytes.
        let mut c = f32s(&[1.0, 2.0, 3.0]);
        stamp(&mut c, 4, 2, 0x0403_0202);
        assert_ne!(b, c);
        stamp(&mut c, 4, 2, 0x0403_0201);
        assert_eq!(b, c);
    }

    #[test]
    fn only_the_largest_float_input_is_varied_never_an_integer_one() {
        let int = Tensor::inline("sr", DType::Int64, vec![], 16000i64.to_le_bytes().to_vec());
        let small = Tensor::inline("state", DType::Float32, vec![2], f32s(&[0.0, 0.0]));
        let big = Tensor::inline("input", DType::Float32, vec![4], f32s(&[0.0; 4]));
        assert_eq!(
            varied_input(&[int.clone(), small.clone(), big.clone()]),
            Some(2)
        );
        assert_eq!(varied_input(&[int.clone(), small]), Some(1));
        assert_eq!(varied_input(&[int]), None);
        let ids = Tensor::inline("ids", DType::Int32, vec![64], vec![0; 256]);
        assert_eq!(varied_input(&[ids]), None);
    }
}
