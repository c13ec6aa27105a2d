//! The node-level sensitivity search: which nodes to keep in float so that static INT8 meets
//! the accuracy thresholds.

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use super::calibrate::{Calibration, tensors};
use super::rewrite::quantize_traced;
use super::{Static, prepare};
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
    let (float_model, _) = prepare(bytes)?;
    let mut keep = BTreeSet::new();
    let mut kept = Vec::new();
    let mut ranges = BTreeMap::new();
    let mut round = 0;
    loop {
        let (q, stat, trace) =
            quantize_traced(env, bytes, calibration, method, &keep, &mut ranges)?;
        let report = crate::report::compare(env, bytes, &q, eval)?;
        let passed = report.min_top1() >= min_top1 && report.min_cosine() >= min_cosine;
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
        let names: BTreeSet<String> = trace.dequantized.keys().cloned().collect();
        let want = tensors(env, &float_model, &names, eval)?;
        let dq_names: BTreeSet<String> = trace.dequantized.values().cloned().collect();
        let got = tensors(env, &Model::parse(&q)?, &dq_names, eval)?;
        let error = |t: &String| -> Option<f64> {
            let (a, b) = (want.get(t)?, got.get(trace.dequantized.get(t)?)?);
            Some(1.0 - crate::report::cosine(a, b))
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
