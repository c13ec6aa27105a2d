//! The sensitivity search (what ONNX Runtime's Python quantizer lacks): when INT8 weights
//! everywhere miss the accuracy thresholds, measure each weight's own effect — the model with
//! only that weight quantized, against the original on the evaluation inputs — and keep the
//! most sensitive weights in float, one at a time, until the thresholds hold. The result says
//! which weights stayed and how much each one alone cost.

use std::collections::BTreeSet;

use ort::environment::Environment;

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

/// INT8 weights with as few float weights as the thresholds allow.
pub fn search(
    env: &Environment,
    bytes: &[u8],
    inputs: &[Input],
    min_top1: f64,
    min_cosine: f64,
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
    // Each weight alone: every other one stays in float.
    let mut sens = Vec::new();
    for w in &weights {
        let others: BTreeSet<String> = weights.iter().filter(|x| *x != w).cloned().collect();
        let (one, _) = int8(bytes, &others)?;
        let r = report::compare(env, bytes, &one, inputs)?;
        sens.push((w.clone(), (1.0 - r.min_cosine()) + (1.0 - r.min_top1())));
    }
    sens.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = BTreeSet::new();
    let mut kept = Vec::new();
    for (w, s) in sens {
        keep.insert(w.clone());
        kept.push((w, s));
        let (candidate, outcome) = int8(bytes, &keep)?;
        let r = report::compare(env, bytes, &candidate, inputs)?;
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
