//! Packet framing: 3-byte little-endian length, 1-byte sequence id, payload.
//!
//! A payload of exactly `0xFFFFFF` bytes continues in the next packet; the
//! [`Framer`] joins such packets into one logical [`Packet`]. A packet wholly
//! inside the chunk being fed is returned as a slice of that chunk (no copy).
//! Anything else is copied into a buffer that never grows past the framer's
//! cap; the bytes beyond the cap are counted in [`Packet::len`].

/// Largest payload of one physical packet; a payload of this size continues.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

/// One logical packet: its first bytes and its full length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Sequence id of the first physical packet.
    pub seq: u8,
    /// The payload, or its first bytes when longer than the framer's cap.
    pub payload: &'a [u8],
    /// Full length of the logical payload (all physical packets).
    pub len: u64,
}

impl Packet<'_> {
    /// Whether bytes of the payload were counted but not kept.
    pub fn is_truncated(&self) -> bool {
        (self.payload.len() as u64) < self.len
    }
}

/// Incremental framer for one direction of a connection.
#[derive(Debug, Clone)]
pub struct Framer {
    cap: usize,
    header: [u8; 4],
    header_len: u8,
    /// Bytes still to come in the current physical packet, when inside one.
    remaining: Option<usize>,
    /// The current physical packet is `MAX_PAYLOAD` long: the logical one goes on.
    continues: bool,
    /// A logical packet has started (some physical packet header was read).
    started: bool,
    seq: u8,
    total: u64,
    buf: Vec<u8>,
    /// `buf` was handed out by the previous call and must be cleared first.
    emitted: bool,
}

impl Framer {
    /// A framer that keeps at most `cap` bytes of each logical payload.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            header: [0; 4],
            header_len: 0,
            remaining: None,
            continues: false,
            started: false,
            seq: 0,
            total: 0,
            buf: Vec::new(),
            emitted: false,
        }
    }

    /// The cap on the bytes kept per logical payload.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether the framer sits between packets (no partial packet buffered).
    pub fn is_idle(&self) -> bool {
        !self.started && self.header_len == 0
    }

    /// Takes bytes from the front of `input` and returns the next complete
    /// logical packet, or `None` once `input` is used up without completing
    /// one (the partial packet is remembered for the next call).
    pub fn next<'s, 'a: 's>(&'s mut self, input: &mut &'a [u8]) -> Option<Packet<'s>> {
        if self.emitted {
            self.emitted = false;
            self.buf.clear();
            self.total = 0;
            self.started = false;
        }
        // Fast path: a whole packet at the front of the chunk.
        if !self.started
            && self.header_len == 0
            && let &[a, b, c, seq, ref rest @ ..] = *input
        {
            {
                let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
                if len < MAX_PAYLOAD
                    && let Some(payload) = rest.get(..len)
                {
                    *input = rest.get(len..).unwrap_or_default();
                    return Some(Packet {
                        seq,
                        payload: payload.get(..self.cap).unwrap_or(payload),
                        len: len as u64,
                    });
                }
            }
        }
        loop {
            let remaining = match self.remaining {
                Some(r) => r,
                None => {
                    let want = 4 - usize::from(self.header_len);
                    let take = want.min(input.len());
                    let (head, rest) = input.split_at(take);
                    let start = usize::from(self.header_len);
                    if let Some(dst) = self.header.get_mut(start..start + take) {
                        dst.copy_from_slice(head);
                    }
                    // `take` is at most 4.
                    self.header_len += take as u8;
                    *input = rest;
                    if self.header_len < 4 {
                        return None;
                    }
                    self.header_len = 0;
                    let [a, b, c, seq] = self.header;
                    let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
                    if !self.started {
                        self.started = true;
                        self.seq = seq;
                    }
                    self.continues = len == MAX_PAYLOAD;
                    self.remaining = Some(len);
                    len
                }
            };
            let take = remaining.min(input.len());
            let (chunk, rest) = input.split_at(take);
            let room = self.cap.saturating_sub(self.buf.len());
            if let Some(keep) = chunk.get(..take.min(room)) {
                self.buf.extend_from_slice(keep);
            }
            self.total += take as u64;
            *input = rest;
            let left = remaining - take;
            if left > 0 {
                self.remaining = Some(left);
                return None;
            }
            self.remaining = None;
            if self.continues {
                continue;
            }
            self.emitted = true;
            return Some(Packet {
                seq: self.seq,
                payload: &self.buf,
                len: self.total,
            });
        }
    }
}
