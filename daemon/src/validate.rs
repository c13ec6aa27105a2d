//! Checks an inference request against a model's signature before any work is queued, and
//! computes the per-input dimension limits a model's requests are held to.
//!
//! Pure: no IO, no ORT. Every rejection carries its wire code; a request that passes has one
//! tensor per model input with the right dtype, rank, fixed dimensions and byte length, no
//! zero-sized dimension (unless the model allows empty inputs: ONNX Runtime's kernels abort
//! the process on some, e.g. Silero VAD's LSTM on a zero batch) and every dimension within the
//! input's limit.

use std::sync::Arc;

use rxd_protocol::{ArenaRef, ErrorCode, InferRequest, TensorData, TensorSpec, WireError};
use rxd_shm::Mapping;

use crate::runtime::{InputData, InputTensor, OutputTarget, Placement, Signature};

/// A request ready for a worker.
#[derive(Debug)]
pub struct Checked {
    pub inputs: Vec<InputTensor>,
    pub outputs: Vec<String>,
    pub placement: Placement,
}

/// Checks a shared-memory reference: an arena exists, the range is inside it (overflow-safe)
/// and `offset` is a multiple of `align`. Nothing is read from the arena.
fn check_ref(
    arena: Option<&Arc<Mapping>>,
    what: &str,
    r: ArenaRef,
    align: u64,
) -> Result<(), WireError> {
    let map = arena.ok_or_else(|| {
        WireError::new(
            ErrorCode::ArenaUnavailable,
            format!("{what} refers to the arena, but this connection has none"),
        )
    })?;
    map.range(r.offset, r.len)
        .map_err(|e| WireError::new(ErrorCode::ArenaOutOfRange, format!("{what}: {e}")))?;
    if !r.offset.is_multiple_of(align) {
        return Err(WireError::new(
            ErrorCode::ArenaMisaligned,
            format!("{what}: offset {} is not a multiple of {align}", r.offset),
        ));
    }
    Ok(())
}

/// Checks `req` against the model's signature; `arena` is the sending connection's arena
/// (references are always relative to it).
pub fn check(
    sig: &Signature,
    req: InferRequest,
    arena: Option<&Arc<Mapping>>,
) -> Result<Checked, WireError> {
    req.check()?;
    let mut slots: Vec<Option<InputTensor>> = sig.inputs.iter().map(|_| None).collect();
    for t in req.inputs {
        let Some(pos) = sig.inputs.iter().position(|s| s.name == t.name) else {
            let names: Vec<&str> = sig.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(WireError::new(
                ErrorCode::UnknownInput,
                format!(
                    "model '{}' has no input '{}' (inputs: {names:?})",
                    req.model, t.name
                ),
            ));
        };
        if slots[pos].is_some() {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("input '{}' given twice", t.name),
            ));
        }
        let spec = &sig.inputs[pos];
        if t.dtype != spec.dtype {
            return Err(WireError::new(
                ErrorCode::DtypeMismatch,
                format!("input '{}' must be {}, got {}", t.name, spec.dtype, t.dtype),
            ));
        }
        check_shape(spec, &t.shape, sig.allow_empty)?;
        let data = match t.data {
            TensorData::Inline(b) => InputData::Inline(b),
            TensorData::Arena(r) => {
                let expected = t.check()?;
                if r.len != expected {
                    return Err(WireError::new(
                        ErrorCode::DataLengthMismatch,
                        format!(
                            "input '{}' is {} {:?}: {expected} bytes expected, the reference has {}",
                            t.name, t.dtype, t.shape, r.len
                        ),
                    ));
                }
                check_ref(
                    arena,
                    &format!("input '{}'", t.name),
                    r,
                    t.dtype.alignment(),
                )?;
                InputData::Shared {
                    map: arena.expect("checked").clone(),
                    offset: r.offset,
                    len: r.len,
                }
            }
            _ => {
                return Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    "unsupported tensor data location",
                ));
            }
        };
        slots[pos] = Some(InputTensor {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            data,
        });
    }
    let missing: Vec<&str> = sig
        .inputs
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(spec, _)| spec.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(WireError::new(
            ErrorCode::MissingInput,
            format!("missing input(s) {missing:?} for model '{}'", req.model),
        ));
    }
    let outputs = if req.outputs.is_empty() {
        sig.outputs.iter().map(|s| s.name.clone()).collect()
    } else {
        for (i, name) in req.outputs.iter().enumerate() {
            if !sig.outputs.iter().any(|s| &s.name == name) {
                return Err(WireError::new(
                    ErrorCode::UnknownOutput,
                    format!("model '{}' has no output '{name}'", req.model),
                ));
            }
            // Each output once: a name repeated would be copied and answered once per mention
            // (a way to multiply one run's memory by the tensor limit).
            if req.outputs[..i].contains(name) {
                return Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!("output '{name}' asked for twice"),
                ));
            }
        }
        req.outputs
    };
    let mut placement = place(sig, &outputs, &req.output_regions, req.output_area, arena)?;
    placement.inline_overflow = req.inline_overflow;
    Ok(Checked {
        // Every slot is filled (checked above); `map` over the vector's own iterator reuses
        // its allocation (`Option<InputTensor>` has the size of `InputTensor`).
        inputs: slots
            .into_iter()
            .map(|s| s.expect("every input is given"))
            .collect(),
        outputs,
        placement,
    })
}

fn place(
    sig: &Signature,
    outputs: &[String],
    regions: &[rxd_protocol::OutputRegion],
    area: Option<ArenaRef>,
    arena: Option<&Arc<Mapping>>,
) -> Result<Placement, WireError> {
    if regions.is_empty() && area.is_none() {
        return Ok(Placement::default());
    }
    for (i, r) in regions.iter().enumerate() {
        if regions[..i].iter().any(|o| o.name == r.name) {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("two regions for output '{}'", r.name),
            ));
        }
        if !outputs.contains(&r.name) {
            return Err(WireError::new(
                ErrorCode::UnknownOutput,
                format!(
                    "a region is given for '{}', which is not an output of this request",
                    r.name
                ),
            ));
        }
        let dtype = sig
            .outputs
            .iter()
            .find(|s| s.name == r.name)
            .map(|s| s.dtype)
            .expect("requested outputs exist");
        let rr = ArenaRef {
            offset: r.offset,
            len: r.len,
        };
        check_ref(
            arena,
            &format!("the region for output '{}'", r.name),
            rr,
            dtype.alignment(),
        )?;
    }
    if let Some(a) = area {
        check_ref(arena, "the output area", a, 1)?;
    }
    let targets = outputs
        .iter()
        .map(|name| match regions.iter().find(|r| &r.name == name) {
            Some(r) => OutputTarget::Region {
                offset: r.offset,
                len: r.len,
            },
            None if area.is_some() => OutputTarget::Area,
            None => OutputTarget::Inline,
        })
        .collect();
    Ok(Placement {
        arena: arena.cloned(),
        targets,
        area: area.map(|a| (a.offset, a.len)),
        inline_overflow: false,
    })
}

/// An input's shape against its spec: rank and fixed dimensions (`shape_mismatch`), no
/// zero-sized dimension unless `allow_empty` (`shape_mismatch`), every dimension within the
/// input's `max_dims` (`tensor_too_large`).
fn check_shape(spec: &TensorSpec, shape: &[u64], allow_empty: bool) -> Result<(), WireError> {
    if !spec.fits(shape) {
        return Err(WireError::new(
            ErrorCode::ShapeMismatch,
            format!(
                "input '{}' must have shape {} (? or a name: any size), got {shape:?}",
                spec.name,
                spec.dims_text(),
            ),
        ));
    }
    for (i, &got) in shape.iter().enumerate() {
        if got == 0 && !allow_empty {
            return Err(WireError::new(
                ErrorCode::ShapeMismatch,
                format!(
                    "input '{}' has size 0 in dimension {i} ({shape:?}): empty inputs are refused \
                     (ONNX Runtime aborts on some; model.toml allow-empty-inputs = true lets \
                     them through)",
                    spec.name
                ),
            ));
        }
        if let Some(&max) = spec.max_dims.get(i)
            && got > max
        {
            return Err(WireError::new(
                ErrorCode::TensorTooLarge,
                format!(
                    "input '{}' dimension {i} is {got}, over this model's limit of {max} \
                     (limits {:?}; model.toml max-dims raises them)",
                    spec.name, spec.max_dims
                ),
            ));
        }
    }
    Ok(())
}

/// A dynamic dimension's default limit is this many times its largest warmup size...
pub const DIM_LIMIT_FACTOR: u64 = 8;
/// ...and never less than this: PP-OCR detector images of 960–1280 px and recognizer crops
/// 48 × up to ~2000 px pass, so do batches of up to 2048 rows.
pub const DIM_LIMIT_FLOOR: u64 = 2048;

/// The largest size each dimension of `spec` accepts: a fixed dimension its own size; a
/// dynamic one what model.toml `max-dims` gives for it (a positive number; 0 or -1 = the
/// default), by default `max(DIM_LIMIT_FLOOR, DIM_LIMIT_FACTOR × warm[i])`, where `warm` is
/// the input's largest warmup shape (the batch size in a dynamic first dimension). Errors name
/// what is wrong with the configured limits.
pub fn max_dims(
    spec: &TensorSpec,
    warm: &[u64],
    configured: Option<&[i64]>,
) -> Result<Vec<u64>, String> {
    if let Some(c) = configured
        && c.len() != spec.dims.len()
    {
        return Err(format!(
            "max-dims for '{}' has {} dimensions, the input has {} ({})",
            spec.name,
            c.len(),
            spec.dims.len(),
            spec.dims_text()
        ));
    }
    spec.dims
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let given = configured
                .and_then(|c| c.get(i))
                .copied()
                .filter(|&g| g > 0);
            match (d, given) {
                (d, Some(g)) if d >= 0 && g != d => Err(format!(
                    "max-dims for '{}' gives {g} for dimension {i}, which is fixed at {d}",
                    spec.name
                )),
                (d, _) if d >= 0 => Ok(d as u64),
                (_, Some(g)) => Ok(g as u64),
                (_, None) => {
                    let w = warm.get(i).copied().unwrap_or(0);
                    Ok(w.saturating_mul(DIM_LIMIT_FACTOR).max(DIM_LIMIT_FLOOR))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxd_protocol::{DType, Tensor};

    fn spec(name: &str, dtype: DType, dims: Vec<i64>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            dim_names: dims.iter().map(|_| String::new()).collect(),
            dims,
            max_dims: Vec::new(),
            warmup_dims: Vec::new(),
            warmup_value: None,
        }
    }

    fn sig() -> Signature {
        Signature {
            inputs: vec![
                spec("x", DType::Float32, vec![-1, 3]),
                spec("sr", DType::Int64, vec![]),
            ],
            outputs: vec![spec("y", DType::Float32, vec![-1])],
            allow_empty: false,
            axes: Default::default(),
        }
    }

    fn req(inputs: Vec<Tensor>) -> InferRequest {
        InferRequest {
            model: "m".into(),
            version: None,
            inputs,
            outputs: vec![],
            output_regions: Vec::new(),
            output_area: None,
            priority: None,
            timeout_ms: None,
            inline_overflow: false,
        }
    }

    fn x(rows: u64) -> Tensor {
        Tensor::inline(
            "x",
            DType::Float32,
            vec![rows, 3],
            vec![0; rows as usize * 12],
        )
    }

    fn sr() -> Tensor {
        Tensor::inline("sr", DType::Int64, vec![], vec![0; 8])
    }

    fn check_(sig: &Signature, req: InferRequest) -> Result<Checked, WireError> {
        check(sig, req, None)
    }

    fn code(r: Result<Checked, WireError>) -> ErrorCode {
        r.unwrap_err().kind().unwrap()
    }

    #[test]
    fn accepts_any_dynamic_dim_and_orders_inputs() {
        let c = check_(&sig(), req(vec![sr(), x(5)])).unwrap();
        assert_eq!(c.inputs[0].name, "x");
        assert_eq!(c.inputs[1].name, "sr");
        assert_eq!(c.outputs, vec!["y".to_string()]);
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        assert_eq!(
            code(check_(&sig(), req(vec![x(1)]))),
            ErrorCode::MissingInput
        );
        let mut extra = vec![x(1), sr()];
        extra.push(Tensor::inline("z", DType::Float32, vec![1], vec![0; 4]));
        assert_eq!(code(check_(&sig(), req(extra))), ErrorCode::UnknownInput);
        let wrong_dtype = Tensor::inline("x", DType::Float64, vec![1, 3], vec![0; 24]);
        assert_eq!(
            code(check_(&sig(), req(vec![wrong_dtype, sr()]))),
            ErrorCode::DtypeMismatch
        );
        let wrong_dim = Tensor::inline("x", DType::Float32, vec![1, 4], vec![0; 16]);
        assert_eq!(
            code(check_(&sig(), req(vec![wrong_dim, sr()]))),
            ErrorCode::ShapeMismatch
        );
        let wrong_rank = Tensor::inline("x", DType::Float32, vec![3], vec![0; 12]);
        assert_eq!(
            code(check_(&sig(), req(vec![wrong_rank, sr()]))),
            ErrorCode::ShapeMismatch
        );
        let short = Tensor::inline("x", DType::Float32, vec![1, 3], vec![0; 11]);
        assert_eq!(
            code(check_(&sig(), req(vec![short, sr()]))),
            ErrorCode::DataLengthMismatch
        );
        assert_eq!(
            code(check_(&sig(), req(vec![x(1), x(1), sr()]))),
            ErrorCode::InvalidRequest
        );
        let mut r = req(vec![x(1), sr()]);
        r.outputs = vec!["nope".into()];
        assert_eq!(code(check_(&sig(), r)), ErrorCode::UnknownOutput);
        let mut r = req(vec![x(1), sr()]);
        r.outputs = vec!["y".into(), "y".into()];
        assert_eq!(code(check_(&sig(), r)), ErrorCode::InvalidRequest);
    }

    #[test]
    fn empty_inputs_are_refused_unless_the_model_allows_them() {
        let e = check_(&sig(), req(vec![x(0), sr()])).unwrap_err();
        assert_eq!(e.kind(), Some(ErrorCode::ShapeMismatch));
        assert!(
            e.message.contains("'x'") && e.message.contains("dimension 0"),
            "{e}"
        );
        let mut open = sig();
        open.allow_empty = true;
        assert!(check_(&open, req(vec![x(0), sr()])).is_ok());
    }

    #[test]
    fn dimensions_over_the_limit_or_past_int64_are_too_large() {
        let mut limited = sig();
        limited.inputs[0].max_dims = vec![4, 3];
        assert!(check_(&limited, req(vec![x(4), sr()])).is_ok());
        let e = check_(&limited, req(vec![x(5), sr()])).unwrap_err();
        assert_eq!(e.kind(), Some(ErrorCode::TensorTooLarge));
        assert!(
            e.message.contains("dimension 0 is 5") && e.message.contains("max-dims"),
            "{e}"
        );
        // Zero elements in all, but a dimension ONNX Runtime cannot represent.
        let mut open = sig();
        open.inputs[0] = spec("x", DType::Float32, vec![-1, -1]);
        open.allow_empty = true;
        let huge = Tensor::inline("x", DType::Float32, vec![1 << 63, 0], vec![]);
        assert_eq!(
            code(check_(&open, req(vec![huge, sr()]))),
            ErrorCode::TensorTooLarge
        );
    }

    #[test]
    fn default_limits_follow_the_warmup_with_a_floor() {
        let det = spec("x", DType::Float32, vec![-1, 3, -1, -1]);
        // Warmed at 32 rows of 32 × 32: the floor.
        assert_eq!(
            max_dims(&det, &[32, 3, 32, 32], None).unwrap(),
            vec![2048, 3, 2048, 2048]
        );
        // Warmed at 640 × 960: eight times that.
        assert_eq!(
            max_dims(&det, &[1, 3, 640, 960], None).unwrap(),
            vec![2048, 3, 5120, 7680]
        );
        // Configured; 0 and -1 keep the default; fixed dimensions must stay as they are.
        assert_eq!(
            max_dims(&det, &[1, 3, 32, 32], Some(&[4, 3, 0, 640])).unwrap(),
            vec![4, 3, 2048, 640]
        );
        assert_eq!(
            max_dims(&det, &[1, 3, 32, 32], Some(&[4, -1, -1, -1])).unwrap(),
            vec![4, 3, 2048, 2048]
        );
        assert!(max_dims(&det, &[1, 3, 32, 32], Some(&[4, 4, 0, 0])).is_err());
        assert!(max_dims(&det, &[1, 3, 32, 32], Some(&[4, 3])).is_err());
        // Scalars have no dimensions to limit.
        assert!(
            max_dims(&spec("sr", DType::Int64, vec![]), &[], None)
                .unwrap()
                .is_empty()
        );
    }
}
