//! A small HTTP application for end-to-end topologies.
//!
//! `custody-e2e-app --name web (--listen 127.0.0.1:8080 | --once PATH) [--forward] [--forge]
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
//! With `--once PATH` it serves nothing: it does what a request to `PATH`
//! would do, once, with no request behind it (as a background job or a cron
//! task does), writes `{"status": S, "body": B}` on stdout and exits.
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
//!
//! gRPC: a route whose URL is written `grpc+http://host:port/pkg.Service/Method`
//! is a unary gRPC call (tonic, HTTP/2 cleartext) of that method, with the
//! identity headers as metadata. Every application also serves gRPC on its
//! port: a unary call of any method is served as a request to the path of
//! the same name (its `--sql` and `--route`s), answered with the status and
//! the JSON body; a non-2xx outcome becomes the matching gRPC status
//! (`PERMISSION_DENIED` for 403) with the body as its message.

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
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic_prost::ProstCodec;

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

/// What the application does: serve on an address, or do a path's work once.
enum Mode {
    Listen(SocketAddr),
    Once(String),
}

fn parse_args() -> anyhow::Result<(App, Mode)> {
    let mut name = None;
    let mut listen = None;
    let mut once = None;
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
            "--once" => once = Some(args.next().context("--once needs a PATH")?),
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
    let mode = match (listen, once) {
        (Some(listen), None) => Mode::Listen(listen.parse().context("--listen")?),
        (None, Some(path)) => Mode::Once(path),
        _ => bail!("one of --listen and --once is required"),
    };
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
        mode,
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

/// A response body of either kind: plain HTTP or gRPC.
type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        let mut server = tonic::server::Grpc::new(ProstCodec::<Answer, Call>::default());
        let resp = server.unary(Unary(app), req).await;
        return Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()));
    }
    let path = req.uri().path().to_owned();
    let (status, body) = serve(&app, &path, req.headers()).await;
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A unary gRPC method of any name: served as the HTTP path of the same name.
struct Unary(Arc<App>);

impl tonic::server::UnaryService<Call> for Unary {
    type Response = Answer;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<Answer>, tonic::Status>> + Send,
        >,
    >;

    fn call(&mut self, request: tonic::Request<Call>) -> Self::Future {
        let app = Arc::clone(&self.0);
        Box::pin(async move {
            let headers = request.metadata().clone().into_headers();
            let path = request.into_inner().path;
            let (status, body) = serve(&app, &path, &headers).await;
            let body = body.to_string();
            if status.is_success() {
                Ok(tonic::Response::new(Answer {
                    status: u32::from(status.as_u16()),
                    body,
                }))
            } else {
                // The answer rides in the message, for the caller to show.
                Err(tonic::Status::new(grpc_code(status), body))
            }
        })
    }
}

/// The request of every gRPC method of the sample application.
#[derive(Clone, PartialEq, prost::Message)]
struct Call {
    /// The method's full path, which names what to do.
    #[prost(string, tag = "1")]
    path: String,
}

/// The answer of every gRPC method: the status and the JSON body an HTTP
/// request to the same path would have had.
#[derive(Clone, PartialEq, prost::Message)]
struct Answer {
    #[prost(uint32, tag = "1")]
    status: u32,
    #[prost(string, tag = "2")]
    body: String,
}

fn grpc_code(status: StatusCode) -> tonic::Code {
    match status.as_u16() {
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        503 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

fn http_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::Ok => StatusCode::OK,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A unary gRPC call to `url` (`http://host:port/package.Service/Method`)
/// with `headers` as metadata: the answer's status and body.
async fn grpc_call(
    url: &str,
    headers: &[(&'static str, http::HeaderValue)],
) -> Result<(StatusCode, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("no authority")?.to_string();
    let path = uri.path_and_query().ok_or("no path")?.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(Call {
        path: path.path().to_owned(),
    });
    for (name, value) in headers {
        let value = tonic::metadata::MetadataValue::try_from(value.as_bytes())
            .map_err(|e| e.to_string())?;
        request.metadata_mut().insert(*name, value);
    }
    let codec = ProstCodec::<Call, Answer>::default();
    match client.unary(request, path, codec).await {
        Ok(resp) => {
            let answer = resp.into_inner();
            let status = u16::try_from(answer.status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            Ok((status, answer.body))
        }
        Err(status) => Ok((http_status(status.code()), status.message().to_owned())),
    }
}

/// Serves `path`: its statements, then its calls. The status is the first
/// non-2xx one got (or 200); the body lists what was done.
async fn serve(
    app: &App,
    path: &str,
    headers: &http::HeaderMap,
) -> (StatusCode, serde_json::Value) {
    let mut calls = Vec::new();
    let mut queries = Vec::new();
    let mut status = StatusCode::OK;
    if path != "/healthz" {
        hold(app.hold).await;
        let traceparent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|_| app.forward);
        for (url, sql) in app.queries.get(path).into_iter().flatten() {
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
        let targets = app.routes.get(path).or_else(|| app.routes.get("*"));
        for target in targets.into_iter().flatten() {
            let (mcp, target) = match target.strip_prefix("mcp:") {
                Some(rest) => {
                    let (tool, url) = rest.split_once('+').unwrap_or((rest, ""));
                    (tool.split_once(':'), url)
                }
                None => (None, target.as_str()),
            };
            let (grpc, target) = match target.strip_prefix("grpc+") {
                Some(url) => (true, url),
                None => (false, target),
            };
            let (forge, url) = match target.strip_prefix("forge+") {
                Some(url) => (true, url),
                None => (app.forge, target),
            };
            let url = url.replace("{path}", path);
            let mut send: Vec<(&'static str, http::HeaderValue)> = Vec::new();
            if app.forward {
                for name in IDENTITY_HEADERS {
                    if let Some(value) = headers.get(name)
                        && !(forge && name == "txn-token")
                    {
                        send.push((name, value.clone()));
                    }
                }
            }
            if forge {
                // Instead of the token it received, never beside it.
                if let Ok(value) = http::HeaderValue::from_str(&forged_token()) {
                    send.push(("txn-token", value));
                }
            }
            let result = if grpc {
                grpc_call(&url, &send).await
            } else {
                http_call(app, &url, mcp, &send).await
            };
            let (code, body) = result.unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e));
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
        "had_token": headers.contains_key("txn-token"),
        "queries": queries,
        "calls": calls,
    });
    (status, body)
}

/// An HTTP call: a GET, or an MCP `tools/call` POST of `(agent, tool)`.
async fn http_call(
    app: &App,
    url: &str,
    mcp: Option<(&str, &str)>,
    headers: &[(&'static str, http::HeaderValue)],
) -> Result<(StatusCode, String), String> {
    let (mut call, body) = match mcp {
        Some((agent, tool)) => {
            let body = serde_json::json!({
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": {}, "_meta": {"agent": agent}},
            })
            .to_string();
            let call = Request::post(url)
                .header("content-type", "application/json")
                .header("content-length", body.len());
            (call, Bytes::from(body))
        }
        None => (Request::get(url), Bytes::new()),
    };
    for (name, value) in headers {
        call = call.header(*name, value);
    }
    let call = call.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = app.client.request(call).await.map_err(|e| e.to_string())?;
    let code = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok((code, body))
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
    let (app, mode) = parse_args()?;
    let listen = match mode {
        Mode::Listen(listen) => listen,
        Mode::Once(path) => {
            use std::io::Write as _;
            let (status, body) = serve(&app, &path, &http::HeaderMap::new()).await;
            let report = serde_json::json!({"status": status.as_u16(), "body": body});
            let mut out = std::io::stdout().lock();
            writeln!(out, "{report}")?;
            out.flush()?;
            return Ok(());
        }
    };
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
