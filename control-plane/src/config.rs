//! Typed, documented configuration of `custody-control`, read from YAML.
//!
//! ```yaml
//! data_dir: /var/lib/custody
//! grpc_listen: 127.0.0.1:19001   # Ingest, PolicyDistribution, Trust
//! http_listen: 127.0.0.1:19002   # investigation and policy API, /metrics
//! sync: full                     # full (survives power loss) or normal
//! store:                         # optional: sqlite (default, in data_dir) or postgres
//!   backend: postgres
//!   postgres:
//!     host: postgres.custody.svc   # or a Unix socket directory
//!     port: 5432
//!     user: custody
//!     dbname: custody
//!     password_file: /etc/custody/postgres/password   # never the password itself
//!     pool_size: 4
//!     connect_timeout_secs: 10
//!     sslmode: verify-full         # or disable (default): TLS, certificate and name verified
//!     ca_file: /etc/custody/postgres-ca/ca.crt
//! tokens:
//!   - { name: oncall, role: admin, secret: "long random string" }
//!   - { name: nodes, role: node, secret_file: /etc/custody/node-token }
//! retention: { max_age_secs: 604800, max_bytes: 10737418240, interval_secs: 60 }
//! trust: { signing_key_ttl_secs: 3600 }
//! assembly: { interval_millis: 200, max_request_secs: 10 }
//! https:                         # optional: the same HTTP API over TLS (admission webhooks)
//!   listen: 0.0.0.0:19443
//!   cert_file: /etc/custody/tls/tls.crt   # PEM chain, re-read when it changes
//!   key_file: /etc/custody/tls/tls.key
//! workload_auth:                 # optional: sidecars and agents authenticate with
//!   issuer: https://kubernetes.default.svc.cluster.local   # projected service-account tokens
//!   jwks_file: /etc/custody/jwks/jwks.json                 # the issuer's /openid/v1/jwks
//!   audience: custody
//!   leeway_secs: 60
//! inject:                        # optional: sidecar injection (`POST /inject`), see `inject.rs`
//!   proxy_image: ghcr.io/custody-mesh/custody-proxy:0.1.0
//!   init_image: ghcr.io/custody-mesh/custody-init:0.1.0
//!   trust_domain: cluster.local
//!   control_plane_url: http://custody-control.custody.svc:19001
//! ```
//!
//! Every error names the field at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A field is missing, mistyped or invalid.
    #[error("{field}: {message}")]
    Field {
        /// The field's path, e.g. `tokens[0].secret`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn field(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operators: the HTTP API and the CLI (and gRPC).
    Admin,
    /// Sidecars and node agents: the gRPC API only.
    Node,
    /// A workload proven by a projected service-account token: the gRPC API
    /// for its own workload only (never a static token's role).
    #[serde(skip)]
    Workload,
}

/// A static bearer token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who presents it: recorded in the audit log.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret itself.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the secret (trailing whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// How long and how much to keep.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Events older than this are deleted (default 7 days).
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// The oldest events are deleted above this size (default 10 GiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// How often the retention job runs (default 60 s).
    #[serde(default = "default_retention_interval")]
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age_secs: default_max_age(),
            max_bytes: default_max_bytes(),
            interval_secs: default_retention_interval(),
        }
    }
}

fn default_max_age() -> u64 {
    7 * 24 * 3600
}
fn default_max_bytes() -> u64 {
    10 << 30
}
fn default_retention_interval() -> u64 {
    60
}

/// Key issuing.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Validity of a sidecar signing key (default 1 h).
    #[serde(default = "default_key_ttl")]
    pub signing_key_ttl_secs: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            signing_key_ttl_secs: default_key_ttl(),
        }
    }
}

fn default_key_ttl() -> u64 {
    3600
}

/// Chain assembly.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssemblyConfig {
    /// How often newly ingested chains are assembled (default 200 ms).
    #[serde(default = "default_assembly_interval")]
    pub interval_millis: u64,
    /// The longest request a contextless hop may have been made for: its
    /// parent is searched among requests started at most this long before
    /// it (default 10 s).
    #[serde(default = "default_max_request")]
    pub max_request_secs: u64,
}

impl Default for AssemblyConfig {
    fn default() -> Self {
        AssemblyConfig {
            interval_millis: default_assembly_interval(),
            max_request_secs: default_max_request(),
        }
    }
}

fn default_max_request() -> u64 {
    10
}

fn default_assembly_interval() -> u64 {
    200
}

/// Disk synchronization of commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every commit reaches the disk before it is acknowledged.
    #[default]
    Full,
    /// Commits survive a process crash; the last may be lost on power loss.
    Normal,
}

/// Which database keeps the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// SQLite in `data_dir`: embedded, nothing to run beside the server.
    #[default]
    Sqlite,
    /// An external PostgreSQL server (`store.postgres`).
    Postgres,
}

/// Where the data is kept.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The backend (default `sqlite`).
    #[serde(default)]
    pub backend: Backend,
    /// The PostgreSQL server; required with `backend: postgres`.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

/// How to reach PostgreSQL. The password is read from a file, never
/// written in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Host name, IP address, or a Unix socket directory (starting with `/`).
    pub host: String,
    /// TCP port (default 5432).
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// The role to log in as.
    pub user: String,
    /// The database (created beforehand; the tables are created at start).
    pub dbname: String,
    /// A file holding the password (trailing whitespace ignored); none for
    /// peer or trust authentication.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections kept open: concurrent ingest batches commit in parallel
    /// up to this many (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long to wait for a connection (default 10 s).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// TLS to the server (default `disable`).
    #[serde(default)]
    pub sslmode: PostgresSslMode,
    /// The CA certificates (PEM) the server's certificate is verified
    /// against; required with `sslmode: verify-full`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// TLS to PostgreSQL, named as libpq names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresSslMode {
    /// Plain TCP (keep the database on a private network).
    #[default]
    Disable,
    /// TLS, the server's certificate verified against `ca_file` and the
    /// host name.
    VerifyFull,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_pool_size() -> usize {
    4
}
fn default_connect_timeout() -> u64 {
    10
}

impl PostgresConfig {
    /// The store's options, with the password read from its file.
    pub fn options(&self) -> Result<crate::store::PostgresOptions, ConfigError> {
        let password = match &self.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| field("store.postgres.password_file", e.to_string()))?
                    .trim_end()
                    .to_owned(),
            ),
            None => None,
        };
        let ca_pem = match (self.sslmode, &self.ca_file) {
            (PostgresSslMode::VerifyFull, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| field("store.postgres.ca_file", e.to_string()))?;
                crate::store::tls_config(&pem).map_err(|e| field("store.postgres.ca_file", e))?;
                Some(pem)
            }
            (PostgresSslMode::VerifyFull, None) => {
                return Err(field(
                    "store.postgres.ca_file",
                    "required with sslmode: verify-full",
                ));
            }
            (PostgresSslMode::Disable, _) => None,
        };
        Ok(crate::store::PostgresOptions {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password,
            dbname: self.dbname.clone(),
            pool_size: self.pool_size,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_secs),
            ca_pem,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("host", &self.host),
            ("user", &self.user),
            ("dbname", &self.dbname),
        ] {
            if value.is_empty() {
                return Err(field(format!("store.postgres.{name}"), "must not be empty"));
            }
        }
        if self.pool_size == 0 {
            return Err(field("store.postgres.pool_size", "must be at least 1"));
        }
        if self.sslmode == PostgresSslMode::VerifyFull && self.ca_file.is_none() {
            return Err(field(
                "store.postgres.ca_file",
                "required with sslmode: verify-full",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(field(
                "store.postgres.connect_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the root key (and the SQLite database) live.
    pub data_dir: PathBuf,
    /// The gRPC listener (port 0 picks a free port).
    pub grpc_listen: SocketAddr,
    /// The HTTP listener.
    pub http_listen: SocketAddr,
    /// Commit synchronization.
    #[serde(default)]
    pub sync: SyncMode,
    /// Where the data is kept (default: SQLite in `data_dir`).
    #[serde(default)]
    pub store: StoreConfig,
    /// Accepted bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// Retention.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Trust.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Assembly.
    #[serde(default)]
    pub assembly: AssemblyConfig,
    /// A TLS listener serving the same HTTP API (the Kubernetes API server
    /// calls admission webhooks over HTTPS only); off when unset.
    #[serde(default)]
    pub https: Option<HttpsConfig>,
    /// Sidecar injection (`POST /inject`); off when unset.
    #[serde(default)]
    pub inject: Option<crate::inject::InjectConfig>,
    /// Workload authentication with projected service-account tokens
    /// ([`crate::workload_auth`]); off when unset.
    #[serde(default)]
    pub workload_auth: Option<crate::workload_auth::WorkloadAuthConfig>,
}

/// The TLS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The certificate chain (PEM); re-read when the file changes, so a
    /// rotated certificate (cert-manager) is served without a restart.
    pub cert_file: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// A token with its secret resolved.
#[derive(Clone)]
pub struct Token {
    /// Who presents it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads and checks a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and checks YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de)
            .map_err(|e| field(e.path().to_string(), e.into_inner().to_string()))?;
        config.tokens()?;
        if config.retention.interval_secs == 0 {
            return Err(field("retention.interval_secs", "must be at least 1"));
        }
        if config.assembly.interval_millis == 0 {
            return Err(field("assembly.interval_millis", "must be at least 1"));
        }
        if config.trust.signing_key_ttl_secs == 0 {
            return Err(field("trust.signing_key_ttl_secs", "must be at least 1"));
        }
        match (&config.store.backend, &config.store.postgres) {
            (Backend::Postgres, None) => {
                return Err(field("store.postgres", "required with backend: postgres"));
            }
            (_, Some(pg)) => pg.validate()?,
            (Backend::Sqlite, None) => {}
        }
        if let Some(inject) = &config.inject {
            inject.validate().map_err(|(f, m)| field(f, m))?;
        }
        if let Some(workload_auth) = &config.workload_auth {
            workload_auth.validate().map_err(|(f, m)| field(f, m))?;
        }
        Ok(config)
    }

    /// The tokens with their secrets read.
    pub fn tokens(&self) -> Result<Vec<Token>, ConfigError> {
        if self.tokens.is_empty() {
            return Err(field("tokens", "at least one token is required"));
        }
        let mut out = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let secret = match (&t.secret, &t.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(p)) => std::fs::read_to_string(p)
                    .map_err(|e| field(format!("tokens[{i}].secret_file"), e.to_string()))?
                    .trim_end()
                    .to_owned(),
                _ => {
                    return Err(field(
                        format!("tokens[{i}]"),
                        "exactly one of secret and secret_file is required",
                    ));
                }
            };
            if secret.len() < 16 {
                return Err(field(
                    format!("tokens[{i}].secret"),
                    "must be at least 16 characters",
                ));
            }
            if t.name.is_empty() {
                return Err(field(format!("tokens[{i}].name"), "must not be empty"));
            }
            out.push(Token {
                name: t.name.clone(),
                role: t.role,
                secret: secret.into_bytes(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
