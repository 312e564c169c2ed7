//! Optional sqlcommenter annotation (`databases[].annotate: true`): the one
//! place the relay changes bytes.
//!
//! Simple-protocol statements (PostgreSQL `Query`, MySQL `COM_QUERY`) of a
//! chain this pod attributed get a comment
//! `/*custody_chain='<chain id>',traceparent='00-<chain id>-<span>-01'*/`
//! appended (keys sorted, values URL-encoded, before a trailing `;`, nothing
//! added when the statement already has a comment), so the server's own
//! views (`pg_stat_activity`, the slow and general logs, `PROCESSLIST`)
//! name the chain.
//!
//! Data flow, client to server only: the [`Annotator`] cuts the client's
//! stream into messages on its own. Bytes of any other message go through
//! as they arrive; a `Query` / `COM_QUERY` message is held until it is
//! whole, then handed to a rewrite function that may return a replacement
//! message with its length field rewritten. The decoders always read the
//! client's original bytes, so attribution, fingerprints and analysis are of
//! what the application sent; the server receives whole, correctly framed
//! messages, and nothing the server sends back refers to client byte
//! positions, so both directions stay in step.
//!
//! Extended-protocol and prepared statements (`Parse`, `COM_STMT_PREPARE`)
//! are never touched: a comment carrying a per-request trace id would make
//! every preparation a different statement text, defeating the caches keyed
//! by that text (drivers' prepared-statement caches, pgbouncer's
//! prepared-statement tracking, server-side statement reuse).

use custody_protocols::mysql::MAX_PAYLOAD;

/// Longest message held back to be annotated; a longer one passes as is.
pub(crate) const MAX_HELD: usize = 1 << 20;

/// The framing of the client's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// PostgreSQL typed messages: tag, 4-byte big-endian length (itself
    /// included), body. Annotates `Query` (`Q`).
    Postgres,
    /// MySQL packets: 3-byte little-endian length, sequence id, payload.
    /// Annotates `COM_QUERY` (first payload byte `0x03`, sequence id 0).
    Mysql,
}

/// What a message's header says to do with it.
enum Decision {
    /// The framing makes no sense: pass everything from now on.
    Broken,
    /// Forward the header; this many more bytes of the message follow it.
    Pass(usize),
    /// Hold the whole message (this long, header included) for rewriting.
    Collect(usize),
}

/// Cuts the client's stream into messages, holding back the ones that may
/// be annotated until they are whole.
#[derive(Debug)]
pub(crate) struct Annotator {
    wire: Wire,
    /// Bytes of the current message not yet forwarded: a header being read,
    /// or a whole message being collected.
    held: Vec<u8>,
    /// The full length of the message being collected, once known.
    collecting: Option<usize>,
    /// Bytes of the current message still to pass through untouched.
    passing: usize,
    /// A MySQL packet of `MAX_PAYLOAD` bytes continues in the next one.
    continues: bool,
    /// The framing made no sense: everything passes through from now on.
    broken: bool,
}

impl Annotator {
    /// An annotator starting at a message boundary of the client's stream.
    pub(crate) fn new(wire: Wire) -> Self {
        Annotator {
            wire,
            held: Vec::new(),
            collecting: None,
            passing: 0,
            continues: false,
            broken: false,
        }
    }

    /// Bytes of header still to read before deciding. A MySQL header is
    /// the 4-byte packet header, then the command byte when the payload is
    /// not empty.
    fn header_wanted(&self) -> usize {
        match self.wire {
            Wire::Postgres => 5 - self.held.len(),
            Wire::Mysql if self.held.len() < 4 => 4 - self.held.len(),
            Wire::Mysql if self.held[..3] == [0; 3] => 0,
            Wire::Mysql => 5 - self.held.len(),
        }
    }

    /// Appends to `out` the bytes of `data` to forward now, replacing each
    /// whole candidate message by what `rewrite` returns (`None`: unchanged).
    pub(crate) fn process(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
        rewrite: &mut dyn FnMut(&[u8]) -> Option<Vec<u8>>,
    ) {
        loop {
            if self.broken {
                out.extend_from_slice(data);
                return;
            }
            if self.passing > 0 {
                let take = self.passing.min(data.len());
                out.extend_from_slice(&data[..take]);
                self.passing -= take;
                data = &data[take..];
            } else if let Some(total) = self.collecting {
                let take = (total - self.held.len()).min(data.len());
                self.held.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.held.len() == total {
                    match rewrite(&self.held) {
                        Some(replacement) => out.extend_from_slice(&replacement),
                        None => out.extend_from_slice(&self.held),
                    }
                    self.held.clear();
                    self.collecting = None;
                }
            } else {
                let take = self.header_wanted().min(data.len());
                self.held.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header_wanted() == 0 {
                    match self.decide() {
                        Decision::Broken => {
                            self.broken = true;
                            out.append(&mut self.held);
                        }
                        Decision::Pass(rest) => {
                            out.append(&mut self.held);
                            self.passing = rest;
                        }
                        Decision::Collect(total) => self.collecting = Some(total),
                    }
                    // A message that is all header, collected, is whole.
                    if self.collecting == Some(self.held.len()) {
                        continue;
                    }
                }
            }
            if data.is_empty() {
                return;
            }
        }
    }

    /// The stream ended: whatever is held goes out as it came.
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
        self.collecting = None;
    }

    /// A whole header is in `held`: collect the message or let it pass.
    fn decide(&mut self) -> Decision {
        let h = &self.held;
        let (total, candidate) = match self.wire {
            Wire::Postgres => {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len < 4 {
                    return Decision::Broken;
                }
                (1 + len, h[0] == b'Q')
            }
            Wire::Mysql => {
                let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
                let continuation = self.continues;
                self.continues = len == MAX_PAYLOAD;
                let candidate = !continuation
                    && !self.continues
                    && h[3] == 0
                    && h.get(4) == Some(&custody_protocols::mysql::commands::QUERY);
                (4 + len, candidate)
            }
        };
        if candidate && total <= MAX_HELD {
            Decision::Collect(total)
        } else {
            Decision::Pass(total - self.held.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn my(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
        let mut p = vec![len[0], len[1], len[2], seq];
        p.extend_from_slice(payload);
        p
    }

    /// Replaces each candidate by a marker naming its length.
    fn marker(message: &[u8]) -> Option<Vec<u8>> {
        Some(format!("<{}>", message.len()).into_bytes())
    }

    /// The output for `stream` fed whole, split at every byte, and byte by
    /// byte must be the same.
    fn check(wire: Wire, stream: &[u8], expected: &[u8]) {
        let mut splits: Vec<Vec<&[u8]>> = vec![vec![stream]];
        for at in 0..=stream.len() {
            splits.push(vec![&stream[..at], &stream[at..]]);
        }
        splits.push(stream.chunks(1).collect());
        for chunks in splits {
            let mut annotator = Annotator::new(wire);
            let mut out = Vec::new();
            for chunk in &chunks {
                annotator.process(chunk, &mut out, &mut marker);
            }
            annotator.flush(&mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected),
                "{:?}",
                chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn postgres_queries_are_collected_and_other_messages_pass() {
        let parse = pg(b'P', b"\0SELECT $1\0\0\0");
        let query = pg(b'Q', b"SELECT 1\0");
        let sync = pg(b'S', b"");
        let empty_query = pg(b'Q', b"");
        let stream = [&parse[..], &query, &sync, &empty_query, &parse].concat();
        let expected = [&parse[..], b"<14>", &sync, b"<5>", &parse].concat();
        check(Wire::Postgres, &stream, &expected);
    }

    #[test]
    fn postgres_bad_length_passes_everything_untouched() {
        let stream = [&[b'Q', 0, 0, 0, 2][..], &pg(b'Q', b"SELECT 1\0")].concat();
        check(Wire::Postgres, &stream, &stream);
    }

    #[test]
    fn postgres_oversized_query_is_not_held() {
        let big = vec![b'x'; MAX_HELD];
        let query = pg(b'Q', &big);
        let mut annotator = Annotator::new(Wire::Postgres);
        let mut out = Vec::new();
        annotator.process(&query[..10], &mut out, &mut marker);
        assert_eq!(out, query[..10], "forwarded as it arrives");
        annotator.process(&query[10..], &mut out, &mut marker);
        assert_eq!(out, query);
    }

    #[test]
    fn mysql_com_query_with_sequence_zero_is_collected() {
        let query = my(0, b"\x03SELECT 1");
        let ping = my(0, b"\x0e");
        let prepare = my(0, b"\x16SELECT ?");
        let infile_data = my(2, b"\x03not a command");
        let empty = my(3, b"");
        let stream = [&query[..], &ping, &prepare, &infile_data, &empty, &query].concat();
        let expected = [&b"<13>"[..], &ping, &prepare, &infile_data, &empty, b"<13>"].concat();
        check(Wire::Mysql, &stream, &expected);
    }

    #[test]
    fn mysql_continued_packets_pass() {
        let mut first = vec![0xff, 0xff, 0xff, 0, 0x03];
        first.resize(4 + MAX_PAYLOAD, b'x');
        let rest = my(1, b"\x03tail");
        let next = my(0, b"\x03SELECT 2");
        let stream = [&first[..], &rest, &next].concat();
        let mut annotator = Annotator::new(Wire::Mysql);
        let mut out = Vec::new();
        annotator.process(&stream, &mut out, &mut marker);
        assert_eq!(out.len(), first.len() + rest.len() + 4);
        assert_eq!(
            &out[..first.len() + rest.len()],
            &stream[..first.len() + rest.len()]
        );
        assert!(out.ends_with(b"<13>"));
    }
}
