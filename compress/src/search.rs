//! The sensitivity search (what ONNX Runtime's Python quantizer lacks): when INT8 weights
//! everywhere miss the accuracy thresholds, measure each weight's own effect — the model with
//! only that weight quantized, against the original on the evaluation inputs — and keep the
//! most sensitive weights in float, one at a time, until the thresholds hold. The result says
//! which weights stayed and how much each one alone cost.

use std::collections::BTreeSet;

use ort::environment::Environment;

use crate::budget::Budget;
use crate::onnx::Model;
use crate::report::{self, Input, Report};
use crate::{Error, Result};

/// What the search found.
#[derive(Debug, Clone)]
pub struct Found {
    pub bytes: Vec<u8>,
    pub report: Report,
    /// Weights kept in float, with their sensitivity (1 − cosine, plus 1 − top-1 agreement,
    /// of the model with only that weight quantized).
    pub kept: Vec<(String, f64)>,
    pub converted: usize,
    pub passed: bool,
}

fn passes(r: &Report, min_top1: f64, min_cosine: f64) -> bool {
    r.min_top1() >= min_top1 && r.min_cosine() >= min_cosine
}

fn int8(bytes: &[u8], keep: &BTreeSet<String>) -> Result<(Vec<u8>, crate::quant::Outcome)> {
    let mut m = Model::parse(bytes)?;
    crate::fold::fold_batchnorm(&mut m)?;
    let out = crate::quant::int8_weights_except(&mut m, keep)?;
    Ok((m.encode(), out))
}

/// INT8 weights with as few float weights as the thresholds allow, however long it takes.
pub fn search(
    env: &Environment,
    bytes: &[u8],
    inputs: &[Input],
    min_top1: f64,
    min_cosine: f64,
) -> Result<Found> {
    search_within(
        env,
        bytes,
        inputs,
        min_top1,
        min_cosine,
        &Budget::unlimited(),
    )
}

/// [`search`] within a time budget, saying how far it got.
pub fn search_within(
    env: &Environment,
    bytes: &[u8],
    inputs: &[Input],
    min_top1: f64,
    min_cosine: f64,
    budget: &Budget,
) -> Result<Found> {
    let (all, outcome) = int8(bytes, &BTreeSet::new())?;
    let r = report::compare(env, bytes, &all, inputs)?;
    let weights: Vec<String> = outcome.converted.iter().map(|c| c.0.clone()).collect();
    if passes(&r, min_top1, min_cosine) || weights.is_empty() {
        let passed = passes(&r, min_top1, min_cosine);
        return Ok(Found {
            bytes: all,
            report: r,
            kept: Vec::new(),
            converted: weights.len(),
            passed,
        });
    }
    budget.say(&format!(
        "INT8 everywhere: top-1 {:.4}, cosine {:.6}; measuring each of {} weights alone",
        r.min_top1(),
        r.min_cosine(),
        weights.len()
    ));
    // Each weight alone: every other one stays in float.
    let mut sens = Vec::new();
    for (k, w) in weights.iter().enumerate() {
        budget.check(|| format!("measuring weight {} of {}", k + 1, weights.len()))?;
        let others: BTreeSet<String> = weights.iter().filter(|x| *x != w).cloned().collect();
        let (one, _) = int8(bytes, &others)?;
        // Ranked by accuracy only: no settled latency for each of the N weights.
        let r = report::compare_quick(env, bytes, &one, inputs)?;
        let cost = (1.0 - r.min_cosine()) + (1.0 - r.min_top1());
        budget.say(&format!(
            "weight {} of {} ({w}) alone costs {cost:.3e}",
            k + 1,
            weights.len()
        ));
        sens.push((w.clone(), cost));
    }
    sens.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = BTreeSet::new();
    let mut kept = Vec::new();
    for (w, s) in sens {
        budget.check(|| format!("with {} weights kept in float", keep.len()))?;
        keep.insert(w.clone());
        kept.push((w, s));
        let (candidate, outcome) = int8(bytes, &keep)?;
        let r = report::compare(env, bytes, &candidate, inputs)?;
        budget.say(&format!(
            "{} weights in float: top-1 {:.4}, cosine {:.6}",
            keep.len(),
            r.min_top1(),
            r.min_cosine()
        ));
        if passes(&r, min_top1, min_cosine) {
            return Ok(Found {
                bytes: candidate,
                report: r,
                kept,
                converted: outcome.converted.len(),
                passed: true,
            });
        }
    }
    Err(Error::ThresholdsUnmet(
        "no choice of float weights meets the thresholds".into(),
    ))
}
