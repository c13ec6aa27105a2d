//! A model's signature (inputs and outputs as the wire describes them, read from a session),
//! the dtype mapping between ORT and the wire, and the zero-filled warmup inputs.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, ValueType};
use rxd_protocol::{DType, TensorSpec};

use super::{RuntimeError, raw, run_err};

/// A model's inputs and outputs, and what requests may send: each input's `max_dims` (set by
/// the registry at load, see `validate::max_dims`) and whether inputs may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Inputs with a zero-sized dimension pass validation (model.toml `allow-empty-inputs`).
    pub allow_empty: bool,
}

impl Signature {
    /// A model can batch when every input and output has rank ≥ 1 and a dynamic first
    /// dimension.
    pub fn batchable(&self) -> bool {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .all(|t| t.dims.first() == Some(&-1))
            && !self.inputs.is_empty()
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
                    })
                }
                other => Err(format!(
                    "{what} '{}' is a {other:?}; only tensor inputs and outputs are served",
                    o.name()
                )),
            }
        };
        Ok(Signature {
            inputs: session
                .inputs()
                .iter()
                .map(|o| spec(o, "input"))
                .collect::<Result<_, _>>()?,
            outputs: session
                .outputs()
                .iter()
                .map(|o| spec(o, "output"))
                .collect::<Result<_, _>>()?,
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

/// Runs `session` once on zero-filled inputs with `rows` in every dynamic first dimension;
/// `dims` gives full shapes for named inputs (its first dimension is replaced by `rows` when
/// the model's is dynamic); other dynamic dimensions get [`WARMUP_AUTO_DIM`]. This makes ORT
/// allocate its arena for that batch size (and compile kernels on GPU providers) before the
/// first client request. Returns the outputs' shapes, in the signature's output order.
pub fn warmup(
    session: &mut Session,
    sig: &Signature,
    rows: u64,
    dims: &std::collections::HashMap<String, Vec<i64>>,
) -> Result<Vec<Vec<u64>>, RuntimeError> {
    let values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = zero_inputs(sig, rows, dims)?
        .into_iter()
        .map(|(name, tensor)| (Cow::Owned(name), tensor.into()))
        .collect();
    let outputs = session.run(values).map_err(|e| run_err(&e))?;
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
    for spec in &sig.inputs {
        let shape = warmup_shape(spec, rows, dims.get(&spec.name).map(Vec::as_slice));
        let elements = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let len = spec
            .dtype
            .byte_len(elements)
            .ok_or_else(|| RuntimeError::Run("warmup shape overflows".into()))?;
        let zeros = vec![0u8; len as usize];
        let tensor = raw::tensor_from_bytes(element_type_of(spec.dtype), &shape, &zeros)
            .map_err(|e| run_err(&e))?;
        values.push((spec.name.clone(), tensor));
    }
    Ok(values)
}

/// The shape [`warmup`] gives an input at `rows` rows: `rows` in a dynamic first dimension,
/// `given` (model.toml `warmup-dims`) for other dynamic dimensions where it has a positive
/// size, [`WARMUP_AUTO_DIM`] for the rest.
pub fn warmup_shape(spec: &TensorSpec, rows: u64, given: Option<&[i64]>) -> Vec<u64> {
    spec.dims
        .iter()
        .enumerate()
        .map(|(i, &d)| match (i, d, given.and_then(|g| g.get(i))) {
            (0, d, _) if d < 0 => rows,
            (_, d, _) if d >= 0 => d as u64,
            (_, _, Some(&g)) if g > 0 => g as u64,
            _ => WARMUP_AUTO_DIM,
        })
        .collect()
}
