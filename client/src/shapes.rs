//! Output sizes known before a run, so that a client can give the daemon an output area in its
//! arena large enough for a first request (instead of receiving the outputs inline through the
//! socket). From a model's signature (`model_info`) and a request's input shapes:
//! - a fixed dimension is its size;
//! - a dynamic dimension with the symbolic name of an input's dimension has that size;
//! - a dimension ONNX Runtime inferred as a formula of input dimensions
//!   (`(floor(height/2 - 1/2) + 1)*...`) is evaluated, exactly, in rational arithmetic;
//! - otherwise the shape the output had in the daemon's batch-1 warmup, when every input has
//!   its warmup shape (the batch excepted, which scales a dynamic first dimension).
//!
//! Anything else is unknown, and so is the total. A guess is never trusted for correctness:
//! the daemon sends an output that does not fit the area inline (`inline_overflow`).

use std::collections::HashMap;

use rxd_protocol::{ModelInfo, OUTPUT_ALIGN, Tensor, TensorSpec};

/// Bytes of an output area that holds the outputs of running `info`'s model on `inputs`
/// (each output 64-byte aligned), for the outputs named in `wanted` (empty: all); `None` when
/// some output's size is unknown before the run.
pub fn output_area_bytes(info: &ModelInfo, inputs: &[Tensor], wanted: &[String]) -> Option<u64> {
    let mut total = 0u64;
    for spec in info
        .outputs
        .iter()
        .filter(|s| wanted.is_empty() || wanted.contains(&s.name))
    {
        let shape = output_shape(info, spec, inputs)?;
        let elements = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        let bytes = spec.dtype.byte_len(elements)?;
        total = total.checked_add(bytes.next_multiple_of(OUTPUT_ALIGN))?;
    }
    Some(total)
}

/// The shape `spec` (an output of `info`) will have for `inputs`, where it can be known.
pub fn output_shape(info: &ModelInfo, spec: &TensorSpec, inputs: &[Tensor]) -> Option<Vec<u64>> {
    let shapes: HashMap<&str, &[u64]> = inputs
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    // Sizes of the inputs' named dimensions in this request.
    let mut vars: HashMap<&str, u64> = HashMap::new();
    for input in &info.inputs {
        let Some(shape) = shapes.get(input.name.as_str()) else {
            continue;
        };
        for (name, &size) in input.dim_names.iter().zip(shape.iter()) {
            if !name.is_empty() {
                vars.entry(name.as_str()).or_insert(size);
            }
        }
    }
    // The request's batch, when every input has a dynamic first dimension of one size and
    // every other dimension at its warmup size: the warmup's output shape then holds, scaled.
    let warm = warm_batch(info, &shapes);
    spec.dims
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d >= 0 {
                return Some(d as u64);
            }
            let name = spec.dim_names.get(i).map_or("", String::as_str);
            if let Some(&v) = vars.get(name) {
                return Some(v);
            }
            if !name.is_empty()
                && let Some(v) = eval(name, &vars)
            {
                return Some(v);
            }
            let (batch, w) = (warm?, spec.warmup_dims.get(i).copied()?);
            match (i, w) {
                (0, 1) => Some(batch),
                (0, _) => None,
                (_, w) => Some(w),
            }
        })
        .collect()
}

/// The batch of a request whose inputs all have their warmup shapes but for a dynamic first
/// dimension (the same in every input); `None` otherwise.
fn warm_batch(info: &ModelInfo, shapes: &HashMap<&str, &[u64]>) -> Option<u64> {
    let mut batch = None;
    for input in &info.inputs {
        let shape = shapes.get(input.name.as_str())?;
        let warm = &input.warmup_dims;
        if shape.len() != input.dims.len() || warm.len() != shape.len() {
            if input.dims.is_empty() && shape.is_empty() {
                continue; // a scalar
            }
            return None;
        }
        for (i, (&got, &w)) in shape.iter().zip(warm).enumerate() {
            if i == 0 && input.dims[0] < 0 && w == 1 {
                if *batch.get_or_insert(got) != got {
                    return None;
                }
            } else if got != w {
                return None;
            }
        }
    }
    Some(batch.unwrap_or(1))
}

/// An exact rational number, for formulas such as `floor(height/2 - 1/2) + 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Q {
    n: i128,
    d: i128,
}

impl Q {
    fn new(n: i128, d: i128) -> Option<Q> {
        if d == 0 {
            return None;
        }
        let g = gcd(n.unsigned_abs(), d.unsigned_abs()).max(1) as i128;
        let s = if d < 0 { -1 } else { 1 };
        Some(Q {
            n: s * n / g,
            d: s * d / g,
        })
    }
    fn int(v: i128) -> Q {
        Q { n: v, d: 1 }
    }
    fn add(self, o: Q) -> Option<Q> {
        Q::new(
            self.n
                .checked_mul(o.d)?
                .checked_add(o.n.checked_mul(self.d)?)?,
            self.d.checked_mul(o.d)?,
        )
    }
    fn neg(self) -> Q {
        Q {
            n: -self.n,
            d: self.d,
        }
    }
    fn mul(self, o: Q) -> Option<Q> {
        Q::new(self.n.checked_mul(o.n)?, self.d.checked_mul(o.d)?)
    }
    fn div(self, o: Q) -> Option<Q> {
        Q::new(self.n.checked_mul(o.d)?, self.d.checked_mul(o.n)?)
    }
    fn floor(self) -> Q {
        Q::int(self.n.div_euclid(self.d))
    }
    fn ceil(self) -> Q {
        Q::int(-(-self.n).div_euclid(self.d))
    }
    fn lt(self, o: Q) -> bool {
        // Denominators are positive.
        self.n.saturating_mul(o.d) < o.n.saturating_mul(self.d)
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Evaluates a dimension formula over `vars`; `None` when it names something unknown, is
/// malformed, or is not a non-negative integer.
fn eval(text: &str, vars: &HashMap<&str, u64>) -> Option<u64> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        vars,
    };
    let v = p.expr()?;
    p.skip();
    if p.i != p.s.len() || v.d != 1 || v.n < 0 {
        return None;
    }
    u64::try_from(v.n).ok()
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    vars: &'a HashMap<&'a str, u64>,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.skip();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expr(&mut self) -> Option<Q> {
        let mut v = self.term()?;
        loop {
            if self.eat(b'+') {
                v = v.add(self.term()?)?;
            } else if self.eat(b'-') {
                v = v.add(self.term()?.neg())?;
            } else {
                return Some(v);
            }
        }
    }
    fn term(&mut self) -> Option<Q> {
        let mut v = self.factor()?;
        loop {
            if self.eat(b'*') {
                v = v.mul(self.factor()?)?;
            } else if self.eat(b'/') {
                v = v.div(self.factor()?)?;
            } else {
                return Some(v);
            }
        }
    }
    fn factor(&mut self) -> Option<Q> {
        self.skip();
        if self.eat(b'-') {
            return Some(self.factor()?.neg());
        }
        if self.eat(b'(') {
            let v = self.expr()?;
            return self.eat(b')').then_some(v);
        }
        let start = self.i;
        let c = *self.s.get(self.i)?;
        if c.is_ascii_digit() {
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            let n: i128 = std::str::from_utf8(&self.s[start..self.i])
                .ok()?
                .parse()
                .ok()?;
            return Some(Q::int(n));
        }
        while self
            .s
            .get(self.i)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.'))
        {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        let name = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if self.eat(b'(') {
            let mut args = vec![self.expr()?];
            while self.eat(b',') {
                args.push(self.expr()?);
            }
            if !self.eat(b')') {
                return None;
            }
            return match (name, args.as_slice()) {
                ("floor", [a]) => Some(a.floor()),
                ("ceiling" | "ceil", [a]) => Some(a.ceil()),
                ("max" | "Max", [a, b]) => Some(if a.lt(*b) { *b } else { *a }),
                ("min" | "Min", [a, b]) => Some(if a.lt(*b) { *a } else { *b }),
                _ => None,
            };
        }
        self.vars.get(name).map(|&v| Q::int(i128::from(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxd_protocol::{DType, ModelSummary};

    /// YOLOv8n's output dimension as ONNX Runtime infers it.
    const YOLO: &str = "(floor(floor(floor(height/2 - 1/2)/2)/2) + 1)*(floor(floor(floor(width/2 - 1/2)/2)/2) + 1) + (floor(floor(floor(floor(height/2 - 1/2)/2)/2)/2) + 1)*(floor(floor(floor(floor(width/2 - 1/2)/2)/2)/2) + 1) + (floor(floor(floor(floor(floor(height/2 - 1/2)/2)/2)/2)/2) + 1)*(floor(floor(floor(floor(floor(width/2 - 1/2)/2)/2)/2)/2) + 1)";

    fn spec(name: &str, dims: &[i64], names: &[&str], warm: &[u64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::Float32,
            dims: dims.to_vec(),
            dim_names: names.iter().map(|s| s.to_string()).collect(),
            max_dims: Vec::new(),
            warmup_dims: warm.to_vec(),
            warmup_value: None,
        }
    }

    fn info(inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> ModelInfo {
        let summary: ModelSummary = serde_json::from_value(serde_json::json!({
            "name": "m", "version": 1, "state": "ready", "instances": 1, "device": "cpu",
            "batchable": true, "requests": 0, "batches": 0, "rows": 0, "padded_rows": 0,
            "cache_hits": 0, "cache_misses": 0, "cache_bytes": 0, "coalesced": 0,
            "pinned": false, "served": true, "loads": 1, "evictions": 0,
        }))
        .unwrap();
        ModelInfo {
            summary,
            inputs,
            outputs,
            settings: None,
            tuning: None,
            not_tuned: None,
            dequantized: None,
        }
    }

    fn input(name: &str, shape: &[u64]) -> Tensor {
        let n: u64 = shape.iter().product();
        Tensor::inline(
            name,
            DType::Float32,
            shape.to_vec(),
            vec![0; n as usize * 4],
        )
    }

    #[test]
    fn formulas_of_input_dimensions_are_evaluated_exactly() {
        let vars: HashMap<&str, u64> = [("height", 320), ("width", 320)].into();
        assert_eq!(eval(YOLO, &vars), Some(2100));
        let vars: HashMap<&str, u64> = [("height", 256), ("width", 256)].into();
        assert_eq!(eval(YOLO, &vars), Some(1344));
        let vars: HashMap<&str, u64> = [("height", 333), ("width", 111)].into();
        // floor(floor(floor(333/2 - 1/2)/2)/2) + 1 = 42, … computed by hand: 42*14 + 21*7 + 11*4.
        assert_eq!(eval(YOLO, &vars), Some(42 * 14 + 21 * 7 + 11 * 4));
        let none: HashMap<&str, u64> = HashMap::new();
        assert_eq!(eval("ceiling(7/2) + Max(2, 3) - min(1, 4)", &none), Some(6));
        assert_eq!(eval("height + 1", &none), None, "unknown name");
        assert_eq!(eval("1/2", &none), None, "not an integer");
        assert_eq!(eval("2 - 3", &none), None, "negative");
        assert_eq!(eval("floor(", &none), None);
        assert_eq!(eval("sqrt(4)", &none), None);
    }

    #[test]
    fn output_sizes_come_from_names_formulas_and_the_warmup() {
        // YOLOv8n: the batch by name, the boxes by formula.
        let yolo = info(
            vec![spec(
                "images",
                &[-1, 3, -1, -1],
                &["batch", "", "height", "width"],
                &[1, 3, 320, 320],
            )],
            vec![spec(
                "output0",
                &[-1, 22, -1],
                &["batch", "", YOLO],
                &[1, 22, 2100],
            )],
        );
        let x = [input("images", &[2, 3, 256, 256])];
        assert_eq!(
            output_shape(&yolo, &yolo.outputs[0], &x),
            Some(vec![2, 22, 1344])
        );
        assert_eq!(
            output_area_bytes(&yolo, &x, &[]),
            Some((2 * 22 * 1344 * 4u64).next_multiple_of(64))
        );
        // PP-OCR's detector: names that link nothing; known only at the warmup's shape, where
        // the batch scales.
        let det = info(
            vec![spec(
                "x",
                &[-1, 3, -1, -1],
                &["p.0", "", "p.1", "p.2"],
                &[1, 3, 640, 640],
            )],
            vec![spec(
                "y",
                &[-1, 1, -1, -1],
                &["p.3", "", "p.4", "p.5"],
                &[1, 1, 640, 640],
            )],
        );
        assert_eq!(
            output_shape(&det, &det.outputs[0], &[input("x", &[3, 3, 640, 640])]),
            Some(vec![3, 1, 640, 640])
        );
        assert_eq!(
            output_shape(&det, &det.outputs[0], &[input("x", &[1, 3, 960, 960])]),
            None
        );
        // Fixed outputs need nothing; `wanted` picks outputs.
        let fixed = info(
            vec![spec("a", &[-1, 4], &["", ""], &[])],
            vec![
                spec("p", &[10], &[""], &[]),
                spec("q", &[-1, 7], &["", ""], &[]),
            ],
        );
        let a = [input("a", &[5, 4])];
        assert_eq!(output_area_bytes(&fixed, &a, &["p".into()]), Some(64));
        assert_eq!(output_area_bytes(&fixed, &a, &[]), None);
    }
}
