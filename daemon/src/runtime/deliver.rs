//! Putting a job's outputs where it wants them: inline in the answer, in a region of the
//! client's arena, or packed into its output area; every region is checked before anything is
//! written (no partial writes), and with `inline_overflow` what does not fit goes inline.

use rxd_protocol::DType;

use super::RuntimeError;
use super::job::{OutputData, OutputTarget, OutputTensor, Placement};

/// A model output's bytes, wherever they are (ORT's buffer, a cache entry).
pub struct View<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: &'a [u8],
}

/// Puts outputs where the job wants them: checks every region first (no partial writes),
/// then copies into the arena or into inline buffers.
pub fn deliver(
    views: &[View<'_>],
    placement: &Placement,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    // Everything inline (the common case for small answers): nothing to place or check.
    if placement.targets.iter().all(|t| *t == OutputTarget::Inline) {
        return Ok(views
            .iter()
            .map(|v| OutputTensor {
                name: v.name.to_string(),
                dtype: v.dtype,
                shape: v.shape.clone(),
                data: OutputData::Inline(v.bytes.to_vec()),
            })
            .collect());
    }
    let wanted: Vec<String> = views.iter().map(|v| v.name.to_string()).collect();
    let bytes: Vec<&[u8]> = views.iter().map(|v| v.bytes).collect();
    let offsets = place(placement, &wanted, &bytes)?;
    let mut result = Vec::with_capacity(views.len());
    for (v, offset) in views.iter().zip(offsets) {
        let data = match (offset, &placement.arena) {
            (Some(offset), Some(map)) => {
                map.copy_in(offset, v.bytes)
                    .map_err(|e| RuntimeError::Run(e.to_string()))?;
                OutputData::Arena {
                    offset,
                    len: v.bytes.len() as u64,
                }
            }
            _ => OutputData::Inline(v.bytes.to_vec()),
        };
        result.push(OutputTensor {
            name: v.name.to_string(),
            dtype: v.dtype,
            shape: v.shape.clone(),
            data,
        });
    }
    Ok(result)
}

/// Decides where each output goes (`None` = inline) and checks, before anything is written,
/// that every region is large enough: no partial writes. With `inline_overflow`, an output
/// that does not fit its region, or the area after the outputs placed before it, goes inline.
fn place(
    placement: &Placement,
    wanted: &[String],
    bytes: &[&[u8]],
) -> Result<Vec<Option<u64>>, RuntimeError> {
    let mut offsets = Vec::with_capacity(bytes.len());
    let (area_start, area_len) = placement.area.unwrap_or((0, 0));
    let area_end = area_start.saturating_add(area_len);
    let mut cursor = area_start;
    let overflow = placement.inline_overflow;
    for (i, data) in bytes.iter().enumerate() {
        let n = data.len() as u64;
        match placement
            .targets
            .get(i)
            .copied()
            .unwrap_or(OutputTarget::Inline)
        {
            OutputTarget::Inline => offsets.push(None),
            OutputTarget::Region { len, .. } if n > len && overflow => offsets.push(None),
            OutputTarget::Region { offset, len } => {
                if n > len {
                    return Err(RuntimeError::OutputTooSmall {
                        target: format!("the region for output '{}'", wanted[i]),
                        needed: n,
                        available: len,
                    });
                }
                offsets.push(Some(offset));
            }
            OutputTarget::Area => {
                let start = cursor.next_multiple_of(rxd_protocol::OUTPUT_ALIGN);
                let end = start.saturating_add(n);
                if overflow && end > area_end {
                    offsets.push(None);
                    continue;
                }
                cursor = end;
                offsets.push(Some(start));
            }
        }
    }
    let needed = cursor - area_start;
    if needed > area_len {
        return Err(RuntimeError::OutputTooSmall {
            target: "the output area".into(),
            needed,
            available: area_len,
        });
    }
    Ok(offsets)
}

#[cfg(test)]
mod place_tests {
    use super::*;

    fn placement(
        targets: Vec<OutputTarget>,
        area: Option<(u64, u64)>,
        overflow: bool,
    ) -> Placement {
        Placement {
            arena: None,
            targets,
            area,
            inline_overflow: overflow,
        }
    }

    #[test]
    fn outputs_that_do_not_fit_go_inline_only_when_the_request_allows_it() {
        let wanted = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let (a, b, c) = (vec![0u8; 100], vec![0u8; 300], vec![0u8; 10]);
        let bytes: Vec<&[u8]> = vec![&a, &b, &c];
        let area = vec![OutputTarget::Area; 3];
        // An area of 256 bytes holds `a` (at 0) and, after `b` overflows, `c` (at 128).
        let p = placement(area.clone(), Some((1024, 256)), true);
        assert_eq!(
            place(&p, &wanted, &bytes).unwrap(),
            vec![Some(1024), None, Some(1152)]
        );
        let p = placement(area, Some((1024, 256)), false);
        assert!(matches!(
            place(&p, &wanted, &bytes),
            Err(RuntimeError::OutputTooSmall { needed: 458, .. })
        ));
        let region = vec![
            OutputTarget::Region { offset: 0, len: 50 },
            OutputTarget::Region {
                offset: 64,
                len: 300,
            },
            OutputTarget::Inline,
        ];
        let p = placement(region.clone(), None, true);
        assert_eq!(
            place(&p, &wanted, &bytes).unwrap(),
            vec![None, Some(64), None]
        );
        let p = placement(region, None, false);
        assert!(matches!(
            place(&p, &wanted, &bytes),
            Err(RuntimeError::OutputTooSmall { needed: 100, .. })
        ));
    }
}
