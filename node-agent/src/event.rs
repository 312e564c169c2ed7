//! Connect events from the kernel, decoded without `unsafe`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The size of `struct connect_event` in `bpf/connect.bpf.c`.
pub const EVENT_SIZE: usize = 72;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// What the kernel decided for a `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    /// The connection went ahead.
    Allow,
    /// The caller got `EPERM`.
    Block,
}

/// One `connect()` seen by the kernel program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    /// The cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// Monotonic kernel time of the call, in nanoseconds.
    pub ktime_ns: u64,
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// User id of the caller.
    pub uid: u32,
    /// The destination.
    pub addr: IpAddr,
    /// The destination port.
    pub port: u16,
    /// The deny entry's rule id when blocked, else 0.
    pub rule_id: u32,
    /// The kernel's verdict.
    pub verdict: KernelVerdict,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub protocol: u8,
    /// The task's command name (up to 15 bytes).
    pub comm: String,
}

/// Why a ring-buffer record was not a connect event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The record is not `EVENT_SIZE` bytes.
    #[error("record of {0} bytes, expected 72")]
    Size(usize),
    /// The address family is neither IPv4 nor IPv6.
    #[error("unknown address family {0}")]
    Family(u16),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(raw)
}

impl ConnectEvent {
    /// Decodes a ring-buffer record (the layout of `struct connect_event`).
    pub fn parse(b: &[u8]) -> Result<Self, EventError> {
        if b.len() != EVENT_SIZE {
            return Err(EventError::Size(b.len()));
        }
        let family = u16_at(b, 28);
        let addr = match family {
            AF_INET => IpAddr::V4(Ipv4Addr::new(b[32], b[33], b[34], b[35])),
            AF_INET6 => {
                let mut raw = [0u8; 16];
                raw.copy_from_slice(&b[32..48]);
                let v6 = Ipv6Addr::from(raw);
                // A v4-mapped destination is an IPv4 connection on a v6 socket.
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
            other => return Err(EventError::Family(other)),
        };
        let comm = &b[54..70];
        let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
        Ok(ConnectEvent {
            cgroup_id: u64_at(b, 0),
            ktime_ns: u64_at(b, 8),
            pid: u32_at(b, 16),
            tid: u32_at(b, 20),
            uid: u32_at(b, 24),
            addr,
            port: u16_at(b, 30),
            rule_id: u32_at(b, 48),
            verdict: if b[52] == 3 {
                KernelVerdict::Block
            } else {
                KernelVerdict::Allow
            },
            protocol: b[53],
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(family: u16, addr: &[u8], verdict: u8) -> Vec<u8> {
        let mut b = vec![0u8; EVENT_SIZE];
        b[0..8].copy_from_slice(&77u64.to_ne_bytes());
        b[16..20].copy_from_slice(&4242u32.to_ne_bytes());
        b[24..28].copy_from_slice(&1000u32.to_ne_bytes());
        b[28..30].copy_from_slice(&family.to_ne_bytes());
        b[30..32].copy_from_slice(&443u16.to_ne_bytes());
        b[32..32 + addr.len()].copy_from_slice(addr);
        b[48..52].copy_from_slice(&2u32.to_ne_bytes());
        b[52] = verdict;
        b[53] = 6;
        b[54..58].copy_from_slice(b"curl");
        b
    }

    #[test]
    fn decodes_both_families() {
        let e = ConnectEvent::parse(&record(2, &[10, 0, 0, 7], 3)).unwrap();
        assert_eq!(e.addr, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!((e.pid, e.uid, e.port, e.rule_id), (4242, 1000, 443, 2));
        assert_eq!(
            (e.verdict, e.protocol, e.comm.as_str()),
            (KernelVerdict::Block, 6, "curl")
        );
        assert_eq!(e.cgroup_id, 77);
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        let e = ConnectEvent::parse(&record(10, &v6.octets(), 1)).unwrap();
        assert_eq!(e.addr, IpAddr::V6(v6));
        assert_eq!(e.verdict, KernelVerdict::Allow);
        let mapped: Ipv6Addr = "::ffff:10.0.0.9".parse().unwrap();
        let e = ConnectEvent::parse(&record(10, &mapped.octets(), 1)).unwrap();
        assert_eq!(e.addr, "10.0.0.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn refuses_bad_records() {
        assert_eq!(ConnectEvent::parse(&[0; 10]), Err(EventError::Size(10)));
        assert_eq!(
            ConnectEvent::parse(&record(1, &[0; 4], 1)),
            Err(EventError::Family(1))
        );
    }
}
