//! Conversions between `ndarray` arrays and wire tensors (little-endian, C order).

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};
use rxd_protocol::{DType, Tensor, TensorData};

use crate::ClientError;

/// A Rust scalar type with a wire dtype.
pub trait Element: Copy + 'static {
    const DTYPE: DType;
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
        }
    };
}

element!(f32, DType::Float32);
element!(f64, DType::Float64);
element!(i8, DType::Int8);
element!(i16, DType::Int16);
element!(i32, DType::Int32);
element!(i64, DType::Int64);
element!(u8, DType::Uint8);
element!(u16, DType::Uint16);
element!(u32, DType::Uint32);
element!(u64, DType::Uint64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    const SIZE: usize = 1;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Encodes an array as an inline tensor.
pub fn from_array<T: Element, S: Data<Elem = T>, D: Dimension>(
    name: &str,
    array: &ArrayBase<S, D>,
) -> Tensor {
    let mut bytes = Vec::with_capacity(array.len() * T::SIZE);
    for &x in array.iter() {
        x.write_le(&mut bytes);
    }
    Tensor::inline(
        name,
        T::DTYPE,
        array.shape().iter().map(|&d| d as u64).collect(),
        bytes,
    )
}

/// Decodes an inline tensor into an owned array, checking the dtype.
pub fn to_array<T: Element>(t: &Tensor) -> Result<ArrayD<T>, ClientError> {
    if t.dtype != T::DTYPE {
        return Err(ClientError::Tensor(format!(
            "tensor '{}' is {}, not {}",
            t.name,
            t.dtype,
            T::DTYPE
        )));
    }
    let TensorData::Inline(bytes) = &t.data else {
        return Err(ClientError::Tensor(format!(
            "tensor '{}' is not inline",
            t.name
        )));
    };
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    if bytes.len() != n * T::SIZE {
        return Err(ClientError::Tensor(format!(
            "tensor '{}' has {} bytes for {n} elements",
            t.name,
            bytes.len()
        )));
    }
    let values: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::read_le).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| ClientError::Tensor(e.to_string()))
}

/// The inline bytes of a tensor.
pub fn bytes(t: &Tensor) -> Option<&[u8]> {
    match &t.data {
        TensorData::Inline(b) => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_shape_and_order() {
        let a = ndarray::array![[1.5f32, -2.0, 3.25], [4.0, 5.0, 6.0]];
        let t = from_array("x", &a);
        assert_eq!(t.dtype, DType::Float32);
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(&bytes(&t).unwrap()[..4], &1.5f32.to_le_bytes());
        let back = to_array::<f32>(&t).unwrap();
        assert_eq!(back, a.into_dyn());
        // A transposed view is written in logical (C) order.
        let b = ndarray::array![[1i64, 2], [3, 4]];
        let t = from_array("y", &b.t());
        assert_eq!(to_array::<i64>(&t).unwrap(), b.t().to_owned().into_dyn());
        assert!(to_array::<f64>(&t).is_err());
    }
}
