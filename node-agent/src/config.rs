//! The agent's configuration file.
//!
//! ```yaml
//! node: node-1                          # reported in every flow
//! cgroup: /sys/fs/cgroup/unified        # attach point; the root covers every pod
//! policyFile: /etc/custody/policy.json  # standalone mode: a PolicyBundle, watched
//! flowsFile: /var/log/custody/flows.jsonl
//! sidecarUids: [1337]                   # connections from these users went through a sidecar
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// The agent's settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// The node name.
    pub node: String,
    /// The cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    /// A `PolicyBundle` (JSON or YAML) to enforce, reloaded when it changes.
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Where flow records go, one JSON object per line; stdout when unset.
    #[serde(default)]
    pub flows_file: Option<PathBuf>,
    /// Users that sidecars run as.
    #[serde(default)]
    pub sidecar_uids: Vec<u32>,
    /// How often the policy file is checked, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub policy_poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    200
}

/// A configuration refused, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Parses and checks a YAML (or JSON) configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| ConfigError {
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        })?;
        let fail = |field: &str, message: &str| {
            Err(ConfigError {
                field: field.to_owned(),
                message: message.to_owned(),
            })
        };
        if config.node.is_empty() {
            return fail("node", "must not be empty");
        }
        if !config.cgroup.is_absolute() {
            return fail("cgroup", "must be an absolute path");
        }
        if config.policy_poll_ms == 0 {
            return fail("policyPollMs", "must be at least 1");
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c = Config::parse(
            "node: n1\ncgroup: /sys/fs/cgroup/unified\npolicyFile: /p.json\nflowsFile: /f.jsonl\nsidecarUids: [1337]\n",
        )
        .unwrap();
        assert_eq!(c.node, "n1");
        assert_eq!(c.sidecar_uids, vec![1337]);
        assert_eq!(c.policy_poll_ms, 200);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |text: &str| Config::parse(text).unwrap_err().field;
        assert_eq!(field("node: n\ncgroup: relative\n"), "cgroup");
        assert_eq!(field("node: ''\ncgroup: /x\n"), "node");
        assert_eq!(
            field("node: n\ncgroup: /x\nsidecarUids: [root]\n"),
            "sidecarUids[0]"
        );
        assert_eq!(field("node: n\ncgroup: /x\nflowFile: /f\n"), "flowFile");
        assert_eq!(
            field("node: n\ncgroup: /x\npolicyPollMs: 0\n"),
            "policyPollMs"
        );
    }
}
