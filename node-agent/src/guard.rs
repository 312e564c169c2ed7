//! The kernel side, loaded and attached: the eBPF program on a cgroup, its
//! deny tries, and the ring buffer of connect events.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};

use crate::deny::{DenyEntry, KernelPolicy};

/// Why the kernel side could not be set up or updated.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The path given.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The object could not be loaded (verifier, permissions, kernel support).
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// The cause.
        source: aya::programs::ProgramError,
    },
    /// A map is missing or could not be used.
    #[error("map {name}: {detail}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        detail: String,
    },
}

type Deny4 = LpmTrie<MapData, [u8; 8], u32>;
type Deny6 = LpmTrie<MapData, [u8; 20], u32>;

/// The eBPF program attached to one cgroup (the node's root cgroup in
/// production, so every pod is covered). Dropping it detaches the program.
pub struct ConnectGuard {
    _ebpf: Ebpf,
    deny4: Deny4,
    deny6: Deny6,
    dropped: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
}

impl std::fmt::Debug for ConnectGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectGuard").finish_non_exhaustive()
    }
}

fn map_error(name: &'static str, detail: impl ToString) -> GuardError {
    GuardError::Map {
        name,
        detail: detail.to_string(),
    }
}

fn key4(entry: &DenyEntry, v4: [u8; 4]) -> Key<[u8; 8]> {
    let mut data = [0u8; 8];
    data[..2].copy_from_slice(&entry.port.to_be_bytes());
    data[2..6].copy_from_slice(&v4);
    Key::new(16 + u32::from(entry.prefix), data)
}

fn key6(entry: &DenyEntry, v6: [u8; 16]) -> Key<[u8; 20]> {
    let mut data = [0u8; 20];
    data[..2].copy_from_slice(&entry.port.to_be_bytes());
    data[2..18].copy_from_slice(&v6);
    Key::new(16 + u32::from(entry.prefix), data)
}

impl ConnectGuard {
    /// Loads the program and attaches `connect4` and `connect6` to `cgroup`.
    pub fn attach(cgroup: &Path) -> Result<Self, GuardError> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connect.bpf.o"));
        let mut ebpf = Ebpf::load(object)?;
        let dir = File::open(cgroup).map_err(|source| GuardError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        for name in ["custody_connect4", "custody_connect6"] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| map_error("programs", format!("{name} missing from the object")))?
                .try_into()
                .map_err(|source| GuardError::Program { name, source })?;
            program
                .load()
                .map_err(|source| GuardError::Program { name, source })?;
            program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| GuardError::Program { name, source })?;
        }
        let deny4 = Deny4::try_from(
            ebpf.take_map("DENY4")
                .ok_or_else(|| map_error("DENY4", "missing"))?,
        )
        .map_err(|e| map_error("DENY4", e))?;
        let deny6 = Deny6::try_from(
            ebpf.take_map("DENY6")
                .ok_or_else(|| map_error("DENY6", "missing"))?,
        )
        .map_err(|e| map_error("DENY6", e))?;
        let dropped = PerCpuArray::try_from(
            ebpf.take_map("DROPPED")
                .ok_or_else(|| map_error("DROPPED", "missing"))?,
        )
        .map_err(|e| map_error("DROPPED", e))?;
        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or_else(|| map_error("EVENTS", "missing"))?,
        )
        .map_err(|e| map_error("EVENTS", e))?;
        Ok(ConnectGuard {
            _ebpf: ebpf,
            deny4,
            deny6,
            dropped,
            events: Some(events),
        })
    }

    /// The ring buffer of connect events; taken once by the event reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Events the kernel dropped because the ring buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Makes the kernel's deny entries exactly `policy`'s: new entries are
    /// inserted before stale ones are removed, so a change never opens a gap.
    pub fn apply(&mut self, policy: &KernelPolicy) -> Result<usize, GuardError> {
        let mut want4 = BTreeSet::new();
        let mut want6 = BTreeSet::new();
        for entry in &policy.entries {
            match entry.addr {
                IpAddr::V4(v4) => {
                    let key = key4(entry, v4.octets());
                    self.deny4
                        .insert(&key, entry.rule_id, 0)
                        .map_err(|e| map_error("DENY4", e))?;
                    want4.insert((key.prefix_len(), key.data()));
                }
                IpAddr::V6(v6) => {
                    let key = key6(entry, v6.octets());
                    self.deny6
                        .insert(&key, entry.rule_id, 0)
                        .map_err(|e| map_error("DENY6", e))?;
                    want6.insert((key.prefix_len(), key.data()));
                }
            }
        }
        let stale4: Vec<_> = self
            .deny4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want4.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale4 {
            self.deny4.remove(&key).map_err(|e| map_error("DENY4", e))?;
        }
        let stale6: Vec<_> = self
            .deny6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want6.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale6 {
            self.deny6.remove(&key).map_err(|e| map_error("DENY6", e))?;
        }
        Ok(want4.len() + want6.len())
    }
}
