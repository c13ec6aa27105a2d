//! The accuracy report: the original and the compressed model run through ONNX Runtime on the
//! same inputs; per output the largest and mean absolute error, cosine similarity, and — for
//! classifier-like outputs ([N, C], or [N, T, C] probability rows) — how often the top-1 class
//! agrees (and for [N, T, C], the greedy CTC reading); sizes and
//! latencies side by side. Thresholds decide whether the compressed model may be used.

use std::path::Path;
use std::time::Instant;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::{Error, Result};

/// One input tensor (from a .npy file).
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Reads a .npy file of little-endian float32 or int64 (C order) as input `name`.
pub fn read_npy(name: &str, path: &Path) -> Result<Input> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let bad = |m: &str| Error::Data(format!("{}: {m}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("short header"))?,
    )
    .map_err(|_| bad("header is not text"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order is not supported"));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<i64> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let body = &bytes[start + hlen..];
    let n: usize = shape.iter().map(|&d| d as usize).product();
    let data = if header.contains("'<f4'") {
        if body.len() != n * 4 {
            return Err(bad("data length does not match the shape"));
        }
        Data::F32(
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        )
    } else if header.contains("'<i8'") {
        if body.len() != n * 8 {
            return Err(bad("data length does not match the shape"));
        }
        Data::I64(
            body.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
        )
    } else {
        return Err(bad("only float32 and int64 arrays are supported"));
    };
    Ok(Input {
        name: name.into(),
        shape,
        data,
    })
}

/// How one output compares.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputReport {
    pub name: String,
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    /// The largest error against the output's largest magnitude.
    pub relative_error: f64,
    pub cosine: f64,
    /// Fraction of rows whose argmax over the last dimension agrees (classifier-like outputs).
    pub top1_agreement: Option<f64>,
    /// For [N, T, C] outputs (per-timestep class scores, as a CTC text recogniser gives):
    /// fraction of the N items whose greedy CTC reading (argmax per step, repeats collapsed,
    /// class 0 = blank dropped) is the same — whole words, not characters.
    pub sequence_agreement: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub size_before: u64,
    pub size_after: u64,
    pub latency_ms_before: f64,
    pub latency_ms_after: f64,
    pub outputs: Vec<OutputReport>,
}

impl Report {
    pub fn size_ratio(&self) -> f64 {
        self.size_after as f64 / self.size_before.max(1) as f64
    }

    /// The lowest top-1 agreement over classifier-like outputs (1.0 when there is none).
    pub fn min_top1(&self) -> f64 {
        self.outputs
            .iter()
            .filter_map(|o| o.top1_agreement)
            .fold(1.0, f64::min)
    }

    pub fn min_cosine(&self) -> f64 {
        self.outputs.iter().map(|o| o.cosine).fold(1.0, f64::min)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "size {} → {} bytes ({:.2}×); latency {:.2} → {:.2} ms",
            self.size_before,
            self.size_after,
            self.size_ratio(),
            self.latency_ms_before,
            self.latency_ms_after
        )?;
        for o in &self.outputs {
            write!(
                f,
                "  {}: max abs error {:.3e} ({:.2e} relative), mean abs error {:.3e}, cosine {:.6}",
                o.name, o.max_abs_error, o.relative_error, o.mean_abs_error, o.cosine
            )?;
            if let Some(t) = o.top1_agreement {
                write!(f, ", top-1 agreement {:.2} %", t * 100.0)?;
            }
            if let Some(t) = o.sequence_agreement {
                write!(f, ", same CTC reading {:.2} %", t * 100.0)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

pub(crate) fn session(env: &Environment, model: &[u8]) -> Result<Session> {
    Ok(Session::builder(env)
        .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
        .and_then(|mut b| b.commit_from_memory(model))?)
}

/// The operators ONNX Runtime runs for `model` after its graph optimizations (on this
/// machine's CPU EP, one thread), by type — e.g. whether a QDQ graph became QLinearConv.
pub fn optimized_ops(
    env: &Environment,
    model: &[u8],
) -> Result<std::collections::BTreeMap<String, usize>> {
    let path = std::env::temp_dir().join(format!(
        "rxd-optimized-{}-{:?}.onnx",
        std::process::id(),
        std::thread::current().id()
    ));
    let built = Session::builder(env)
        .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
        .and_then(|b| b.with_optimized_model_path(&path).map_err(Into::into))
        .and_then(|mut b| b.commit_from_memory(model))
        .map_err(Error::from);
    let saved = built.and_then(|_| {
        std::fs::read(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })
    });
    let _ = std::fs::remove_file(&path);
    let m = crate::onnx::Model::parse(&saved?)?;
    let mut ops = std::collections::BTreeMap::new();
    for n in m.graph.messages(crate::onnx::graph::NODE)? {
        *ops.entry(crate::onnx::op_type(&n)).or_default() += 1;
    }
    Ok(ops)
}

pub(crate) fn values(inputs: &[Input]) -> Result<Vec<(String, DynValue)>> {
    inputs
        .iter()
        .map(|i| {
            let v: DynValue = match &i.data {
                Data::F32(d) => Tensor::from_array((i.shape.clone(), d.clone()))?.into_dyn(),
                Data::I64(d) => Tensor::from_array((i.shape.clone(), d.clone()))?.into_dyn(),
            };
            Ok((i.name.clone(), v))
        })
        .collect()
}

/// One output of a run: name, shape, values.
type Output = (String, Vec<i64>, Vec<f64>);

/// Runs a model on the inputs: each output as (name, shape, values as f64) for float outputs,
/// plus the mean latency of `runs` timed runs.
fn run(s: &mut Session, inputs: &[Input], runs: usize) -> Result<(Vec<Output>, f64)> {
    let names: Vec<String> = s.outputs().iter().map(|o| o.name().to_string()).collect();
    let outs = s.run(values(inputs)?)?;
    let mut result = Vec::new();
    for n in &names {
        let v = &outs[n.as_str()];
        if let Ok((shape, data)) = v.try_extract_tensor::<f32>() {
            result.push((
                n.clone(),
                shape.to_vec(),
                data.iter().map(|&x| f64::from(x)).collect(),
            ));
        } else if let Ok((shape, data)) = v.try_extract_tensor::<i64>() {
            result.push((
                n.clone(),
                shape.to_vec(),
                data.iter().map(|&x| x as f64).collect(),
            ));
        }
    }
    drop(outs);
    let t = Instant::now();
    for _ in 0..runs {
        s.run(values(inputs)?)?;
    }
    Ok((result, t.elapsed().as_secs_f64() * 1e3 / runs.max(1) as f64))
}

/// The index of the largest value (the first of equal ones; 0 for an empty slice).
pub fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |m, (i, &x)| if x > m.1 { (i, x) } else { m },
        )
        .0
}

/// Greedy CTC decoding of one item's [T, C] scores: argmax per step, repeats collapsed, class 0
/// (the blank) dropped.
pub fn ctc_greedy(scores: &[f64], classes: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = usize::MAX;
    for step in scores.chunks_exact(classes) {
        let k = argmax(step);
        if k != prev && k != 0 {
            out.push(k);
        }
        prev = k;
    }
    out
}

/// Cosine similarity of two outputs (1 when both are all zeros).
/// Cosine similarity of two equally long vectors (float32 or float64), summed in f64; 1 when
/// both are zero.
pub fn cosine<T: Copy + Into<f64>>(x: &[T], y: &[T]) -> f64 {
    let (mut dot, mut nx, mut ny) = (0f64, 0f64, 0f64);
    for (&p, &q) in x.iter().zip(y) {
        let (p, q): (f64, f64) = (p.into(), q.into());
        dot += p * q;
        nx += p * p;
        ny += q * q;
    }
    let (nx, ny) = (nx.sqrt(), ny.sqrt());
    if nx == 0.0 && ny == 0.0 {
        1.0
    } else {
        dot / (nx * ny).max(f64::MIN_POSITIVE)
    }
}

/// Compares `before` and `after` (model bytes) on `inputs`.
pub fn compare(env: &Environment, before: &[u8], after: &[u8], inputs: &[Input]) -> Result<Report> {
    let mut a = session(env, before)?;
    let mut b = session(env, after).map_err(|e| Error::CompressedDoesNotLoad(e.to_string()))?;
    let (ra, la) = run(&mut a, inputs, 5)?;
    let (rb, lb) = run(&mut b, inputs, 5)?;
    let mut outputs = Vec::new();
    for ((name, shape, x), (_, _, y)) in ra.iter().zip(&rb) {
        if x.len() != y.len() {
            return Err(Error::OutputChanged {
                name: name.clone(),
                before: x.len(),
                after: y.len(),
            });
        }
        let n = x.len().max(1) as f64;
        let diffs = x.iter().zip(y).map(|(p, q)| (p - q).abs());
        let max_abs_error = diffs.clone().fold(0.0, f64::max);
        let mean_abs_error = diffs.sum::<f64>() / n;
        let largest = x.iter().fold(0.0f64, |m, p| m.max(p.abs()));
        let relative_error = max_abs_error / largest.max(f64::MIN_POSITIVE);
        let cosine = cosine(x, y);
        let last = *shape.last().unwrap_or(&1) as usize;
        // Classifier-like: [N, C] rows, or [N, T, C] whose rows are probability distributions
        // in the original (a CTC recogniser's softmax) — not YOLO's [1, 84, anchors] or a
        // detector's [N, 1, H, W] map, where an argmax along the last axis means nothing.
        let distributions = last >= 2
            && x.chunks_exact(last)
                .all(|r| r.iter().all(|&p| p >= 0.0) && (r.iter().sum::<f64>() - 1.0).abs() < 1e-3);
        let classes = last >= 2 && (shape.len() == 2 || (shape.len() == 3 && distributions));
        let sequence_agreement = (classes && shape.len() == 3 && shape[1] > 1).then(|| {
            let steps = shape[1] as usize * last;
            let items = x.len() / steps.max(1);
            let same = x
                .chunks_exact(steps)
                .zip(y.chunks_exact(steps))
                .filter(|(p, q)| ctc_greedy(p, last) == ctc_greedy(q, last))
                .count();
            same as f64 / items.max(1) as f64
        });
        let top1_agreement = classes.then(|| {
            let rows = x.len() / last;
            let same = x
                .chunks_exact(last)
                .zip(y.chunks_exact(last))
                .filter(|(p, q)| argmax(p) == argmax(q))
                .count();
            same as f64 / rows.max(1) as f64
        });
        outputs.push(OutputReport {
            name: name.clone(),
            max_abs_error,
            mean_abs_error,
            relative_error,
            cosine,
            top1_agreement,
            sequence_agreement,
        });
    }
    Ok(Report {
        size_before: before.len() as u64,
        size_after: after.len() as u64,
        latency_ms_before: la,
        latency_ms_after: lb,
        outputs,
    })
}

/// Deterministic random inputs for a model's signature (float32 in [0, 1), int64 zeros);
/// dynamic dimensions get `dynamic` (the batch dimension 1). For checking that a compressed
/// model agrees with its original when no evaluation data is given.
pub fn random_inputs(env: &Environment, model: &[u8], dynamic: i64) -> Result<Vec<Input>> {
    use ort::value::{TensorElementType, ValueType};
    let s = session(env, model)?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    s.inputs()
        .iter()
        .map(|o| {
            let ValueType::Tensor { ty, shape, .. } = o.dtype() else {
                return Err(Error::Unsupported(format!(
                    "input '{}' is not a tensor",
                    o.name()
                )));
            };
            let dims: Vec<i64> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match (i, d) {
                    (_, d) if d >= 0 => d,
                    (0, _) => 1,
                    _ => dynamic,
                })
                .collect();
            let n: usize = dims.iter().map(|&d| d as usize).product();
            let data = match ty {
                TensorElementType::Float32 => Data::F32(
                    (0..n)
                        .map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            (seed >> 40) as f32 / (1u64 << 24) as f32
                        })
                        .collect(),
                ),
                TensorElementType::Int64 => Data::I64(vec![0; n]),
                other => {
                    return Err(Error::Unsupported(format!(
                        "input '{}': {other:?} is not supported",
                        o.name()
                    )));
                }
            };
            Ok(Input {
                name: o.name().to_string(),
                shape: dims,
                data,
            })
        })
        .collect()
}
