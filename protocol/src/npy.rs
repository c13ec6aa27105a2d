//! NumPy `.npy` files (format 1.0–3.0) holding any wire dtype, read and written as raw
//! little-endian bytes: the one `.npy` reader of the project (rxctl, the compressor, the
//! tests). Fortran-order arrays are refused rather than silently transposed.

use std::io::{Read, Write};

use crate::{DType, Tensor, TensorData};

const MAGIC: &[u8] = b"\x93NUMPY";

/// NumPy `descr` for a dtype (`None` where NumPy has no such type).
pub fn descr(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::Float32 => "<f4",
        DType::Float64 => "<f8",
        DType::Float16 => "<f2",
        DType::Int8 => "|i1",
        DType::Int16 => "<i2",
        DType::Int32 => "<i4",
        DType::Int64 => "<i8",
        DType::Uint8 => "|u1",
        DType::Uint16 => "<u2",
        DType::Uint32 => "<u4",
        DType::Uint64 => "<u8",
        DType::Bool => "|b1",
        DType::Complex64 => "<c8",
        DType::Complex128 => "<c16",
        _ => return None,
    })
}

fn dtype_of_descr(s: &str) -> Option<DType> {
    let s = s.replace('=', "<");
    let s = match s.as_str() {
        "<i1" | "<u1" | "<b1" => s.replacen('<', "|", 1),
        _ => s,
    };
    DType::ALL
        .into_iter()
        .find(|&d| descr(d) == Some(s.as_str()))
}

/// Reads a `.npy` file into a named tensor.
pub fn read(name: &str, mut r: impl Read) -> Result<Tensor, String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic[..6] != MAGIC {
        return Err("not a .npy file".into());
    }
    let header_len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(|e| e.to_string())?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(|e| e.to_string())?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    if header_len > 1 << 20 {
        return Err("header too large".into());
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header = String::from_utf8(header).map_err(|_| "header is not text".to_string())?;
    let field = |key: &str| -> Result<&str, String> {
        let start = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no '{key}'"))?;
        let rest = &header[start + key.len() + 2..];
        let colon = rest.find(':').ok_or("bad header")?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr_text = field("descr")?;
    let descr_val = descr_text
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or("bad descr")?;
    let dtype =
        dtype_of_descr(descr_val).ok_or_else(|| format!("unsupported dtype {descr_val}"))?;
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-order arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<u64> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<u64>()
                .map_err(|_| format!("bad dim {s}"))
        })
        .collect::<Result<_, _>>()?;
    let n = crate::message::element_count(&shape).ok_or("shape overflows")?;
    let len = dtype.byte_len(n).ok_or("shape overflows")?;
    let mut data = Vec::new();
    r.take(len)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 != len {
        return Err(format!(
            "file holds {} data bytes, {len} expected",
            data.len()
        ));
    }
    Ok(Tensor::inline(name, dtype, shape, data))
}

/// Writes a tensor's inline bytes as a `.npy` file (format 1.0).
pub fn write(t: &Tensor, mut w: impl Write) -> Result<(), String> {
    let d = descr(t.dtype).ok_or_else(|| format!("{} has no NumPy dtype", t.dtype))?;
    let TensorData::Inline(bytes) = &t.data else {
        return Err("tensor is not inline".into());
    };
    let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{d}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, header ends with '\n'.
    let total = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(header.len() + 10);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    w.write_all(&out).map_err(|e| e.to_string())?;
    w.write_all(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_every_numpy_dtype() {
        for d in DType::ALL.into_iter().filter(|&d| descr(d).is_some()) {
            let n = 6u64;
            let bytes: Vec<u8> = (0..d.byte_len(n).unwrap()).map(|i| (i % 2) as u8).collect();
            let t = Tensor::inline("t", d, vec![2, 3], bytes);
            let mut buf = Vec::new();
            write(&t, &mut buf).unwrap();
            assert_eq!((buf.len() - t_len(&t)) % 64, 0, "data aligned for {d}");
            let back = read("t", &buf[..]).unwrap();
            assert_eq!(back, t, "{d}");
        }
    }

    fn t_len(t: &Tensor) -> usize {
        match &t.data {
            TensorData::Inline(b) => b.len(),
            _ => unreachable!("inline"),
        }
    }

    #[test]
    fn reads_numpy_written_header() {
        // np.save of np.arange(3, dtype=np.int64)
        let mut h = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }".to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend_from_slice(&(h.len() as u16).to_le_bytes());
        f.extend_from_slice(h.as_bytes());
        for i in 0..3i64 {
            f.extend_from_slice(&i.to_le_bytes());
        }
        let t = read("a", &f[..]).unwrap();
        assert_eq!(t.dtype, DType::Int64);
        assert_eq!(t.shape, vec![3]);
        assert!(read("a", &b"garbage!"[..]).is_err());
    }
}
