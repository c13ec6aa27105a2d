//! Protocol Buffers at the wire level, without a schema: a message is its fields in order,
//! each a number and a raw value. Nothing is interpreted unless asked, so fields this crate
//! does not know (newer ONNX versions, vendor extensions) pass through untouched, and a message
//! parsed and encoded again without changes is semantically identical (byte-identical when the
//! producer used canonical varints, as every protobuf library does).

/// A decoding error: where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protobuf: {0}")]
pub struct Error(pub String);

/// A field's value as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1.
    I64(u64),
    /// Wire type 2: strings, bytes, sub-messages, packed repeated fields.
    Bytes(Vec<u8>),
    /// Wire type 5.
    I32(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub number: u32,
    pub value: Value,
}

/// A message: its fields in wire order (repeated fields are several entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub fields: Vec<Field>,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Error> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| Error(format!("varint runs past the end at {pos}")))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(Error(format!("varint longer than 10 bytes at {pos}")))
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], Error> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| {
            Error(format!(
                "{n} bytes at {pos} run past the end ({})",
                buf.len()
            ))
        })?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

/// What [`Message::parse_mapped`] keeps of a length-delimited field (number, bytes).
pub type KeepField<'a> = dyn FnMut(u32, &[u8]) -> Result<Option<Vec<u8>>, Error> + 'a;

impl Message {
    pub fn parse(buf: &[u8]) -> Result<Message, Error> {
        Message::parse_mapped(buf, &mut |_, b| Ok(Some(b.to_vec())))
    }

    /// [`Message::parse`], with each length-delimited field's bytes handed to `map` (field
    /// number, the bytes in `buf`), which says what to keep in their place (`None`: drop the
    /// field) — a view of a large message without copying the parts it leaves out.
    pub fn parse_mapped(buf: &[u8], map: &mut KeepField<'_>) -> Result<Message, Error> {
        let mut pos = 0;
        let mut fields = Vec::new();
        while pos < buf.len() {
            let key = read_varint(buf, &mut pos)?;
            let number = u32::try_from(key >> 3)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error(format!("bad field number in key {key}")))?;
            let value = match key & 7 {
                0 => Value::Varint(read_varint(buf, &mut pos)?),
                1 => Value::I64(u64::from_le_bytes(
                    take(buf, &mut pos, 8)?.try_into().expect("8 bytes"),
                )),
                2 => {
                    let n = usize::try_from(read_varint(buf, &mut pos)?)
                        .map_err(|_| Error("length overflows".into()))?;
                    match map(number, take(buf, &mut pos, n)?)? {
                        Some(kept) => Value::Bytes(kept),
                        None => continue,
                    }
                }
                5 => Value::I32(u32::from_le_bytes(
                    take(buf, &mut pos, 4)?.try_into().expect("4 bytes"),
                )),
                w => {
                    return Err(Error(format!(
                        "wire type {w} (field {number}) is not supported"
                    )));
                }
            };
            fields.push(Field { number, value });
        }
        Ok(Message { fields })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for f in &self.fields {
            let wire = match f.value {
                Value::Varint(_) => 0,
                Value::I64(_) => 1,
                Value::Bytes(_) => 2,
                Value::I32(_) => 5,
            };
            write_varint(&mut out, (u64::from(f.number) << 3) | wire);
            match &f.value {
                Value::Varint(v) => write_varint(&mut out, *v),
                Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
                Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
                Value::Bytes(b) => {
                    write_varint(&mut out, b.len() as u64);
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }

    /// Every value of field `n`.
    pub fn all(&self, n: u32) -> impl Iterator<Item = &Value> {
        self.fields
            .iter()
            .filter(move |f| f.number == n)
            .map(|f| &f.value)
    }

    pub fn bytes(&self, n: u32) -> Option<&[u8]> {
        self.all(n).find_map(|v| match v {
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        })
    }

    pub fn string(&self, n: u32) -> String {
        self.bytes(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    pub fn strings(&self, n: u32) -> Vec<String> {
        self.all(n)
            .filter_map(|v| match v {
                Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }

    pub fn varint(&self, n: u32) -> Option<u64> {
        self.all(n).find_map(|v| match v {
            Value::Varint(x) => Some(*x),
            _ => None,
        })
    }

    /// A repeated integer field, packed or not (protobuf accepts both).
    pub fn varints(&self, n: u32) -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        for v in self.all(n) {
            match v {
                Value::Varint(x) => out.push(*x),
                Value::Bytes(b) => {
                    let mut pos = 0;
                    while pos < b.len() {
                        out.push(read_varint(b, &mut pos)?);
                    }
                }
                other => return Err(Error(format!("field {n}: {other:?} is not an integer"))),
            }
        }
        Ok(out)
    }

    /// A repeated fixed32 field (floats), packed or not.
    pub fn fixed32s(&self, n: u32) -> Result<Vec<u32>, Error> {
        let mut out = Vec::new();
        for v in self.all(n) {
            match v {
                Value::I32(x) => out.push(*x),
                Value::Bytes(b) if b.len() % 4 == 0 => out.extend(
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                ),
                other => return Err(Error(format!("field {n}: {other:?} is not fixed32"))),
            }
        }
        Ok(out)
    }

    /// Every sub-message in field `n`.
    pub fn messages(&self, n: u32) -> Result<Vec<Message>, Error> {
        self.all(n)
            .map(|v| match v {
                Value::Bytes(b) => Message::parse(b),
                other => Err(Error(format!("field {n}: {other:?} is not a message"))),
            })
            .collect()
    }

    pub fn message(&self, n: u32) -> Result<Option<Message>, Error> {
        self.bytes(n).map(Message::parse).transpose()
    }

    /// Replaces every occurrence of field `n` with `values`, at the place of the first one
    /// (or at the end when there was none).
    pub fn replace(&mut self, n: u32, values: Vec<Value>) {
        let at = self
            .fields
            .iter()
            .position(|f| f.number == n)
            .unwrap_or(self.fields.len());
        let before = self.fields[..at].iter().filter(|f| f.number != n).count();
        self.fields.retain(|f| f.number != n);
        let at = before.min(self.fields.len());
        let new: Vec<Field> = values
            .into_iter()
            .map(|value| Field { number: n, value })
            .collect();
        self.fields.splice(at..at, new);
    }

    pub fn push(&mut self, n: u32, value: Value) {
        self.fields.push(Field { number: n, value });
    }

    pub fn push_str(&mut self, n: u32, s: &str) {
        self.push(n, Value::Bytes(s.as_bytes().to_vec()));
    }

    pub fn push_message(&mut self, n: u32, m: &Message) {
        self.push(n, Value::Bytes(m.encode()));
    }
}

/// Packs integers as a packed repeated field's bytes.
pub fn packed_varints(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        write_varint(&mut out, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_bytes_round_trip() {
        // field 1 varint 150, field 2 string "testing", field 3 fixed32, field 4 fixed64.
        let bytes = [
            0x08, 0x96, 0x01, 0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g', 0x1d, 1, 2, 3,
            4, 0x21, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.varint(1), Some(150));
        assert_eq!(m.string(2), "testing");
        assert_eq!(m.encode(), bytes);
    }

    #[test]
    fn packed_and_unpacked_integers_read_alike() {
        let mut a = Message::default();
        a.push(1, Value::Varint(3));
        a.push(1, Value::Varint(300));
        let mut b = Message::default();
        b.push(1, Value::Bytes(packed_varints(&[3, 300])));
        assert_eq!(a.varints(1).unwrap(), vec![3, 300]);
        assert_eq!(b.varints(1).unwrap(), vec![3, 300]);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        assert!(Message::parse(&[0x12, 0x05, b'a']).is_err());
        assert!(Message::parse(&[0x08, 0xff]).is_err());
        assert!(Message::parse(&[0x0b]).is_err(), "groups are refused");
    }

    proptest! {
        #[test]
        fn encode_parse_round_trips(fields in proptest::collection::vec(
            (1u32..1000, prop_oneof![
                any::<u64>().prop_map(Value::Varint),
                any::<u64>().prop_map(Value::I64),
                any::<u32>().prop_map(Value::I32),
                proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            ]), 0..20)) {
            let m = Message { fields: fields.into_iter().map(|(number, value)| Field { number, value }).collect() };
            let bytes = m.encode();
            prop_assert_eq!(Message::parse(&bytes).unwrap(), m.clone());
            prop_assert_eq!(Message::parse(&bytes).unwrap().encode(), bytes);
        }

        #[test]
        fn parsing_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::parse(&bytes);
        }
    }
}
