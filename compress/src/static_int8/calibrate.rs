//! Calibration: the float values of chosen tensors on the calibration inputs (the model run
//! with them added as graph outputs), and the range each one gets.

use std::collections::{BTreeMap, BTreeSet};

use ort::environment::Environment;

use crate::onnx::{self, Model, graph, tensor};
use crate::proto::{Message, Value};
use crate::report::Input;
use crate::{Error, Result};

/// The values of the float tensors in `names` on `inputs` (the model run with those tensors
/// added as outputs); names the run cannot give as float are absent.
pub(crate) fn tensors(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    inputs: &[Input],
) -> Result<BTreeMap<String, Vec<f32>>> {
    // A graph input is read from `inputs`: asked for as an output, ONNX Runtime hands back
    // the input's own buffer, which is freed with the inputs when the run returns.
    let mut values = BTreeMap::new();
    for i in inputs {
        if let (true, crate::report::Data::F32(d)) = (names.contains(&i.name), &i.data) {
            values.insert(i.name.clone(), d.clone());
        }
    }
    let mut m = model.clone();
    let existing = m.output_names()?;
    for n in names
        .iter()
        .filter(|n| !existing.contains(*n) && !values.contains_key(*n))
    {
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
    let mut s = crate::report::session(env, &m.encode())?;
    let outs = s.run(crate::report::values(inputs)?)?;
    let from_run: Vec<&String> = names.iter().filter(|n| !values.contains_key(*n)).collect();
    for n in from_run {
        if let Ok((_, data)) = outs[n.as_str()].try_extract_tensor::<f32>() {
            values.insert(n.clone(), data.to_vec());
        }
    }
    Ok(values)
}

/// The range of each tensor in `names` over the calibration inputs.
pub(crate) fn calibrate(
    env: &Environment,
    model: &Model,
    names: &BTreeSet<String>,
    calibration: &[Input],
    method: Calibration,
) -> Result<BTreeMap<String, (f32, f32)>> {
    Ok(tensors(env, model, names, calibration)?
        .into_iter()
        .map(|(n, v)| (n, range(&v, method)))
        .collect())
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
