//! The client side of the shared-memory arena: the mapping the daemon passed at the
//! handshake, an allocator over it ([`rxd_shm::Allocator`]), and buffers ([`ArenaBuf`]) that
//! free themselves on drop — so a failed request or a dropped future never leaks arena space.
//!
//! Write inputs in place through [`ArenaBuf::view_mut`] and send them as
//! [`ArenaBuf::tensor`] references. Outputs go into buffers lent to the request for its whole
//! life ([`OutputBufs`], [`crate::Client::infer_into`]): the daemon writes them until it
//! answers, so the request borrows them mutably until then and nothing here can read them
//! meanwhile; read them without copying afterwards through [`ArenaBuf::view`]. A buffer lent
//! to a request whose future is dropped before the answer is emptied (length 0): the daemon
//! may still write its range, which is freed once the answer comes (never, if the connection
//! is gone first).

use std::sync::Arc;

use ndarray::{ArrayViewD, ArrayViewMutD, IxDyn};
use rxd_protocol::{ArenaRef, DType, OUTPUT_ALIGN, Tensor, TensorData};
use rxd_shm::{Allocator, Lent, Mapping, Region};

use crate::ClientError;
use crate::tensor::Element;

/// Offsets handed out are multiples of this (enough for every dtype and for SIMD loads).
pub const ALIGN: u64 = OUTPUT_ALIGN;

const _: () = assert!(rxd_shm::REGION_ALIGN == ALIGN);

/// The connection's arena. Cheap to clone.
#[derive(Clone)]
pub struct Arena {
    alloc: Arc<Allocator>,
    /// Bytes for tensors: the mapping, less a ring at its end.
    size: u64,
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
    /// The arena of the first `size` bytes of `map` (a ring lies after them).
    pub(crate) fn within(map: std::sync::Arc<Mapping>, size: u64) -> Arena {
        Arena {
            alloc: Allocator::within(map, size),
            size,
        }
    }

    /// Bytes for tensors (the arena's ring, if any, is not counted).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.alloc.free_bytes()
    }

    /// Allocates `len` bytes (at least 1), aligned to [`ALIGN`]. First fit.
    pub fn alloc(&self, len: u64) -> Result<ArenaBuf, ClientError> {
        let region = self
            .alloc
            .alloc(len)
            .ok_or_else(|| ClientError::ArenaFull {
                wanted: len,
                free: self.free_bytes(),
            })?;
        Ok(ArenaBuf {
            region: Some(region),
            len,
        })
    }
}

/// An allocated piece of the arena; freed when dropped.
pub struct ArenaBuf {
    /// `None` once lent to a request that was dropped before its answer.
    region: Option<Region>,
    /// Bytes asked for (the region may be larger, rounded to [`ALIGN`]).
    len: u64,
}

impl std::fmt::Debug for ArenaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArenaBuf({}+{})", self.offset(), self.len())
    }
}

impl ArenaBuf {
    pub fn offset(&self) -> u64 {
        self.region.as_ref().map_or(0, Region::offset)
    }

    /// Bytes asked for; 0 once the buffer was given up to a dropped request.
    pub fn len(&self) -> u64 {
        if self.region.is_some() { self.len } else { 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole buffer as a wire reference.
    pub fn as_ref(&self) -> ArenaRef {
        ArenaRef {
            offset: self.offset(),
            len: self.len(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.region {
            Some(r) => &r.as_slice()[..self.len as usize],
            None => &[],
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len as usize;
        match &mut self.region {
            Some(r) => &mut r.as_mut_slice()[..len],
            None => &mut [],
        }
    }

    /// Whether this buffer lies in `arena` (offsets name places in one connection's arena).
    pub fn is_in(&self, arena: &Arena) -> bool {
        self.region
            .as_ref()
            .is_some_and(|r| r.is_from(&arena.alloc))
    }

    /// Gives the range up for good while a request that may still write it is outstanding
    /// (its future was dropped before the answer): the buffer becomes empty.
    pub(crate) fn give_up(&mut self) -> Option<Lent> {
        self.region.take().map(Region::lend)
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
        if n > self.len() {
            return Err(ClientError::Tensor(format!(
                "{n} bytes do not fit a {}-byte buffer",
                self.len()
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
            .filter(|s| s.checked_add(r.len).is_some_and(|e| e <= self.len()))
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

/// The arena buffers a request's outputs go to, lent to the request (mutably borrowed) until
/// its answer: the whole output area, and regions for named outputs. See
/// [`crate::Client::infer_into`].
#[derive(Debug, Default)]
pub struct OutputBufs<'a> {
    pub(crate) area: Option<&'a mut ArenaBuf>,
    pub(crate) regions: Vec<(String, &'a mut ArenaBuf)>,
}

impl<'a> OutputBufs<'a> {
    /// Every output not given a region goes into `buf`, packed in output order (each at a
    /// multiple of 64 bytes).
    pub fn area(buf: &'a mut ArenaBuf) -> OutputBufs<'a> {
        OutputBufs {
            area: Some(buf),
            regions: Vec::new(),
        }
    }

    /// Output `name` goes into `buf`.
    pub fn region(mut self, name: &str, buf: &'a mut ArenaBuf) -> OutputBufs<'a> {
        self.regions.push((name.into(), buf));
        self
    }

    /// Every buffer, for the time of the request.
    pub(crate) fn into_all(self) -> Vec<&'a mut ArenaBuf> {
        let mut v: Vec<&'a mut ArenaBuf> = self.regions.into_iter().map(|(_, b)| b).collect();
        v.extend(self.area);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn arena(size: usize) -> Arena {
        let fd = rxd_shm::create_sealed("rxd-client-test", size).unwrap();
        let map = Mapping::map(fd.as_fd(), size).unwrap();
        Arena::within(std::sync::Arc::new(map), size as u64)
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
