//! A small blocking client of the investigation and policy API, for the
//! `custody` CLI and for tests.

use std::io::BufRead as _;
use std::time::Duration;

use serde_json::Value;

/// The longest line of a server-sent event read.
const MAX_EVENT_LINE: u64 = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or the answer was unreadable.
    #[error("cannot reach the control plane: {0}")]
    Transport(String),
    /// The server answered with an error status.
    #[error("{status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The server's message (or `field: message` for invalid input).
        message: String,
        /// The body.
        body: Value,
    },
}

impl ClientError {
    /// The exit code the CLI documents for this error: 3 not found, 4
    /// refused or invalid, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Status { status: 404, .. } => 3,
            ClientError::Status {
                status: 400 | 401 | 403 | 409 | 422,
                ..
            } => 4,
            _ => 1,
        }
    }
}

/// The API client.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

fn message_of(body: &Value, fallback: &str) -> String {
    match (body.get("field"), body.get("message"), body.get("error")) {
        (Some(f), Some(m), _) => format!(
            "{}: {}",
            f.as_str().unwrap_or_default(),
            m.as_str().unwrap_or_default()
        ),
        (_, _, Some(e)) => e.as_str().unwrap_or(fallback).to_owned(),
        _ => fallback.to_owned(),
    }
}

impl Client {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:19002`).
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    fn finish(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut resp = result.map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(ClientError::Status {
                status,
                message: message_of(&body, "request failed"),
                body,
            })
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// `GET path?query`.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(*k, v);
        }
        if let Some(a) = self.auth() {
            req = req.header("authorization", a);
        }
        Self::finish(req.call())
    }

    /// `POST path` with a body of the given content type.
    pub fn post(&self, path: &str, content_type: &str, body: &str) -> Result<Value, ClientError> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .content_type(content_type);
        if let Some(a) = self.auth() {
            req = req.header("authorization", a);
        }
        Self::finish(req.send(body))
    }

    /// Follows the server-sent events of `GET path?query`: calls
    /// `connected` once the server has accepted the request, then `each`
    /// with the data of every event named `event`, until `each` returns
    /// `false`. The stream ending is an error: a follower expects it to
    /// last.
    pub fn follow(
        &self,
        path: &str,
        query: &[(&str, String)],
        event: &str,
        connected: impl FnOnce(),
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport(e.to_string());
        // No overall timeout: the stream lasts; the server's keep-alive
        // comments keep it from looking idle.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(None)
            .timeout_connect(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut req = agent
            .get(format!("{}{path}", self.base))
            .header("accept", "text/event-stream");
        for (k, v) in query {
            req = req.query(*k, v);
        }
        if let Some(a) = self.auth() {
            req = req.header("authorization", a);
        }
        let resp = req.call().map_err(|e| transport(&e))?;
        if !resp.status().is_success() {
            return Self::finish(Ok(resp)).map(|_| ());
        }
        connected();
        let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
        let (mut name, mut data) = (String::new(), String::new());
        let mut line = String::new();
        loop {
            line.clear();
            let n = std::io::Read::take(&mut reader, MAX_EVENT_LINE)
                .read_line(&mut line)
                .map_err(|e| transport(&e))?;
            if n == 0 {
                return Err(ClientError::Transport(
                    "the control plane closed the stream".into(),
                ));
            }
            if !line.ends_with('\n') && n as u64 == MAX_EVENT_LINE {
                return Err(ClientError::Transport(
                    "an event line longer than 16 MiB".into(),
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                // A blank line ends an event (unnamed events are `message`).
                let named = if name.is_empty() { "message" } else { &name };
                if named == event && !each(&data) {
                    return Ok(());
                }
                name.clear();
                data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the keep-alive
            }
            let (field, value) = line
                .split_once(':')
                .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "event" => value.clone_into(&mut name),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                _ => {}
            }
        }
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("authorization", a);
        }
        Self::finish(req.call())
    }
}
