//! Field-level decoding of packet payloads: integers, length-encoded values,
//! NUL-terminated strings and the fixed packet layouts (OK, ERR, EOF, column
//! definition, `COM_STMT_PREPARE_OK`).

use super::MysqlError;
use super::capabilities as cap;

/// A cursor over a payload. Every read checks bounds and returns `None` past the end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub(crate) fn skip(&mut self, n: usize) -> Option<()> {
        self.bytes(n).map(|_| ())
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&b, tail) = self.buf.split_first()?;
        self.buf = tail;
        Some(b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Some(u32::from_le_bytes(a))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    /// A length-encoded integer; `None` for the NULL marker `0xFB`, the
    /// ERR marker `0xFF` or a short buffer.
    pub(crate) fn lenenc(&mut self) -> Option<u64> {
        match self.u8()? {
            b @ 0..=0xfa => Some(u64::from(b)),
            0xfc => self.u16().map(u64::from),
            0xfd => {
                let b = self.bytes(3)?;
                Some(
                    u64::from(*b.first()?)
                        | u64::from(*b.get(1)?) << 8
                        | u64::from(*b.get(2)?) << 16,
                )
            }
            0xfe => self.u64(),
            _ => None,
        }
    }

    /// A length-encoded string.
    pub(crate) fn lenenc_bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.lenenc()?;
        self.bytes(usize::try_from(n).ok()?)
    }

    /// A NUL-terminated string; the terminator is consumed. Without a
    /// terminator, the rest of the buffer.
    pub(crate) fn nul_bytes(&mut self) -> &'a [u8] {
        match memchr::memchr(0, self.buf) {
            Some(i) => {
                let (s, tail) = self.buf.split_at(i);
                self.buf = tail.get(1..).unwrap_or_default();
                s
            }
            None => std::mem::take(&mut self.buf),
        }
    }
}

/// Bytes as text, lossy, with at most `max` bytes of input kept.
pub(crate) fn text(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(bytes.get(..max).unwrap_or(bytes)).into_owned()
}

fn truncated(packet: &'static str) -> MysqlError {
    MysqlError::Truncated { packet }
}

/// An OK packet (header `0x00`, or `0xFE` when it ends a result set under
/// `CLIENT_DEPRECATE_EOF`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OkPacket<'a> {
    pub(crate) affected_rows: u64,
    pub(crate) last_insert_id: u64,
    pub(crate) status: u16,
    pub(crate) warnings: u16,
    pub(crate) info: &'a [u8],
    /// The new default schema, from session state tracking.
    pub(crate) schema: Option<&'a [u8]>,
}

pub(crate) fn parse_ok(payload: &[u8], caps: u32) -> Result<OkPacket<'_>, MysqlError> {
    let mut r = Reader::new(payload);
    r.u8().ok_or(truncated("ok"))?;
    let affected_rows = r.lenenc().ok_or(truncated("ok"))?;
    let last_insert_id = r.lenenc().ok_or(truncated("ok"))?;
    let mut ok = OkPacket {
        affected_rows,
        last_insert_id,
        ..OkPacket::default()
    };
    if caps & cap::PROTOCOL_41 != 0 {
        ok.status = r.u16().ok_or(truncated("ok"))?;
        ok.warnings = r.u16().ok_or(truncated("ok"))?;
    } else if !r.is_empty() {
        ok.status = r.u16().ok_or(truncated("ok"))?;
    }
    if caps & cap::SESSION_TRACK != 0 {
        if r.is_empty() {
            return Ok(ok);
        }
        ok.info = r.lenenc_bytes().ok_or(truncated("ok"))?;
        if ok.status & super::status::SESSION_STATE_CHANGED != 0 {
            let changes = r.lenenc_bytes().ok_or(truncated("ok"))?;
            ok.schema = session_schema(changes);
        }
    } else {
        ok.info = r.rest();
    }
    Ok(ok)
}

/// The schema named by a `SESSION_TRACK_SCHEMA` entry of session state changes.
fn session_schema(changes: &[u8]) -> Option<&[u8]> {
    let mut r = Reader::new(changes);
    let mut schema = None;
    while !r.is_empty() {
        let kind = r.u8()?;
        let data = r.lenenc_bytes()?;
        if kind == 1 {
            schema = Reader::new(data).lenenc_bytes();
        }
    }
    schema
}

/// An ERR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrPacket<'a> {
    pub(crate) code: u16,
    pub(crate) sql_state: Option<[u8; 5]>,
    pub(crate) message: &'a [u8],
}

pub(crate) fn parse_err(payload: &[u8]) -> Result<ErrPacket<'_>, MysqlError> {
    let mut r = Reader::new(payload);
    r.u8().ok_or(truncated("err"))?;
    let code = r.u16().ok_or(truncated("err"))?;
    let mut sql_state = None;
    if r.rest().first() == Some(&b'#') {
        let mut s = r;
        s.skip(1);
        if let Some(state) = s.bytes(5) {
            let mut a = [0u8; 5];
            a.copy_from_slice(state);
            sql_state = Some(a);
            r = s;
        }
    }
    Ok(ErrPacket {
        code,
        sql_state,
        message: r.rest(),
    })
}

/// An EOF packet (`0xFE`, shorter than 9 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EofPacket {
    pub(crate) warnings: u16,
    pub(crate) status: u16,
}

pub(crate) fn parse_eof(payload: &[u8]) -> EofPacket {
    let mut r = Reader::new(payload);
    r.skip(1);
    EofPacket {
        warnings: r.u16().unwrap_or(0),
        status: r.u16().unwrap_or(0),
    }
}

/// A column definition (`ColumnDefinition41`), borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawColumn<'a> {
    pub(crate) schema: &'a [u8],
    pub(crate) table: &'a [u8],
    pub(crate) org_table: &'a [u8],
    pub(crate) name: &'a [u8],
    pub(crate) org_name: &'a [u8],
    pub(crate) charset: u16,
    pub(crate) length: u32,
    pub(crate) column_type: u8,
    pub(crate) flags: u16,
    pub(crate) decimals: u8,
}

pub(crate) fn parse_column(
    payload: &[u8],
    extended_metadata: bool,
) -> Result<RawColumn<'_>, MysqlError> {
    let err = truncated("column definition");
    let mut r = Reader::new(payload);
    let _catalog = r.lenenc_bytes().ok_or(err.clone())?;
    let schema = r.lenenc_bytes().ok_or(err.clone())?;
    let table = r.lenenc_bytes().ok_or(err.clone())?;
    let org_table = r.lenenc_bytes().ok_or(err.clone())?;
    let name = r.lenenc_bytes().ok_or(err.clone())?;
    let org_name = r.lenenc_bytes().ok_or(err.clone())?;
    if extended_metadata {
        r.lenenc_bytes().ok_or(err.clone())?;
    }
    let fixed = r.lenenc().ok_or(err.clone())?;
    if fixed < 10 {
        return Err(MysqlError::Malformed {
            packet: "column definition",
            reason: "fixed-length fields too short",
        });
    }
    let charset = r.u16().ok_or(err.clone())?;
    let length = r.u32().ok_or(err.clone())?;
    let column_type = r.u8().ok_or(err.clone())?;
    let flags = r.u16().ok_or(err.clone())?;
    let decimals = r.u8().ok_or(err)?;
    Ok(RawColumn {
        schema,
        table,
        org_table,
        name,
        org_name,
        charset,
        length,
        column_type,
        flags,
        decimals,
    })
}

/// `COM_STMT_PREPARE_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrepareOk {
    pub(crate) statement_id: u32,
    pub(crate) columns: u16,
    pub(crate) params: u16,
    pub(crate) warnings: u16,
}

pub(crate) fn parse_prepare_ok(payload: &[u8]) -> Result<PrepareOk, MysqlError> {
    let err = truncated("prepare ok");
    let mut r = Reader::new(payload);
    r.u8().ok_or(err.clone())?;
    let statement_id = r.u32().ok_or(err.clone())?;
    let columns = r.u16().ok_or(err.clone())?;
    let params = r.u16().ok_or(err)?;
    let warnings = if r.skip(1).is_some() {
        r.u16().unwrap_or(0)
    } else {
        0
    };
    Ok(PrepareOk {
        statement_id,
        columns,
        params,
        warnings,
    })
}

/// Column types (`MYSQL_TYPE_*`) whose binary encoding is fixed or length-prefixed.
pub(crate) mod types {
    pub(crate) const TINY: u8 = 1;
    pub(crate) const SHORT: u8 = 2;
    pub(crate) const LONG: u8 = 3;
    pub(crate) const FLOAT: u8 = 4;
    pub(crate) const DOUBLE: u8 = 5;
    pub(crate) const NULL: u8 = 6;
    pub(crate) const TIMESTAMP: u8 = 7;
    pub(crate) const LONGLONG: u8 = 8;
    pub(crate) const INT24: u8 = 9;
    pub(crate) const DATE: u8 = 10;
    pub(crate) const TIME: u8 = 11;
    pub(crate) const DATETIME: u8 = 12;
    pub(crate) const YEAR: u8 = 13;
    pub(crate) const TIMESTAMP2: u8 = 17;
    pub(crate) const DATETIME2: u8 = 18;
    pub(crate) const TIME2: u8 = 19;
}

/// The binary-protocol value of a column of type `column_type`, read from `r`.
pub(crate) fn binary_value<'a>(
    r: &mut Reader<'a>,
    column_type: u8,
    unsigned: bool,
) -> Option<super::Value<'a>> {
    use super::Value;
    use types::*;
    Some(match column_type {
        NULL => Value::Null,
        TINY => {
            let b = r.u8()?;
            if unsigned {
                Value::UInt(u64::from(b))
            } else {
                Value::Int(i64::from(b as i8))
            }
        }
        SHORT | YEAR => {
            let v = r.u16()?;
            if unsigned {
                Value::UInt(u64::from(v))
            } else {
                Value::Int(i64::from(v as i16))
            }
        }
        LONG | INT24 => {
            let v = r.u32()?;
            if unsigned {
                Value::UInt(u64::from(v))
            } else {
                Value::Int(i64::from(v as i32))
            }
        }
        LONGLONG => {
            let v = r.u64()?;
            if unsigned {
                Value::UInt(v)
            } else {
                Value::Int(v as i64)
            }
        }
        FLOAT => Value::Float(f64::from(f32::from_bits(r.u32()?))),
        DOUBLE => Value::Float(f64::from_bits(r.u64()?)),
        DATE | DATETIME | TIMESTAMP | TIME | TIMESTAMP2 | DATETIME2 | TIME2 => {
            let n = r.u8()?;
            Value::Temporal(r.bytes(usize::from(n))?)
        }
        _ => Value::Bytes(r.lenenc_bytes()?),
    })
}
