//! Checks an inference request against a model's signature before any work is queued.
//!
//! Pure: no IO, no ORT. Every rejection carries its wire code; a request that passes has one
//! tensor per model input with the right dtype, rank, fixed dimensions and byte length.

use std::sync::Arc;

use rxd_protocol::{ArenaRef, ErrorCode, InferRequest, TensorData, WireError};
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
        let fits = t.shape.len() == spec.dims.len()
            && t.shape
                .iter()
                .zip(&spec.dims)
                .all(|(&got, &want)| want < 0 || got == want as u64);
        if !fits {
            return Err(WireError::new(
                ErrorCode::ShapeMismatch,
                format!(
                    "input '{}' must have shape {} (-1 = any), got {:?}",
                    t.name,
                    dims_text(&spec.dims),
                    t.shape
                ),
            ));
        }
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
        for name in &req.outputs {
            if !sig.outputs.iter().any(|s| &s.name == name) {
                return Err(WireError::new(
                    ErrorCode::UnknownOutput,
                    format!("model '{}' has no output '{name}'", req.model),
                ));
            }
        }
        req.outputs
    };
    let placement = place(sig, &outputs, &req.output_regions, req.output_area, arena)?;
    Ok(Checked {
        inputs: slots.into_iter().flatten().collect(),
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
    })
}

fn dims_text(dims: &[i64]) -> String {
    let parts: Vec<String> = dims.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxd_protocol::{DType, Tensor, TensorSpec};

    fn sig() -> Signature {
        let spec = |name: &str, dtype, dims: Vec<i64>| TensorSpec {
            name: name.into(),
            dtype,
            dim_names: dims.iter().map(|_| String::new()).collect(),
            dims,
        };
        Signature {
            inputs: vec![
                spec("x", DType::Float32, vec![-1, 3]),
                spec("sr", DType::Int64, vec![]),
            ],
            outputs: vec![spec("y", DType::Float32, vec![-1])],
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
    }
}
