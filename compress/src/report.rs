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

/// Reads a .npy file of float32 or int64 (C order) as input `name` (`rxd_protocol::npy`, the
/// project's one `.npy` reader).
pub fn read_npy(name: &str, path: &Path) -> Result<Input> {
    let file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let t = rxd_protocol::npy::read(name, std::io::BufReader::new(file))
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    Input::from_tensor(&t).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

impl Input {
    /// An inline float32 or int64 tensor as an input.
    pub fn from_tensor(t: &rxd_protocol::Tensor) -> Result<Input> {
        let bad = |m: String| Error::Data(format!("input '{}': {m}", t.name));
        let rxd_protocol::TensorData::Inline(bytes) = &t.data else {
            return Err(bad("must be inline".into()));
        };
        let elements = rxd_protocol::message::element_count(&t.shape)
            .ok_or_else(|| bad("its shape overflows".into()))?;
        if t.dtype.byte_len(elements) != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "{} bytes do not hold a {:?} tensor of shape {:?}",
                bytes.len(),
                t.dtype,
                t.shape
            )));
        }
        let shape = t
            .shape
            .iter()
            .map(|&d| i64::try_from(d).map_err(|_| bad("a dimension is too large".into())))
            .collect::<Result<Vec<i64>>>()?;
        let data = match t.dtype {
            rxd_protocol::DType::Float32 => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            rxd_protocol::DType::Int64 => Data::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            other => {
                return Err(bad(format!(
                    "{other:?} is not supported (float32 and int64 are)"
                )));
            }
        };
        Ok(Input {
            name: t.name.clone(),
            shape,
            data,
        })
    }
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
    /// fraction of the N items whose reading ([`ctc_reading`]: greedy CTC, margin spaces
    /// trimmed) is the same — whole words, not characters. Where it is given it is what the
    /// output is judged by (held to the top-1 threshold); its per-step top-1 and cosine are
    /// shown, not judged: a blank read a step earlier changes them, not the word.
    pub sequence_agreement: Option<f64>,
    /// For detector outputs [N, 4 + C, boxes] (YOLOv8's: 4 box coordinates, then C class
    /// scores in [0, 1] per candidate box): fraction of the N items whose highest-scoring box
    /// has the same class. Box coordinates are almost all of such an output's magnitude, so
    /// its cosine sees boxes, not classes.
    pub top_box_agreement: Option<f64>,
    /// For detector outputs: the cosine of the class scores alone.
    pub score_cosine: Option<f64>,
    /// For detector outputs: the detections (candidates whose best class score reaches
    /// [`DETECTION_SCORE`], per-class non-maximum suppression at [`NMS_IOU`]) of the two
    /// models matched one to one by class and IoU ≥ [`MATCH_IOU`]: 2 × matched ÷ (the
    /// original's + the compressed model's detections), over all items — a box that moves,
    /// changes class, appears or disappears counts. `None` when neither model detects
    /// anything.
    pub box_agreement: Option<f64>,
    /// For detector outputs: how many detections the original and the compressed model made.
    pub detections: Option<[usize; 2]>,
    /// For one-channel score outputs in [0, 1] — [N, 1] (a voice-activity probability) or
    /// [N, 1, H, W] (a text or segmentation map) — the fraction of values on the same side
    /// of 0.5: the decisions (speech, text pixel) a user of the output takes.
    pub decision_agreement: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub size_before: u64,
    pub size_after: u64,
    /// Items per timed run: 1 (batch 1, the first item) when the inputs are a batch both
    /// models take item by item, else the inputs' first dimension (all of them at once).
    /// Latencies are medians of runs of the two models interleaved.
    pub latency_items: usize,
    pub latency_ms_before: f64,
    pub latency_ms_after: f64,
    pub outputs: Vec<OutputReport>,
}

impl Report {
    pub fn size_ratio(&self) -> f64 {
        self.size_after as f64 / self.size_before.max(1) as f64
    }

    /// The lowest agreement of what the outputs decide: top-1 of classifier-like outputs,
    /// whole readings of CTC recognisers (instead of their per-step top-1), top-box class and
    /// matched boxes of detector outputs, the 0.5 decision of score maps (1.0 when there is
    /// none).
    pub fn min_top1(&self) -> f64 {
        self.outputs
            .iter()
            .flat_map(|o| {
                [
                    o.sequence_agreement.or(o.top1_agreement),
                    o.top_box_agreement,
                    o.box_agreement,
                    o.decision_agreement,
                ]
            })
            .flatten()
            .fold(1.0, f64::min)
    }

    /// The lowest cosine over outputs (not CTC recognisers', judged by their readings), and
    /// over the class scores of detector outputs.
    pub fn min_cosine(&self) -> f64 {
        self.outputs
            .iter()
            .flat_map(|o| {
                [
                    o.sequence_agreement.is_none().then_some(o.cosine),
                    o.score_cosine,
                ]
            })
            .flatten()
            .fold(1.0, f64::min)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.latency_items == 1 {
            "at batch 1".to_string()
        } else {
            format!("of all {} items at once", self.latency_items)
        };
        writeln!(
            f,
            "size {} → {} bytes ({:.2}×); latency {at} {:.3} → {:.3} ms",
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
            if let Some(t) = o.decision_agreement {
                write!(f, ", decisions at 0.5 agree {:.2} %", t * 100.0)?;
            }
            if let (Some(t), Some(c)) = (o.top_box_agreement, o.score_cosine) {
                write!(
                    f,
                    ", top-box class agreement {:.2} %, class scores cosine {c:.6}",
                    t * 100.0
                )?;
            }
            match (o.box_agreement, o.detections) {
                (Some(b), Some([x, y])) => write!(
                    f,
                    ", boxes matched by class and IoU ≥ {MATCH_IOU} {:.2} % ({x} → {y} detections)",
                    b * 100.0
                )?,
                (None, Some(_)) => write!(f, ", no detections (score ≥ {DETECTION_SCORE})")?,
                _ => {}
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
    let m = crate::onnx::Model::parse(&optimized(env, model)?)?;
    let mut ops = std::collections::BTreeMap::new();
    for n in m.graph.messages(crate::onnx::graph::NODE)? {
        *ops.entry(crate::onnx::op_type(&n)).or_default() += 1;
    }
    Ok(ops)
}

/// The graph ONNX Runtime runs for `model` after its graph optimizations (on this machine's
/// CPU EP, one thread), as a model's bytes.
pub fn optimized(env: &Environment, model: &[u8]) -> Result<Vec<u8>> {
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
    saved
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

/// Runs a model on the inputs: each output as (name, shape, values as f64) for float outputs.
fn run(s: &mut Session, inputs: &[Input]) -> Result<Vec<Output>> {
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
    Ok(result)
}

/// Items `from..to` of an input (along its first dimension).
pub(crate) fn items_of(i: &Input, from: usize, to: usize) -> Input {
    let per = i.shape[1..].iter().map(|&d| d as usize).product::<usize>();
    let mut shape = i.shape.clone();
    shape[0] = (to - from) as i64;
    let data = match &i.data {
        Data::F32(d) => Data::F32(d[from * per..to * per].to_vec()),
        Data::I64(d) => Data::I64(d[from * per..to * per].to_vec()),
    };
    Input {
        name: i.name.clone(),
        shape,
        data,
    }
}

/// How many items the inputs hold along a first dimension they all share and the model
/// leaves free (`None`: the inputs are not a batch the model could take item by item).
pub(crate) fn batch_items(s: &Session, inputs: &[Input]) -> Option<usize> {
    let free = s.inputs().iter().all(|i| match i.dtype() {
        ort::value::ValueType::Tensor { shape, .. } => shape.first().is_some_and(|d| *d < 0),
        _ => false,
    });
    let n = *inputs.first()?.shape.first()?;
    (free && n > 0 && inputs.iter().all(|i| i.shape.first() == Some(&n))).then_some(n as usize)
}

/// Timed runs per model: at least this many at batch 1, or of the whole inputs when they are
/// not a batch…
const TIMED_RUNS_ONE: usize = 20;
const TIMED_RUNS_ALL: usize = 5;
/// … and at batch 1 until both models have run this long (a digits MLP answers in 15 µs:
/// 20 runs of it time the machine's noise, not the model), at most [`TIMED_RUNS_MAX`] runs.
const TIMED_AT_LEAST: std::time::Duration = std::time::Duration::from_millis(400);
const TIMED_RUNS_MAX: usize = 20_000;

/// The median of some durations in seconds (0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median latency of `a` and of `b` in ms, runs interleaved (a, b, a, b, …, after one
/// untimed run each), so that both see the same machine: at batch 1 — the first item — when
/// the inputs are a batch both models take item by item, else of the whole inputs; and the
/// items per run. Medians, not means: on a shared machine another process's burst lands in
/// a few runs of either model and would move a mean.
fn latencies(
    a: &mut Session,
    b: &mut Session,
    inputs: &[Input],
    at_least: std::time::Duration,
) -> Result<(f64, f64, usize)> {
    let (one, runs, items) = match (batch_items(a, inputs), batch_items(b, inputs)) {
        (Some(_), Some(_)) => (
            inputs.iter().map(|i| items_of(i, 0, 1)).collect::<Vec<_>>(),
            TIMED_RUNS_ONE,
            1,
        ),
        _ => (
            inputs.to_vec(),
            TIMED_RUNS_ALL,
            inputs
                .first()
                .and_then(|i| i.shape.first())
                .map_or(1, |&n| n.max(1) as usize),
        ),
    };
    a.run(values(&one)?)?;
    b.run(values(&one)?)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while ta.len() < runs || (items == 1 && start.elapsed() < at_least && ta.len() < TIMED_RUNS_MAX)
    {
        // The input values are made before the clock starts: only the run is timed.
        let v = values(&one)?;
        let t = Instant::now();
        a.run(v)?;
        ta.push(t.elapsed().as_secs_f64());
        let v = values(&one)?;
        let t = Instant::now();
        b.run(v)?;
        tb.push(t.elapsed().as_secs_f64());
    }
    Ok((median(ta) * 1e3, median(tb) * 1e3, items))
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

/// What a CTC recogniser reads in one item's [T, C] scores, as its users read it: the greedy
/// decoding ([`ctc_greedy`]) without the spaces at its ends. PaddleOCR's recognisers (PP-OCR,
/// RapidOCR) put the space last among their classes (`use_space_char`), and one read at a
/// crop's margin is not part of the word (their pipelines strip it), so two readings that
/// differ only there agree.
pub fn ctc_reading(scores: &[f64], classes: usize) -> Vec<usize> {
    let mut read = ctc_greedy(scores, classes);
    let space = classes.saturating_sub(1);
    let end = read.iter().rposition(|&k| k != space).map_or(0, |i| i + 1);
    read.truncate(end);
    let start = read.iter().position(|&k| k != space).unwrap_or(read.len());
    read.drain(..start);
    read
}

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

/// How one output of the compressed model (`y`) compares with the original's (`x`), both of
/// shape `shape`, by what the output means: classifier rows by top-1, CTC sequences by their
/// reading, detector outputs by the class of the top box and the cosine of their class
/// scores; every output by its errors and cosine.
pub fn compare_output(name: &str, shape: &[i64], x: &[f64], y: &[f64]) -> OutputReport {
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
            .filter(|(p, q)| ctc_reading(p, last) == ctc_reading(q, last))
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
    let detector = (!distributions)
        .then(|| detector_layout(shape, x))
        .flatten();
    let (box_agreement, detections) = match detector {
        Some((features, boxes)) => {
            let item = features * boxes;
            let (mut matched, mut na, mut nb) = (0, 0, 0);
            for (p, q) in x.chunks_exact(item).zip(y.chunks_exact(item)) {
                let (a, b) = (detect(p, features, boxes), detect(q, features, boxes));
                matched += match_boxes(&a, &b);
                na += a.len();
                nb += b.len();
            }
            (
                (na + nb > 0).then(|| 2.0 * matched as f64 / (na + nb) as f64),
                Some([na, nb]),
            )
        }
        None => (None, None),
    };
    let (top_box_agreement, score_cosine) = match detector {
        Some((features, boxes)) => {
            let item = features * boxes;
            let items = x.len() / item;
            let same = x
                .chunks_exact(item)
                .zip(y.chunks_exact(item))
                .filter(|(p, q)| top_box(p, features, boxes).1 == top_box(q, features, boxes).1)
                .count();
            let scores = |v: &[f64]| -> Vec<f64> {
                v.chunks_exact(item)
                    .flat_map(|i| i[4 * boxes..].iter().copied())
                    .collect()
            };
            (
                Some(same as f64 / items.max(1) as f64),
                Some(crate::report::cosine(&scores(x), &scores(y))),
            )
        }
        None => (None, None),
    };
    let scores = shape.len() >= 2
        && shape[1] == 1
        && !x.is_empty()
        && x.iter().all(|p| (0.0..=1.0).contains(p));
    let decision_agreement = scores.then(|| {
        let same = x
            .iter()
            .zip(y)
            .filter(|(p, q)| (**p >= 0.5) == (**q >= 0.5))
            .count();
        same as f64 / x.len() as f64
    });
    OutputReport {
        name: name.to_string(),
        max_abs_error,
        mean_abs_error,
        relative_error,
        cosine,
        top1_agreement,
        sequence_agreement,
        top_box_agreement,
        score_cosine,
        box_agreement,
        detections,
        decision_agreement,
    }
}

/// A detector's best class score a candidate box needs to count as a detection (YOLOv8's
/// usual confidence threshold).
pub const DETECTION_SCORE: f64 = 0.25;
/// Non-maximum suppression: a detection overlapping a better one of its class by more than
/// this is dropped.
pub const NMS_IOU: f64 = 0.45;
/// Two detections of the same class are the same object from this IoU on.
pub const MATCH_IOU: f64 = 0.5;
/// Detections kept per item, best first.
const MAX_DETECTIONS: usize = 300;

/// One detection: box as (centre x, centre y, width, height), class, score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub rect: [f64; 4],
    pub class: usize,
    pub score: f64,
}

/// Intersection over union of two (cx, cy, w, h) boxes.
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let span = |r: &[f64; 4], k: usize| (r[k] - r[k + 2] / 2.0, r[k] + r[k + 2] / 2.0);
    let overlap = |k| {
        let ((a0, a1), (b0, b1)) = (span(a, k), span(b, k));
        (a1.min(b1) - a0.max(b0)).max(0.0)
    };
    let inter = overlap(0) * overlap(1);
    let union = a[2].max(0.0) * a[3].max(0.0) + b[2].max(0.0) * b[3].max(0.0) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// One item of a detector output ([4 + C, boxes]) as detections: every candidate whose best
/// class score reaches [`DETECTION_SCORE`], best first, per-class non-maximum suppression at
/// [`NMS_IOU`], at most [`MAX_DETECTIONS`].
pub fn detect(item: &[f64], features: usize, boxes: usize) -> Vec<Detection> {
    let mut found: Vec<Detection> = (0..boxes)
        .filter_map(|b| {
            let (class, score) = (0..features - 4)
                .map(|c| (c, item[(4 + c) * boxes + b]))
                .fold(
                    (0, f64::NEG_INFINITY),
                    |m, (c, s)| if s > m.1 { (c, s) } else { m },
                );
            (score >= DETECTION_SCORE).then(|| Detection {
                rect: [0, 1, 2, 3].map(|k| item[k * boxes + b]),
                class,
                score,
            })
        })
        .collect();
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in found {
        if kept.len() == MAX_DETECTIONS {
            break;
        }
        if !kept
            .iter()
            .any(|k| k.class == d.class && iou(&k.rect, &d.rect) > NMS_IOU)
        {
            kept.push(d);
        }
    }
    kept
}

/// How many of `a`'s detections (best first) find their own partner in `b`: the unmatched
/// one of the same class with the highest IoU, at least [`MATCH_IOU`].
pub fn match_boxes(a: &[Detection], b: &[Detection]) -> usize {
    let mut taken = vec![false; b.len()];
    let mut matched = 0;
    for d in a {
        let best = b
            .iter()
            .enumerate()
            .filter(|(j, e)| !taken[*j] && e.class == d.class)
            .map(|(j, e)| (j, iou(&d.rect, &e.rect)))
            .filter(|(_, v)| *v >= MATCH_IOU)
            .max_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((j, _)) = best {
            taken[j] = true;
            matched += 1;
        }
    }
    matched
}

/// For an output laid out as a detector's [N, 4 + C, boxes] — more candidate boxes than
/// features, and every class score of the original in [0, 1] — its (features, boxes).
fn detector_layout(shape: &[i64], x: &[f64]) -> Option<(usize, usize)> {
    let &[_, features, boxes] = shape else {
        return None;
    };
    let (features, boxes) = (
        usize::try_from(features).ok()?,
        usize::try_from(boxes).ok()?,
    );
    if features < 5 || boxes <= features || x.is_empty() {
        return None;
    }
    let item = features * boxes;
    let scores_in_unit = x
        .chunks_exact(item)
        .all(|i| i[4 * boxes..].iter().all(|s| (0.0..=1.0).contains(s)));
    scores_in_unit.then_some((features, boxes))
}

/// One item of a detector output ([4 + C, boxes]): the box with the highest class score, and
/// its class.
pub fn top_box(item: &[f64], features: usize, boxes: usize) -> (usize, usize) {
    let classes = features - 4;
    let (mut best, mut at, mut class) = (f64::NEG_INFINITY, 0, 0);
    for c in 0..classes {
        let row = &item[(4 + c) * boxes..(5 + c) * boxes];
        for (b, &s) in row.iter().enumerate() {
            if s > best {
                (best, at, class) = (s, b, c);
            }
        }
    }
    (at, class)
}

/// Compares `before` and `after` (model bytes) on `inputs`.
pub fn compare(env: &Environment, before: &[u8], after: &[u8], inputs: &[Input]) -> Result<Report> {
    compare_timed(env, before, after, inputs, TIMED_AT_LEAST)
}

/// [`compare`] with latencies from the least timing (20 runs, no time floor): for a search's
/// steps that only rank candidates by accuracy, where a settled latency would cost
/// [`TIMED_AT_LEAST`] per step.
pub(crate) fn compare_quick(
    env: &Environment,
    before: &[u8],
    after: &[u8],
    inputs: &[Input],
) -> Result<Report> {
    compare_timed(env, before, after, inputs, std::time::Duration::ZERO)
}

fn compare_timed(
    env: &Environment,
    before: &[u8],
    after: &[u8],
    inputs: &[Input],
    at_least: std::time::Duration,
) -> Result<Report> {
    let mut a = session(env, before)?;
    let mut b = session(env, after).map_err(|e| Error::CompressedDoesNotLoad(e.to_string()))?;
    let ra = run(&mut a, inputs)?;
    let rb = run(&mut b, inputs)?;
    let (la, lb, latency_items) = latencies(&mut a, &mut b, inputs, at_least)?;
    let mut outputs = Vec::new();
    for ((name, shape, x), (_, _, y)) in ra.iter().zip(&rb) {
        if x.len() != y.len() {
            return Err(Error::OutputChanged {
                name: name.clone(),
                before: x.len(),
                after: y.len(),
            });
        }
        outputs.push(compare_output(name, shape, x, y));
    }
    Ok(Report {
        size_before: before.len() as u64,
        size_after: after.len() as u64,
        latency_items,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_become_inputs_only_when_their_bytes_fit_their_shape() {
        use rxd_protocol::{DType, Tensor};
        let f: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let i = Input::from_tensor(&Tensor::inline("x", DType::Float32, vec![1, 2], f.clone()));
        assert_eq!(i.unwrap().data, Data::F32(vec![1.5, -2.0]));
        let n = Input::from_tensor(&Tensor::inline(
            "n",
            DType::Int64,
            vec![],
            7i64.to_le_bytes().to_vec(),
        ));
        assert_eq!(n.unwrap().data, Data::I64(vec![7]));
        let short = Input::from_tensor(&Tensor::inline("x", DType::Float32, vec![1, 3], f.clone()));
        assert!(short.unwrap_err().to_string().contains("do not hold"));
        let odd = Input::from_tensor(&Tensor::inline("b", DType::Uint8, vec![8], f));
        assert!(odd.unwrap_err().to_string().contains("not supported"));
        let mut npy = Vec::new();
        let t = Tensor::inline(
            "x",
            DType::Float32,
            vec![2],
            [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
        );
        rxd_protocol::npy::write(&t, &mut npy).unwrap();
        let dir = std::env::temp_dir().join(format!("rxd-npy-{}", std::process::id()));
        std::fs::write(&dir, &npy).unwrap();
        let back = read_npy("x", &dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(back.unwrap().data, Data::F32(vec![1.0, 2.0]));
    }

    /// A YOLOv8-like output [N, 4 + C, boxes]: box coordinates in pixels, class scores in
    /// [0, 1]; one strong box per item, of class `item % C`.
    fn detections(items: usize, classes: usize, boxes: usize, shift: usize) -> Vec<f64> {
        let features = 4 + classes;
        let mut v = vec![0.0; items * features * boxes];
        for i in 0..items {
            let item = &mut v[i * features * boxes..(i + 1) * features * boxes];
            for b in 0..boxes {
                for k in 0..4 {
                    item[k * boxes + b] = 20.0 + ((b * 7 + k * 13) % 280) as f64;
                }
                for c in 0..classes {
                    item[(4 + c) * boxes + b] = 0.001 * ((b + c) % 5) as f64;
                }
            }
            let c = (i + shift) % classes;
            item[(4 + c) * boxes + 3] = 0.9;
        }
        v
    }

    #[test]
    fn detector_boxes_are_matched_by_class_and_iou() {
        let (items, classes, boxes) = (4, 6, 200);
        let features = 4 + classes;
        let shape = [items as i64, features as i64, boxes as i64];
        let x = detections(items, classes, boxes, 0);
        // The strong box (index 3) of item 0 moves by its own width: its class and score
        // stay, so the top-box class still agrees, but it is another place in the image.
        let mut moved = x.clone();
        let w = moved[2 * boxes + 3];
        moved[3] += w;
        let r = compare_output("output0", &shape, &x, &moved);
        assert_eq!(r.top_box_agreement, Some(1.0));
        assert_eq!(r.detections, Some([4, 4]));
        // 3 of 4 matched: 2 × 3 / 8.
        assert_eq!(r.box_agreement, Some(0.75));
        // A small shift (a tenth of the width) is the same object.
        let mut nudged = x.clone();
        nudged[3] += w / 10.0;
        let r = compare_output("output0", &shape, &x, &nudged);
        assert_eq!(r.box_agreement, Some(1.0));
        // A detection that appears: item 1 gets a second box of another class far away.
        let mut extra = x.clone();
        let item = features * boxes;
        extra[item + (4 + 5) * boxes + 100] = 0.8;
        let r = compare_output("output0", &shape, &x, &extra);
        assert_eq!(r.detections, Some([4, 5]));
        assert!(
            (r.box_agreement.unwrap() - 8.0 / 9.0).abs() < 1e-12,
            "{r:?}"
        );
        let report = Report {
            size_before: 1,
            size_after: 1,
            latency_items: 1,
            latency_ms_before: 1.0,
            latency_ms_after: 1.0,
            outputs: vec![r],
        };
        assert!(report.min_top1() < 0.9);
        assert!(
            report.to_string().contains("(4 → 5 detections)"),
            "{report}"
        );
        // Overlapping boxes of one class are one detection (suppression); IoU by hand.
        let a = [10.0, 10.0, 10.0, 10.0];
        assert_eq!(iou(&a, &a), 1.0);
        assert!((iou(&a, &[15.0, 10.0, 10.0, 10.0]) - 50.0 / 150.0).abs() < 1e-12);
        assert_eq!(iou(&a, &[40.0, 10.0, 10.0, 10.0]), 0.0);
        let mut twice = x.clone();
        twice[4] = x[3] + 1.0;
        twice[4 * boxes + 4] = 0.85;
        assert_eq!(detect(&twice[..item], features, boxes).len(), 1);
        // Nothing detected by either model: nothing to judge.
        let quiet = vec![0.01; items * item];
        assert_eq!(
            compare_output("output0", &shape, &quiet, &quiet).box_agreement,
            None
        );
    }

    #[test]
    fn a_detector_that_flips_classes_is_caught_though_its_cosine_is_near_one() {
        let (items, classes, boxes) = (8, 18, 300);
        let shape = [items as i64, 4 + classes as i64, boxes as i64];
        let x = detections(items, classes, boxes, 0);
        let same = compare_output("output0", &shape, &x, &x);
        assert_eq!(same.top_box_agreement, Some(1.0));
        // Every item's top box changes class; the boxes do not move.
        let flipped = detections(items, classes, boxes, 1);
        let r = compare_output("output0", &shape, &x, &flipped);
        assert!(r.cosine > 0.9998, "{}", r.cosine);
        assert_eq!(r.top_box_agreement, Some(0.0));
        assert!(r.score_cosine.unwrap() < 0.5, "{:?}", r.score_cosine);
        assert_eq!(r.top1_agreement, None);
        // The flipped classes are also unmatched boxes: one detection per item each, none
        // of the same class.
        assert_eq!(r.detections, Some([items, items]));
        assert_eq!(r.box_agreement, Some(0.0));
        assert_eq!(same.box_agreement, Some(1.0));
        let report = Report {
            size_before: 1,
            size_after: 1,
            latency_items: 1,
            latency_ms_before: 1.0,
            latency_ms_after: 1.0,
            outputs: vec![r],
        };
        assert_eq!(report.min_top1(), 0.0);
        // A one-channel map in [0, 1] is judged by its decisions.
        let map = [0.1, 0.6, 0.7, 0.2];
        let r = compare_output("maps", &[1, 1, 2, 2], &map, &[0.1, 0.4, 0.7, 0.2]);
        assert_eq!(r.decision_agreement, Some(0.75));
        assert_eq!(r.top_box_agreement, None);
        // A [N, 1, H, W] map or an [N, C] row is no detector.
        assert_eq!(detector_layout(&[1, 1, 64], &[0.5; 64]), None);
        assert_eq!(detector_layout(&[2, 10], &[0.5; 20]), None);
    }
}
