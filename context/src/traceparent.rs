//! W3C Trace Context `traceparent`: parse, format, and start spans.
//!
//! The chain id of a Custody token (`txn`) is the trace id, so a chain and a
//! trace are the same thing and existing tracing keeps working.

use std::fmt;
use std::str::FromStr;

/// A 16-byte trace id; never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id; never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId([u8; 8]);

/// Why a `traceparent` (or a bare id) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// The header is shorter than a version-00 header or has extra bytes.
    #[error("traceparent has the wrong length")]
    Length,
    /// A `-` separator is missing.
    #[error("traceparent separator missing")]
    Separator,
    /// A field holds something other than lowercase hex.
    #[error("traceparent field is not lowercase hex")]
    NotHex,
    /// Version `ff` is forbidden.
    #[error("traceparent version ff is invalid")]
    BadVersion,
    /// The trace id is all zeros.
    #[error("trace id is all zeros")]
    ZeroTraceId,
    /// The parent (span) id is all zeros.
    #[error("parent id is all zeros")]
    ZeroSpanId,
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes lowercase hex into `out`; `src` must be twice as long.
fn decode_hex(src: &[u8], out: &mut [u8]) -> Result<(), TraceParentError> {
    if src.len() != out.len() * 2 {
        return Err(TraceParentError::Length);
    }
    for (byte, pair) in out.iter_mut().zip(src.chunks_exact(2)) {
        let hi = hex_value(pair[0]).ok_or(TraceParentError::NotHex)?;
        let lo = hex_value(pair[1]).ok_or(TraceParentError::NotHex)?;
        *byte = (hi << 4) | lo;
    }
    Ok(())
}

/// Lower-case hex of `bytes` into `out` (twice as long), without the
/// formatting machinery: ids are encoded several times per request.
fn encode_hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // Only ASCII hex digits were written.
    std::str::from_utf8(&out[..bytes.len() * 2]).unwrap_or_default()
}

fn write_hex<const N: usize>(f: &mut fmt::Formatter<'_>, bytes: &[u8; N]) -> fmt::Result {
    let mut out = [0u8; 32];
    f.write_str(encode_hex(bytes, &mut out))
}

/// A fresh random 128-bit id in lower-case hex (32 characters): the id of
/// one hop event.
pub fn random_event_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    encode_hex(&bytes, &mut out).to_owned()
}

impl TraceId {
    /// A trace id from bytes; `None` when all zero.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(TraceId(bytes))
    }

    /// A fresh random trace id.
    pub fn random() -> Self {
        loop {
            if let Some(id) = TraceId::from_bytes(rand::random()) {
                return id;
            }
        }
    }

    /// The raw bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl SpanId {
    /// A span id from bytes; `None` when all zero.
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(SpanId(bytes))
    }

    /// A fresh random span id.
    pub fn random() -> Self {
        loop {
            if let Some(id) = SpanId::from_bytes(rand::random()) {
                return id;
            }
        }
    }

    /// The raw bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

impl FromStr for TraceId {
    type Err = TraceParentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0; 16];
        decode_hex(s.as_bytes(), &mut bytes)?;
        TraceId::from_bytes(bytes).ok_or(TraceParentError::ZeroTraceId)
    }
}

impl FromStr for SpanId {
    type Err = TraceParentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0; 8];
        decode_hex(s.as_bytes(), &mut bytes)?;
        SpanId::from_bytes(bytes).ok_or(TraceParentError::ZeroSpanId)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TraceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The sampled flag of `trace-flags`.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed `traceparent` header: the trace, the caller's span, and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace (and chain) id.
    pub trace_id: TraceId,
    /// The span of the caller; a callee's span names it as its parent.
    pub parent_id: SpanId,
    /// `trace-flags`; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// The length of a version-00 header.
    pub const LEN: usize = 55;

    /// Parses a header value per W3C Trace Context level 1.
    ///
    /// Version 00 must be exactly 55 bytes; a higher version may carry more
    /// fields after a `-`, which are ignored. Version `ff`, upper-case hex and
    /// all-zero ids are refused.
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let b = value.as_bytes();
        if b.len() < Self::LEN {
            return Err(TraceParentError::Length);
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParentError::Separator);
        }
        let mut version = [0u8; 1];
        decode_hex(&b[0..2], &mut version)?;
        match version[0] {
            0xff => return Err(TraceParentError::BadVersion),
            0x00 if b.len() != Self::LEN => return Err(TraceParentError::Length),
            _ if b.len() > Self::LEN && b[Self::LEN] != b'-' => {
                return Err(TraceParentError::Length);
            }
            _ => {}
        }
        let mut trace = [0u8; 16];
        decode_hex(&b[3..35], &mut trace)?;
        let mut span = [0u8; 8];
        decode_hex(&b[36..52], &mut span)?;
        let mut flags = [0u8; 1];
        decode_hex(&b[53..55], &mut flags)?;
        Ok(TraceParent {
            trace_id: TraceId::from_bytes(trace).ok_or(TraceParentError::ZeroTraceId)?,
            parent_id: SpanId::from_bytes(span).ok_or(TraceParentError::ZeroSpanId)?,
            flags: flags[0],
        })
    }

    /// A new trace with a fresh root span, sampled.
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: TraceId::random(),
            parent_id: SpanId::random(),
            flags: FLAG_SAMPLED,
        }
    }

    /// A new span in the same trace, whose parent is this one's span: the
    /// value to send downstream so the next hop links to it.
    pub fn new_span(&self) -> Self {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: SpanId::random(),
            flags: self.flags,
        }
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

#[cfg(test)]
mod tests;
