//! One compression job, as both faces run it (`rxd compress` on a file, `rxctl model compress`
//! in the daemon): a [`Plan`] (what to do), calibration and evaluation inputs, [`Thresholds`]
//! → [`Compressed`] (the new bytes, what was done, the accuracy report, whether it passed),
//! with `Display` for people and `Serialize` for programs. The defaults live here and
//! nowhere else. Must not: write files or decide what a refusal means to its caller (not
//! written, not published) — the faces do.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use ort::environment::Environment;
use serde::Serialize;

use crate::auto::{Candidate, Measured, Objective, Table, Tried};
use crate::budget::Budget;
use crate::report::{Input, Report};
use crate::static_int8::{Calibration, Static};
use crate::{Error, Outcome, Result, Strategy};

/// The strategy a job runs when none is named.
pub const DEFAULT_STRATEGY: &str = "int8-weights";
/// How long a sensitivity search may take unless told otherwise.
pub const DEFAULT_SEARCH_BUDGET: Duration = Duration::from_secs(300);
/// Random evaluation inputs drawn (batch size) to check a model.toml `compress` strategy.
pub const RANDOM_CHECK_BATCH: i64 = 32;

/// The accuracy a compressed model must keep against its original to be used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Lowest top-1 agreement of a classifier-like output.
    pub min_top1: f64,
    /// Lowest cosine similarity of any output.
    pub min_cosine: f64,
    /// `auto`: the highest batch-1 latency a candidate may have, as a ratio of the
    /// original's (default [`crate::auto::LATENCY_TOLERANCE`]: not slower, timing noise
    /// allowed; 0.8 asks for a model at least 20 % faster).
    pub max_latency: f64,
    /// `auto`: the largest file a candidate may write, as a ratio of the original's (`None`:
    /// smaller than the original).
    pub max_size: Option<f64>,
}

impl Thresholds {
    /// "Users will not notice": 99 % of top-1 answers, cosine 0.99.
    pub const DEFAULT: Thresholds = Thresholds {
        min_top1: 0.99,
        min_cosine: 0.99,
        max_latency: crate::auto::LATENCY_TOLERANCE,
        max_size: None,
    };

    /// Whether `r` meets both thresholds.
    pub fn met_by(&self, r: &Report) -> bool {
        r.min_top1() >= self.min_top1 && r.min_cosine() >= self.min_cosine
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::DEFAULT
    }
}

/// What a job does to the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Graph rewrites: `int8-weights`, `fp16`, `prune:S`, … combined with `+`.
    Rewrite(Strategy),
    /// Activations and weights in INT8, ranges from the calibration inputs.
    StaticInt8(Calibration),
    /// No compression: an already compressed model (another tool's) judged against the
    /// original with the same report.
    Given(Vec<u8>),
    /// Try the candidate strategies ([`crate::auto::candidates`]), judge each against the
    /// original, keep the one `Objective` prefers among those that pass.
    Auto(Objective, Calibration),
}

impl Plan {
    /// The plan a `--strategy` names (`static-int8` calibrates with `method`; `auto` and
    /// `auto:OBJECTIVE` search, static-int8 candidates calibrating with `method`).
    pub fn parse(strategy: &str, method: Calibration) -> Result<Plan> {
        if strategy == "static-int8" {
            return Ok(Plan::StaticInt8(method));
        }
        if strategy == "auto" {
            return Ok(Plan::Auto(Objective::default(), method));
        }
        if let Some(o) = strategy.strip_prefix("auto:") {
            return Ok(Plan::Auto(o.parse()?, method));
        }
        match strategy.parse() {
            Ok(s) => Ok(Plan::Rewrite(s)),
            Err(Error::Usage(m)) => Err(Error::Usage(format!("{m}, static-int8 or auto"))),
            Err(e) => Err(e),
        }
    }
}

/// A compression to run: what, on which inputs, judged how.
#[derive(Debug, Clone)]
pub struct Job {
    pub plan: Plan,
    /// Calibration inputs (static-int8), one tensor per model input.
    pub calibration: Vec<Input>,
    /// Evaluation inputs, one tensor per model input; empty: no accuracy report.
    pub eval: Vec<Input>,
    pub thresholds: Thresholds,
    /// With `int8-weights`: when the thresholds are missed, keep the most sensitive weights in
    /// float until they hold (static-int8 always searches when it has evaluation inputs).
    pub search: bool,
    /// How long a search may take ([`DEFAULT_SEARCH_BUDGET`] from [`Job::new`]); for
    /// [`Plan::Auto`], all candidates together.
    pub search_budget: Duration,
    /// The evaluation inputs are random (the caller had no data): reports measure agreement
    /// with the original, not accuracy, and [`Plan::Auto`]'s table says so.
    pub eval_is_random: bool,
    /// The result will be served dequantized at load when it is a weights-only form (true
    /// from [`Job::new`]); false: [`Plan::Auto`] does not try the `@load` candidates (a model
    /// whose model.toml sets `dequantize-at-load = false`).
    pub at_load: bool,
}

impl Job {
    /// A job, checked for what can be checked without the model.
    pub fn new(
        plan: Plan,
        calibration: Vec<Input>,
        eval: Vec<Input>,
        thresholds: Thresholds,
        search: bool,
    ) -> Result<Job> {
        if matches!(plan, Plan::StaticInt8(_)) && calibration.is_empty() {
            return Err(Error::Usage(
                "static-int8 needs calibration inputs (NAME=FILE.npy, one per model input)".into(),
            ));
        }
        Ok(Job {
            plan,
            calibration,
            eval,
            thresholds,
            search,
            search_budget: DEFAULT_SEARCH_BUDGET,
            eval_is_random: false,
            at_load: true,
        })
    }

    /// Whether [`Job::run`] needs ONNX Runtime (to calibrate or to evaluate).
    pub fn needs_runtime(&self) -> bool {
        matches!(self.plan, Plan::StaticInt8(_) | Plan::Auto(..)) || !self.eval.is_empty()
    }

    /// Compresses `model` and, with evaluation inputs, judges the result against it. `env`
    /// must be given when [`Job::needs_runtime`]. A result under the thresholds is `Ok` with
    /// [`Compressed::passed`] false; `Err` when nothing could be judged.
    pub fn run(&self, env: Option<&Environment>, model: &[u8]) -> Result<Compressed> {
        self.run_with(env, model, &|_| {})
    }

    /// [`Job::run`], a search's progress told to `progress` as it goes.
    pub fn run_with(
        &self,
        env: Option<&Environment>,
        model: &[u8],
        progress: &dyn Fn(&str),
    ) -> Result<Compressed> {
        let names = model_inputs(model)?;
        check_names(
            "calibration input",
            self.calibration.iter().map(|i| &i.name),
            &names,
        )?;
        check_names(
            "evaluation input",
            self.eval.iter().map(|i| &i.name),
            &names,
        )?;
        if let Plan::Auto(objective, method) = self.plan {
            let env = env.ok_or_else(|| {
                Error::Runtime("this job needs ONNX Runtime, and none was given".into())
            })?;
            return self.run_auto(env, model, objective, method, progress);
        }
        let budget = Budget::new(self.search_budget, progress);
        self.run_plan(&self.plan, env, model, &budget)
    }

    /// [`Plan::Auto`]: every candidate run as its own plan on the same inputs, all within
    /// the one search budget (a candidate that would not fit what is left is skipped, and
    /// says so), the winner's result returned with the table. Nothing passes: `Ok` with
    /// [`Compressed::passed`] false, the table saying what each candidate missed.
    fn run_auto(
        &self,
        env: &Environment,
        model: &[u8],
        objective: Objective,
        method: Calibration,
        progress: &dyn Fn(&str),
    ) -> Result<Compressed> {
        if self.eval.is_empty() {
            return Err(Error::Usage(
                "auto judges every candidate against the original on evaluation inputs \
                 (--eval NAME=FILE.npy), and none were given: what it picked would be of \
                 unverified accuracy; give --eval, or name a strategy"
                    .into(),
            ));
        }
        let start = Instant::now();
        let say = |m: &str| {
            progress(&format!(
                "[{:.1} s] auto: {m}",
                start.elapsed().as_secs_f64()
            ))
        };
        if self.eval_is_random {
            say(
                "WARNING: no evaluation data; candidates are judged on random inputs, so \
                 their accuracy is unverified",
            );
        }
        let mut rows = Vec::new();
        let mut kept: Vec<Option<Compressed>> = Vec::new();
        let mut slowest = Duration::ZERO;
        // What ONNX Runtime holds of the original: the memory ratios' denominator.
        let memory_before = crate::report::optimized(env, model).map(|b| b.len());
        let tried = crate::auto::candidates(!self.calibration.is_empty())
            .into_iter()
            .filter(|c| self.at_load || !crate::auto::at_load(c).1);
        for strategy in tried {
            let (base, at_load) = crate::auto::at_load(strategy);
            let plan = Plan::parse(base, method)?;
            let left = self.search_budget.saturating_sub(start.elapsed());
            let (tried, result) = if left.is_zero() || left < slowest {
                let why = format!(
                    "would not fit the time budget ({:.1} s of {:.0} s left, the slowest \
                     candidate so far took {:.1} s)",
                    left.as_secs_f64(),
                    self.search_budget.as_secs_f64(),
                    slowest.as_secs_f64()
                );
                (Tried::Skipped { why }, None)
            } else {
                say(&format!("trying {strategy}"));
                let t = Instant::now();
                let budget = Budget::new(left, progress);
                let run = self
                    .run_plan(&plan, Some(env), model, &budget)
                    .and_then(|c| self.served(env, model, c, at_load));
                slowest = slowest.max(t.elapsed());
                let out_of_time = start.elapsed() >= self.search_budget;
                let memory = |served: &[u8]| {
                    let before = *memory_before.as_ref().ok()?;
                    let after = crate::report::optimized(env, served).ok()?.len();
                    Some(after as f64 / before.max(1) as f64)
                };
                self.judge(run, t.elapsed(), out_of_time, memory)
            };
            if let Tried::Measured(m) = &tried {
                let misses = m.misses();
                say(&format!(
                    "{strategy}: {:.2}× size, {:.2}× latency: {}",
                    m.size_ratio,
                    m.latency_ratio,
                    if misses.is_empty() {
                        "passes".to_string()
                    } else {
                        misses.join("; ")
                    }
                ));
            }
            rows.push(Candidate {
                strategy: strategy.to_string(),
                tried,
            });
            kept.push(result);
        }
        let table = Table::new(
            objective,
            rows,
            self.eval_is_random,
            start.elapsed().as_secs_f64(),
            self.search_budget.as_secs_f64(),
        );
        say(&table.why());
        let mut done = table
            .chosen
            .and_then(|i| kept[i].take())
            .unwrap_or_else(|| Compressed::nothing(&self.plan, model, self.thresholds));
        done.auto = Some(table);
        Ok(done)
    }

    /// An auto candidate as it would be served, with the bytes the session is made from:
    /// `c` itself, or (`at_load`) the float model its weights-only file stands for, judged
    /// and timed as that model against the original — its size is still the file's.
    fn served(
        &self,
        env: &Environment,
        model: &[u8],
        mut c: Compressed,
        at_load: bool,
    ) -> Result<(Compressed, Vec<u8>)> {
        if !at_load {
            let bytes = c.bytes.clone();
            return Ok((c, bytes));
        }
        let (full, d) = crate::dequant::dequantize_bytes(&c.bytes)?;
        let Some(full) = full else {
            return Err(Error::NothingChanged(format!(
                "nothing to dequantize at load: {d}"
            )));
        };
        let mut r = crate::report::compare(env, model, &full, &self.eval)?;
        r.size_after = c.size_after();
        c.report = Some(r);
        Ok((c, full))
    }

    /// One auto candidate's run as a row of the table, and its result when it may win (only
    /// those keep their bytes). A search stopped by the budget is a skip; a strategy that
    /// finds nothing to change does not apply. `memory` measures the served bytes.
    fn judge(
        &self,
        run: Result<(Compressed, Vec<u8>)>,
        took: Duration,
        out_of_time: bool,
        memory: impl Fn(&[u8]) -> Option<f64>,
    ) -> (Tried, Option<Compressed>) {
        match run {
            Ok((c, served)) => {
                let Some(r) = &c.report else {
                    let why = "no accuracy report".to_string();
                    return (Tried::Failed { why }, None);
                };
                let mut m = Measured::new(r, &self.thresholds, c.kept.len(), took.as_secs_f64());
                m.memory_ratio = memory(&served);
                let keep = m.passed().then_some(c);
                (Tried::Measured(m), keep)
            }
            Err(Error::NothingChanged(m)) => {
                let why = format!("does not apply: {m}");
                (Tried::Skipped { why }, None)
            }
            Err(Error::ThresholdsUnmet(why)) if out_of_time => (Tried::Skipped { why }, None),
            Err(e) => (Tried::Failed { why: e.to_string() }, None),
        }
    }

    /// `plan` (not [`Plan::Auto`]) on `model`, a search within `budget`.
    fn run_plan(
        &self,
        plan: &Plan,
        env: Option<&Environment>,
        model: &[u8],
        budget: &crate::budget::Budget,
    ) -> Result<Compressed> {
        let env = || {
            env.ok_or_else(|| {
                Error::Runtime("this job needs ONNX Runtime, and none was given".into())
            })
        };
        let mut done = Compressed::nothing(plan, model, self.thresholds);
        match plan {
            Plan::StaticInt8(method) => {
                // With evaluation inputs the sensitivity search runs when the thresholds are
                // missed: a static model that misses them is of no use, and which nodes to
                // keep in float is what a user would otherwise find by hand.
                if self.eval.is_empty() {
                    let (b, st) = crate::static_int8::quantize_with(
                        env()?,
                        model,
                        &self.calibration,
                        *method,
                    )?;
                    done.bytes = b;
                    done.did = Did::Static(st);
                } else {
                    let found = crate::static_int8::search_within(
                        env()?,
                        model,
                        &self.calibration,
                        *method,
                        &self.eval,
                        (self.thresholds.min_top1, self.thresholds.min_cosine),
                        budget,
                    )?;
                    done.bytes = found.bytes;
                    done.did = Did::Static(found.stat);
                    done.kept = found.kept;
                    done.report = Some(found.report);
                }
                if let Did::Static(st) = &done.did
                    && st.weights == 0
                    && st.activations.is_empty()
                {
                    return Err(Error::NothingChanged(
                        "static-int8 changed nothing: no weight or activation of this model \
                         can be quantized (subgraphs are not planned)"
                            .into(),
                    ));
                }
                return Ok(done);
            }
            Plan::Given(b) => done.bytes = b.clone(),
            Plan::Auto(..) => {
                return Err(Error::Usage("auto cannot be a candidate of itself".into()));
            }
            Plan::Rewrite(strategy) => {
                let (b, outcome) = crate::compress(model, *strategy)?;
                if *strategy != Strategy::NONE && outcome.weights_changed() == 0 {
                    return Err(Error::NothingChanged(nothing_changed(strategy, &outcome)));
                }
                done.bytes = b;
                done.did = Did::Rewrite(outcome);
            }
        }
        if self.eval.is_empty() {
            return Ok(done);
        }
        let report = crate::report::compare(env()?, model, &done.bytes, &self.eval)?;
        let weights_only = matches!(plan, Plan::Rewrite(s) if *s == Strategy::INT8_WEIGHTS);
        if self.search && weights_only && !self.thresholds.met_by(&report) {
            let found = crate::search::search_within(
                env()?,
                model,
                &self.eval,
                self.thresholds.min_top1,
                self.thresholds.min_cosine,
                budget,
            )?;
            done.bytes = found.bytes;
            done.kept = found.kept;
            done.first = Some((report, found.converted));
            done.report = Some(found.report);
        } else {
            done.report = Some(report);
        }
        Ok(done)
    }
}

/// Why `strategy` changed nothing, in words: what it looked for, and the weights it found
/// but kept (with why).
fn nothing_changed(strategy: &Strategy, o: &Outcome) -> String {
    let mut looked = Vec::new();
    if strategy.int8_weights || strategy.prune.is_some() {
        looked.push("MatMul/Gemm/Conv/recurrent weights");
    }
    if strategy.dynamic_int8 || strategy.int4 {
        looked.push("MatMul weights");
    }
    if strategy.fp16 || strategy.fp16_compute {
        looked.push("float tensors of 64 or more values");
    }
    looked.dedup();
    let mut text = format!(
        "{strategy} changed nothing in this model: it found no {} to convert, in the graph or \
         its subgraphs",
        looked.join(" or ")
    );
    let kept: Vec<String> = o
        .quant
        .kept
        .iter()
        .chain(&o.dynamic.kept)
        .map(|(n, why)| format!("{n} ({why})"))
        .collect();
    if !kept.is_empty() {
        text.push_str(&format!("; kept as they were: {}", kept.join(", ")));
    }
    text
}

/// The names of a model's inputs (its graph inputs that are not initializers).
pub fn model_inputs(model: &[u8]) -> Result<Vec<String>> {
    crate::onnx::Model::parse(model)
        .and_then(|m| m.input_names())
        .map_err(Error::NotOnnx)
}

/// Checks that the `what` inputs name every input of the model and nothing else (ONNX
/// Runtime's own message for a wrong name says neither which nor what exists). No inputs at
/// all is fine: the job then does without.
pub fn check_names<'a>(
    what: &str,
    given: impl IntoIterator<Item = &'a String>,
    model: &[String],
) -> Result<()> {
    let given: Vec<&String> = given.into_iter().collect();
    if given.is_empty() {
        return Ok(());
    }
    let list = model.join(", ");
    for g in &given {
        if !model.contains(g) {
            return Err(Error::Usage(format!(
                "{what} '{g}': the model has no input of that name (its inputs: {list})"
            )));
        }
    }
    for m in model {
        if !given.contains(&m) {
            return Err(Error::Usage(format!(
                "{what}: no '{m}' given (the model's inputs: {list})"
            )));
        }
    }
    Ok(())
}

/// What the compressor did to the graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Did {
    /// Nothing (a [`Plan::Given`] model).
    Nothing,
    Rewrite(Outcome),
    Static(Static),
}

/// A finished job: the compressed bytes and how they compare with the original.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub bytes: Vec<u8>,
    pub plan: Plan,
    pub size_before: u64,
    pub did: Did,
    /// Weights (int8-weights) or nodes (static-int8) the search kept in float, in the order
    /// chosen, each with what it cost in INT8.
    pub kept: Vec<(String, f64)>,
    /// When a weight search ran: the report of every weight in INT8 (which missed the
    /// thresholds), and how many weights are INT8 after the search.
    pub first: Option<(Report, usize)>,
    /// Original against compressed on the evaluation inputs (none given: `None`).
    pub report: Option<Report>,
    pub thresholds: Thresholds,
    /// [`Plan::Auto`]: what was tried and what won (this result is the winner's; without a
    /// winner it holds no model).
    pub auto: Option<Table>,
}

impl Compressed {
    /// `plan` on `model` before it has done anything: no bytes, no report.
    fn nothing(plan: &Plan, model: &[u8], thresholds: Thresholds) -> Compressed {
        Compressed {
            bytes: Vec::new(),
            plan: plan.clone(),
            size_before: model.len() as u64,
            did: Did::Nothing,
            kept: Vec::new(),
            first: None,
            report: None,
            thresholds,
            auto: None,
        }
    }

    pub fn size_after(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn size_ratio(&self) -> f64 {
        self.size_after() as f64 / self.size_before.max(1) as f64
    }

    /// Whether the result may be used: its report meets the thresholds, or nothing was
    /// evaluated; with [`Plan::Auto`], a candidate won.
    pub fn passed(&self) -> bool {
        self.auto.as_ref().is_none_or(|t| t.chosen.is_some())
            && self
                .report
                .as_ref()
                .is_none_or(|r| self.thresholds.met_by(r))
    }

    /// Why the result was refused, in words (`None` when it passed).
    pub fn shortfall(&self) -> Option<String> {
        if let Some(t) = self.auto.as_ref().filter(|t| t.chosen.is_none()) {
            return Some(t.why());
        }
        let r = self.report.as_ref().filter(|_| !self.passed())?;
        Some(format!(
            "top-1 agreement {:.4} (minimum {}), cosine {:.6} (minimum {})",
            r.min_top1(),
            self.thresholds.min_top1,
            r.min_cosine(),
            self.thresholds.min_cosine
        ))
    }
}

/// `{n} {op}, …` or `none`.
fn by_op(m: &BTreeMap<String, usize>) -> String {
    let v: Vec<String> = m.iter().map(|(op, n)| format!("{n} {op}")).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

impl fmt::Display for Static {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "static INT8: {} activations calibrated, {} weights, {} biases",
            self.activations.len(),
            self.weights,
            self.biases
        )?;
        writeln!(f, "  in INT8: {}", by_op(&self.quantized))?;
        writeln!(
            f,
            "  folded into scales and ranges: {}",
            by_op(&self.folded)
        )?;
        writeln!(f, "  moved as INT8: {}", by_op(&self.moved))?;
        writeln!(f, "  left in float: {}", by_op(&self.float))
    }
}

/// What a rewrite did, one line per step that did something (`int8_weights`: always).
fn write_outcome(f: &mut fmt::Formatter<'_>, o: &Outcome, s: &Strategy) -> fmt::Result {
    if o.batchnorms_folded > 0 {
        writeln!(
            f,
            "{} BatchNormalization nodes folded into their Conv",
            o.batchnorms_folded
        )?;
    }
    if let Some(p) = &o.pruned {
        writeln!(
            f,
            "pruned {} weight tensors: {} of {} entries are exact zeros ({:.1} %)",
            p.tensors,
            p.zeros,
            p.elements,
            p.sparsity() * 100.0
        )?;
    }
    if !o.dynamic.converted.is_empty() {
        writeln!(
            f,
            "{} MatMul weights converted to dynamic INT8 (MatMulInteger)",
            o.dynamic.converted.len()
        )?;
    }
    match &o.fp16_compute {
        Some(h) => {
            writeln!(
                f,
                "float16 arithmetic: {} tensors converted, {} values clamped to ±65504, \
                 float32 inputs and outputs kept by casts",
                h.tensors, h.clamped
            )?;
            if let Some((from, to)) = h.opset_upgraded {
                writeln!(f, "  opset {from} → {to} (Clip's float16 kernels)")?;
            }
            for n in &h.kept_float {
                writeln!(f, "  kept in float32 (no float16 form): {n}")?;
            }
        }
        None if o.fp16_tensors > 0 => {
            writeln!(f, "{} float tensors stored as float16", o.fp16_tensors)?;
        }
        None => {}
    }
    if s.int8_weights {
        writeln!(
            f,
            "{} weights converted to INT8, {} kept as they were",
            o.quant.converted.len(),
            o.quant.kept.len()
        )?;
        for (name, why) in &o.quant.kept {
            writeln!(f, "  kept {name}: {why}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Compressed {
    /// The auto table (when there is one), what was done, what the search kept in float,
    /// and the report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = &self.auto {
            write!(f, "{t}")?;
            if let Some(s) = t.chosen_strategy() {
                writeln!(f, "chosen: {s}")?;
            }
        }
        match (&self.did, &self.plan) {
            (Did::Rewrite(o), Plan::Rewrite(s)) => write_outcome(f, o, s)?,
            (Did::Static(st), _) => {
                write!(f, "{st}")?;
                for (node, e) in &self.kept {
                    writeln!(
                        f,
                        "  kept {node} in float (its quantization added {e:.2e} to 1 − cosine)"
                    )?;
                }
            }
            _ => {}
        }
        if let Some((first, converted)) = &self.first {
            write!(f, "INT8 everywhere: {first}")?;
            for (w, s) in &self.kept {
                writeln!(f, "  kept {w} in float (alone it costs {s:.3e})")?;
            }
            write!(f, "with {converted} weights in INT8: ")?;
        }
        if let Some(r) = &self.report {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One output in JSON.
#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    max_abs_error: f64,
    mean_abs_error: f64,
    relative_error: f64,
    cosine: f64,
    top1_agreement: Option<f64>,
    sequence_agreement: Option<f64>,
    top_box_agreement: Option<f64>,
    score_cosine: Option<f64>,
    box_agreement: Option<f64>,
    detections: Option<[usize; 2]>,
    decision_agreement: Option<f64>,
}

/// A report in JSON, with its verdict under `thresholds`.
#[derive(Serialize)]
struct ReportJson<'a> {
    size_before: u64,
    size_after: u64,
    size_ratio: f64,
    latency_items: usize,
    latency_ms_before: f64,
    latency_ms_after: f64,
    min_top1: f64,
    min_cosine: f64,
    passed: bool,
    outputs: Vec<OutputJson<'a>>,
}

impl<'a> ReportJson<'a> {
    fn new(r: &'a Report, t: &Thresholds) -> Self {
        ReportJson {
            size_before: r.size_before,
            size_after: r.size_after,
            size_ratio: r.size_ratio(),
            latency_items: r.latency_items,
            latency_ms_before: r.latency_ms_before,
            latency_ms_after: r.latency_ms_after,
            min_top1: r.min_top1(),
            min_cosine: r.min_cosine(),
            passed: t.met_by(r),
            outputs: r
                .outputs
                .iter()
                .map(|o| OutputJson {
                    name: &o.name,
                    max_abs_error: o.max_abs_error,
                    mean_abs_error: o.mean_abs_error,
                    relative_error: o.relative_error,
                    cosine: o.cosine,
                    top1_agreement: o.top1_agreement,
                    sequence_agreement: o.sequence_agreement,
                    top_box_agreement: o.top_box_agreement,
                    score_cosine: o.score_cosine,
                    box_agreement: o.box_agreement,
                    detections: o.detections,
                    decision_agreement: o.decision_agreement,
                })
                .collect(),
        }
    }
}

impl Serialize for Compressed {
    /// `size_before`, `size_after`, `size_ratio`, `kept_in_float` (names), `report` (or
    /// null), `passed`; with auto, `auto`: the table (`objective`, `candidates`, `chosen`,
    /// `chosen_strategy`, `why`, …).
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct AutoJson<'a> {
            #[serde(flatten)]
            table: &'a Table,
            chosen_strategy: Option<&'a str>,
            why: String,
        }
        #[derive(Serialize)]
        struct Doc<'a> {
            size_before: u64,
            size_after: u64,
            size_ratio: f64,
            kept_in_float: Vec<&'a str>,
            report: Option<ReportJson<'a>>,
            passed: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            auto: Option<AutoJson<'a>>,
        }
        Doc {
            size_before: self.size_before,
            size_after: self.size_after(),
            size_ratio: self.size_ratio(),
            kept_in_float: self.kept.iter().map(|(n, _)| n.as_str()).collect(),
            report: self
                .report
                .as_ref()
                .map(|r| ReportJson::new(r, &self.thresholds)),
            passed: self.passed(),
            auto: self.auto.as_ref().map(|t| AutoJson {
                table: t,
                chosen_strategy: t.chosen_strategy(),
                why: t.why(),
            }),
        }
        .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_a_static_job_needs_calibration() {
        let p = Plan::parse("static-int8", Calibration::MinMax).unwrap();
        assert_eq!(p, Plan::StaticInt8(Calibration::MinMax));
        assert_eq!(
            Plan::parse("prune:0.5+int8-weights", Calibration::DEFAULT).unwrap(),
            Plan::Rewrite("prune:0.5+int8-weights".parse().unwrap())
        );
        assert_eq!(
            Plan::parse("auto", Calibration::MinMax).unwrap(),
            Plan::Auto(Objective::Size, Calibration::MinMax)
        );
        assert_eq!(
            Plan::parse("auto:latency", Calibration::DEFAULT).unwrap(),
            Plan::Auto(Objective::Latency, Calibration::DEFAULT)
        );
        assert!(Plan::parse("auto:fast", Calibration::DEFAULT).is_err());
        let e = Plan::parse("int9", Calibration::DEFAULT).unwrap_err();
        assert!(
            matches!(&e, Error::Usage(m) if m.ends_with("static-int8 or auto")),
            "{e}"
        );
        let e = Job::new(p, Vec::new(), Vec::new(), Thresholds::DEFAULT, false).unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e}");
        assert_eq!(
            Calibration::DEFAULT
                .to_string()
                .parse::<Calibration>()
                .unwrap(),
            Calibration::DEFAULT
        );
    }

    #[test]
    fn input_names_must_match_the_model_exactly() {
        let model = ["x".to_string(), "state".to_string()];
        let given = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_names("--eval", &given(&[]), &model).is_ok());
        assert!(check_names("--eval", &given(&["state", "x"]), &model).is_ok());
        let e = check_names("--eval", &given(&["x"]), &model).unwrap_err();
        assert!(e.to_string().contains("no 'state'"), "{e}");
        let e = check_names("--eval", &given(&["x", "y"]), &model).unwrap_err();
        assert!(e.to_string().contains("'y'"), "{e}");
    }
}
