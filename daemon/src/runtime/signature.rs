//! A model's signature (inputs and outputs as the wire describes them, read from a session),
//! where each tensor's rows are when requests run as one batch, the dtype mapping between ORT
//! and the wire, and the zero-filled warmup inputs.

use std::borrow::Cow;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, ValueType};
use rxd_protocol::{DType, TensorSpec};

use super::{RuntimeError, raw, run_err};

/// A model's inputs and outputs, where their rows are, and what requests may send: each
/// input's `max_dims` (set by the registry at load, see `validate::max_dims`) and whether
/// inputs may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Inputs with a zero-sized dimension pass validation (model.toml `allow-empty-inputs`).
    pub allow_empty: bool,
    /// Where each input's and output's rows are, in the order of `inputs` and `outputs`.
    pub axes: Axes,
}

/// Where a tensor's rows are when several requests run as one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Along this dimension: 0, unless model.toml `batch-axes` names another (a recurrent
    /// model's state, `[layers, batch, hidden]`, has its rows along dimension 1).
    Rows(usize),
    /// Not batched: every request of a batch gives the same value, which the batch runs with
    /// once (a rank-0 input such as Silero VAD's sample rate, or one named in model.toml
    /// `shared-inputs`). Requests with different values run in different batches.
    Shared,
}

/// Each tensor's [`Axis`], in the signature's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Axes {
    pub inputs: Vec<Axis>,
    pub outputs: Vec<Axis>,
    /// The outputs' names, in the same order.
    pub output_names: Vec<String>,
}

impl Axes {
    /// The axis of input `k` (dimension 0 if there is no such input).
    pub fn input(&self, k: usize) -> Axis {
        self.inputs.get(k).copied().unwrap_or(Axis::Rows(0))
    }

    /// The axis of the output named `name` (dimension 0 if there is none of that name).
    pub fn output(&self, name: &str) -> Axis {
        self.output_names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.outputs.get(i).copied())
            .unwrap_or(Axis::Rows(0))
    }

    /// By default rows are along dimension 0, and rank-0 inputs are shared.
    pub fn default_for(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Axes {
        Axes {
            inputs: inputs
                .iter()
                .map(|t| match t.dims.len() {
                    0 => Axis::Shared,
                    _ => Axis::Rows(0),
                })
                .collect(),
            outputs: outputs.iter().map(|_| Axis::Rows(0)).collect(),
            output_names: outputs.iter().map(|t| t.name.clone()).collect(),
        }
    }
}

/// model.toml's `batch-axes` (tensor name → the dimension its rows are along) and
/// `shared-inputs` (inputs every request of a batch must give the same value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AxesConfig {
    pub axes: std::collections::HashMap<String, u32>,
    pub shared: Vec<String>,
}

impl Signature {
    /// A model can batch when it has an input with rows, every input with rows and every
    /// output has a dynamic dimension where its rows are, and no output is shared.
    pub fn batchable(&self) -> bool {
        let rows_dynamic = |t: &TensorSpec, a: &Axis| match a {
            Axis::Rows(k) => t.dims.get(*k) == Some(&-1),
            Axis::Shared => false,
        };
        self.inputs
            .iter()
            .zip(&self.axes.inputs)
            .any(|(t, a)| rows_dynamic(t, a))
            && self
                .inputs
                .iter()
                .zip(&self.axes.inputs)
                .all(|(t, a)| *a == Axis::Shared || rows_dynamic(t, a))
            && self
                .outputs
                .iter()
                .zip(&self.axes.outputs)
                .all(|(t, a)| rows_dynamic(t, a))
    }

    /// The [`Axis`] of input `k`.
    pub fn input_axis(&self, k: usize) -> Axis {
        self.axes.input(k)
    }

    /// Applies model.toml's `batch-axes` and `shared-inputs`, or says what in them does not
    /// fit this model.
    pub fn set_axes(&mut self, config: &AxesConfig) -> Result<(), String> {
        let mut axes = Axes::default_for(&self.inputs, &self.outputs);
        for (name, &axis) in &config.axes {
            let (spec, slot) = match self.inputs.iter().position(|t| &t.name == name) {
                Some(i) => (&self.inputs[i], &mut axes.inputs[i]),
                None => match self.outputs.iter().position(|t| &t.name == name) {
                    Some(i) => (&self.outputs[i], &mut axes.outputs[i]),
                    None => {
                        return Err(format!(
                            "batch-axes names '{name}', which is neither an input nor an output"
                        ));
                    }
                },
            };
            if axis as usize >= spec.dims.len() {
                return Err(format!(
                    "batch-axes gives '{name}' dimension {axis}; it has {} ({})",
                    spec.dims.len(),
                    spec.dims_text()
                ));
            }
            *slot = Axis::Rows(axis as usize);
        }
        for name in &config.shared {
            let Some(i) = self.inputs.iter().position(|t| &t.name == name) else {
                return Err(format!(
                    "shared-inputs names '{name}', which is not an input"
                ));
            };
            if config.axes.contains_key(name) {
                return Err(format!("'{name}' is in both batch-axes and shared-inputs"));
            }
            axes.inputs[i] = Axis::Shared;
        }
        self.axes = axes;
        Ok(())
    }

    pub(super) fn of(session: &Session) -> Result<Signature, String> {
        let spec = |o: &ort::value::Outlet, what: &str| -> Result<TensorSpec, String> {
            match o.dtype() {
                ValueType::Tensor {
                    ty,
                    shape,
                    dimension_symbols,
                } => {
                    let dtype = dtype_of(*ty).ok_or_else(|| {
                        format!(
                            "{what} '{}' has element type {ty:?}, which rxd does not serve",
                            o.name()
                        )
                    })?;
                    let dims: Vec<i64> = shape.iter().copied().collect();
                    let dim_names = (0..dims.len())
                        .map(|i| dimension_symbols.get(i).cloned().unwrap_or_default())
                        .collect();
                    Ok(TensorSpec {
                        name: o.name().to_string(),
                        dtype,
                        dims,
                        dim_names,
                        max_dims: Vec::new(),
                        warmup_dims: Vec::new(),
                        warmup_value: None,
                    })
                }
                other => Err(format!(
                    "{what} '{}' is a {other:?}; only tensor inputs and outputs are served",
                    o.name()
                )),
            }
        };
        let inputs: Vec<TensorSpec> = session
            .inputs()
            .iter()
            .map(|o| spec(o, "input"))
            .collect::<Result<_, _>>()?;
        let outputs: Vec<TensorSpec> = session
            .outputs()
            .iter()
            .map(|o| spec(o, "output"))
            .collect::<Result<_, _>>()?;
        Ok(Signature {
            axes: Axes::default_for(&inputs, &outputs),
            inputs,
            outputs,
            allow_empty: false,
        })
    }
}

/// Maps ORT's element type to the wire dtype (`None` for strings and types rxd does not serve).
pub fn dtype_of(t: TensorElementType) -> Option<DType> {
    use TensorElementType as T;
    Some(match t {
        T::Float32 => DType::Float32,
        T::Uint8 => DType::Uint8,
        T::Int8 => DType::Int8,
        T::Uint16 => DType::Uint16,
        T::Int16 => DType::Int16,
        T::Int32 => DType::Int32,
        T::Int64 => DType::Int64,
        T::Bool => DType::Bool,
        T::Float16 => DType::Float16,
        T::Float64 => DType::Float64,
        T::Uint32 => DType::Uint32,
        T::Uint64 => DType::Uint64,
        T::Complex64 => DType::Complex64,
        T::Complex128 => DType::Complex128,
        T::Bfloat16 => DType::Bfloat16,
        T::Float8E4M3FN => DType::Float8e4m3fn,
        T::Float8E4M3FNUZ => DType::Float8e4m3fnuz,
        T::Float8E5M2 => DType::Float8e5m2,
        T::Float8E5M2FNUZ => DType::Float8e5m2fnuz,
        T::Uint4 => DType::Uint4,
        T::Int4 => DType::Int4,
        T::Float4E2M1 => DType::Float4e2m1,
        _ => return None,
    })
}

/// Maps a wire dtype to ORT's element type.
pub fn element_type_of(d: DType) -> TensorElementType {
    use TensorElementType as T;
    match d {
        DType::Float32 => T::Float32,
        DType::Uint8 => T::Uint8,
        DType::Int8 => T::Int8,
        DType::Uint16 => T::Uint16,
        DType::Int16 => T::Int16,
        DType::Int32 => T::Int32,
        DType::Int64 => T::Int64,
        DType::Bool => T::Bool,
        DType::Float16 => T::Float16,
        DType::Float64 => T::Float64,
        DType::Uint32 => T::Uint32,
        DType::Uint64 => T::Uint64,
        DType::Complex64 => T::Complex64,
        DType::Complex128 => T::Complex128,
        DType::Bfloat16 => T::Bfloat16,
        DType::Float8e4m3fn => T::Float8E4M3FN,
        DType::Float8e4m3fnuz => T::Float8E4M3FNUZ,
        DType::Float8e5m2 => T::Float8E5M2,
        DType::Float8e5m2fnuz => T::Float8E5M2FNUZ,
        DType::Uint4 => T::Uint4,
        DType::Int4 => T::Int4,
        DType::Float4e2m1 => T::Float4E2M1,
        _ => T::Undefined,
    }
}

/// Size given to dynamic dimensions other than the batch dimension when warming up without
/// configured shapes: large enough for the strides of common conv nets.
pub const WARMUP_AUTO_DIM: u64 = 32;

/// Runs `session` once on zero-filled inputs (an integer input the graph compares with a
/// constant is filled with it: `TensorSpec::warmup_value`) with `rows` in every input's
/// dynamic rows dimension (see [`Axis`]); `dims` gives full shapes for named inputs (their rows dimension
/// is replaced by `rows` when the model's is dynamic); other dynamic dimensions get
/// [`WARMUP_AUTO_DIM`]. This makes ORT
/// allocate its arena for that batch size (and compile kernels on GPU providers) before the
/// first client request. Returns the outputs' shapes, in the signature's output order.
pub fn warmup(
    session: &mut super::DeviceSession,
    sig: &Signature,
    rows: u64,
    dims: &std::collections::HashMap<String, Vec<i64>>,
) -> Result<Vec<Vec<u64>>, RuntimeError> {
    let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = zero_inputs(sig, rows, dims)?
        .into_iter()
        .map(|(name, tensor)| (Cow::Owned(name), tensor.into()))
        .collect();
    let outputs = session.with(|s| s.run(values)).map_err(|e| run_err(&e))?;
    Ok(sig
        .outputs
        .iter()
        .map(|spec| {
            outputs
                .get(spec.name.as_str())
                .and_then(|v| match v.dtype() {
                    ValueType::Tensor { shape, .. } => {
                        Some(shape.iter().map(|&d| d.max(0) as u64).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        })
        .collect())
}

/// Zero-filled inputs of the warmup's shapes at `rows` rows (see [`warmup`]).
pub fn zero_inputs(
    sig: &Signature,
    rows: u64,
    dims: &std::collections::HashMap<String, Vec<i64>>,
) -> Result<Vec<(String, ort::value::DynTensor)>, RuntimeError> {
    let mut values = Vec::with_capacity(sig.inputs.len());
    for (k, spec) in sig.inputs.iter().enumerate() {
        let given = dims.get(&spec.name).map(Vec::as_slice);
        let shape = warmup_shape(spec, sig.input_axis(k), rows, given);
        let elements = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let len = spec
            .dtype
            .byte_len(elements)
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let data = match spec.warmup_value {
            Some(v) => filled(spec.dtype, elements, v),
            None => None,
        }
        .unwrap_or_else(|| vec![0u8; len as usize]);
        let tensor = raw::tensor_from_bytes(element_type_of(spec.dtype), &shape, &data)
            .map_err(|e| run_err(&e))?;
        values.push((spec.name.clone(), tensor));
    }
    Ok(values)
}

/// `elements` values `v` of integer type `dtype`, little-endian (`None` for other types, or
/// when `v` does not fit the type).
fn filled(dtype: DType, elements: u64, v: i64) -> Option<Vec<u8>> {
    Some(
        dtype
            .integer_bytes(v)?
            .repeat(usize::try_from(elements).ok()?),
    )
}

/// Whether inputs of `dtype` can take a warmup value (see `TensorSpec::warmup_value`).
pub fn integer(dtype: DType) -> bool {
    dtype.integer_bytes(0).is_some()
}

/// Whether `v` is a value of integer type `dtype`.
pub fn fits(dtype: DType, v: i64) -> bool {
    dtype.integer_bytes(v).is_some()
}

/// Sets the `warmup_value` of each integer input of one element (rank 0, or every dimension
/// fixed at 1: a sample rate, a mode, a flag) from the model's graph (`path`, or `bytes`
/// when the session was made from memory): the constant an `Equal` compares it with. Larger
/// integer inputs (token ids, masks) keep zeros: a whole tensor of the one value a graph
/// compares them with (a padding id) is no more a real request than zeros. Models without
/// such inputs are not read; a file that cannot be read or parsed here (ONNX Runtime made a
/// session of it) leaves zeros.
pub(super) fn read_warmup_values(sig: &mut Signature, path: &Path, bytes: Option<&[u8]>) {
    let names: Vec<&str> = sig
        .inputs
        .iter()
        .filter(|s| integer(s.dtype) && s.dims.iter().all(|&d| d == 1))
        .map(|s| s.name.as_str())
        .collect();
    if names.is_empty() {
        return;
    }
    let read;
    let bytes = match bytes {
        Some(b) => b,
        None => match std::fs::read(path) {
            Ok(b) => {
                read = b;
                &read
            }
            Err(_) => return,
        },
    };
    let found = rxd_compress::onnx::Model::parse(bytes)
        .and_then(|m| rxd_compress::onnx::equal_constants(&m, &names));
    match found {
        Ok(found) => {
            for spec in &mut sig.inputs {
                spec.warmup_value = found.get(&spec.name).copied();
            }
        }
        Err(e) => tracing::debug!(path = %path.display(), "no warmup values from the graph: {e}"),
    }
}

/// The shape [`warmup`] gives an input at `rows` rows: `rows` in its dynamic rows dimension
/// (`axis`), `given` (model.toml `warmup-dims`) for other dynamic dimensions where it has a
/// positive size, [`WARMUP_AUTO_DIM`] for the rest.
pub fn warmup_shape(spec: &TensorSpec, axis: Axis, rows: u64, given: Option<&[i64]>) -> Vec<u64> {
    let at = match axis {
        Axis::Rows(k) => Some(k),
        Axis::Shared => None,
    };
    spec.dims
        .iter()
        .enumerate()
        .map(|(i, &d)| match (i, d, given.and_then(|g| g.get(i))) {
            (i, d, _) if d < 0 && Some(i) == at => rows,
            (_, d, _) if d >= 0 => d as u64,
            (_, _, Some(&g)) if g > 0 => g as u64,
            _ => WARMUP_AUTO_DIM,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dims: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::Float32,
            dims: dims.to_vec(),
            dim_names: Vec::new(),
            max_dims: Vec::new(),
            warmup_dims: Vec::new(),
            warmup_value: None,
        }
    }

    /// Silero VAD's signature: audio `[batch, samples]`, state `[2, batch, 128]`, a rank-0
    /// sample rate; outputs `[batch, 1]` and the new state, every dimension dynamic.
    fn silero() -> Signature {
        let inputs = vec![
            spec("input", &[-1, -1]),
            spec("state", &[2, -1, 128]),
            spec("sr", &[]),
        ];
        let outputs = vec![spec("output", &[-1, 1]), spec("stateN", &[-1, -1, -1])];
        Signature {
            axes: Axes::default_for(&inputs, &outputs),
            inputs,
            outputs,
            allow_empty: false,
        }
    }

    fn config(axes: &[(&str, u32)], shared: &[&str]) -> AxesConfig {
        AxesConfig {
            axes: axes.iter().map(|&(n, a)| (n.to_string(), a)).collect(),
            shared: shared.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn warmup_values_fill_integer_inputs_of_their_type_and_only_where_they_fit() {
        assert_eq!(
            filled(DType::Int64, 2, 16000),
            Some([16000i64.to_le_bytes(), 16000i64.to_le_bytes()].concat())
        );
        assert_eq!(
            filled(DType::Uint16, 1, 8000),
            Some(8000u16.to_le_bytes().to_vec())
        );
        assert_eq!(filled(DType::Int8, 1, -3), Some(vec![0xfd]));
        assert_eq!(filled(DType::Int8, 1, 300), None, "does not fit");
        assert_eq!(filled(DType::Uint32, 1, -1), None, "does not fit");
        assert_eq!(filled(DType::Float32, 1, 1), None, "not an integer type");
        assert!(integer(DType::Int32) && !integer(DType::Bool) && !integer(DType::Float16));
        assert!(fits(DType::Int16, -32768) && !fits(DType::Int16, 100_000));
    }

    #[test]
    fn a_state_with_its_rows_along_dimension_one_batches_once_configured() {
        let mut sig = silero();
        assert!(!sig.batchable(), "the state's dimension 0 is fixed at 2");
        assert_eq!(
            sig.input_axis(2),
            Axis::Shared,
            "rank 0 is shared by default"
        );
        sig.set_axes(&config(&[("state", 1), ("stateN", 1)], &[]))
            .unwrap();
        assert!(sig.batchable());
        assert_eq!(sig.input_axis(1), Axis::Rows(1));
        assert_eq!(sig.axes.output("stateN"), Axis::Rows(1));
        assert_eq!(sig.axes.output("output"), Axis::Rows(0));
        assert_eq!(
            warmup_shape(&sig.inputs[1], sig.input_axis(1), 4, Some(&[2, 1, 128])),
            vec![2, 4, 128],
            "warmup rows go where the rows are"
        );
        // Only the new state's axis: the output's rows are still where they were.
        let mut half = silero();
        half.set_axes(&config(&[("state", 1)], &[])).unwrap();
        assert!(half.batchable(), "stateN's dimension 0 is dynamic too");
    }

    #[test]
    fn axes_that_do_not_fit_the_model_are_refused_by_name() {
        let mut sig = silero();
        let err = |c: AxesConfig| silero().set_axes(&c).unwrap_err();
        assert!(err(config(&[("nope", 0)], &[])).contains("'nope'"));
        assert!(err(config(&[("state", 3)], &[])).contains("dimension 3"));
        assert!(err(config(&[], &["stateN"])).contains("not an input"));
        assert!(err(config(&[("input", 0)], &["input"])).contains("both"));
        // A shared input with rows elsewhere: the model still batches on the others.
        sig.set_axes(&config(&[("state", 1), ("stateN", 1)], &["input"]))
            .unwrap();
        assert_eq!(sig.input_axis(0), Axis::Shared);
        assert!(sig.batchable());
        // Every input shared: nothing to batch along.
        let mut none = silero();
        none.set_axes(&config(&[], &["input", "state"])).unwrap();
        assert!(!none.batchable());
    }

    #[test]
    fn the_default_is_dimension_zero_everywhere() {
        let inputs = vec![spec("x", &[-1, 3])];
        let outputs = vec![spec("y", &[-1])];
        let mut sig = Signature {
            axes: Axes::default_for(&inputs, &outputs),
            inputs,
            outputs,
            allow_empty: false,
        };
        assert!(sig.batchable());
        sig.set_axes(&AxesConfig::default()).unwrap();
        assert!(sig.batchable());
        assert_eq!(sig.input_axis(0), Axis::Rows(0));
    }
}
