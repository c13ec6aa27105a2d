//! Tensor element types as they travel on the wire.
//!
//! Owns the list of element types, their wire names and their storage sizes. It does not know ONNX
//! Runtime: the daemon maps these to ORT's types in one place (`runtime`).

use serde::{Deserialize, Serialize};

/// Element type of a tensor. Every ONNX numeric type plus `bool`; strings are not supported.
///
/// On the wire a dtype is its lower-case name (`"float32"`, `"int64"`, ...), see PROTOCOL.md.
/// The ONNX `TensorProto.DataType` number is given by [`DType::onnx_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    Float32,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Int32,
    Int64,
    Bool,
    Float16,
    Float64,
    Uint32,
    Uint64,
    Complex64,
    Complex128,
    Bfloat16,
    Float8e4m3fn,
    Float8e4m3fnuz,
    Float8e5m2,
    Float8e5m2fnuz,
    Uint4,
    Int4,
    Float4e2m1,
}

impl DType {
    /// Every dtype, in ONNX code order.
    pub const ALL: [DType; 22] = [
        DType::Float32,
        DType::Uint8,
        DType::Int8,
        DType::Uint16,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::Bool,
        DType::Float16,
        DType::Float64,
        DType::Uint32,
        DType::Uint64,
        DType::Complex64,
        DType::Complex128,
        DType::Bfloat16,
        DType::Float8e4m3fn,
        DType::Float8e4m3fnuz,
        DType::Float8e5m2,
        DType::Float8e5m2fnuz,
        DType::Uint4,
        DType::Int4,
        DType::Float4e2m1,
    ];

    /// The wire name (same as the serde representation).
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Uint16 => "uint16",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::Bool => "bool",
            DType::Float16 => "float16",
            DType::Float64 => "float64",
            DType::Uint32 => "uint32",
            DType::Uint64 => "uint64",
            DType::Complex64 => "complex64",
            DType::Complex128 => "complex128",
            DType::Bfloat16 => "bfloat16",
            DType::Float8e4m3fn => "float8e4m3fn",
            DType::Float8e4m3fnuz => "float8e4m3fnuz",
            DType::Float8e5m2 => "float8e5m2",
            DType::Float8e5m2fnuz => "float8e5m2fnuz",
            DType::Uint4 => "uint4",
            DType::Int4 => "int4",
            DType::Float4e2m1 => "float4e2m1",
        }
    }

    /// Parses a wire name.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::Float32 => 1,
            DType::Uint8 => 2,
            DType::Int8 => 3,
            DType::Uint16 => 4,
            DType::Int16 => 5,
            DType::Int32 => 6,
            DType::Int64 => 7,
            DType::Bool => 9,
            DType::Float16 => 10,
            DType::Float64 => 11,
            DType::Uint32 => 12,
            DType::Uint64 => 13,
            DType::Complex64 => 14,
            DType::Complex128 => 15,
            DType::Bfloat16 => 16,
            DType::Float8e4m3fn => 17,
            DType::Float8e4m3fnuz => 18,
            DType::Float8e5m2 => 19,
            DType::Float8e5m2fnuz => 20,
            DType::Uint4 => 21,
            DType::Int4 => 22,
            DType::Float4e2m1 => 23,
        }
    }

    /// Bits per element (4 for the packed 4-bit types).
    pub fn bits(self) -> u64 {
        match self {
            DType::Uint4 | DType::Int4 | DType::Float4e2m1 => 4,
            DType::Uint8
            | DType::Int8
            | DType::Bool
            | DType::Float8e4m3fn
            | DType::Float8e4m3fnuz
            | DType::Float8e5m2
            | DType::Float8e5m2fnuz => 8,
            DType::Uint16 | DType::Int16 | DType::Float16 | DType::Bfloat16 => 16,
            DType::Float32 | DType::Int32 | DType::Uint32 => 32,
            DType::Float64 | DType::Int64 | DType::Uint64 | DType::Complex64 => 64,
            DType::Complex128 => 128,
        }
    }

    /// Required alignment in bytes of a buffer holding this dtype (used for shared-memory
    /// references): the size of one scalar component.
    pub fn alignment(self) -> u64 {
        match self {
            DType::Complex64 => 4,
            DType::Complex128 => 8,
            other => (other.bits() / 8).max(1),
        }
    }

    /// `v` as one element of this type, little-endian: `None` unless this is an integer type
    /// (signed or unsigned, 8 to 64 bits; not bool) that holds `v`.
    pub fn integer_bytes(self, v: i64) -> Option<Vec<u8>> {
        Some(match self {
            DType::Int8 => i8::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Uint8 => u8::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Int16 => i16::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Uint16 => u16::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Int32 => i32::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Uint32 => u32::try_from(v).ok()?.to_le_bytes().to_vec(),
            DType::Int64 => v.to_le_bytes().to_vec(),
            DType::Uint64 => u64::try_from(v).ok()?.to_le_bytes().to_vec(),
            _ => return None,
        })
    }

    /// Bytes needed for `elements` elements, packed 4-bit types rounded up to whole bytes.
    /// `None` on overflow.
    pub fn byte_len(self, elements: u64) -> Option<u64> {
        let bits = elements.checked_mul(self.bits())?;
        Some(bits.div_ceil(8))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_name() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            let bytes = rmp_serde::to_vec(&d).unwrap();
            let back: DType = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, d);
            // The serde form is the plain name string.
            let s: String = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(s, d.name());
        }
        assert_eq!(DType::from_name("string"), None);
    }

    #[test]
    fn onnx_codes_are_unique_and_match_onnx() {
        let mut codes: Vec<i32> = DType::ALL.iter().map(|d| d.onnx_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), DType::ALL.len());
        assert_eq!(DType::Float32.onnx_code(), 1);
        assert_eq!(DType::Int64.onnx_code(), 7);
        assert_eq!(DType::Bool.onnx_code(), 9);
    }

    #[test]
    fn byte_len_handles_packing_and_overflow() {
        assert_eq!(DType::Float32.byte_len(3), Some(12));
        assert_eq!(DType::Int4.byte_len(3), Some(2));
        assert_eq!(DType::Complex128.byte_len(2), Some(32));
        assert_eq!(DType::Float64.byte_len(u64::MAX / 4), None);
    }
}
