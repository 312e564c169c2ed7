//! Connect events turned into `custody.v1.FlowEvent` records.

use std::path::Path;

use custody_context::api::{SCHEMA_VERSION, v1};

use crate::deny::KernelPolicy;
use crate::event::{ConnectEvent, KernelVerdict};
use crate::lineage;

/// What the agent knows about the node it runs on.
#[derive(Clone, Debug)]
pub struct NodeContext {
    /// The node name.
    pub node: String,
    /// User ids that sidecars run as: their connections went through a sidecar.
    pub sidecar_uids: Vec<u32>,
    /// Where `/proc` is (a test or a container may mount it elsewhere).
    pub proc_root: std::path::PathBuf,
}

/// Builds the flow record of `event`, with the caller's lineage read now
/// (the process may already have gone: then lineage is empty).
pub fn flow_event(
    node: &NodeContext,
    policy: &KernelPolicy,
    event: &ConnectEvent,
    unix_nanos: u64,
    sequence: u64,
) -> v1::FlowEvent {
    let chain = lineage::lineage(Path::new(&node.proc_root), event.pid);
    let executable = chain
        .first()
        .map(|p| p.executable.clone())
        .unwrap_or_else(|| event.comm.clone());
    let lineage = chain
        .iter()
        .skip(1)
        .map(|p| format!("{}:{}", p.pid, p.executable))
        .collect();
    let (verdict, policy_name) = match event.verdict {
        KernelVerdict::Allow => (v1::Verdict::Allow, String::new()),
        KernelVerdict::Block => (
            v1::Verdict::Block,
            policy
                .rule(event.rule_id)
                .map(|r| format!("{}/{}", r.policy, r.rule))
                .unwrap_or_default(),
        ),
    };
    v1::FlowEvent {
        schema_version: SCHEMA_VERSION,
        event_id: format!("{}-{}-{}", node.node, event.ktime_ns, sequence),
        node: node.node.clone(),
        pid: event.pid,
        executable,
        lineage,
        workload: None,
        connection: Some(v1::FiveTuple {
            src_ip: String::new(),
            src_port: 0,
            dst_ip: event.addr.to_string(),
            dst_port: u32::from(event.port),
            transport: if event.protocol == 17 { "udp" } else { "tcp" }.to_owned(),
        }),
        via_sidecar: node.sidecar_uids.contains(&event.uid),
        verdict: verdict as i32,
        policy: policy_name,
        unix_nanos,
    }
}
