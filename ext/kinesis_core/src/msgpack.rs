//! A small zero-copy MessagePack reader for fluentd buffer chunks: enough to walk values, find
//! map entries and transcode to JSON without building a tree.

/// Why bytes could not be read as MessagePack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed MessagePack at byte {offset}: {what}")]
pub struct MsgpackError {
    pub offset: usize,
    pub what: &'static str,
}

/// The kind of the value at a position, with its scalar payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Head<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext(i8, &'a [u8]),
}

/// A cursor over a MessagePack byte string.
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn err(&self, what: &'static str) -> MsgpackError {
        MsgpackError {
            offset: self.pos,
            what,
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err("value runs past the end of the chunk"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    #[inline]
    fn be(&mut self, n: usize) -> Result<u64, MsgpackError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// Reads the head of the next value (for arrays and maps, only their length).
    #[inline]
    pub fn head(&mut self) -> Result<Head<'a>, MsgpackError> {
        let b = self.take(1)?[0];
        Ok(match b {
            0x00..=0x7f => Head::UInt(u64::from(b)),
            0x80..=0x8f => Head::Map(usize::from(b & 0x0f)),
            0x90..=0x9f => Head::Array(usize::from(b & 0x0f)),
            0xa0..=0xbf => Head::Str(self.take(usize::from(b & 0x1f))?),
            0xc0 => Head::Nil,
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4..=0xc6 => {
                let n = self.be(1 << (b - 0xc4))? as usize;
                Head::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.be(1 << (b - 0xc7))? as usize;
                let t = self.take(1)?[0] as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xca => Head::F32(f32::from_bits(self.be(4)? as u32)),
            0xcb => Head::F64(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Head::UInt(self.be(1 << (b - 0xcc))?),
            0xd0 => Head::Int(i64::from(self.take(1)?[0] as i8)),
            0xd1 => Head::Int(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => Head::Int(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => Head::Int(self.be(8)? as i64),
            0xd4..=0xd8 => {
                let t = self.take(1)?[0] as i8;
                Head::Ext(t, self.take(1 << (b - 0xd4))?)
            }
            0xd9..=0xdb => {
                let n = self.be(1 << (b - 0xd9))? as usize;
                Head::Str(self.take(n)?)
            }
            0xdc | 0xdd => Head::Array(self.be(2 << (b - 0xdc))? as usize),
            0xde | 0xdf => Head::Map(self.be(2 << (b - 0xde))? as usize),
            0xe0..=0xff => Head::Int(i64::from(b as i8)),
            0xc1 => {
                return Err(MsgpackError {
                    offset: self.pos - 1,
                    what: "byte 0xc1 is never used in MessagePack",
                })
            }
        })
    }

    /// Skips one whole value.
    pub fn skip(&mut self) -> Result<(), MsgpackError> {
        let mut remaining: usize = 1;
        while remaining > 0 {
            remaining -= 1;
            match self.head()? {
                Head::Array(n) => {
                    remaining = remaining
                        .checked_add(n)
                        .ok_or_else(|| self.err("array too long"))?
                }
                Head::Map(n) => {
                    remaining = remaining
                        .checked_add(n.checked_mul(2).ok_or_else(|| self.err("map too long"))?)
                        .ok_or_else(|| self.err("map too long"))?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_heads_and_skips() {
        // [1, "ab", {"k": [true, nil]}, -1, 1.5]
        let bytes = [
            0x95, 0x01, 0xa2, b'a', b'b', 0x81, 0xa1, b'k', 0x92, 0xc3, 0xc0, 0xff, 0xcb, 0x3f,
            0xf8, 0, 0, 0, 0, 0, 0,
        ];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.head().unwrap(), Head::Array(5));
        assert_eq!(r.head().unwrap(), Head::UInt(1));
        assert_eq!(r.head().unwrap(), Head::Str(b"ab"));
        r.skip().unwrap();
        assert_eq!(r.head().unwrap(), Head::Int(-1));
        assert_eq!(r.head().unwrap(), Head::F64(1.5));
        assert!(r.at_end());
        let mut r = Reader::new(&bytes[..8]);
        assert!(r.skip().is_err());
    }
}
