//! A small HTTP application for end-to-end topologies.
//!
//! `custody-e2e-app --name web --listen 127.0.0.1:8080 [--forward] [--forge]
//!  [--route PATH=URL]... [--sql PATH=URL|STATEMENT]... [--delay-ms D [--jitter-ms J]]`
//!
//! A request to `PATH` calls every `URL` routed from it, in order, and
//! answers with the first non-2xx status it got (or 200) and a JSON body
//! listing the calls. With `--forward` it passes the identity headers it
//! received (`txn-token`, `traceparent`, `tracestate`) on to its calls, as an
//! instrumented service would; without, it drops them, as a legacy service
//! does. With `--forge`, or for a route whose URL is written
//! `forge+http://...`, it sends a token of its own making instead, naming
//! another user, as a compromised service would. `/healthz` answers 200 and
//! calls nothing. A route `*` serves every path without a route of its own,
//! and `{path}` in a URL is replaced by the path received, so a request's
//! path travels down a chain of services without any header. With
//! `--delay-ms`, each request is held `D` ms (± up to `J` ms, uniformly)
//! before its calls and again after them, so requests overlap as they do
//! under load.
//!
//! `--sql PATH=URL|STATEMENT` runs `STATEMENT` against the database at `URL`
//! (`postgres://user:password@host:port/db` or `mysql://...`) on every
//! request to `PATH`, before its calls, over a connection of its own; the
//! answer's `queries` list the rows each returned (never their values). With
//! `--forward` the statement carries the request's `traceparent` as a
//! sqlcommenter comment (and a MySQL connection as a connection attribute),
//! as an instrumented service's driver does. A route
//! whose URL is written `mcp:AGENT:TOOL+http://...` is an MCP `tools/call`
//! of `TOOL` (a JSON-RPC POST) with `params._meta.agent` set to `AGENT`, as
//! an AI agent calls a tool or hands a task to a sub-agent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use custody_context::issue::{Issuer, Mint};
use custody_context::keys::SigningKey;
use custody_context::token::InitiatorKind;
use custody_context::traceparent::TraceId;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

const IDENTITY_HEADERS: [&str; 3] = ["txn-token", "traceparent", "tracestate"];

struct App {
    name: String,
    forward: bool,
    forge: bool,
    routes: HashMap<String, Vec<String>>,
    /// Statements run on a path: database URL and SQL.
    queries: HashMap<String, Vec<(String, String)>>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Hold before and after the calls, in microseconds: base and jitter.
    hold: (u64, u64),
}

/// Sleeps `base ± jitter` microseconds (uniform); nothing when both are zero.
async fn hold((base, jitter): (u64, u64)) {
    if base == 0 && jitter == 0 {
        return;
    }
    let bytes = TraceId::random().to_bytes();
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    let offset = u64::from_le_bytes(raw) % (2 * jitter + 1);
    let micros = (base + offset).saturating_sub(jitter);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

fn parse_args() -> anyhow::Result<(App, SocketAddr)> {
    let mut name = None;
    let mut listen = None;
    let mut forward = false;
    let mut forge = false;
    let mut routes: HashMap<String, Vec<String>> = HashMap::new();
    let mut queries: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut hold = (0, 0);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next(),
            "--listen" => listen = args.next(),
            "--forward" => forward = true,
            "--forge" => forge = true,
            "--route" => {
                let route = args.next().context("--route needs PATH=URL")?;
                let (path, url) = route.split_once('=').context("--route needs PATH=URL")?;
                routes
                    .entry(path.to_owned())
                    .or_default()
                    .push(url.to_owned());
            }
            "--sql" => {
                let spec = args.next().context("--sql needs PATH=URL|STATEMENT")?;
                let (path, rest) = spec
                    .split_once('=')
                    .context("--sql needs PATH=URL|STATEMENT")?;
                let (url, sql) = rest
                    .split_once('|')
                    .context("--sql needs PATH=URL|STATEMENT")?;
                if !(url.starts_with("postgres") || url.starts_with("mysql://")) {
                    bail!("--sql: the URL must be postgres://... or mysql://...");
                }
                queries
                    .entry(path.to_owned())
                    .or_default()
                    .push((url.to_owned(), sql.to_owned()));
            }
            "--delay-ms" => hold.0 = millis(args.next(), "--delay-ms")?,
            "--jitter-ms" => hold.1 = millis(args.next(), "--jitter-ms")?,
            other => bail!("unknown argument {other}"),
        }
    }
    let listen: SocketAddr = listen
        .context("--listen is required")?
        .parse()
        .context("--listen")?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    Ok((
        App {
            name: name.context("--name is required")?,
            forward,
            forge,
            routes,
            queries,
            client,
            hold,
        },
        listen,
    ))
}

/// A number of milliseconds (fractions allowed), in microseconds.
fn millis(value: Option<String>, flag: &str) -> anyhow::Result<u64> {
    let ms: f64 = value
        .with_context(|| format!("{flag} needs a number of milliseconds"))?
        .parse()
        .with_context(|| format!("{flag} needs a number of milliseconds"))?;
    if !(0.0..=60_000.0).contains(&ms) {
        bail!("{flag} must be between 0 and 60000");
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked range
    Ok((ms * 1000.0).round() as u64)
}

/// A token no mesh key signed, naming someone the caller is not.
fn forged_token() -> String {
    let issuer = Issuer::new(
        SigningKey::generate(),
        "spiffe://cluster.local/ns/shop/sa/web",
        "cluster.local",
        300,
    );
    let mint = Mint {
        txn: TraceId::random(),
        sub: "mallory@example.com".into(),
        kind: InitiatorKind::Human,
        scope: "admin".into(),
        act: None,
        tctx: None,
        rctx: None,
        taint: vec![],
    };
    issuer
        .mint(mint, custody_context::unix_now())
        .map(|t| t.encoded)
        .unwrap_or_default()
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut calls = Vec::new();
    let mut queries = Vec::new();
    let mut status = StatusCode::OK;
    if path != "/healthz" {
        hold(app.hold).await;
        let traceparent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|_| app.forward);
        for (url, sql) in app.queries.get(&path).into_iter().flatten() {
            let sql = match traceparent {
                Some(tp) => format!("{sql} /*traceparent='{tp}'*/"),
                None => sql.clone(),
            };
            match query(url, &sql, traceparent).await {
                Ok(rows) => queries.push(serde_json::json!({"rows": rows})),
                Err(e) => {
                    status = StatusCode::BAD_GATEWAY;
                    queries.push(serde_json::json!({"error": format!("{e:#}")}));
                }
            }
        }
        let targets = app.routes.get(&path).or_else(|| app.routes.get("*"));
        for target in targets.into_iter().flatten() {
            let (mcp, target) = match target.strip_prefix("mcp:") {
                Some(rest) => {
                    let (tool, url) = rest.split_once('+').unwrap_or((rest, ""));
                    (tool.split_once(':'), url)
                }
                None => (None, target.as_str()),
            };
            let (forge, url) = match target.strip_prefix("forge+") {
                Some(url) => (true, url),
                None => (app.forge, target),
            };
            let url = url.replace("{path}", &path);
            let (mut call, body) = match mcp {
                Some((agent, tool)) => {
                    let body = serde_json::json!({
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "tools/call",
                        "params": {"name": tool, "arguments": {}, "_meta": {"agent": agent}},
                    })
                    .to_string();
                    let call = Request::post(&url)
                        .header("content-type", "application/json")
                        .header("content-length", body.len());
                    (call, Bytes::from(body))
                }
                None => (Request::get(&url), Bytes::new()),
            };
            if app.forward {
                for name in IDENTITY_HEADERS {
                    if let Some(value) = req.headers().get(name)
                        && !(forge && name == "txn-token")
                    {
                        call = call.header(name, value);
                    }
                }
            }
            if forge {
                // Instead of the token it received, never beside it.
                call = call.header("txn-token", forged_token());
            }
            let result = match call.body(Full::new(body)) {
                Ok(call) => app.client.request(call).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let (code, body) = match result {
                Ok(resp) => {
                    let code = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                        .unwrap_or_default();
                    (code, body)
                }
                Err(e) => (StatusCode::BAD_GATEWAY, e),
            };
            if status == StatusCode::OK && !code.is_success() {
                status = code;
            }
            let body = serde_json::from_str::<serde_json::Value>(&body)
                .unwrap_or(serde_json::Value::String(body));
            calls.push(serde_json::json!({"url": url, "status": code.as_u16(), "body": body}));
        }
        hold(app.hold).await;
    }
    let body = serde_json::json!({
        "app": app.name,
        "path": path,
        "had_token": req.headers().contains_key("txn-token"),
        "queries": queries,
        "calls": calls,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Runs `sql` against the database at `url` over a connection of its own and
/// returns how many rows it gave. A MySQL connection also carries
/// `traceparent` as a connection attribute, so the driver's own statements
/// on it belong to the request too.
async fn query(url: &str, sql: &str, traceparent: Option<&str>) -> anyhow::Result<usize> {
    if url.starts_with("mysql://") {
        use mysql_async::prelude::Queryable as _;
        let opts = mysql_async::Opts::from_url(url).context("mysql URL")?;
        let mut opts = mysql_async::OptsBuilder::from_opts(opts);
        if let Some(tp) = traceparent {
            opts = opts.connect_attribute("traceparent", tp);
        }
        let mut conn = mysql_async::Conn::new(opts).await?;
        let rows: Vec<mysql_async::Row> = conn.query(sql).await?;
        conn.disconnect().await?;
        Ok(rows.len())
    } else {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let messages = client.simple_query(sql).await?;
        drop(client);
        let _ = driver.await;
        Ok(messages
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (app, listen) = parse_args()?;
    let app = Arc::new(app);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&app), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
