//! The compact binary form of a stored chain: its summary and the shape of
//! its tree.
//!
//! JSON spelled every field name, escaped every string and repeated each
//! workload URI in the services and again in the identities: about 1,150
//! bytes per 5-hop chain, and the serializer was a visible share of ingest.
//! Here a record is a format byte, then the fields in a fixed order:
//! integers as LEB128 varints, floats as 4 little-endian bytes, and each
//! string as one of
//!
//! - raw UTF-8 bytes,
//! - lowercase hex packed two digits per byte (chain and event ids),
//! - a back-reference to an earlier string of the same record.
//!
//! The string header is a varint `n << 2 | tag` (tag 0 raw with `n` bytes,
//! 1 back-reference to string `n`, 2 packed hex with `n` bytes).
//!
//! Decoding is total: any byte string gives a record or an error, never a
//! panic, and lengths are checked against the bytes left before anything
//! is allocated.

use crate::assembly::{
    ChainSummary, ClassCount, Coverage, DestinationView, Evidence, IdentityUse, InitiatorView,
};

use std::collections::HashMap;

use super::StoreError;
use super::common::NodeShape;

/// The first byte of every record of this form. JSON documents, which
/// older stores hold, start with `{` or `[`.
const FORMAT: u8 = 1;

const RAW: u64 = 0;
const BACK_REFERENCE: u64 = 1;
const HEX: u64 = 2;

/// Why a stored record did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CompactError(&'static str);

impl From<CompactError> for StoreError {
    fn from(e: CompactError) -> Self {
        StoreError::Compact(e.0)
    }
}

type Result<T> = std::result::Result<T, CompactError>;

/// The record of a chain summary.
pub(crate) fn encode_summary(s: &ChainSummary) -> Vec<u8> {
    let mut w = Writer::new(256);
    w.str(&s.chain_id);
    w.byte(coverage_code(s.coverage));
    w.f32(s.confidence);
    match &s.initiator {
        None => w.byte(0),
        Some(i) => {
            w.byte(1);
            w.str(&i.subject);
            w.str(&i.kind);
            w.strs(&i.actors);
            w.str(&i.scope);
        }
    }
    w.strs(&s.services);
    w.strs(&s.tools);
    w.len(s.identities.len());
    for i in &s.identities {
        w.str(&i.kind);
        w.str(&i.value);
    }
    w.len(s.data_classes.len());
    for c in &s.data_classes {
        w.str(&c.class);
        w.varint(c.count);
    }
    w.len(s.destinations.len());
    for d in &s.destinations {
        w.str(&d.host);
        w.str(&d.ip);
        w.varint(u64::from(d.port));
        w.str(&d.verdict);
        w.str(&d.policy);
        w.str(&d.rule);
    }
    w.strs(&s.joined_chains);
    w.len(s.hop_count);
    w.varint(s.first_unix_nanos);
    w.varint(s.last_unix_nanos);
    w.out
}

/// A chain summary from its record.
pub(crate) fn decode_summary(bytes: &[u8]) -> Result<ChainSummary> {
    let mut r = Reader::new(bytes)?;
    let chain_id = r.str()?;
    let coverage = coverage_of(r.byte()?)?;
    let confidence = r.f32()?;
    let initiator = match r.byte()? {
        0 => None,
        1 => Some(InitiatorView {
            subject: r.str()?,
            kind: r.str()?,
            actors: r.strs()?,
            scope: r.str()?,
        }),
        _ => return Err(CompactError("initiator flag is neither 0 nor 1")),
    };
    let services = r.strs()?;
    let tools = r.strs()?;
    let identities = r.list(|r| {
        Ok(IdentityUse {
            kind: r.str()?,
            value: r.str()?,
        })
    })?;
    let data_classes = r.list(|r| {
        Ok(ClassCount {
            class: r.str()?,
            count: r.varint()?,
        })
    })?;
    let destinations = r.list(|r| {
        Ok(DestinationView {
            host: r.str()?,
            ip: r.str()?,
            port: u32::try_from(r.varint()?).map_err(|_| CompactError("port out of range"))?,
            verdict: r.str()?,
            policy: r.str()?,
            rule: r.str()?,
        })
    })?;
    let joined_chains = r.strs()?;
    let hop_count =
        usize::try_from(r.varint()?).map_err(|_| CompactError("hop count out of range"))?;
    let first_unix_nanos = r.varint()?;
    let last_unix_nanos = r.varint()?;
    r.end()?;
    Ok(ChainSummary {
        chain_id,
        coverage,
        confidence,
        initiator,
        services,
        tools,
        identities,
        data_classes,
        destinations,
        joined_chains,
        hop_count,
        first_unix_nanos,
        last_unix_nanos,
    })
}

/// The record of a tree's shape.
pub(crate) fn encode_shape(shape: &[NodeShape]) -> Vec<u8> {
    let mut w = Writer::new(8 + shape.len() * 24);
    w.len(shape.len());
    for (event_id, parent, depth, evidence, confidence) in shape {
        w.str(event_id);
        // Parents are earlier positions or -1: stored one up, never negative.
        w.varint(u64::try_from(parent.saturating_add(1)).unwrap_or(0));
        w.varint(u64::from(*depth));
        w.byte(evidence_code(*evidence));
        w.f32(*confidence);
    }
    w.out
}

/// A tree's shape from its record.
pub(crate) fn decode_shape(bytes: &[u8]) -> Result<Vec<NodeShape>> {
    let mut r = Reader::new(bytes)?;
    let shape = r.list(|r| {
        let event_id = r.str()?;
        let parent = i64::try_from(r.varint()?)
            .map_err(|_| CompactError("parent position out of range"))?
            - 1;
        let depth = u32::try_from(r.varint()?).map_err(|_| CompactError("depth out of range"))?;
        let evidence = evidence_of(r.byte()?)?;
        let confidence = r.f32()?;
        Ok((event_id, parent, depth, evidence, confidence))
    })?;
    r.end()?;
    Ok(shape)
}

/// Whether `bytes` are a record of this form (rather than JSON).
pub(crate) fn is_compact(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT)
}

/// A stored summary: a record of this form, or the JSON of older stores.
pub(crate) fn stored_summary(bytes: &[u8]) -> std::result::Result<ChainSummary, StoreError> {
    if is_compact(bytes) {
        Ok(decode_summary(bytes)?)
    } else {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A stored tree shape: a record of this form, or the JSON of older stores.
pub(crate) fn stored_shape(bytes: &[u8]) -> std::result::Result<Vec<NodeShape>, StoreError> {
    if is_compact(bytes) {
        Ok(decode_shape(bytes)?)
    } else {
        Ok(serde_json::from_slice(bytes)?)
    }
}

fn coverage_code(c: Coverage) -> u8 {
    match c {
        Coverage::Propagated => 0,
        Coverage::Stitched => 1,
        Coverage::Partial => 2,
        Coverage::Orphan => 3,
    }
}

fn coverage_of(code: u8) -> Result<Coverage> {
    Coverage::ALL
        .get(usize::from(code))
        .copied()
        .ok_or(CompactError("unknown coverage class"))
}

const EVIDENCE: [Evidence; 7] = [
    Evidence::Root,
    Evidence::SpanParent,
    Evidence::SidecarStitched,
    Evidence::FiveTuple,
    Evidence::FlowContainment,
    Evidence::TimeContainment,
    Evidence::Gap,
];

fn evidence_code(e: Evidence) -> u8 {
    match e {
        Evidence::Root => 0,
        Evidence::SpanParent => 1,
        Evidence::SidecarStitched => 2,
        Evidence::FiveTuple => 3,
        Evidence::FlowContainment => 4,
        Evidence::TimeContainment => 5,
        Evidence::Gap => 6,
    }
}

fn evidence_of(code: u8) -> Result<Evidence> {
    EVIDENCE
        .get(usize::from(code))
        .copied()
        .ok_or(CompactError("unknown join evidence"))
}

/// Strings of two lowercase hex digits per byte, as chain and event ids are.
fn packable_hex(s: &str) -> bool {
    !s.is_empty()
        && s.len().is_multiple_of(2)
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn nibble(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    }
}

/// Strings a record holds before its writer looks them up by hash rather
/// than one by one (a chain of thousands of hops has thousands of ids).
const SCAN_LIMIT: usize = 32;

struct Writer<'a> {
    out: Vec<u8>,
    /// Non-empty strings written so far, by position: back-reference targets.
    seen: Vec<&'a str>,
    /// The same, by string, once there are more than [`SCAN_LIMIT`].
    index: HashMap<&'a str, usize, foldhash::fast::RandomState>,
}

impl<'a> Writer<'a> {
    fn new(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(FORMAT);
        Writer {
            out,
            seen: Vec::new(),
            index: HashMap::default(),
        }
    }

    /// The position of `s` among the strings written so far, remembering
    /// it if new.
    fn remember(&mut self, s: &'a str) -> Option<usize> {
        if self.seen.len() < SCAN_LIMIT {
            let found = self.seen.iter().position(|seen| *seen == s);
            if found.is_none() {
                self.seen.push(s);
            }
            return found;
        }
        if self.index.is_empty() {
            // First time past the limit: index what was scanned so far.
            self.index = self.seen.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        }
        let next = self.seen.len();
        match self.index.entry(s) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(next);
                self.seen.push(s);
                None
            }
        }
    }

    fn byte(&mut self, b: u8) {
        self.out.push(b);
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            // Truncation intended: the low 7 bits with the continuation bit.
            self.out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn len(&mut self, n: usize) {
        self.varint(n as u64);
    }

    fn f32(&mut self, v: f32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn str(&mut self, s: &'a str) {
        if s.is_empty() {
            self.varint(RAW);
            return;
        }
        if let Some(i) = self.remember(s) {
            self.varint((i as u64) << 2 | BACK_REFERENCE);
            return;
        }
        if packable_hex(s) {
            self.varint(((s.len() / 2) as u64) << 2 | HEX);
            for pair in s.as_bytes().chunks_exact(2) {
                self.out.push(nibble(pair[0]) << 4 | nibble(pair[1]));
            }
        } else {
            self.varint((s.len() as u64) << 2 | RAW);
            self.out.extend_from_slice(s.as_bytes());
        }
    }

    fn strs(&mut self, list: &'a [String]) {
        self.len(list.len());
        for s in list {
            self.str(s);
        }
    }
}

/// Bytes of strings one record may decode to at most. Back-references
/// let a few bytes stand for a long string, so without a bound a small
/// corrupt record could decode to gigabytes; real summaries and shapes are
/// a few kilobytes.
const MAX_DECODED_BYTES: usize = 16 << 20;

struct Reader<'a> {
    bytes: &'a [u8],
    seen: Vec<String>,
    /// Bytes of strings decoded so far.
    decoded: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self> {
        match bytes.split_first() {
            Some((&FORMAT, rest)) => Ok(Reader {
                bytes: rest,
                seen: Vec::new(),
                decoded: 0,
            }),
            Some(_) => Err(CompactError("unknown record format")),
            None => Err(CompactError("empty record")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(CompactError("record cut short"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(CompactError("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CompactError("varint longer than 10 bytes"))
    }

    fn f32(&mut self) -> Result<f32> {
        let b = self.take(4)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count of items that each take at least one byte: never more
    /// than the bytes left, so a bad count cannot allocate much.
    fn count(&mut self) -> Result<usize> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or(CompactError("count larger than the record"))
    }

    /// Counts `len` more decoded bytes against [`MAX_DECODED_BYTES`].
    fn decode(&mut self, len: usize) -> Result<()> {
        self.decoded = self.decoded.saturating_add(len);
        if self.decoded > MAX_DECODED_BYTES {
            return Err(CompactError("record expands past 16 MiB"));
        }
        Ok(())
    }

    fn str(&mut self) -> Result<String> {
        let header = self.varint()?;
        let n = usize::try_from(header >> 2).map_err(|_| CompactError("string too long"))?;
        let s = match header & 3 {
            RAW if n == 0 => return Ok(String::new()),
            RAW => std::str::from_utf8(self.take(n)?)
                .map_err(|_| CompactError("string is not UTF-8"))?
                .to_owned(),
            BACK_REFERENCE => {
                let len = self
                    .seen
                    .get(n)
                    .ok_or(CompactError("back-reference to no earlier string"))?
                    .len();
                self.decode(len)?;
                return Ok(self.seen[n].clone());
            }
            HEX if n > 0 => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                // Taken before allocating: `n` is checked against the bytes left.
                let packed = self.take(n)?;
                let mut s = String::with_capacity(2 * n);
                for b in packed {
                    s.push(char::from(DIGITS[usize::from(b >> 4)]));
                    s.push(char::from(DIGITS[usize::from(b & 0xf)]));
                }
                s
            }
            _ => return Err(CompactError("unknown string form")),
        };
        self.decode(s.len())?;
        self.seen.push(s.clone());
        Ok(s)
    }

    fn strs(&mut self) -> Result<Vec<String>> {
        self.list(Reader::str)
    }

    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn end(&self) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(CompactError("bytes left after the record"))
        }
    }
}

#[cfg(test)]
mod tests;
