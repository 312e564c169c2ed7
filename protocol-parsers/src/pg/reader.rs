//! A cursor over a message body that never panics.

use super::{MessageError, Text};

/// Reads fields from a message body; every read checks bounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    tag: char,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Self {
            buf,
            tag: char::from(tag),
        }
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn truncated(&self, field: &'static str) -> MessageError {
        MessageError::Truncated {
            tag: self.tag,
            field,
        }
    }

    pub(crate) fn invalid(&self, field: &'static str, value: i64) -> MessageError {
        MessageError::InvalidValue {
            tag: self.tag,
            field,
            value,
        }
    }

    pub(crate) fn bytes(
        &mut self,
        n: usize,
        field: &'static str,
    ) -> Result<&'a [u8], MessageError> {
        if n > self.buf.len() {
            return Err(self.truncated(field));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        let b = self.bytes(1, field)?;
        Ok(b.first().copied().unwrap_or_default())
    }

    pub(crate) fn i16(&mut self, field: &'static str) -> Result<i16, MessageError> {
        let b = self.bytes(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// A non-negative 16-bit count.
    pub(crate) fn count(&mut self, field: &'static str) -> Result<u16, MessageError> {
        let v = self.i16(field)?;
        u16::try_from(v).map_err(|_| self.invalid(field, i64::from(v)))
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, MessageError> {
        let b = self.bytes(4, field)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        let b = self.bytes(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string; the terminator is consumed, not returned.
    pub(crate) fn cstr(&mut self, field: &'static str) -> Result<Text<'a>, MessageError> {
        match memchr::memchr(0, self.buf) {
            Some(i) => {
                let (s, tail) = self.buf.split_at(i);
                self.buf = tail.get(1..).unwrap_or_default();
                Ok(Text(s))
            }
            None => Err(MessageError::Unterminated {
                tag: self.tag,
                field,
            }),
        }
    }

    /// A 32-bit length-prefixed value; -1 is NULL.
    pub(crate) fn value(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, MessageError> {
        let len = self.i32(field)?;
        if len == -1 {
            return Ok(None);
        }
        let n = usize::try_from(len).map_err(|_| self.invalid(field, i64::from(len)))?;
        self.bytes(n, field).map(Some)
    }

    pub(crate) fn finish(&self) -> Result<(), MessageError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MessageError::TrailingBytes {
                tag: self.tag,
                count: self.buf.len(),
            })
        }
    }
}
