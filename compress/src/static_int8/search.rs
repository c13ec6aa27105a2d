//! The node-level sensitivity search: which nodes to keep in float so that static INT8 meets
//! the accuracy thresholds.

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use super::calibrate::{Calibration, Probe};
use super::rewrite::quantize_traced;
use super::{Static, prepare};
use crate::budget::Budget;
use crate::onnx::Model;
use crate::report::{Input, Report};
use crate::{Error, Result};

/// What [`search`] found.
#[derive(Debug, Clone)]
pub struct Searched {
    pub bytes: Vec<u8>,
    pub stat: Static,
    pub report: Report,
    /// Nodes kept in float, in the order chosen, each with the error its quantization added
    /// (1 − cosine of the tensor it wrote against float, less the worst of the quantized
    /// tensors it read) when it was chosen.
    pub kept: Vec<(String, f64)>,
    pub passed: bool,
}

/// Rounds of the search: round k keeps 2^k more nodes in float (at most 63 in all).
const SEARCH_ROUNDS: u32 = 6;

/// Static INT8 that meets the thresholds on `eval` with as few float nodes as it can find:
/// quantize everything; while the report misses, compare every quantized tensor with its
/// float value on the evaluation inputs, charge each quantized node with the error it adds
/// (what it writes, less the worst of what it reads) and keep the worst nodes in float —
/// one, then two, four, … more per round.
pub fn search(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
    eval: &[Input],
    min_top1: f64,
    min_cosine: f64,
) -> Result<Searched> {
    search_within(
        env,
        bytes,
        calibration,
        method,
        eval,
        (min_top1, min_cosine),
        &Budget::unlimited(),
    )
}

/// [`search`] within a time budget, saying how far it got; `thresholds` are (top-1, cosine).
pub fn search_within(
    env: &Environment,
    bytes: &[u8],
    calibration: &[Input],
    method: Calibration,
    eval: &[Input],
    (min_top1, min_cosine): (f64, f64),
    budget: &Budget,
) -> Result<Searched> {
    let (float_model, _) = prepare(bytes)?;
    let mut keep = BTreeSet::new();
    let mut kept: Vec<(String, f64)> = Vec::new();
    let mut ranges = BTreeMap::new();
    let mut round = 0;
    loop {
        budget.check(|| format!("after {round} rounds ({} nodes in float)", kept.len()))?;
        let (q, stat, trace) =
            quantize_traced(env, bytes, calibration, method, &keep, &mut ranges)?;
        let report = crate::report::compare(env, bytes, &q, eval)?;
        let passed = report.min_top1() >= min_top1 && report.min_cosine() >= min_cosine;
        budget.say(&format!(
            "static INT8 with {} nodes in float: top-1 {:.4}, cosine {:.6}",
            kept.len(),
            report.min_top1(),
            report.min_cosine()
        ));
        let done = |passed| Searched {
            bytes: q.clone(),
            stat: stat.clone(),
            report: report.clone(),
            kept: kept.clone(),
            passed,
        };
        if passed && stat.weights == 0 && stat.activations.is_empty() {
            return Err(Error::ThresholdsUnmet(
                "no static INT8 model meets the thresholds: only the float model does".into(),
            ));
        }
        if passed || round == SEARCH_ROUNDS {
            return Ok(done(passed));
        }
        // Each quantized tensor against its float value, a chunk of the evaluation inputs at
        // a time: dot products and norms summed, never the tensors of the whole set.
        let names: BTreeSet<String> = trace.dequantized.keys().cloned().collect();
        let dq_names: BTreeSet<String> = trace.dequantized.values().cloned().collect();
        let quantized = Model::parse(&q)?;
        let mut want = Probe::new(env, &float_model, &names, eval)?;
        let mut got = Probe::new(env, &quantized, &dq_names, eval)?;
        if want.chunks() != got.chunks() {
            return Err(Error::Unsupported(
                "the quantized model takes its inputs in other shapes than the original".into(),
            ));
        }
        let mut sums: BTreeMap<&String, (f64, f64, f64)> = BTreeMap::new();
        for k in 0..want.chunks() {
            let (a, b) = (want.values(k)?, got.values(k)?);
            for (t, d) in &trace.dequantized {
                let (Some(x), Some(y)) = (a.get(t), b.get(d)) else {
                    continue;
                };
                let s = sums.entry(t).or_default();
                for (&p, &q) in x.iter().zip(y) {
                    let (p, q) = (f64::from(p), f64::from(q));
                    s.0 += p * q;
                    s.1 += p * p;
                    s.2 += q * q;
                }
            }
        }
        let error = |t: &String| -> Option<f64> {
            let &(dot, nx, ny) = sums.get(t)?;
            let cosine = if nx == 0.0 && ny == 0.0 {
                1.0
            } else {
                dot / (nx.sqrt() * ny.sqrt()).max(f64::MIN_POSITIVE)
            };
            Some(1.0 - cosine)
        };
        let mut by_node: BTreeMap<String, f64> = BTreeMap::new();
        for (t, (node, read)) in &trace.blame {
            let Some(e) = error(t) else { continue };
            let upstream = read.iter().filter_map(error).fold(0.0, f64::max);
            let own = by_node.entry(node.clone()).or_default();
            *own = own.max(e - upstream);
        }
        let mut ranked: Vec<(String, f64)> = by_node
            .into_iter()
            .filter(|(n, e)| *e > 0.0 && !keep.contains(n))
            .collect();
        if ranked.is_empty() {
            return Err(Error::ThresholdsUnmet(format!(
                "no static INT8 model meets the thresholds: {} nodes kept in float, and no \
                 other quantized node adds error",
                kept.len()
            )));
        }
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (n, e) in ranked.into_iter().take(1 << round) {
            keep.insert(n.clone());
            kept.push((n, e));
        }
        round += 1;
    }
}
