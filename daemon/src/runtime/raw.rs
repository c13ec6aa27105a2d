//! The daemon's unsafe code around ONNX Runtime: copying bytes into and out of ORT tensor
//! buffers, and building input tensors directly over a client's shared-memory arena.
//! (Shared memory itself — mapping, fd passing — is in the `rxd-shm` crate.)
//!
//! Invariants: a buffer is touched only after checking that it is CPU-accessible and that its
//! byte size, as ORT reports it, equals the slice's length; a tensor over the arena is built
//! only after the range check in `Mapping::ptr`, a length check against dtype × shape and an
//! alignment check, and never outlives the borrow of the mapping.
#![allow(unsafe_code)]

use ort::memory::{Allocator, MemoryInfo};
use ort::session::SessionInputValue;
use ort::value::{DynTensor, DynTensorRef, Shape, TensorElementType, TensorRefMut};
use rxd_shm::Mapping;

fn dims_of(shape: &[u64]) -> Result<Vec<i64>, String> {
    shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| format!("dimension {d} too large")))
        .collect()
}

/// An input tensor over `len` bytes of the arena at `offset`, without copying, for the types
/// whose values ONNX Runtime only computes with ([`arena_zero_copy_type`]); other types are
/// copied out first: bool (normalised to 0/1), the packed and 8-bit float types, and the
/// 32- and 64-bit integers, which may be indices or sizes.
pub fn tensor_over_mapping<'a>(
    map: &'a Mapping,
    offset: u64,
    len: u64,
    ty: TensorElementType,
    shape: &[u64],
) -> Result<SessionInputValue<'a>, String> {
    if !arena_zero_copy_type(ty) {
        let buf = map.read_out(offset, len).map_err(|e| e.to_string())?;
        return Ok(tensor_from_bytes(ty, shape, &buf)?.into());
    }
    let ptr = map.ptr(offset, len).map_err(|e| e.to_string())?;
    // SAFETY: `Mapping::ptr` checked that `ptr..ptr+len` lies inside the mapping, which `map`
    // keeps mapped for 'a. ORT only reads inputs; the peer may change the bytes concurrently,
    // which can only change the numbers computed (every bit pattern is a valid value of the
    // zero-copy types).
    unsafe { over_raw(ptr, len, ty, shape) }
}

/// An input tensor over `bytes` (a gathered batch, an inline input), without copying, for the
/// plain numeric types at their alignment; other types, or misaligned bytes, are copied into
/// an ORT tensor.
pub fn tensor_over_bytes<'a>(
    bytes: &'a [u8],
    ty: TensorElementType,
    shape: &[u64],
) -> Result<SessionInputValue<'a>, String> {
    let align = match ty {
        TensorElementType::Float64 | TensorElementType::Int64 | TensorElementType::Uint64 => 8,
        _ => 4,
    };
    if !zero_copy_type(ty) || !(bytes.as_ptr() as usize).is_multiple_of(align) {
        return Ok(tensor_from_bytes(ty, shape, bytes)?.into());
    }
    // SAFETY: `bytes` is a live slice of `bytes.len()` bytes borrowed for 'a; ORT only reads
    // inputs, so the cast to a mutable pointer is never written through.
    unsafe { over_raw(bytes.as_ptr().cast_mut(), bytes.len() as u64, ty, shape) }
}

/// Whether an input of `ty` may be read by ONNX Runtime straight from the arena, which the
/// peer can rewrite while the run reads it. A value read twice may then differ between the
/// reads. For data that is only computed with, that changes the numbers the peer gets back
/// and nothing else. But 32- and 64-bit integers are what ONNX makes indices and sizes of
/// (`Gather`, `ScatterND`, `Slice`, `Reshape`, `TopK`, `Expand`): a kernel that checks every
/// index and then reads the indices again to use them (ORT's `Gather` does) would use an
/// index it never checked — reading, or writing, outside its tensors. Those are copied out of
/// the arena first (they are small: ids, masks, rates); floats and 8- and 16-bit integers
/// (images, audio, quantized data) are not.
fn arena_zero_copy_type(ty: TensorElementType) -> bool {
    use TensorElementType as T;
    zero_copy_type(ty) && !matches!(ty, T::Int32 | T::Uint32 | T::Int64 | T::Uint64)
}

fn zero_copy_type(ty: TensorElementType) -> bool {
    use TensorElementType as T;
    matches!(
        ty,
        T::Float32
            | T::Float64
            | T::Int8
            | T::Uint8
            | T::Int16
            | T::Uint16
            | T::Int32
            | T::Uint32
            | T::Int64
            | T::Uint64
    )
}

/// A tensor over `len` bytes at `ptr`, checked against `ty` × `shape` and `ty`'s alignment.
///
/// # Safety
/// `ptr..ptr+len` must be readable for 'a, and nothing may free it while the tensor lives.
unsafe fn over_raw<'a>(
    ptr: *mut u8,
    len: u64,
    ty: TensorElementType,
    shape: &[u64],
) -> Result<SessionInputValue<'a>, String> {
    let dims = dims_of(shape)?;
    let elements: u64 = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    macro_rules! zero_copy {
        ($t:ty) => {{
            let size = std::mem::size_of::<$t>() as u64;
            if elements.checked_mul(size) != Some(len) {
                return Err(format!("{len} bytes for {elements} elements of {ty:?}"));
            }
            if !(ptr as usize).is_multiple_of(std::mem::align_of::<$t>()) {
                return Err(format!("input data is not aligned for {ty:?}"));
            }
            // SAFETY: the caller guarantees `ptr..ptr+len` is readable for 'a; `len` equals
            // elements × size_of::<T>() and `ptr` is aligned for T (both checked above).
            let t = unsafe {
                TensorRefMut::<$t>::from_raw(MemoryInfo::default(), ptr.cast(), Shape::from(dims))
            }
            .map_err(|e| e.to_string())?;
            Ok(t.into())
        }};
    }
    use TensorElementType as T;
    match ty {
        T::Float32 => zero_copy!(f32),
        T::Float64 => zero_copy!(f64),
        T::Int8 => zero_copy!(i8),
        T::Uint8 => zero_copy!(u8),
        T::Int16 => zero_copy!(i16),
        T::Uint16 => zero_copy!(u16),
        T::Int32 => zero_copy!(i32),
        T::Uint32 => zero_copy!(u32),
        T::Int64 => zero_copy!(i64),
        T::Uint64 => zero_copy!(u64),
        other => Err(format!("no zero-copy tensor for {other:?}")),
    }
}

/// Creates a CPU tensor of `ty` and `shape` holding a copy of `bytes`.
pub fn tensor_from_bytes(
    ty: TensorElementType,
    shape: &[u64],
    bytes: &[u8],
) -> Result<DynTensor, String> {
    let dims = dims_of(shape)?;
    let mut tensor = DynTensor::new(&Allocator::default(), ty, dims).map_err(|e| e.to_string())?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err("tensor memory is not CPU-accessible".into());
    }
    let size = tensor.size().ok_or("tensor has no byte size")?;
    if size != bytes.len() {
        return Err(format!("tensor holds {size} bytes, {} given", bytes.len()));
    }
    if size > 0 {
        let dst = tensor.data_ptr_mut().cast::<u8>();
        if dst.is_null() {
            return Err("tensor has no data buffer".into());
        }
        // SAFETY: `dst` is the non-null, CPU-accessible buffer of a tensor we own exclusively,
        // `size` bytes long (checked equal to `bytes.len()` above); a fresh ORT allocation
        // cannot overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, size) };
        if ty == TensorElementType::Bool {
            // SAFETY: same buffer as above, exclusively ours; normalise to 0/1 so that ORT
            // never reads an invalid bool.
            let b = unsafe { std::slice::from_raw_parts_mut(dst, size) };
            for x in b {
                *x = u8::from(*x != 0);
            }
        }
    }
    Ok(tensor)
}

/// The bytes of a CPU tensor, borrowed for the tensor's lifetime.
pub fn tensor_bytes<'a>(tensor: &'a DynTensorRef<'_>) -> Result<&'a [u8], String> {
    if !tensor.memory_info().is_cpu_accessible() {
        return Err("output is not in CPU memory".into());
    }
    let size = tensor.size().ok_or("output has no byte size")?;
    if size == 0 {
        return Ok(&[]);
    }
    let ptr = tensor.data_ptr().cast::<u8>();
    if ptr.is_null() {
        return Err("output has no data buffer".into());
    }
    // SAFETY: `ptr` is the non-null, CPU-accessible buffer of `tensor`, `size` bytes long as
    // ORT reports it; the returned slice borrows `tensor`, which keeps the buffer alive and
    // unmodified (nothing else holds the run's outputs).
    Ok(unsafe { std::slice::from_raw_parts(ptr, size) })
}

/// Fixes glibc's heap thresholds, which it otherwise moves: after each large free it raises
/// the size from which a block is mapped on its own (up to 32 MiB) and, with it, the size a
/// thread's heap must have free at its top before it is given back (twice that). As
/// `malloc_trim` never shrinks the top of a thread's heap, what ONNX Runtime freed there when
/// a model was unloaded stayed resident, and each load/unload cycle left more behind
/// (ppocr_rec beside two resident models, 20 cycles: +4 to +12 MiB; with the thresholds
/// fixed, +0.4 to +3). Fixed here: a heap gives back a free top above 128 KiB at once; blocks are mapped
/// on their own from 32 MiB (the largest threshold glibc would have moved to: mapping every
/// block above 128 KiB, glibc's starting value, made YOLOv8n's load 12 ms slower, as each
/// large buffer of a load then faults in fresh pages). Runs do not pay for either: ORT's arena
/// keeps its regions across runs and Rust allocates through mimalloc.
pub fn fix_heap_thresholds() {
    for (param, value) in [
        (nix::libc::M_TRIM_THRESHOLD, 128 << 10),
        (nix::libc::M_MMAP_THRESHOLD, 32 << 20),
    ] {
        // SAFETY: mallopt takes no pointers; it sets a glibc malloc parameter under the main
        // arena's lock and is safe to call from any thread at any time.
        if unsafe { nix::libc::mallopt(param, value) } != 1 {
            tracing::warn!(param, value, "mallopt refused a heap threshold");
        }
    }
}

/// Hands memory that the allocators hold free back to the kernel (after a model is unloaded
/// or evicted, so that its pages really leave the process, and around a load, whose footprint
/// is the resident set's growth). Two allocators: glibc's holds what ONNX Runtime allocates,
/// mimalloc (the daemon's global allocator) what Rust does. mimalloc keeps freed pages
/// committed for a while (its purge delay: 10 ms for a page, 100 ms for an arena in the v2
/// mimalloc built here): a forced collect returns them now, or a
/// load's transient buffers would be counted in its footprint.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap under its internal lock; it takes no
    // pointers from us and is safe to call from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    // SAFETY: mi_collect takes no pointers; it frees the calling thread's empty pages and
    // purges mimalloc's arenas under their own locks, safe from any thread at any time (it is
    // harmless where mimalloc is not the global allocator: it then holds nothing).
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// ORT's statistics of a session's CPU arena allocator (`InUse`, `MaxInUse`,
/// `TotalAllocated`, `NumReserves`, ...), or why they are not available.
pub fn arena_stats(session: &ort::session::Session) -> Result<Vec<(String, i64)>, String> {
    use ort::AsPointer;
    use ort::memory::{AllocationDevice, AllocatorType, MemoryType};
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| e.to_string())?;
    let allocator = Allocator::new(session, info).map_err(|e| e.to_string())?;
    let api = ort::api();
    let mut kvp: *mut ort::sys::OrtKeyValuePairs = std::ptr::null_mut();
    // SAFETY: `allocator` is a live allocator created above (ORT checked the session and
    // memory info); `kvp` is a valid out-pointer. On success ORT gives us a key/value set
    // that we release below; on failure the status is ours to read and release.
    let status = unsafe { (api.AllocatorGetStats)(allocator.ptr(), &mut kvp) };
    if !status.0.is_null() {
        // SAFETY: a non-null status from ORT: its message is a NUL-terminated string owned
        // by the status, read before the status is released exactly once.
        let message = unsafe {
            let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            m
        };
        return Err(message);
    }
    if kvp.is_null() {
        return Err("the allocator returned no statistics".into());
    }
    let mut keys: *const *const std::ffi::c_char = std::ptr::null();
    let mut values: *const *const std::ffi::c_char = std::ptr::null();
    let mut n: usize = 0;
    let mut out = Vec::new();
    // SAFETY: `kvp` is the non-null set ORT returned; ORT fills `keys`/`values` with `n`
    // pointers to NUL-terminated strings owned by `kvp`, which we read (null entries
    // skipped) before releasing `kvp` exactly once.
    unsafe {
        (api.GetKeyValuePairs)(kvp, &mut keys, &mut values, &mut n);
        if !keys.is_null() && !values.is_null() {
            for i in 0..n {
                let (k, v) = (*keys.add(i), *values.add(i));
                if k.is_null() || v.is_null() {
                    continue;
                }
                let k = std::ffi::CStr::from_ptr(k).to_string_lossy().into_owned();
                let v = std::ffi::CStr::from_ptr(v).to_string_lossy();
                if let Ok(v) = v.trim().parse::<i64>() {
                    out.push((k, v));
                }
            }
        }
        (api.ReleaseKeyValuePairs)(kvp);
    }
    Ok(out)
}

/// Registers one CPU arena allocator on `env`, shared by every session built with
/// `session.use_env_allocators` and capped at `max_mem` bytes (`arena_extend_strategy`
/// kSameAsRequested, so growth is what is asked for, not the next power of two). A run that
/// needs more than the cap fails with ORT's allocation error instead of growing the process.
pub fn register_capped_cpu_arena(
    env: &ort::environment::Environment,
    max_mem: usize,
) -> Result<(), String> {
    use ort::AsPointer;
    let api = ort::api();
    let read_status = |status: ort::sys::OrtStatusPtr| -> Result<(), String> {
        if status.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status from ORT: its message is a NUL-terminated string owned by
        // the status, read before the status is released exactly once.
        Err(unsafe {
            let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            m
        })
    };
    let mut info: *mut ort::sys::OrtMemoryInfo = std::ptr::null_mut();
    // SAFETY: `info` is a valid out-pointer; ORT writes a new memory info on success.
    read_status(unsafe {
        (api.CreateCpuMemoryInfo)(
            ort::sys::OrtAllocatorType::OrtArenaAllocator,
            ort::sys::OrtMemType::OrtMemTypeDefault,
            &mut info,
        )
    })?;
    let keys = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    let values: [usize; 2] = [max_mem, 1];
    let mut cfg: *mut ort::sys::OrtArenaCfg = std::ptr::null_mut();
    // SAFETY: `keys` and `values` are arrays of 2 live entries (NUL-terminated literals and
    // integers) for the duration of the call; `cfg` is a valid out-pointer.
    let made = read_status(unsafe {
        (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg)
    });
    let registered = made.and_then(|()| {
        // SAFETY: `env` is a live environment (borrowed for the call), `info` and `cfg` were
        // created above and are only read by ORT, which copies what it keeps.
        read_status(unsafe { (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info, cfg) })
    });
    // SAFETY: `cfg` (if created) and `info` were created above and are released exactly once.
    unsafe {
        if !cfg.is_null() {
            (api.ReleaseArenaCfg)(cfg);
        }
        (api.ReleaseMemoryInfo)(info);
    }
    registered
}
