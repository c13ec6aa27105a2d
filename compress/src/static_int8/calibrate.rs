//! Calibration: the float values of chosen tensors on the calibration inputs (the model run
//! with them added as graph outputs), and the range each one gets.

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Message, Value};
use crate::report::{Data, Input};
use crate::{Error, Result};

/// Chosen float tensors of a model, read on its inputs a few items at a time: the model with
/// those tensors added as graph outputs, one session, the inputs cut along their first
/// dimension when every input has it and the model takes any size there. What one run holds is
/// one chunk's tensors, whatever the size of the data set.
pub(crate) struct Probe<'a> {
    session: ort::session::Session,
    /// Names the run gives (the others are graph inputs, read from the inputs).
    from_run: Vec<String>,
    from_inputs: Vec<String>,
    inputs: &'a [Input],
    /// Items per run and how many items there are; `None` when the inputs do not share a
    /// first dimension the model leaves free (then one run takes them all).
    cut: Option<(usize, usize)>,
}

/// Items per run when the inputs can be cut.
pub const CHUNK_ITEMS: usize = 1;

impl<'a> Probe<'a> {
    pub(crate) fn new(
        env: &Environment,
        model: &Model,
        names: &BTreeSet<String>,
        inputs: &'a [Input],
    ) -> Result<Probe<'a>> {
        // A graph input is read from `inputs`: asked for as an output, ONNX Runtime hands
        // back the input's own buffer, which is freed with the inputs when the run returns.
        let from_inputs: Vec<String> = inputs
            .iter()
            .filter(|i| names.contains(&i.name) && matches!(i.data, Data::F32(_)))
            .map(|i| i.name.clone())
            .collect();
        let mut m = model.clone();
        let existing = m.output_names()?;
        let from_run: Vec<String> = names
            .iter()
            .filter(|n| !from_inputs.contains(*n))
            .cloned()
            .collect();
        for n in from_run.iter().filter(|n| !existing.contains(*n)) {
            // ValueInfoProto { name, type: TypeProto { tensor_type: { elem_type: FLOAT } } }
            let mut tt = Message::default();
            tt.push(1, Value::Varint(tensor::FLOAT));
            let mut ty = Message::default();
            ty.push_message(1, &tt);
            let mut vi = Message::default();
            vi.push_str(onnx::value_info::NAME, n);
            vi.push_message(2, &ty);
            m.graph.push_message(graph::OUTPUT, &vi);
        }
        let session = crate::report::session(env, &m.encode())?;
        let cut = crate::report::batch_items(&session, inputs).map(|n| (CHUNK_ITEMS, n));
        Ok(Probe {
            session,
            from_run,
            from_inputs,
            inputs,
            cut,
        })
    }

    /// How many runs [`Probe::values`] takes.
    pub(crate) fn chunks(&self) -> usize {
        self.cut.map_or(1, |(chunk, items)| items.div_ceil(chunk))
    }

    /// The tensors' values on chunk `k`: names the run cannot give as float are absent.
    pub(crate) fn values(&mut self, k: usize) -> Result<BTreeMap<String, Vec<f32>>> {
        let part: Vec<Input> = match self.cut {
            None => self.inputs.to_vec(),
            Some((chunk, items)) => {
                let (from, to) = (k * chunk, ((k + 1) * chunk).min(items));
                self.inputs
                    .iter()
                    .map(|i| crate::report::items_of(i, from, to))
                    .collect()
            }
        };
        let mut values = BTreeMap::new();
        for i in &part {
            if let (true, Data::F32(d)) = (self.from_inputs.contains(&i.name), &i.data) {
                values.insert(i.name.clone(), d.clone());
            }
        }
        let outs = self.session.run(crate::report::values(&part)?)?;
        for n in &self.from_run {
            if let Ok((_, data)) = outs[n.as_str()].try_extract_tensor::<f32>() {
                values.insert(n.clone(), data.to_vec());
            }
        }
        Ok(values)
    }
}

/// The range of each tensor in `names` over the calibration inputs, streamed: each tensor's
/// values go into its [`Stats`] one chunk at a time.
pub(crate) fn calibrate(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    calibration: &[Input],
    method: Calibration,
) -> Result<BTreeMap<String, (f32, f32)>> {
    let mut probe = Probe::new(env, model, names, calibration)?;
    let mut stats: BTreeMap<String, Stats> = BTreeMap::new();
    for k in 0..probe.chunks() {
        for (n, v) in probe.values(k)? {
            stats.entry(n).or_default().add(&v);
        }
    }
    Ok(stats
        .into_iter()
        .map(|(n, s)| (n, s.range(method)))
        .collect())
}

/// Values kept exactly per tensor before they go into a histogram.
pub const EXACT_VALUES: usize = 1 << 14;
/// Histogram bins per sign: 64 per octave of magnitude over 2^-40 … 2^40 (1.6 % apart at
/// most); smaller magnitudes count as 0, larger ones as the top bin (min/max stay exact).
pub const HALF_BINS: usize = 80 * 64;

/// What calibration keeps of one tensor's values, bounded whatever their number: the exact
/// minimum and maximum, and for percentiles the values themselves up to [`EXACT_VALUES`],
/// then a histogram of [`HALF_BINS`] bins on each side of 0, spaced by relative size so that
/// a percentile is exact to 1.6 % of its own value whatever the outliers — at most
/// `EXACT_VALUES` × 4 bytes or `(2 × HALF_BINS + 1)` × 4 bytes per tensor.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    lo: f32,
    hi: f32,
    exact: Vec<f32>,
    hist: Option<Histogram>,
}

#[derive(Debug, Clone)]
struct Histogram {
    /// Negative magnitudes, largest first (`HALF_BINS - 1 - m` for magnitude bin m), then
    /// the zero bin at `HALF_BINS`, then positive magnitudes, smallest first.
    counts: Vec<u32>,
    total: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; 2 * HALF_BINS + 1],
            total: 0,
        }
    }

    /// The magnitude bin of `|x|`: its octave (from 2^-40) and the top 6 bits of its
    /// mantissa; `None` for magnitudes under 2^-40.
    fn magnitude_bin(x: f32) -> Option<usize> {
        let bits = x.abs().to_bits();
        let exponent = ((bits >> 23) & 0xff) as i32 - 127;
        if exponent < -40 {
            return None;
        }
        let octave = ((exponent + 40) as usize).min(79);
        let sub = if exponent >= 40 {
            63
        } else {
            ((bits >> 17) & 63) as usize
        };
        Some(octave * 64 + sub)
    }

    /// The middle of magnitude bin `m`.
    fn magnitude(m: usize) -> f32 {
        let (octave, sub) = (m / 64, m % 64);
        2f32.powi(octave as i32 - 40) * (1.0 + (sub as f32 + 0.5) / 64.0)
    }

    fn add(&mut self, x: f32) {
        if !x.is_finite() {
            return;
        }
        let at = match Self::magnitude_bin(x) {
            None => HALF_BINS,
            Some(m) if x > 0.0 => HALF_BINS + 1 + m,
            Some(m) => HALF_BINS - 1 - m,
        };
        self.counts[at] = self.counts[at].saturating_add(1);
        self.total += 1;
    }

    /// The value at rank `k` (0 = the smallest): the middle of its bin.
    fn at(&self, k: u64) -> f32 {
        let mut seen = 0u64;
        for (at, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen > k {
                return match at.cmp(&HALF_BINS) {
                    std::cmp::Ordering::Less => -Self::magnitude(HALF_BINS - 1 - at),
                    std::cmp::Ordering::Equal => 0.0,
                    std::cmp::Ordering::Greater => Self::magnitude(at - HALF_BINS - 1),
                };
            }
        }
        0.0
    }
}

impl Stats {
    pub fn add(&mut self, values: &[f32]) {
        for &x in values {
            self.lo = self.lo.min(x);
            self.hi = self.hi.max(x);
        }
        match &mut self.hist {
            Some(h) => values.iter().for_each(|&x| h.add(x)),
            None => {
                self.exact
                    .extend(values.iter().copied().filter(|x| x.is_finite()));
                if self.exact.len() > EXACT_VALUES {
                    let mut h = Histogram::new();
                    self.exact.iter().for_each(|&x| h.add(x));
                    self.exact = Vec::new();
                    self.hist = Some(h);
                }
            }
        }
    }

    /// The range under `method`, always including 0: exact for min/max and for up to
    /// [`EXACT_VALUES`] values, else within 1.6 % of the percentile (and within min/max).
    pub fn range(&self, method: Calibration) -> (f32, f32) {
        match (method, &self.hist) {
            (Calibration::MinMax, _) => (self.lo.min(0.0), self.hi.max(0.0)),
            (Calibration::Percentile(_), None) => range(&self.exact, method),
            (Calibration::Percentile(p), Some(h)) => {
                if h.total == 0 {
                    return (0.0, 0.0);
                }
                let rank = |q: f64| (((h.total - 1) as f64) * q).round() as u64;
                let lo = h.at(rank(1.0 - p / 100.0)).max(self.lo);
                let hi = h.at(rank(p / 100.0)).min(self.hi);
                (lo.min(0.0), hi.max(0.0))
            }
        }
    }

    /// Bytes this statistic holds (for the bound's test).
    pub fn bytes(&self) -> usize {
        self.exact.capacity() * 4 + self.hist.as_ref().map_or(0, |h| h.counts.len() * 4)
    }
}

/// How activation ranges come from the calibration values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The smallest and largest value seen (always including 0).
    MinMax,
    /// The given percentile of the values at each end (e.g. 99.99): outliers are clipped so
    /// the common values get finer steps.
    Percentile(f64),
}

impl Calibration {
    /// Clips the 0.01 % outliers at each end: min/max ranges broke the PP-OCR classifier's
    /// squeeze-excite blocks (55 % agreement) and cost YOLOv8n a decimal of cosine;
    /// percentile ranges kept both (100 %, 0.9999).
    pub const DEFAULT: Calibration = Calibration::Percentile(99.99);
}

impl std::fmt::Display for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Calibration::MinMax => f.write_str("minmax"),
            Calibration::Percentile(p) => write!(f, "percentile:{p}"),
        }
    }
}

impl std::str::FromStr for Calibration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(Calibration::MinMax),
            Some(("percentile", p)) => p
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 50.0 && *p <= 100.0)
                .map(Calibration::Percentile)
                .ok_or_else(|| Error::Usage(format!("percentile:{p}: a percentile in (50, 100]"))),
            _ => Err(Error::Usage(format!(
                "calibration '{s}' is not minmax or percentile:P"
            ))),
        }
    }
}

/// The range of `data` under `method`, always including 0 (so that 0 is exact).
pub fn range(data: &[f32], method: Calibration) -> (f32, f32) {
    match method {
        Calibration::MinMax => data
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x))),
        Calibration::Percentile(p) => {
            let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                return (0.0, 0.0);
            }
            // Two selections, not a sort: calibration tensors hold millions of values.
            let mut at = |q: f64| {
                let k = (((v.len() - 1) as f64) * q).round() as usize;
                *v.select_nth_unstable_by(k, f32::total_cmp).1
            };
            let (lo, hi) = (at(1.0 - p / 100.0), at(p / 100.0));
            (lo.min(0.0), hi.max(0.0))
        }
    }
}
