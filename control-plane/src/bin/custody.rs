//! `custody`: the command-line client of the control plane.
//!
//! Exit codes: 0 success, 1 error (server unreachable, server failure),
//! 2 usage, 3 not found, 4 refused or invalid (authentication, validation).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use custody_control::assembly::{ChainSummary, ChainTree};
use custody_control::client::{Client, ClientError};
use custody_control::http::BlastRadius;
use custody_control::render;
use custody_control::store::PolicyState;
use serde_json::{Value, json};

/// Investigate identity chains and steer egress policy.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 refused or invalid."
)]
struct Cli {
    /// The control plane's HTTP address.
    #[arg(
        long,
        env = "CUSTODY_SERVER",
        default_value = "http://127.0.0.1:19002",
        global = true
    )]
    server: String,
    /// An admin bearer token.
    #[arg(long, env = "CUSTODY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Human, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List chains, newest first.
    Chains(ChainFilters),
    /// Show one chain as a tree.
    Chain {
        /// The chain id (or the id of a chain joined into it).
        id: String,
    },
    /// Chains, services, data classes and destinations reached by a principal or credential.
    BlastRadius {
        /// A principal (initiator, actor, workload URI or database user).
        principal: Option<String>,
        /// A credential: a key id or `system/database/user`.
        #[arg(long, conflicts_with = "principal")]
        credential: Option<String>,
        /// Since (a duration ago such as 15m, 2h, 7d, or Unix nanoseconds).
        #[arg(long)]
        since: Option<String>,
        /// Until (same forms).
        #[arg(long)]
        until: Option<String>,
    },
    /// Manage egress policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Contain an incident.
    #[command(subcommand)]
    Contain(ContainCommand),
    /// Show the audit log.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, clap::Args)]
struct ChainFilters {
    /// Initiator or actor.
    #[arg(long)]
    initiator: Option<String>,
    /// A workload URI the chain crossed.
    #[arg(long)]
    service: Option<String>,
    /// A data class touched.
    #[arg(long)]
    data_class: Option<String>,
    /// An egress destination host.
    #[arg(long)]
    destination: Option<String>,
    /// An egress verdict.
    #[arg(long, value_parser = ["allow", "audit", "block"])]
    verdict: Option<String>,
    /// An identity used (workload, database user, key id).
    #[arg(long)]
    identity: Option<String>,
    /// A coverage class.
    #[arg(long, value_parser = ["propagated", "stitched", "partial", "orphan"])]
    coverage: Option<String>,
    /// Since (15m, 2h, 7d ago, or Unix nanoseconds).
    #[arg(long)]
    since: Option<String>,
    /// Until (same forms).
    #[arg(long)]
    until: Option<String>,
    /// At most this many (default 50; with --follow, no limit).
    #[arg(long)]
    limit: Option<u32>,
    /// Keep running and print each chain as it is assembled (new chains
    /// and chains that changed), until interrupted or --limit chains.
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Create or replace a policy from a YAML or JSON file (`-` for stdin).
    Apply {
        /// The file.
        #[arg(short, long)]
        file: PathBuf,
    },
    /// List the policies in force.
    List,
    /// Delete a policy.
    Delete {
        /// Its name.
        name: String,
    },
    /// Which version each client applied.
    Status,
}

#[derive(Debug, Subcommand)]
enum ContainCommand {
    /// Block a destination mesh-wide (optionally only for some chains).
    Block {
        /// Host or *.suffix.
        host: String,
        /// Only chains tainted by one of these data classes.
        #[arg(long = "taint-any")]
        taint_any: Vec<String>,
        /// Only chains started by these kinds (human, service, agent, system).
        #[arg(long = "initiator-kind")]
        initiator_kinds: Vec<String>,
    },
    /// Revoke a principal, a key or a credential mesh-wide.
    Revoke {
        /// An initiator.
        #[arg(long, group = "what")]
        principal: Option<String>,
        /// A signing key id.
        #[arg(long, group = "what")]
        key_id: Option<String>,
        /// SHA-256 hex of a credential.
        #[arg(long, group = "what")]
        credential_hash: Option<String>,
    },
    /// Flag a chain for investigation.
    Quarantine {
        /// The chain id.
        chain: String,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn time_arg(name: &str, value: Option<&String>) -> Result<Option<String>, Failure> {
    let Some(v) = value else { return Ok(None) };
    if let Ok(n) = v.parse::<u64>() {
        return Ok(Some(n.to_string()));
    }
    let (num, unit) = v.split_at(v.len().saturating_sub(1));
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => 0,
    };
    let n: u64 = num.parse().ok().filter(|_| secs > 0).ok_or_else(|| {
        usage(format!(
            "--{name}: expected 15m, 2h, 7d or Unix nanoseconds, got {v:?}"
        ))
    })?;
    let ago = n.saturating_mul(secs).saturating_mul(1_000_000_000);
    Ok(Some(
        custody_control::unix_nanos()
            .saturating_sub(ago)
            .to_string(),
    ))
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v).map_err(|e| Failure {
        code: 1,
        message: format!("unexpected answer from the server: {e}"),
    })
}

fn run(cli: Cli) -> Result<String, Failure> {
    let client = Client::new(&cli.server, cli.token.clone());
    let json_out = cli.output == Output::Json;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    match cli.command {
        Command::Chains(f) => {
            let mut q: Vec<(&str, String)> = Vec::new();
            for (k, v) in [
                ("initiator", f.initiator),
                ("service", f.service),
                ("data_class", f.data_class),
                ("destination", f.destination),
                ("verdict", f.verdict),
                ("identity", f.identity),
                ("coverage", f.coverage),
                ("since", time_arg("since", f.since.as_ref())?),
                ("until", time_arg("until", f.until.as_ref())?),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            if f.follow {
                if f.limit == Some(0) {
                    return Err(usage("--limit: at least 1"));
                }
                return follow_chains(&client, &q, f.limit, json_out);
            }
            q.push(("limit", f.limit.unwrap_or(50).to_string()));
            let v = client.get("/v1/chains", &q)?;
            if json_out {
                return Ok(pretty(&v));
            }
            let list: Vec<ChainSummary> = decode(v["chains"].clone())?;
            Ok(render::chains(&list))
        }
        Command::Chain { id } => {
            let v = client.get(&format!("/v1/chains/{id}"), &[])?;
            if json_out {
                return Ok(pretty(&v));
            }
            let tree: ChainTree = decode(v)?;
            Ok(render::chain(&tree))
        }
        Command::BlastRadius {
            principal,
            credential,
            since,
            until,
        } => {
            let mut q = match (principal, credential) {
                (Some(p), None) => vec![("principal", p)],
                (None, Some(c)) => vec![("credential", c)],
                _ => return Err(usage("give a principal or --credential")),
            };
            if let Some(s) = time_arg("since", since.as_ref())? {
                q.push(("since", s));
            }
            if let Some(u) = time_arg("until", until.as_ref())? {
                q.push(("until", u));
            }
            let v = client.get("/v1/blast-radius", &q)?;
            if json_out {
                return Ok(pretty(&v));
            }
            let b: BlastRadius = decode(v)?;
            Ok(render::blast_radius(&b))
        }
        Command::Policy(PolicyCommand::Apply { file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot read {}: {e}", file.display()),
            })?;
            let ct = if text.trim_start().starts_with('{') {
                "application/json"
            } else {
                "application/yaml"
            };
            let v = client.post("/v1/policies", ct, &text)?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(format!(
                "applied policy {} (version {})\n",
                v["name"].as_str().unwrap_or_default(),
                v["version"]
            ))
        }
        Command::Policy(PolicyCommand::List) => {
            let v = client.get("/v1/policies", &[])?;
            if json_out {
                return Ok(pretty(&v));
            }
            let state: PolicyState = decode(v)?;
            Ok(render::policies(&state))
        }
        Command::Policy(PolicyCommand::Delete { name }) => {
            let v = client.delete(&format!("/v1/policies/{name}"))?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(format!(
                "deleted policy {name} (version {})\n",
                v["version"]
            ))
        }
        Command::Policy(PolicyCommand::Status) => {
            let v = client.get("/v1/policies/status", &[])?;
            if json_out {
                return Ok(pretty(&v));
            }
            let mut out = format!("version {}\n", v["version"]);
            for c in v["clients"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{} {} applied {} in {} ms{}\n",
                    c["kind"].as_str().unwrap_or_default(),
                    c["client"].as_str().unwrap_or_default(),
                    c["version"],
                    c["change_to_applied_nanos"].as_u64().unwrap_or(0) / 1_000_000,
                    c["error"]
                        .as_str()
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(" (refused: {e})"))
                        .unwrap_or_default()
                ));
            }
            Ok(out)
        }
        Command::Contain(ContainCommand::Block {
            host,
            taint_any,
            initiator_kinds,
        }) => {
            let body =
                json!({"host": host, "taint_any": taint_any, "initiator_kinds": initiator_kinds});
            let v = client.post(
                "/v1/contain/block-destination",
                "application/json",
                &body.to_string(),
            )?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(format!(
                "blocked {host} with policy {} (version {})\n",
                v["policy"].as_str().unwrap_or_default(),
                v["version"]
            ))
        }
        Command::Contain(ContainCommand::Revoke {
            principal,
            key_id,
            credential_hash,
        }) => {
            let (what, body) = match (principal, key_id, credential_hash) {
                (Some(p), None, None) => (p.clone(), json!({"principal": p})),
                (None, Some(k), None) => (k.clone(), json!({"key_id": k})),
                (None, None, Some(h)) => (h.clone(), json!({"credential_hash": h})),
                _ => {
                    return Err(usage(
                        "give one of --principal, --key-id, --credential-hash",
                    ));
                }
            };
            let v = client.post("/v1/contain/revoke", "application/json", &body.to_string())?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(format!("revoked {what} (version {})\n", v["version"]))
        }
        Command::Contain(ContainCommand::Quarantine { chain }) => {
            let body = json!({ "chain": chain });
            let v = client.post(
                "/v1/contain/quarantine",
                "application/json",
                &body.to_string(),
            )?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(format!(
                "quarantined chain {chain} (version {})\n",
                v["version"]
            ))
        }
        Command::Audit { limit } => {
            let v = client.get("/v1/audit", &[("limit", limit.to_string())])?;
            if json_out {
                return Ok(pretty(&v));
            }
            let mut out = String::new();
            for e in v["entries"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "#{} v{} {} {} {}\n",
                    e["id"],
                    e["version"],
                    e["actor"].as_str().unwrap_or_default(),
                    e["action"].as_str().unwrap_or_default(),
                    e["target"].as_str().unwrap_or_default()
                ));
            }
            Ok(out)
        }
    }
}

/// `custody chains --follow`: one line per chain as it is assembled (a
/// table row, or a JSON object per line), written as it arrives; stops
/// after `limit` chains or when stdout is closed.
fn follow_chains(
    client: &Client,
    query: &[(&str, String)],
    limit: Option<u32>,
    json_out: bool,
) -> Result<String, Failure> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let mut left = limit;
    let mut failed: Option<Failure> = None;
    let connected = || {
        // Said on stderr, so that stdout holds only chains.
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "custody: following new chains (Ctrl-C to stop)");
    };
    let mut header = !json_out;
    client.follow("/v1/chains/stream", query, "chain", connected, |data| {
        let line = if json_out {
            // One object per line, as the server sent it.
            format!("{data}\n")
        } else {
            match serde_json::from_str::<ChainSummary>(data) {
                Ok(c) if std::mem::take(&mut header) => {
                    render::chains_header() + &render::chain_row(&c)
                }
                Ok(c) => render::chain_row(&c),
                Err(e) => {
                    failed = Some(Failure {
                        code: 1,
                        message: format!("unexpected event from the server: {e}"),
                    });
                    return false;
                }
            }
        };
        // A closed stdout (`| head`) ends the follow quietly.
        if stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return false;
        }
        if let Some(n) = &mut left {
            *n = n.saturating_sub(1);
            return *n > 0;
        }
        true
    })?;
    match failed {
        Some(f) => Err(f),
        None => Ok(String::new()),
    }
}

#[allow(clippy::print_stdout, clippy::print_stderr)] // a CLI's output
fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("custody: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
