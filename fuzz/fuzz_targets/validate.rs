//! Fuzz target: request validation (`rxd::validate::check`) — a fuzzed inference request
//! against a fuzzed model signature, with or without a real sealed arena. Must never panic;
//! whatever passes must be what a worker may run: one input per model input with its dtype,
//! rank and fixed dimensions, inline bytes of exactly the right length, arena references
//! inside the arena and aligned, outputs the model has, output places inside the arena.
//! Run: `scripts/fuzz validate [SECONDS]`.
#![no_main]

use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rxd::runtime::{InputData, OutputTarget, Signature};
use rxd_protocol::{
    ArenaRef, DType, InferRequest, OutputRegion, Tensor, TensorData, TensorSpec,
    message::element_count,
};
use rxd_shm::Mapping;

/// Arena size: not a multiple of anything, so that ends are checked exactly.
const ARENA: usize = 65_536 + 24;

fn arena() -> &'static Arc<Mapping> {
    static MAP: OnceLock<Arc<Mapping>> = OnceLock::new();
    MAP.get_or_init(|| {
        let fd = rxd_shm::create_sealed("rxd-fuzz", ARENA).unwrap();
        Arc::new(Mapping::map(fd.as_fd(), ARENA).unwrap())
    })
}

const NAMES: [&str; 4] = ["x", "input", "y", "state"];

fn name(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(if u.ratio(7, 8)? {
        NAMES[u.choose_index(NAMES.len())?].to_string()
    } else {
        u.arbitrary::<String>()?
    })
}

fn dtype(u: &mut Unstructured<'_>) -> Result<DType> {
    Ok(DType::ALL[u.choose_index(DType::ALL.len())?])
}

/// A small number, or now and then anything.
fn num(u: &mut Unstructured<'_>, small: u64) -> Result<u64> {
    Ok(if u.ratio(7, 8)? {
        u.int_in_range(0..=small)?
    } else {
        u.arbitrary()?
    })
}

fn specs(u: &mut Unstructured<'_>) -> Result<Vec<TensorSpec>> {
    let mut v: Vec<TensorSpec> = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let name = name(u)?;
        if v.iter().any(|s| s.name == name) {
            continue; // ONNX names are unique
        }
        let rank = u.int_in_range(0..=4)?;
        let dims: Vec<i64> = (0..rank)
            .map(|_| {
                Ok(if u.ratio(1, 3)? {
                    -1
                } else {
                    num(u, 6)? as i64
                })
            })
            .collect::<Result<_>>()?;
        let dim_names = vec![String::new(); dims.len()];
        v.push(TensorSpec {
            name,
            dtype: dtype(u)?,
            dims,
            dim_names,
            max_dims: Vec::new(),
            warmup_dims: Vec::new(),
            warmup_value: None,
        });
    }
    Ok(v)
}

fn arena_ref(u: &mut Unstructured<'_>, len: u64) -> Result<ArenaRef> {
    let offset = match u.int_in_range(0..=3)? {
        0 => u.arbitrary()?,
        1 => (ARENA as u64).saturating_sub(len),
        2 => (ARENA as u64)
            .saturating_sub(len)
            .saturating_add(num(u, 8)?),
        _ => num(u, 4096)?,
    };
    let len = if u.ratio(3, 4)? {
        len
    } else {
        num(u, 1 << 17)?
    };
    Ok(ArenaRef { offset, len })
}

/// A request mostly shaped like the signature, with every field now and then off.
fn request(u: &mut Unstructured<'_>, sig: &Signature) -> Result<InferRequest> {
    let mut inputs = Vec::new();
    for spec in &sig.inputs {
        if u.ratio(1, 16)? {
            continue;
        }
        let dtype = if u.ratio(15, 16)? {
            spec.dtype
        } else {
            dtype(u)?
        };
        let mut shape: Vec<u64> = spec
            .dims
            .iter()
            .map(|&d| {
                Ok(if d < 0 || u.ratio(1, 16)? {
                    num(u, 5)?
                } else {
                    d as u64
                })
            })
            .collect::<Result<_>>()?;
        if u.ratio(1, 16)? {
            shape.push(num(u, 3)?);
        }
        let bytes = element_count(&shape)
            .and_then(|e| dtype.byte_len(e))
            .unwrap_or(0);
        let data = if u.ratio(1, 2)? {
            let n = if bytes <= 4096 && u.ratio(7, 8)? {
                bytes
            } else {
                u.int_in_range(0..=bytes.min(4096) + 8)?
            };
            TensorData::Inline(vec![0xA5; n as usize])
        } else {
            TensorData::Arena(arena_ref(u, bytes)?)
        };
        let name = if u.ratio(15, 16)? {
            spec.name.clone()
        } else {
            name(u)?
        };
        inputs.push(Tensor {
            name,
            dtype,
            shape,
            data,
        });
        if u.ratio(1, 32)? {
            inputs.push(inputs[inputs.len() - 1].clone());
        }
    }
    let mut req = InferRequest::new("m", inputs);
    for o in &sig.outputs {
        if u.ratio(1, 4)? {
            req.outputs.push(o.name.clone());
        }
        if u.ratio(1, 4)? {
            let len = num(u, 256)?;
            let r = arena_ref(u, len)?;
            req.output_regions.push(OutputRegion {
                name: o.name.clone(),
                offset: r.offset,
                len: r.len,
            });
        }
    }
    if u.ratio(1, 8)? {
        req.outputs.push(name(u)?);
    }
    if u.ratio(1, 3)? {
        let len = num(u, 1024)?;
        req.output_area = Some(arena_ref(u, len)?);
    }
    Ok(req)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (Ok(inputs), Ok(outputs)) = (specs(&mut u), specs(&mut u)) else {
        return;
    };
    let axes = rxd::runtime::Axes::default_for(&inputs, &outputs);
    let sig = Signature {
        inputs,
        outputs,
        allow_empty: false,
        axes,
    };
    let Ok(req) = request(&mut u, &sig) else {
        return;
    };
    let with_arena = u.arbitrary::<bool>().unwrap_or(true);
    let map = with_arena.then(arena);
    let Ok(checked) = rxd::validate::check(&sig, req.clone(), map) else {
        return;
    };
    // One input per model input, in the model's order, matching its spec.
    assert_eq!(checked.inputs.len(), sig.inputs.len());
    for (t, spec) in checked.inputs.iter().zip(&sig.inputs) {
        assert_eq!(t.name, spec.name);
        assert_eq!(t.dtype, spec.dtype);
        assert_eq!(t.shape.len(), spec.dims.len());
        for (&got, &want) in t.shape.iter().zip(&spec.dims) {
            assert!(want < 0 || got == want as u64);
        }
        let bytes = element_count(&t.shape)
            .and_then(|e| t.dtype.byte_len(e))
            .expect("sizes of a passed tensor do not overflow");
        match &t.data {
            InputData::Inline(b) => assert_eq!(b.len() as u64, bytes),
            InputData::Shared { map, offset, len } => {
                assert_eq!(*len, bytes);
                assert!(
                    offset
                        .checked_add(*len)
                        .is_some_and(|e| e <= map.len() as u64)
                );
                assert_eq!(offset % t.dtype.alignment(), 0);
                assert!(Arc::ptr_eq(map, arena()));
            }
        }
    }
    // Outputs the model has; output places inside the arena.
    assert!(!checked.outputs.is_empty() || sig.outputs.is_empty());
    for o in &checked.outputs {
        assert!(sig.outputs.iter().any(|s| &s.name == o));
    }
    let p = &checked.placement;
    if !p.targets.is_empty() {
        assert_eq!(p.targets.len(), checked.outputs.len());
        assert!(p.arena.is_some());
    }
    for t in &p.targets {
        if let OutputTarget::Region { offset, len } = t {
            assert!(offset.checked_add(*len).is_some_and(|e| e <= ARENA as u64));
        }
    }
    if let Some((offset, len)) = p.area {
        assert!(offset.checked_add(len).is_some_and(|e| e <= ARENA as u64));
    }
});
