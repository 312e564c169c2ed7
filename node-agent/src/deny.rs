//! From egress policy to kernel deny entries.
//!
//! The kernel sees only the destination of a `connect()`: an address and a
//! port. So only rules that block on the destination alone (no chain
//! condition) can be enforced here; rules that depend on the chain (taint,
//! initiator) stay with the sidecars, which see the chain. Host names are
//! resolved to addresses when the policy is applied; wildcard hosts cannot be
//! resolved and are reported as not enforceable in the kernel.

use std::net::IpAddr;

use custody_context::policy::{ChainMatch, Cidr, PolicyBundle, Verdict};

/// One (network, port) the kernel refuses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DenyEntry {
    /// The network address (host bits zero).
    pub addr: IpAddr,
    /// The prefix length in bits.
    pub prefix: u8,
    /// The port; 0 means every port.
    pub port: u16,
    /// A small id the kernel reports back when the entry matches.
    pub rule_id: u32,
}

/// Which policy rule a deny entry came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// The policy's name.
    pub policy: String,
    /// The rule's name.
    pub rule: String,
}

/// The kernel's share of a policy bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The policy version this was compiled from.
    pub version: u64,
    /// Entries, sorted and without duplicates.
    pub entries: Vec<DenyEntry>,
    /// `rules[rule_id - 1]` names the rule behind an entry.
    pub rules: Vec<RuleRef>,
    /// Host patterns of blocking rules that could not be turned into
    /// addresses (wildcards, names that did not resolve).
    pub unenforceable_hosts: Vec<String>,
}

impl KernelPolicy {
    /// The rule behind a rule id the kernel reported.
    pub fn rule(&self, rule_id: u32) -> Option<&RuleRef> {
        let index = usize::try_from(rule_id).ok()?.checked_sub(1)?;
        self.rules.get(index)
    }
}

fn chain_independent(chain: &ChainMatch) -> bool {
    chain.initiator_kinds.is_empty()
        && chain.principals.is_empty()
        && chain.services.is_empty()
        && chain.taint_any.is_empty()
}

/// Compiles the blocking, chain-independent rules of `bundle`; `resolve`
/// turns an exact host name into the addresses it currently has.
pub fn compile(bundle: &PolicyBundle, resolve: &dyn Fn(&str) -> Vec<IpAddr>) -> KernelPolicy {
    let mut out = KernelPolicy {
        version: bundle.version,
        ..KernelPolicy::default()
    };
    for policy in &bundle.policies {
        for rule in &policy.spec.rules {
            if rule.verdict != Verdict::Block || !chain_independent(&rule.chain) {
                continue;
            }
            let dest = &rule.destination;
            let mut networks: Vec<(IpAddr, u8)> = dest
                .cidrs
                .iter()
                .map(|c| (c.network(), c.prefix()))
                .collect();
            for host in &dest.hosts {
                let name = host.to_string();
                let resolved = if name.starts_with("*.") {
                    Vec::new()
                } else {
                    resolve(&name)
                };
                if resolved.is_empty() {
                    out.unenforceable_hosts.push(name);
                }
                for addr in resolved {
                    networks.push((addr, if addr.is_ipv4() { 32 } else { 128 }));
                }
            }
            if dest.hosts.is_empty() && dest.cidrs.is_empty() {
                // Every destination: 0.0.0.0/0 and ::/0.
                networks.push((IpAddr::from([0u8; 4]), 0));
                networks.push((IpAddr::from([0u8; 16]), 0));
            }
            if networks.is_empty() {
                continue;
            }
            out.rules.push(RuleRef {
                policy: policy.name().to_owned(),
                rule: rule.name.clone(),
            });
            let rule_id = u32::try_from(out.rules.len()).unwrap_or(u32::MAX);
            let ports: Vec<u16> = if dest.ports.is_empty() {
                vec![0]
            } else {
                dest.ports.clone()
            };
            for (addr, prefix) in networks {
                for &port in &ports {
                    out.entries.push(DenyEntry {
                        addr: Cidr::new(addr, prefix).map_or(addr, |c| c.network()),
                        prefix,
                        port,
                        rule_id,
                    });
                }
            }
        }
    }
    out.entries.sort();
    out.entries
        .dedup_by(|a, b| a.addr == b.addr && a.prefix == b.prefix && a.port == b.port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_context::policy::EgressPolicy;

    fn bundle(rules: &str) -> PolicyBundle {
        let doc = format!(
            "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: {{ name: p }}\nspec:\n  rules:\n{rules}"
        );
        PolicyBundle {
            version: 3,
            policies: vec![EgressPolicy::from_yaml(&doc).unwrap()],
            ..PolicyBundle::default()
        }
    }

    fn resolver(host: &str) -> Vec<IpAddr> {
        match host {
            "paste.risky.example" => vec!["10.99.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            _ => vec![],
        }
    }

    #[test]
    fn only_chain_independent_blocks_reach_the_kernel() {
        let b = bundle(
            "    - name: paste\n      destination: { hosts: [paste.risky.example], ports: [443, 80] }\n      verdict: block\n\
             \x20   - name: tainted\n      destination: { cidrs: [10.1.0.0/16] }\n      chain: { taintAny: [pii.ssn] }\n      verdict: block\n\
             \x20   - name: audited\n      destination: { cidrs: [10.2.0.0/16] }\n      verdict: audit\n\
             \x20   - name: net\n      destination: { cidrs: [192.0.2.77/24] }\n      verdict: block\n",
        );
        let k = compile(&b, &resolver);
        assert_eq!(k.version, 3);
        assert_eq!(k.rules.len(), 2);
        let shown: Vec<_> = k
            .entries
            .iter()
            .map(|e| format!("{}/{}:{}#{}", e.addr, e.prefix, e.port, e.rule_id))
            .collect();
        assert_eq!(
            shown,
            vec![
                "10.99.0.7/32:80#1",
                "10.99.0.7/32:443#1",
                "192.0.2.0/24:0#2",
                "fd00::7/128:80#1",
                "fd00::7/128:443#1",
            ]
        );
        assert_eq!(k.rule(2).unwrap().rule, "net");
        assert_eq!(k.rule(0), None);
        assert_eq!(k.rule(9), None);
    }

    #[test]
    fn wildcards_and_unresolved_names_are_reported() {
        let b = bundle(
            "    - name: r\n      destination: { hosts: [\"*.risky.example\", nowhere.example] }\n      verdict: block\n",
        );
        let k = compile(&b, &resolver);
        assert!(k.entries.is_empty());
        assert!(k.rules.is_empty());
        assert_eq!(
            k.unenforceable_hosts,
            vec!["*.risky.example", "nowhere.example"]
        );
    }

    #[test]
    fn a_rule_without_destination_blocks_everything() {
        let b = bundle("    - name: all\n      verdict: block\n");
        let k = compile(&b, &resolver);
        assert_eq!(k.entries.len(), 2);
        assert!(k.entries.iter().all(|e| e.prefix == 0 && e.port == 0));
    }
}
