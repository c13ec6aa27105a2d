//! The client side of the shared-memory arena: the mapping the daemon passed at the
//! handshake, an allocator over it, and buffers ([`ArenaBuf`]) that free themselves on drop —
//! so a failed request or a dropped future never leaks arena space.
//!
//! Write inputs in place through [`ArenaBuf::view_mut`], send them as [`ArenaBuf::tensor`]
//! references, name a buffer as the output area, and read outputs without copying through
//! [`ArenaBuf::view`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ndarray::{ArrayViewD, ArrayViewMutD, IxDyn};
use rxd_protocol::{ArenaRef, DType, OUTPUT_ALIGN, Tensor, TensorData};
use rxd_shm::{Mapping, Region};

use crate::ClientError;
use crate::tensor::Element;

/// Offsets handed out are multiples of this (enough for every dtype and for SIMD loads).
pub const ALIGN: u64 = OUTPUT_ALIGN;

struct Inner {
    map: Arc<Mapping>,
    /// Free ranges: offset → length, coalesced.
    free: Mutex<BTreeMap<u64, u64>>,
}

/// The connection's arena. Cheap to clone.
#[derive(Clone)]
pub struct Arena {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Arena({} bytes, {} free)",
            self.size(),
            self.free_bytes()
        )
    }
}

impl Arena {
    pub(crate) fn new(map: Mapping) -> Arena {
        let size = map.len() as u64;
        Arena {
            inner: Arc::new(Inner {
                map: Arc::new(map),
                free: Mutex::new(BTreeMap::from([(0, size)])),
            }),
        }
    }

    pub fn size(&self) -> u64 {
        self.inner.map.len() as u64
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.inner.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates `len` bytes (at least 1), aligned to [`ALIGN`]. First fit.
    pub fn alloc(&self, len: u64) -> Result<ArenaBuf, ClientError> {
        let want = len.max(1).next_multiple_of(ALIGN);
        let mut free = self.lock();
        let found = free
            .iter()
            .find(|&(_, &l)| l >= want)
            .map(|(&o, &l)| (o, l));
        let Some((offset, have)) = found else {
            return Err(ClientError::ArenaFull {
                wanted: len,
                free: free.values().sum(),
            });
        };
        free.remove(&offset);
        if have > want {
            free.insert(offset + want, have - want);
        }
        drop(free);
        let region = Region::new(self.inner.map.clone(), offset, want)
            .map_err(|e| ClientError::Tensor(e.to_string()))?;
        Ok(ArenaBuf {
            arena: self.clone(),
            region: Some(region),
            len,
        })
    }

    fn release(&self, offset: u64, len: u64) {
        let mut free = self.lock();
        let (mut start, mut size) = (offset, len);
        // Merge with the previous and the next free range.
        if let Some((&po, &pl)) = free.range(..offset).next_back()
            && po + pl == offset
        {
            free.remove(&po);
            start = po;
            size += pl;
        }
        if let Some(&nl) = free.get(&(offset + len)) {
            free.remove(&(offset + len));
            size += nl;
        }
        free.insert(start, size);
    }
}

/// An allocated piece of the arena; freed when dropped.
pub struct ArenaBuf {
    arena: Arena,
    region: Option<Region>,
    /// Bytes asked for (the region may be larger, rounded to [`ALIGN`]).
    len: u64,
}

impl std::fmt::Debug for ArenaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArenaBuf({}+{})", self.offset(), self.len)
    }
}

impl Drop for ArenaBuf {
    fn drop(&mut self) {
        if let Some(r) = self.region.take() {
            self.arena.release(r.offset(), r.len() as u64);
        }
    }
}

impl ArenaBuf {
    fn region(&self) -> &Region {
        self.region.as_ref().expect("present until drop")
    }

    pub fn offset(&self) -> u64 {
        self.region().offset()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a wire reference.
    pub fn as_ref(&self) -> ArenaRef {
        ArenaRef {
            offset: self.offset(),
            len: self.len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.region().as_slice()[..self.len as usize]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len as usize;
        let r = self.region.as_mut().expect("present until drop");
        &mut r.as_mut_slice()[..len]
    }

    /// A writable typed view of the buffer with `shape` (element count × size must fit).
    pub fn view_mut<T: Element + bytemuck::Pod>(
        &mut self,
        shape: &[usize],
    ) -> Result<ArrayViewMutD<'_, T>, ClientError> {
        let n: usize = shape.iter().product();
        let bytes = self
            .bytes_mut()
            .get_mut(..n * T::SIZE)
            .ok_or_else(|| ClientError::Tensor(format!("{shape:?} does not fit the buffer")))?;
        let slice: &mut [T] =
            bytemuck::try_cast_slice_mut(bytes).map_err(|e| ClientError::Tensor(e.to_string()))?;
        ArrayViewMutD::from_shape(IxDyn(shape), slice)
            .map_err(|e| ClientError::Tensor(e.to_string()))
    }

    /// A wire tensor whose bytes are this buffer's first `dtype × shape` bytes.
    pub fn tensor(&self, name: &str, dtype: DType, shape: Vec<u64>) -> Result<Tensor, ClientError> {
        let n = rxd_protocol::message::element_count(&shape)
            .and_then(|e| dtype.byte_len(e))
            .ok_or_else(|| ClientError::Tensor("shape overflows".into()))?;
        if n > self.len {
            return Err(ClientError::Tensor(format!(
                "{n} bytes do not fit a {}-byte buffer",
                self.len
            )));
        }
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape,
            data: TensorData::Arena(ArenaRef {
                offset: self.offset(),
                len: n,
            }),
        })
    }

    /// The bytes of an output tensor the daemon wrote into this buffer (checked to lie inside it).
    pub fn output_bytes(&self, t: &Tensor) -> Result<&[u8], ClientError> {
        let TensorData::Arena(r) = &t.data else {
            return Err(ClientError::Tensor(format!(
                "output '{}' is not in the arena",
                t.name
            )));
        };
        let start = r
            .offset
            .checked_sub(self.offset())
            .filter(|s| s.checked_add(r.len).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                ClientError::Tensor(format!("output '{}' lies outside this buffer", t.name))
            })?;
        Ok(&self.bytes()[start as usize..(start + r.len) as usize])
    }

    /// A read-only typed view of an output the daemon wrote into this buffer — no copy.
    pub fn view<T: Element + bytemuck::Pod>(
        &self,
        t: &Tensor,
    ) -> Result<ArrayViewD<'_, T>, ClientError> {
        if t.dtype != T::DTYPE {
            return Err(ClientError::Tensor(format!(
                "output '{}' is {}, not {}",
                t.name,
                t.dtype,
                T::DTYPE
            )));
        }
        let bytes = self.output_bytes(t)?;
        let slice: &[T] =
            bytemuck::try_cast_slice(bytes).map_err(|e| ClientError::Tensor(e.to_string()))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        ArrayViewD::from_shape(IxDyn(&shape), slice).map_err(|e| ClientError::Tensor(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn arena(size: usize) -> Arena {
        let fd = rxd_shm::create_sealed("rxd-client-test", size).unwrap();
        Arena::new(Mapping::map(fd.as_fd(), size).unwrap())
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_freed_on_drop() {
        let a = arena(4096);
        let x = a.alloc(10).unwrap();
        let y = a.alloc(100).unwrap();
        assert_eq!(x.offset() % ALIGN, 0);
        assert_eq!(y.offset() % ALIGN, 0);
        assert!(y.offset() >= x.offset() + 64);
        assert_eq!(a.free_bytes(), 4096 - 64 - 128);
        assert!(matches!(a.alloc(5000), Err(ClientError::ArenaFull { .. })));
        drop(x);
        drop(y);
        assert_eq!(a.free_bytes(), 4096);
        // Everything coalesced back into one range: the whole arena can be allocated again.
        let all = a.alloc(4096).unwrap();
        assert_eq!(all.offset(), 0);
    }

    #[test]
    fn typed_views_write_and_read_in_place() {
        let a = arena(4096);
        let mut b = a.alloc(24).unwrap();
        b.view_mut::<f32>(&[2, 3]).unwrap().fill(1.5);
        let t = b.tensor("x", DType::Float32, vec![2, 3]).unwrap();
        let v = b.view::<f32>(&t).unwrap();
        assert_eq!(v.shape(), &[2, 3]);
        assert!(v.iter().all(|&x| x == 1.5));
        assert!(b.tensor("x", DType::Float32, vec![2, 4]).is_err());
    }
}
