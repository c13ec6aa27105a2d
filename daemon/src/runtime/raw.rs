//! The daemon's only unsafe code: copying bytes into and out of ORT tensor buffers.
//!
//! Invariant: a buffer is touched only after checking that it is CPU-accessible and that its
//! byte size, as ORT reports it, equals the slice's length.
#![allow(unsafe_code)]

use ort::memory::Allocator;
use ort::value::{DynTensor, DynTensorRef, TensorElementType};

/// Creates a CPU tensor of `ty` and `shape` holding a copy of `bytes`.
pub fn tensor_from_bytes(
    ty: TensorElementType,
    shape: &[u64],
    bytes: &[u8],
) -> Result<DynTensor, String> {
    let dims: Vec<i64> = shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| format!("dimension {d} too large")))
        .collect::<Result<_, _>>()?;
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
