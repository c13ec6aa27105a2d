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
/// one, then two, four, … more per round — each round verified: its nodes stay only if the
/// final error went down with them ([`Steps`]). Short of the thresholds after the last round,
/// the best model found (lowest final error) is returned with `passed` false.
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
    let mut steps = Steps::default();
    let mut best: Option<Searched> = None;
    let mut ranges = BTreeMap::new();
    let mut round = 0;
    loop {
        budget.check(|| format!("after {round} rounds ({} nodes in float)", steps.kept.len()))?;
        let keep = steps.keep();
        let (q, stat, trace) =
            quantize_traced(env, bytes, calibration, method, &keep, &mut ranges)?;
        let report = crate::report::compare(env, bytes, &q, eval)?;
        let passed = report.min_top1() >= min_top1 && report.min_cosine() >= min_cosine;
        let trying = steps.trying.len();
        let kept_it = steps.verify(Score {
            top1: report.min_top1(),
            cosine: report.min_cosine(),
        });
        budget.say(&format!(
            "static INT8 with {} nodes in float: top-1 {:.4}, cosine {:.6}{}",
            keep.len(),
            report.min_top1(),
            report.min_cosine(),
            match (trying, kept_it) {
                (0, _) => String::new(),
                (n, true) => format!(" (the {n} just kept lower the error: they stay)"),
                (n, false) => format!(" (the {n} just kept do not lower the error: back to INT8)"),
            }
        ));
        if kept_it {
            if passed && stat.weights == 0 && stat.activations.is_empty() {
                return Err(Error::ThresholdsUnmet(
                    "no static INT8 model meets the thresholds: only the float model does".into(),
                ));
            }
            best = Some(Searched {
                bytes: q.clone(),
                stat: stat.clone(),
                report: report.clone(),
                kept: steps.kept.clone(),
                passed,
            });
        }
        let found = || {
            best.clone()
                .ok_or_else(|| Error::Unsupported("no round ran".into()))
        };
        if (kept_it && passed) || round == SEARCH_ROUNDS {
            return found();
        }
        if kept_it {
            // Each quantized tensor against its float value, a chunk of the evaluation
            // inputs at a time: dot products and norms summed, never the tensors of the
            // whole set.
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
            steps.rank(by_node.into_iter().collect());
        }
        if !steps.next(1 << round) {
            return Err(Error::ThresholdsUnmet(format!(
                "no static INT8 model meets the thresholds: {} nodes kept in float, and no \
                 other quantized node adds error or lowers it in float ({} tried and sent back)",
                steps.kept.len(),
                steps.tried.len()
            )));
        }
        round += 1;
    }
}

/// What a round measured: the lowest agreement (top-1 and its kin) and the lowest cosine.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    top1: f64,
    cosine: f64,
}

impl Score {
    /// Lower error than `other`: more agreement, or as much and a higher cosine.
    fn better_than(&self, other: &Score) -> bool {
        const SAME: f64 = 1e-12;
        self.top1 > other.top1 + SAME
            || ((self.top1 - other.top1).abs() <= SAME && self.cosine > other.cosine + SAME)
    }
}

/// The search's steps, verified: the nodes a round keeps in float stay only if the model's
/// final error went down with them; otherwise they go back to INT8 and are not tried again,
/// and the next nodes of the ranking (made from the last model that was kept) are tried.
#[derive(Debug, Default)]
struct Steps {
    /// Kept in float, each with the error charged to it when it was ranked.
    kept: Vec<(String, f64)>,
    /// This round's nodes, kept in float on trial.
    trying: Vec<(String, f64)>,
    /// Tried and sent back: never again.
    tried: BTreeSet<String>,
    /// Not tried yet, worst first.
    queue: Vec<(String, f64)>,
    /// The score with `kept` alone.
    best: Option<Score>,
}

impl Steps {
    /// The nodes in float for this round.
    fn keep(&self) -> BTreeSet<String> {
        self.kept
            .iter()
            .chain(&self.trying)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Judges the round that measured `score`: true if its nodes stay (or it is the first
    /// round), false if they went back.
    fn verify(&mut self, score: Score) -> bool {
        let better = self.best.is_none_or(|b| score.better_than(&b));
        let trying = std::mem::take(&mut self.trying);
        if better {
            self.kept.extend(trying);
            self.best = Some(score);
        } else {
            self.tried.extend(trying.into_iter().map(|(n, _)| n));
        }
        better
    }

    /// A new ranking of the quantized nodes by the error each adds (from the model just
    /// kept); nodes with no error, kept or tried already are left out.
    fn rank(&mut self, by_node: Vec<(String, f64)>) {
        let kept: BTreeSet<&String> = self.kept.iter().map(|(n, _)| n).collect();
        let mut ranked: Vec<(String, f64)> = by_node
            .into_iter()
            .filter(|(n, e)| *e > 0.0 && !kept.contains(n) && !self.tried.contains(n))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        self.queue = ranked;
    }

    /// Puts the next `n` nodes of the ranking on trial; false when none is left.
    fn next(&mut self, n: usize) -> bool {
        let n = n.min(self.queue.len());
        self.trying = self.queue.drain(..n).collect();
        !self.trying.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(top1: f64, cosine: f64) -> Score {
        Score { top1, cosine }
    }

    fn nodes(names: &[&str]) -> Vec<(String, f64)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), 1.0 / (i + 1) as f64))
            .collect()
    }

    #[test]
    fn a_round_whose_nodes_do_not_lower_the_error_is_undone_and_the_next_nodes_are_tried() {
        let mut s = Steps::default();
        assert!(
            s.verify(score(0.80, 0.95)),
            "the all-INT8 round sets the baseline"
        );
        s.rank(nodes(&["a", "b", "c", "d"]));
        assert!(s.next(1));
        assert_eq!(s.keep(), BTreeSet::from(["a".to_string()]));
        // "a" in float: more agreement, it stays.
        assert!(s.verify(score(0.85, 0.90)));
        s.rank(nodes(&["b", "a", "c", "d"]));
        assert!(s.next(2));
        assert_eq!(s.keep().len(), 3);
        // "b" and "c" in float: worse — back to INT8, never tried again.
        assert!(!s.verify(score(0.85, 0.89)));
        assert_eq!(s.kept.len(), 1);
        assert_eq!(s.keep(), BTreeSet::from(["a".to_string()]));
        // The ranking of the kept model goes on: "d" next, even though a new ranking would
        // name "b" again.
        assert!(s.next(4));
        assert_eq!(s.trying.len(), 1);
        assert_eq!(s.trying[0].0, "d");
        // As much agreement, a higher cosine: it stays.
        assert!(s.verify(score(0.85, 0.93)));
        s.rank(nodes(&["b", "c", "e"]));
        assert!(s.next(1));
        assert_eq!(s.trying[0].0, "e", "tried nodes are not ranked again");
        assert!(!s.verify(score(0.85, 0.93)), "no better is not better");
        assert!(!s.next(1), "nothing left");
    }
}
