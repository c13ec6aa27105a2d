//! `--strategy auto`: which candidate variants to try, how each one is judged from what was
//! measured (accuracy checks against the original, size, batch-1 latency against the
//! original measured in the same run), and which one wins under an [`Objective`]. Pure: the
//! measuring is [`crate::job`]'s, so the choice can be tested on tables of simulated
//! candidates. Must not: run ONNX Runtime or compress.

use std::fmt;

use serde::Serialize;

use crate::job::Thresholds;
use crate::report::Report;
use crate::{Error, Result};

/// A batch-1 latency ratio up to this counts as "not slower than the original": the mean
/// of 20 interleaved runs on a shared 2-core machine moves by a few percent from one run to
/// the next, and a rule that flips on that noise would pick differently each time.
pub const LATENCY_TOLERANCE: f64 = 1.05;

/// Under the size objective, files up to this ratio of the smallest passing one count as "as
/// small", and of those the fastest wins — latencies within [`LATENCY_TOLERANCE`] of it
/// counting as as fast, the smallest of them: a weights-only INT8 file dequantized at load is
/// 0.26× YOLOv8n-320 and as fast as the original, its static INT8 file 0.27× and 0.42× the
/// latency; a rule that gave up 2.4× the speed for 4 % of the file would serve users badly,
/// and one that let timing noise pick between two equally fast files would choose differently
/// from one run to the next.
pub const SIZE_TOLERANCE: f64 = 1.05;

/// What `auto` optimizes among the candidates that pass (all of them: the accuracy
/// thresholds, smaller than the original, not slower at batch 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// The smallest file; of files within [`SIZE_TOLERANCE`] of the smallest, the fastest
    /// (those within [`LATENCY_TOLERANCE`] of it: the smallest).
    #[default]
    Size,
    /// The fastest at batch 1 (then the smallest).
    Latency,
    /// The smallest product of size ratio and latency ratio: halving the file is worth as
    /// much as halving the latency.
    Balanced,
}

impl std::str::FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "size" => Ok(Objective::Size),
            "latency" => Ok(Objective::Latency),
            "balanced" => Ok(Objective::Balanced),
            _ => Err(Error::Usage(format!(
                "objective '{s}' is not size, latency or balanced"
            ))),
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Size => "size",
            Objective::Latency => "latency",
            Objective::Balanced => "balanced",
        })
    }
}

/// The suffix of a candidate served dequantized at load: the file is the weights-only form,
/// the session runs the float model it stands for ([`crate::dequant`]), as the daemon does.
pub const AT_LOAD: &str = "@load";

/// A candidate's strategy and whether it is served dequantized at load (`int8-weights@load`).
pub fn at_load(candidate: &str) -> (&str, bool) {
    match candidate.strip_suffix(AT_LOAD) {
        Some(base) => (base, true),
        None => (candidate, false),
    }
}

/// The strategies `auto` tries, cheapest first; `static-int8` (last, it calibrates and
/// searches) only with calibration inputs. The weights-only INT8 forms are tried twice: as
/// ONNX Runtime runs the file (dequantizing on every run: small, slow) and dequantized at load
/// (`@load`: small on disk, float in memory, full speed). Pruning is not a candidate: pruned
/// weights are stored dense (no smaller on disk) and cost accuracy.
pub fn candidates(calibration: bool) -> Vec<&'static str> {
    let mut v = vec![
        "fp16-weights",
        "fp16",
        "dynamic-int8",
        "int8-weights",
        "int8-weights+fp16-weights",
        "int8-weights@load",
        "int8-weights+fp16-weights@load",
        "int4",
    ];
    if calibration {
        v.push("static-int8");
    }
    v
}

/// One accuracy check of a candidate against the original.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// The output it looks at.
    pub output: String,
    /// `top-1`, `CTC reading` (whole readings, margin spaces trimmed), `top-box class`,
    /// `boxes` (matched by class and IoU), `decisions`, `cosine`, `class-score cosine`.
    pub check: &'static str,
    pub value: f64,
    /// The threshold it must meet (`None`: shown for information, not judged).
    pub minimum: Option<f64>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.minimum.is_none_or(|m| self.value >= m)
    }
}

/// Every check a report's verdict under `t` rests on ([`Thresholds::met_by`] holds exactly
/// when all of them pass), and beside them what is shown but not judged: a CTC recogniser is
/// judged by its whole readings, its per-step top-1 and cosine only shown (a blank read a step
/// earlier changes them, not the word).
pub fn checks(r: &Report, t: &Thresholds) -> Vec<Check> {
    let mut v = Vec::new();
    for o in &r.outputs {
        // Judged unless the output is a CTC recogniser's, judged by its readings instead.
        let unless_ctc = |m: f64| o.sequence_agreement.is_none().then_some(m);
        let mut add = |check, value: Option<f64>, minimum| {
            if let Some(value) = value {
                v.push(Check {
                    output: o.name.clone(),
                    check,
                    value,
                    minimum,
                });
            }
        };
        add("top-1", o.top1_agreement, unless_ctc(t.min_top1));
        add("CTC reading", o.sequence_agreement, Some(t.min_top1));
        add("top-box class", o.top_box_agreement, Some(t.min_top1));
        add("boxes", o.box_agreement, Some(t.min_top1));
        add("decisions", o.decision_agreement, Some(t.min_top1));
        add("cosine", Some(o.cosine), unless_ctc(t.min_cosine));
        add("class-score cosine", o.score_cosine, Some(t.min_cosine));
    }
    v
}

/// What was measured of a candidate that ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// The file on disk against the original's.
    pub size_ratio: f64,
    /// What ONNX Runtime holds in memory against the original's: the graph it runs after its
    /// load-time optimizations (`fp16-weights`' casts folded to float, a `@load` form's float
    /// weights), measured; `None` when it could not be.
    pub memory_ratio: Option<f64>,
    /// Candidate over original, measured interleaved in the same run.
    pub latency_ratio: f64,
    pub latency_ms_before: f64,
    pub latency_ms_after: f64,
    /// 1: at batch 1; else the items of every timed run (inputs the models cannot take one
    /// item at a time).
    pub latency_items: usize,
    pub checks: Vec<Check>,
    /// Weights or nodes a sensitivity search kept in float.
    pub kept_in_float: usize,
    pub seconds: f64,
    /// The highest latency ratio it may have ([`Thresholds::max_latency`]).
    pub latency_limit: f64,
    /// The largest size ratio it may have ([`Thresholds::max_size`]; `None`: under 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<f64>,
}

impl Measured {
    /// From a candidate's report.
    pub fn new(r: &Report, t: &Thresholds, kept_in_float: usize, seconds: f64) -> Measured {
        Measured {
            size_ratio: r.size_ratio(),
            memory_ratio: None,
            latency_ratio: r.latency_ms_after / r.latency_ms_before.max(f64::MIN_POSITIVE),
            latency_ms_before: r.latency_ms_before,
            latency_ms_after: r.latency_ms_after,
            latency_items: r.latency_items,
            checks: checks(r, t),
            kept_in_float,
            seconds,
            latency_limit: t.max_latency,
            size_limit: t.max_size,
        }
    }

    /// What keeps it from being used, in words (empty: it passes).
    pub fn misses(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| {
                let m = c.minimum.filter(|_| !c.passed())?;
                Some(format!(
                    "{} {} {} < {}",
                    c.output,
                    c.check,
                    fmt_value(c.check, c.value),
                    fmt_value(c.check, m)
                ))
            })
            .collect();
        if self.latency_ratio > self.latency_limit {
            v.push(format!(
                "slower: {:.2}× the original's latency {} (more than {}×)",
                self.latency_ratio,
                self.latency_at(),
                self.latency_limit
            ));
        }
        if self.size_ratio >= 1.0 {
            v.push(format!("not smaller ({:.2}×)", self.size_ratio));
        } else if let Some(limit) = self.size_limit.filter(|&l| self.size_ratio > l) {
            v.push(format!(
                "larger: {:.2}× the original's size (more than {limit}×)",
                self.size_ratio
            ));
        }
        v
    }

    pub fn passed(&self) -> bool {
        self.misses().is_empty()
    }

    fn latency_at(&self) -> String {
        if self.latency_items == 1 {
            "at batch 1".into()
        } else {
            format!("over {} items at once", self.latency_items)
        }
    }
}

fn fmt_value(check: &str, v: f64) -> String {
    if check.ends_with("cosine") {
        format!("{v:.6}")
    } else {
        format!("{:.2} %", v * 100.0)
    }
}

/// What became of one candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Tried {
    /// Compressed and measured.
    Measured(Measured),
    /// Not run: it does not apply to this model, or it would not fit the time budget.
    Skipped { why: String },
    /// The compressor or ONNX Runtime failed on it.
    Failed { why: String },
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub strategy: String,
    #[serde(flatten)]
    pub tried: Tried,
}

impl Candidate {
    /// `passed`, `chosen`, `missed`, `skipped` or `failed` — and why, for all but `passed`.
    fn verdict(&self, chosen: bool) -> (&'static str, String) {
        match &self.tried {
            Tried::Measured(m) => match m.misses() {
                v if v.is_empty() && chosen => ("chosen", String::new()),
                v if v.is_empty() => ("passed", String::new()),
                v => ("missed", v.join("; ")),
            },
            Tried::Skipped { why } => ("skipped", why.clone()),
            Tried::Failed { why } => ("failed", why.clone()),
        }
    }
}

/// The one score an objective minimizes, then the tie-breaks (size: among the files that are
/// small enough and fast enough — see [`choose`] — the smallest, then the faster).
fn key(m: &Measured, o: Objective) -> [f64; 2] {
    match o {
        Objective::Size => [m.size_ratio, m.latency_ratio],
        Objective::Latency => [m.latency_ratio, m.size_ratio],
        Objective::Balanced => [m.size_ratio * m.latency_ratio, m.size_ratio],
    }
}

/// The candidates that pass, with their index.
fn passing(rows: &[Candidate]) -> impl Iterator<Item = (usize, &Measured)> {
    rows.iter().enumerate().filter_map(|(i, c)| match &c.tried {
        Tried::Measured(m) if m.passed() => Some((i, m)),
        _ => None,
    })
}

/// The smallest size ratio of the candidates that pass.
fn smallest(rows: &[Candidate]) -> Option<f64> {
    passing(rows).map(|(_, m)| m.size_ratio).reduce(f64::min)
}

/// The candidate `objective` picks among those that pass (`None`: none does); of equal
/// ones, the first tried. Under [`Objective::Size`], of those within [`SIZE_TOLERANCE`] of
/// the smallest file and within [`LATENCY_TOLERANCE`] of the fastest of those, the smallest.
pub fn choose(rows: &[Candidate], objective: Objective) -> Option<usize> {
    let small_enough = smallest(rows).map_or(0.0, |s| s * SIZE_TOLERANCE);
    let fast_enough = passing(rows)
        .filter(|(_, m)| m.size_ratio <= small_enough)
        .map(|(_, m)| m.latency_ratio)
        .reduce(f64::min)
        .map_or(0.0, |l| l * LATENCY_TOLERANCE);
    let mut best: Option<(usize, [f64; 2])> = None;
    for (i, m) in passing(rows) {
        if objective == Objective::Size
            && (m.size_ratio > small_enough || m.latency_ratio > fast_enough)
        {
            continue;
        }
        let k = key(m, objective);
        if best.is_none_or(|(_, b)| k < b) {
            best = Some((i, k));
        }
    }
    best.map(|(i, _)| i)
}

/// What `auto` tried and what it chose.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub objective: Objective,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates`.
    pub chosen: Option<usize>,
    /// Set when the evaluation inputs were random (no data given): the checks say the
    /// candidate agrees with the original on noise, not that it is accurate.
    pub accuracy_unverified: bool,
    pub seconds: f64,
    pub budget_seconds: f64,
}

impl Table {
    /// A table with its choice made.
    pub fn new(
        objective: Objective,
        candidates: Vec<Candidate>,
        accuracy_unverified: bool,
        seconds: f64,
        budget_seconds: f64,
    ) -> Table {
        let chosen = choose(&candidates, objective);
        Table {
            objective,
            candidates,
            chosen,
            accuracy_unverified,
            seconds,
            budget_seconds,
        }
    }

    /// The winner's strategy.
    pub fn chosen_strategy(&self) -> Option<&str> {
        self.chosen.map(|i| self.candidates[i].strategy.as_str())
    }

    /// What the latency limit asks, in words: "not slower", or "at most 0.8× the
    /// original's latency".
    fn latency_rule(&self) -> String {
        let limit = self
            .candidates
            .iter()
            .find_map(|c| match &c.tried {
                Tried::Measured(m) => Some(m.latency_limit),
                _ => None,
            })
            .unwrap_or(LATENCY_TOLERANCE);
        if limit >= 1.0 {
            "not slower".into()
        } else {
            format!("at most {limit}× the original's latency")
        }
    }

    /// What the size limit asks, in words: "smaller", or "at most 0.3× the original's size".
    fn size_rule(&self) -> String {
        let limit = self.candidates.iter().find_map(|c| match &c.tried {
            Tried::Measured(m) => m.size_limit,
            _ => None,
        });
        match limit {
            Some(l) if l < 1.0 => format!("at most {l}× the original's size"),
            _ => "smaller".into(),
        }
    }

    /// Why the winner won, or why nothing did.
    pub fn why(&self) -> String {
        let passing: Vec<&Measured> = self
            .candidates
            .iter()
            .filter_map(|c| match &c.tried {
                Tried::Measured(m) if m.passed() => Some(m),
                _ => None,
            })
            .collect();
        let won = self.chosen.and_then(|i| match &self.candidates[i].tried {
            Tried::Measured(m) => Some((&self.candidates[i], m)),
            _ => None,
        });
        let Some((c, m)) = won else {
            let missed: Vec<String> = self
                .candidates
                .iter()
                .map(|c| format!("{}: {}", c.strategy, c.verdict(false).1))
                .collect();
            return format!(
                "no candidate is {}, meets the thresholds and is {}: {}",
                self.size_rule(),
                self.latency_rule(),
                missed.join("; ")
            );
        };
        let what = match self.objective {
            Objective::Size => match smallest(&self.candidates) {
                Some(s) if s < m.size_ratio => format!(
                    "the fastest of the smallest ({:.2}×, within {:.0} % of the smallest, \
                     {s:.2}×, and {:.2}× latency)",
                    m.size_ratio,
                    (SIZE_TOLERANCE - 1.0) * 100.0,
                    m.latency_ratio
                ),
                _ => format!("the smallest ({:.2}×)", m.size_ratio),
            },
            Objective::Latency => format!("the fastest ({:.2}× latency)", m.latency_ratio),
            Objective::Balanced => format!(
                "the smallest size × latency ({:.2}× · {:.2}× = {:.3})",
                m.size_ratio,
                m.latency_ratio,
                m.size_ratio * m.latency_ratio
            ),
        };
        let of = match passing.len() {
            1 => "the only candidate that passes".to_string(),
            n => format!("of the {n} candidates that pass"),
        };
        let load = if at_load(&c.strategy).1 {
            let memory = m
                .memory_ratio
                .map_or_else(String::new, |r| format!(", {r:.2}× in memory"));
            "; the file is its weights-only form, which rxd dequantizes when it loads it (float \
             weights in memory, full speed)"
                .to_string()
                + &memory
        } else {
            String::new()
        };
        let rule = match self.latency_rule().as_str() {
            "not slower" => "not slower than it".to_string(),
            other => other.to_string(),
        };
        format!(
            "{} wins: {what}, {of} (meets the thresholds, smaller than the original, {rule} \
             {}): {:.2}× size, {:.2}× latency{load}",
            c.strategy,
            m.latency_at(),
            m.size_ratio,
            m.latency_ratio,
        )
    }
}

/// A candidate's checks grouped by output: `label: cosine 1.000000; probabilities: top-1
/// 100.00 %, cosine 0.999990`.
fn agreement(checks: &[Check]) -> String {
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    for c in checks {
        let v = format!("{} {}", c.check, fmt_value(c.check, c.value));
        match groups.last_mut() {
            Some((o, vs)) if *o == c.output => vs.push(v),
            _ => groups.push((&c.output, vec![v])),
        }
    }
    groups
        .iter()
        .map(|(o, vs)| format!("{o}: {}", vs.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Table {
    /// The table of what was tried (a line per candidate: size, latency, verdict, agreement
    /// per check; then why, when it did not pass), then the choice.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.accuracy_unverified {
            writeln!(
                f,
                "WARNING: accuracy unverified — no evaluation data, the candidates were judged \
                 on random inputs (agreement with the original on noise, not accuracy)"
            )?;
        }
        writeln!(
            f,
            "auto ({} objective), {:.1} s of a {:.0} s budget; size on disk, in memory (the \
             graph ONNX Runtime runs) and latency at batch 1 against the original's; @load: \
             served dequantized at load:",
            self.objective, self.seconds, self.budget_seconds
        )?;
        writeln!(
            f,
            "  {:<32} {:>6} {:>6} {:>8}  {:<8} agreement",
            "strategy", "disk", "memory", "latency", "verdict"
        )?;
        for (i, c) in self.candidates.iter().enumerate() {
            let (verdict, why) = c.verdict(self.chosen == Some(i));
            let (size, memory, latency, checks) = match &c.tried {
                Tried::Measured(m) => (
                    format!("{:.2}×", m.size_ratio),
                    m.memory_ratio
                        .map_or_else(|| "?".into(), |r| format!("{r:.2}×")),
                    format!("{:.2}×", m.latency_ratio),
                    agreement(&m.checks),
                ),
                _ => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            writeln!(
                f,
                "  {:<32} {size:>6} {memory:>6} {latency:>8}  {verdict:<8} {checks}",
                c.strategy
            )?;
            if !why.is_empty() {
                writeln!(f, "  {:<32}   └ {why}", "")?;
            }
        }
        writeln!(f, "{}", self.why())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(strategy: &str, size: f64, latency: f64, top1: f64) -> Candidate {
        Candidate {
            strategy: strategy.into(),
            tried: Tried::Measured(Measured {
                size_ratio: size,
                memory_ratio: Some(size),
                latency_ratio: latency,
                latency_ms_before: 1.0,
                latency_ms_after: latency,
                latency_items: 1,
                checks: vec![
                    Check {
                        output: "y".into(),
                        check: "top-1",
                        value: top1,
                        minimum: Some(0.99),
                    },
                    Check {
                        output: "y".into(),
                        check: "cosine",
                        value: 0.999,
                        minimum: Some(0.99),
                    },
                ],
                kept_in_float: 0,
                latency_limit: LATENCY_TOLERANCE,
                size_limit: None,
                seconds: 0.1,
            }),
        }
    }

    fn skipped(strategy: &str) -> Candidate {
        Candidate {
            strategy: strategy.into(),
            tried: Tried::Skipped {
                why: "would not fit the budget".into(),
            },
        }
    }

    /// Measured on digits/PP-OCR-like models: int8-weights small and slow as ONNX Runtime
    /// runs the file, as fast as the original dequantized at load; static small and fast,
    /// fp16-weights half and as fast, fp16 half and a little slower.
    fn table() -> Vec<Candidate> {
        vec![
            measured("fp16-weights", 0.50, 1.00, 1.0),
            measured("fp16", 0.50, 1.14, 1.0),
            measured("int8-weights", 0.27, 6.3, 1.0),
            measured("static-int8", 0.36, 0.80, 1.0),
            measured("int4", 0.20, 0.95, 0.90),
            skipped("dynamic-int8"),
            measured("int8-weights@load", 0.27, 1.01, 1.0),
        ]
    }

    #[test]
    fn each_objective_picks_among_the_candidates_that_pass() {
        let t = table();
        // int8-weights as the file runs is slower; int4 is smaller but misses top-1; the same
        // int8-weights dequantized at load is as small and not slower: size and balanced
        // (0.27 × 1.01 against static's 0.36 × 0.80) take it, latency takes static.
        assert_eq!(choose(&t, Objective::Size), Some(6));
        assert_eq!(choose(&t, Objective::Latency), Some(3));
        assert_eq!(choose(&t, Objective::Balanced), Some(6));
        // YOLOv8n-320 as measured: the @load file is 4 % smaller than static INT8's, which is
        // 2.4× faster: within SIZE_TOLERANCE, the size objective takes the faster.
        let yolo = vec![
            measured("int8-weights@load", 0.26, 0.99, 1.0),
            measured("static-int8", 0.27, 0.42, 1.0),
            measured("fp16", 0.50, 0.96, 1.0),
        ];
        for o in [Objective::Size, Objective::Latency, Objective::Balanced] {
            assert_eq!(choose(&yolo, o), Some(1), "{o}");
        }
        let why = Table::new(Objective::Size, yolo, false, 1.0, 300.0).why();
        assert!(
            why.starts_with(
                "static-int8 wins: the fastest of the smallest (0.27×, within 5 % of the \
                 smallest, 0.26×, and 0.42× latency)"
            ),
            "{why}"
        );
        // Equally small and equally fast (within the tolerances): the smaller, whichever
        // timing noise made a hair faster (digits: 0.28× at 0.993×, 0.29× at 0.990×).
        let digits = vec![
            measured("int8-weights@load", 0.29, 0.990, 1.0),
            measured("int8-weights+fp16-weights@load", 0.28, 0.993, 1.0),
        ];
        assert_eq!(choose(&digits, Objective::Size), Some(1));
        // Beyond it, the smaller wins however fast the other is.
        let t = vec![
            measured("int8-weights@load", 0.26, 0.99, 1.0),
            measured("static-int8", 0.28, 0.42, 1.0),
        ];
        assert_eq!(choose(&t, Objective::Size), Some(0));
        // Without the @load form, static-int8 wins every objective.
        let mut t = table();
        t.remove(6);
        assert_eq!(choose(&t, Objective::Size), Some(3));
        assert_eq!(choose(&t, Objective::Latency), Some(3));
        assert_eq!(choose(&t, Objective::Balanced), Some(3));
        // Without static-int8 either: size and balanced take fp16-weights.
        t.remove(3);
        assert_eq!(choose(&t, Objective::Size), Some(0));
        assert_eq!(choose(&t, Objective::Balanced), Some(0));
        // Size and latency trade: a smaller slower-but-within-tolerance one against a
        // bigger faster one.
        let t = vec![
            measured("a", 0.30, 1.04, 1.0),
            measured("b", 0.50, 0.70, 1.0),
            measured("c", 0.45, 0.90, 1.0),
        ];
        assert_eq!(choose(&t, Objective::Size), Some(0));
        assert_eq!(choose(&t, Objective::Latency), Some(1));
        // 0.312, 0.35, 0.405.
        assert_eq!(choose(&t, Objective::Balanced), Some(0));
        let t = vec![
            measured("a", 0.30, 1.04, 1.0),
            measured("b", 0.40, 0.50, 1.0),
        ];
        assert_eq!(choose(&t, Objective::Balanced), Some(1));
    }

    #[test]
    fn when_every_variant_is_slower_the_one_that_is_not_wins_or_nothing_does() {
        let mut t = vec![
            measured("int8-weights", 0.27, 6.3, 1.0),
            measured("fp16", 0.50, 1.14, 1.0),
            measured("fp16-weights", 0.50, 1.03, 1.0),
        ];
        for o in [Objective::Size, Objective::Latency, Objective::Balanced] {
            assert_eq!(choose(&t, o), Some(2), "{o}");
        }
        t[2] = measured("fp16-weights", 0.50, 1.06, 1.0);
        for o in [Objective::Size, Objective::Latency, Objective::Balanced] {
            assert_eq!(choose(&t, o), None, "{o}");
        }
        let table = Table::new(Objective::Size, t, false, 1.0, 300.0);
        let why = table.why();
        assert!(why.starts_with("no candidate"), "{why}");
        for s in [
            "int8-weights: slower: 6.30×",
            "fp16: slower: 1.14×",
            "fp16-weights: slower: 1.06×",
        ] {
            assert!(why.contains(s), "{s}: {why}");
        }
        let text = table.to_string();
        assert_eq!(text.matches(" missed ").count(), 3, "{text}");
        assert_eq!(text.matches("└ slower: ").count(), 3, "{text}");
    }

    #[test]
    fn a_latency_limit_below_one_asks_for_a_faster_model_or_refuses_naming_the_misses() {
        let limited = |strategy: &str, size: f64, latency: f64| {
            let mut c = measured(strategy, size, latency, 1.0);
            if let Tried::Measured(m) = &mut c.tried {
                m.latency_limit = 0.8;
            }
            c
        };
        let t = vec![
            limited("int8-weights@load", 0.26, 1.0),
            limited("static-int8", 0.27, 0.42),
            limited("fp16", 0.50, 0.97),
        ];
        let table = Table::new(Objective::Size, t.clone(), false, 1.0, 300.0);
        assert_eq!(table.chosen_strategy(), Some("static-int8"));
        assert!(
            table.why().contains("at most 0.8× the original's latency"),
            "{}",
            table.why()
        );
        // Without the static form nothing is fast enough: refused, each miss named.
        let table = Table::new(
            Objective::Size,
            vec![t[0].clone(), t[2].clone()],
            false,
            1.0,
            300.0,
        );
        assert_eq!(table.chosen_strategy(), None);
        let why = table.why();
        assert!(
            why.contains("is at most 0.8× the original's latency"),
            "{why}"
        );
        assert!(why.contains("int8-weights@load: slower: 1.00×"), "{why}");
        assert!(why.contains("(more than 0.8×)"), "{why}");
        assert!(why.contains("fp16: slower: 0.97×"), "{why}");
    }

    #[test]
    fn a_size_limit_refuses_what_is_larger_and_names_it() {
        let limited = |strategy: &str, size: f64, top1: f64| {
            let mut c = measured(strategy, size, 1.0, top1);
            if let Tried::Measured(m) = &mut c.tried {
                m.size_limit = Some(0.3);
            }
            c
        };
        let t = vec![
            limited("fp16", 0.50, 1.0),
            limited("int8-weights@load", 0.26, 0.985),
        ];
        let table = Table::new(Objective::Size, t, false, 1.0, 300.0);
        assert_eq!(table.chosen_strategy(), None);
        let why = table.why();
        assert!(
            why.contains("fp16: ")
                && why.contains("larger: 0.50× the original's size (more than 0.3×)"),
            "{why}"
        );
        assert!(why.contains("int8-weights@load: "), "{why}");
        assert!(why.contains("top-1 98.50 % < 99.00 %"), "{why}");
        assert!(
            why.starts_with("no candidate is at most 0.3× the original's size"),
            "{why}"
        );
    }

    #[test]
    fn accuracy_misses_skips_and_failures_are_named() {
        let mut t = table();
        t.push(Candidate {
            strategy: "static-int8".into(),
            tried: Tried::Failed {
                why: "the compressed model does not load".into(),
            },
        });
        t.remove(6);
        let table = Table::new(Objective::Size, t, true, 2.0, 300.0);
        assert_eq!(table.chosen_strategy(), Some("static-int8"));
        let text = table.to_string();
        assert!(text.starts_with("WARNING: accuracy unverified"), "{text}");
        assert!(text.contains("y top-1 90.00 % < 99.00 %"), "{text}");
        assert!(text.contains("skipped  -\n"), "{text}");
        assert!(text.contains("└ would not fit the budget"), "{text}");
        assert!(
            text.contains("└ the compressed model does not load"),
            "{text}"
        );
        assert!(text.contains("chosen"), "{text}");
        assert!(
            table.why().starts_with(
                "static-int8 wins: the smallest (0.36×), of the 2 candidates that pass"
            ),
            "{}",
            table.why()
        );
        // The @load form's win says what it costs on disk and in memory.
        let mut t = self::table();
        if let Tried::Measured(m) = &mut t[6].tried {
            m.memory_ratio = Some(1.0);
        }
        let won = Table::new(Objective::Size, t, false, 2.0, 300.0);
        let why = won.why();
        assert!(
            why.starts_with("int8-weights@load wins: the smallest (0.27×)")
                && why.contains("rxd dequantizes when it loads it")
                && why.ends_with("1.00× in memory"),
            "{why}"
        );
        let text = won.to_string();
        assert!(
            text.contains("int8-weights@load                 0.27×  1.00×    1.01×  chosen"),
            "{text}"
        );
        let (base, load) = at_load("int8-weights+fp16-weights@load");
        assert_eq!((base, load), ("int8-weights+fp16-weights", true));
        assert_eq!(at_load("int8-weights"), ("int8-weights", false));
        // A variant no smaller than the original does not pass, however accurate and fast.
        let t = vec![measured("none", 1.0, 0.9, 1.0)];
        assert_eq!(choose(&t, Objective::Latency), None);
    }

    #[test]
    fn checks_follow_the_thresholds_verdict() {
        use crate::report::compare_output;
        let x = [0.1, 0.9, 0.8, 0.2];
        let o = compare_output("y", &[2, 2], &x, &[0.9, 0.1, 0.8, 0.2]);
        let r = Report {
            size_before: 10,
            size_after: 5,
            latency_items: 1,
            latency_ms_before: 2.0,
            latency_ms_after: 1.0,
            outputs: vec![o],
        };
        let t = Thresholds::DEFAULT;
        let m = Measured::new(&r, &t, 0, 0.0);
        assert_eq!(m.latency_ratio, 0.5);
        assert_eq!(m.checks.len(), 2);
        assert_eq!(m.checks[0].value, 0.5);
        assert_eq!(m.passed(), t.met_by(&r));
        assert!(!m.passed());
        let same = compare_output("y", &[2, 2], &x, &x);
        let r = Report {
            outputs: vec![same],
            ..r
        };
        assert!(Measured::new(&r, &t, 0, 0.0).passed() && t.met_by(&r));
        // A recogniser is judged by its readings (margin spaces trimmed), not by its per-step
        // top-1 or cosine.
        let row = |k: usize| -> [f64; 3] {
            let mut r = [0.1; 3];
            r[k] = 0.8;
            r
        };
        let seq = |ks: [usize; 6]| -> Vec<f64> { ks.iter().flat_map(|&k| row(k)).collect() };
        let x = seq([1, 0, 2, 2, 2, 0]);
        let y = seq([0, 0, 0, 2, 2, 0]);
        let r = Report {
            outputs: vec![compare_output("softmax", &[2, 3, 3], &x, &y)],
            ..r
        };
        let m = Measured::new(&r, &t, 0, 0.0);
        let ctc = m.checks.iter().find(|c| c.check == "CTC reading").unwrap();
        assert_eq!((ctc.value, ctc.minimum), (0.5, Some(0.99)));
        assert!(!ctc.passed());
        assert_eq!(
            m.misses(),
            ["softmax CTC reading 50.00 % < 99.00 %"],
            "the per-step top-1 and cosine are shown, not judged"
        );
        assert_eq!(m.passed(), t.met_by(&r));
        for c in m.checks.iter().filter(|c| c.check != "CTC reading") {
            assert_eq!(c.minimum, None, "{c:?}");
        }
        // Readings that differ only by a space (the last class) at their ends agree; one in
        // the middle does not.
        let (s, b) = (2, 0);
        let x = seq([1, 1, b, 1, b, b]);
        let y = seq([s, 1, b, 1, b, s]);
        let z = seq([1, s, b, 1, b, b]);
        let r = Report {
            outputs: vec![compare_output(
                "softmax",
                &[3, 6, 3],
                &[x.clone(), x.clone(), x.clone()].concat(),
                &[x, y, z].concat(),
            )],
            ..r
        };
        assert_eq!(r.outputs[0].sequence_agreement, Some(2.0 / 3.0));
        assert_eq!(
            "balanced".parse::<Objective>().unwrap(),
            Objective::Balanced
        );
        assert!("fast".parse::<Objective>().is_err());
        assert!(candidates(true).contains(&"static-int8"));
        assert!(candidates(false).contains(&"int8-weights@load"));
        assert!(!candidates(false).contains(&"static-int8"));
    }
}
