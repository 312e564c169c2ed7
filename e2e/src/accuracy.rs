//! Attribution accuracy: how often assembled chains are right, measured
//! against traffic whose true chains are known.
//!
//! The workload is a chain of services `edge -> hopa -> hopb -> ...`, each the
//! sample application behind a sidecar, holding every request a few
//! milliseconds before and after its downstream call so that requests overlap.
//! A fraction of the services that call downstream forward no identity
//! header: their sidecars must stitch the call to an inbound request in
//! flight. Request `i` enters at the edge as user `u<i>` (the trusted edge
//! header) on path `/t/<i>`, and every application calls downstream with the
//! path it received, so each hop's `operation` (`GET /t/<i>`) names the
//! request it truly belongs to. The sidecars never read that path for
//! attribution; it is ground truth for the measurement only.
//!
//! Data flow: [`run`] starts the topology ([`Topology::start_apps`]), runs the
//! driver in the client pod (`custody-accuracy drive`, [`drive`]), then the
//! collector there (`custody-accuracy collect`, [`collect`]) which reads every
//! chain tree from the control plane's HTTP API until the answer is
//! complete or stops changing, and [`measure`] compares the trees with the
//! truth: precision and recall of parent→child hop links, chains
//! reconstructed exactly, and how the reported confidence of each link
//! matches its accuracy.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::topology::{ADMIN_TOKEN, AppPod, HTTP_PORT, Topology, binary};

/// The header the edge sidecar starts chains from.
pub const USER_HEADER: &str = "x-custody-user";

/// One configuration of the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Services in the chain, the edge included (at least 2).
    pub services: usize,
    /// Requests in flight at once (each a whole chain), so per pod.
    pub concurrency: usize,
    /// Fraction of the services that call downstream and forward no header.
    pub no_forward: f64,
    /// Requests sent.
    pub requests: usize,
    /// Hold before and after each downstream call, milliseconds.
    pub delay_ms: f64,
    /// Uniform jitter around the hold, ± milliseconds.
    pub jitter_ms: f64,
}

impl Scenario {
    /// The service names: `edge`, then `hopa`, `hopb`, ...
    pub fn service_names(&self) -> Vec<String> {
        (0..self.services)
            .map(|j| match j {
                0 => "edge".to_owned(),
                _ => format!("hop{}", letters(j - 1)),
            })
            .collect()
    }

    /// For each service, whether it drops identity headers on its call: the
    /// given fraction of the services that call downstream (all but the
    /// last), spread evenly along the chain.
    pub fn drops_headers(&self) -> Vec<bool> {
        let callers = self.services.saturating_sub(1);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )] // a fraction of a small count
        let dropping = (self.no_forward.clamp(0.0, 1.0) * callers as f64).round() as usize;
        (0..self.services)
            .map(|j| j < callers && (j + 1) * dropping / callers > j * dropping / callers)
            .collect()
    }

    /// The application pods of the topology.
    pub fn apps(&self) -> Vec<AppPod> {
        let names = self.service_names();
        let drops = self.drops_headers();
        names
            .iter()
            .enumerate()
            .map(|(j, name)| {
                let mut args = vec![
                    "--delay-ms".to_owned(),
                    self.delay_ms.to_string(),
                    "--jitter-ms".to_owned(),
                    self.jitter_ms.to_string(),
                ];
                if !drops[j] {
                    args.push("--forward".to_owned());
                }
                if let Some(next) = names.get(j + 1) {
                    args.push("--route".to_owned());
                    args.push(format!("*=http://{next}:8080{{path}}"));
                }
                AppPod {
                    name: name.clone(),
                    edge: j == 0,
                    args,
                }
            })
            .collect()
    }

    /// Hops one request makes: inbound at every service, outbound at every
    /// service but the last.
    pub fn hops_per_request(&self) -> usize {
        2 * self.services - 1
    }
}

/// `0 -> a`, `25 -> z`, `26 -> ba`, ...: pod names are letters only.
fn letters(mut n: usize) -> String {
    let mut out = Vec::new();
    loop {
        #[allow(clippy::cast_possible_truncation)] // n % 26 < 26
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// One hop of an assembled chain, with what the truth says of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Hop {
    /// The hop's event id.
    pub event_id: String,
    /// Its parent in the assembled tree.
    pub parent: Option<String>,
    /// Position along the true chain: `2j` inbound and `2j + 1` outbound at
    /// service `j`; `None` for a hop of no service of the scenario.
    pub position: Option<usize>,
    /// The request the hop truly belongs to (from its operation's path).
    pub truth: Option<usize>,
    /// The confidence the control plane reported for the link to its parent.
    pub confidence: f64,
    /// The evidence of that link (`span_parent`, `sidecar_stitched`, ...).
    pub evidence: String,
}

/// One assembled chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    /// The request its initiator names (`u<i>`), if any.
    pub initiator: Option<usize>,
    /// Its hops.
    pub hops: Vec<Hop>,
}

/// Reads a chain tree (`GET /v1/chains/{id}`) for the given service names.
pub fn parse_chain(tree: &Value, services: &[String]) -> Chain {
    let initiator = tree["summary"]["initiator"]["subject"]
        .as_str()
        .and_then(|s| s.strip_prefix('u'))
        .and_then(|s| s.parse().ok());
    let hops = tree["hops"]
        .as_array()
        .map(|hops| {
            hops.iter()
                .map(|h| {
                    let service = h["workload"]
                        .as_str()
                        .and_then(|w| w.rsplit_once("/sa/"))
                        .and_then(|(_, sa)| services.iter().position(|s| s == sa));
                    let position = match (service, h["direction"].as_str()) {
                        (Some(j), Some("inbound")) => Some(2 * j),
                        (Some(j), Some("outbound")) => Some(2 * j + 1),
                        _ => None,
                    };
                    Hop {
                        event_id: h["event_id"].as_str().unwrap_or_default().to_owned(),
                        parent: h["parent_event_id"].as_str().map(str::to_owned),
                        position,
                        truth: truth_of(h["operation"].as_str().unwrap_or_default()),
                        confidence: h["join"]["confidence"].as_f64().unwrap_or(0.0),
                        evidence: h["join"]["evidence"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Chain { initiator, hops }
}

/// The request id in an operation `GET /t/<i>`.
fn truth_of(operation: &str) -> Option<usize> {
    operation
        .split_once(' ')
        .map_or(operation, |(_, path)| path)
        .strip_prefix("/t/")?
        .parse()
        .ok()
}

/// The edges of one confidence bucket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    /// Lower bound (inclusive) of the reported confidence.
    pub low: f64,
    /// Upper bound (exclusive, but 1.0 included in the top bucket).
    pub high: f64,
    /// Edges in the bucket.
    pub edges: usize,
    /// Of which right.
    pub correct: usize,
    /// Sum of their reported confidences.
    pub confidence_sum: f64,
}

impl Bucket {
    /// Share of its edges that are right.
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct, self.edges)
    }

    /// Mean reported confidence.
    pub fn mean_confidence(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // counts are small
        let n = self.edges.max(1) as f64;
        self.confidence_sum / n
    }
}

/// Bucket bounds: certain, then the ranges `1/n` falls in for 2, 3-4, 5-8
/// and more candidates.
const BOUNDS: [(f64, f64); 5] = [
    (0.999, 1.0),
    (0.5, 0.999),
    (0.25, 0.5),
    (0.125, 0.25),
    (0.0, 0.125),
];

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measurement {
    /// Requests sent.
    pub requests: usize,
    /// Requests answered 200.
    pub answered: usize,
    /// Parent→child hop links the true chains have.
    pub true_edges: usize,
    /// Links in the assembled trees.
    pub assembled_edges: usize,
    /// Assembled links that are true.
    pub correct_edges: usize,
    /// Assembled links the sidecars stitched.
    pub stitched_edges: usize,
    /// Of which true.
    pub stitched_correct: usize,
    /// Hops in the assembled trees.
    pub hops: usize,
    /// Hops in the chain of the request they belong to.
    pub hops_in_right_chain: usize,
    /// Requests whose chain is exactly the true one.
    pub exact_chains: usize,
    /// Links by reported confidence.
    pub buckets: Vec<Bucket>,
}

fn ratio(a: usize, b: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)] // counts are small
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Measurement {
    /// Correct links over assembled links.
    pub fn precision(&self) -> f64 {
        ratio(self.correct_edges, self.assembled_edges)
    }

    /// Correct links over true links.
    pub fn recall(&self) -> f64 {
        ratio(self.correct_edges, self.true_edges)
    }

    /// Requests reconstructed exactly, over requests sent.
    pub fn exact_share(&self) -> f64 {
        ratio(self.exact_chains, self.requests)
    }

    /// Stitched links that are right.
    pub fn stitch_accuracy(&self) -> f64 {
        ratio(self.stitched_correct, self.stitched_edges)
    }

    /// Hops that landed in their own request's chain.
    pub fn right_chain_share(&self) -> f64 {
        ratio(self.hops_in_right_chain, self.hops)
    }

    /// Expected calibration error: mean |accuracy - confidence| over the
    /// buckets, weighted by their edges.
    pub fn calibration_error(&self) -> f64 {
        let total: usize = self.buckets.iter().map(|b| b.edges).sum();
        if total == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)] // counts are small
        let weighted: f64 = self
            .buckets
            .iter()
            .map(|b| b.edges as f64 * (b.accuracy() - b.mean_confidence()).abs())
            .sum();
        #[allow(clippy::cast_precision_loss)] // counts are small
        let total = total as f64;
        weighted / total
    }
}

/// Compares assembled chains with the truth of `scenario` (`answered`
/// requests answered 200).
pub fn measure(scenario: &Scenario, answered: usize, chains: &[Chain]) -> Measurement {
    let per_request = scenario.hops_per_request();
    let mut m = Measurement {
        requests: scenario.requests,
        answered,
        true_edges: scenario.requests * (per_request - 1),
        buckets: BOUNDS
            .iter()
            .map(|&(low, high)| Bucket {
                low,
                high,
                ..Bucket::default()
            })
            .collect(),
        ..Measurement::default()
    };
    let mut by_initiator: BTreeMap<usize, usize> = BTreeMap::new();
    let mut exact_candidates = Vec::new();
    let mut seen_edges = HashSet::new();
    for chain in chains {
        if let Some(i) = chain.initiator {
            *by_initiator.entry(i).or_default() += 1;
        }
        let by_id: BTreeMap<&str, &Hop> = chain
            .hops
            .iter()
            .map(|h| (h.event_id.as_str(), h))
            .collect();
        let mut all_right = chain.hops.len() == per_request;
        let mut root_right = false;
        for hop in &chain.hops {
            m.hops += 1;
            let own = hop.truth.is_some() && hop.truth == chain.initiator;
            if own {
                m.hops_in_right_chain += 1;
            } else {
                all_right = false;
            }
            let Some(parent) = hop.parent.as_deref().and_then(|p| by_id.get(p)) else {
                root_right = hop.position == Some(0);
                continue;
            };
            if !seen_edges.insert((parent.event_id.as_str(), hop.event_id.as_str())) {
                continue;
            }
            let right = hop.truth.is_some()
                && parent.truth == hop.truth
                && matches!((parent.position, hop.position), (Some(p), Some(c)) if c == p + 1);
            m.assembled_edges += 1;
            m.correct_edges += usize::from(right);
            all_right &= right;
            if hop.evidence == "sidecar_stitched" {
                m.stitched_edges += 1;
                m.stitched_correct += usize::from(right);
            }
            if let Some(b) = m
                .buckets
                .iter_mut()
                .find(|b| hop.confidence >= b.low && (hop.confidence < b.high || b.high >= 1.0))
            {
                b.edges += 1;
                b.correct += usize::from(right);
                b.confidence_sum += hop.confidence;
            }
        }
        if all_right
            && root_right
            && let Some(i) = chain.initiator
        {
            exact_candidates.push(i);
        }
    }
    // A request split over several chains is not reconstructed exactly.
    m.exact_chains = exact_candidates
        .iter()
        .filter(|i| **i < scenario.requests && by_initiator.get(i) == Some(&1))
        .count();
    m
}

/// Runs `scenario` on a mesh of its own and measures it.
pub fn run(scenario: &Scenario, label: &str) -> anyhow::Result<Measurement> {
    ensure!(
        scenario.services >= 2,
        "the chain needs at least 2 services"
    );
    ensure!(scenario.concurrency >= 1, "concurrency must be at least 1");
    let topo = Topology::start_apps(label, &scenario.apps())?;
    let client = topo.pod("client")?;
    let control = topo.pod("control")?;
    let helper = binary("custody-accuracy")?;
    let helper = helper.to_str().context("non-UTF-8 path")?;
    let requests = scenario.requests.to_string();
    let concurrency = scenario.concurrency.to_string();
    let out = topo.mesh.exec(
        &client,
        &[
            helper,
            "drive",
            "--url",
            "http://edge:8080",
            "--requests",
            &requests,
            "--concurrency",
            &concurrency,
        ],
    )?;
    ensure!(
        out.status.success(),
        "driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answered: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("driver output")?;

    let server = format!("http://{}:{HTTP_PORT}", control.ip);
    let services = scenario.service_names();
    let expected = scenario.requests * scenario.hops_per_request();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (usize::MAX, 0);
    loop {
        let out = topo.mesh.exec(
            &client,
            &[
                helper,
                "collect",
                "--server",
                &server,
                "--token",
                ADMIN_TOKEN,
                "--requests",
                &requests,
            ],
        )?;
        ensure!(
            out.status.success(),
            "collector failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trees: Vec<Value> = serde_json::from_slice(&out.stdout).context("collector output")?;
        let chains: Vec<Chain> = trees.iter().map(|t| parse_chain(t, &services)).collect();
        let hops: usize = chains.iter().map(|c| c.hops.len()).sum();
        // Complete, or unchanged over two reads a second apart.
        let stable = hops == last.0 && trees.len() == last.1;
        if stable && (hops >= expected || Instant::now() > deadline) {
            return Ok(measure(scenario, answered, &chains));
        }
        if Instant::now() > deadline + Duration::from_secs(30) {
            bail!("chains still changing after the deadline ({hops} of {expected} hops)");
        }
        last = (hops, trees.len());
        std::thread::sleep(Duration::from_secs(1));
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn get(client: &HttpClient, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Sends requests `0..requests` to `<url>/t/<i>` as user `u<i>`,
/// `concurrency` at a time; returns how many were answered 200.
pub async fn drive(url: &str, requests: usize, concurrency: usize) -> anyhow::Result<usize> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let next = Arc::clone(&next);
        let url = url.to_owned();
        workers.push(tokio::spawn(async move {
            let mut ok = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return ok;
                }
                let req = Request::get(format!("{url}/t/{i}"))
                    .header(USER_HEADER, format!("u{i}"))
                    .body(Full::new(Bytes::new()));
                if let Ok(req) = req
                    && let Ok((200, _)) = get(&client, req).await
                {
                    ok += 1;
                }
            }
        }));
    }
    let mut ok = 0;
    for w in workers {
        ok += w.await?;
    }
    Ok(ok)
}

async fn api(client: &HttpClient, server: &str, token: &str, path: &str) -> anyhow::Result<Value> {
    let req = Request::get(format!("{server}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))?;
    let (status, body) = get(client, req).await?;
    ensure!(status == 200, "GET {path}: {status}");
    Ok(serde_json::from_slice(&body)?)
}

/// Every chain tree the control plane holds for requests `0..requests`
/// (found by initiator), and any other chain it lists.
pub async fn collect(server: &str, token: &str, requests: usize) -> anyhow::Result<Vec<Value>> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut lists = vec!["/v1/chains?limit=1000".to_owned()];
    lists.extend((0..requests).map(|i| format!("/v1/chains?initiator=u{i}")));
    for list in lists {
        let listed = api(&client, server, token, &list).await?;
        for chain in listed["chains"].as_array().into_iter().flatten() {
            if let Some(id) = chain["chain_id"].as_str()
                && seen.insert(id.to_owned())
            {
                ids.push(id.to_owned());
            }
        }
    }
    let mut trees = Vec::with_capacity(ids.len());
    for id in ids {
        trees.push(api(&client, server, token, &format!("/v1/chains/{id}")).await?);
    }
    Ok(trees)
}

/// The results as a Markdown table, one row per measurement.
pub fn table(rows: &[(Scenario, Measurement)]) -> String {
    let mut out = String::from(
        "| c | f | requests (200) | edge precision | edge recall | exact chains | stitched edges right | hops in own chain | calibration error |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (s, m) in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {:.1}% | {:.1}% | {:.1}% | {} | {:.1}% | {:.3} |",
            s.concurrency,
            s.no_forward,
            m.requests,
            m.answered,
            100.0 * m.precision(),
            100.0 * m.recall(),
            100.0 * m.exact_share(),
            if m.stitched_edges == 0 {
                "—".to_owned()
            } else {
                format!(
                    "{:.1}% of {}",
                    100.0 * m.stitch_accuracy(),
                    m.stitched_edges
                )
            },
            100.0 * m.right_chain_share(),
            m.calibration_error(),
        );
    }
    out
}

/// Calibration per confidence bucket, one row per measurement with stitching.
pub fn calibration_table(rows: &[(Scenario, Measurement)]) -> String {
    let mut out = String::from("| c | f |");
    for (low, high) in BOUNDS {
        if high >= 1.0 {
            let _ = write!(out, " conf 1 |");
        } else {
            let _ = write!(out, " conf [{low}, {high:.3}) |");
        }
    }
    out.push('\n');
    out.push_str(&"|---".repeat(BOUNDS.len() + 2));
    out.push_str("|\n");
    for (s, m) in rows {
        let _ = write!(out, "| {} | {} |", s.concurrency, s.no_forward);
        for b in &m.buckets {
            if b.edges == 0 {
                out.push_str(" — |");
            } else {
                let _ = write!(
                    out,
                    " {:.1}% right, mean {:.2}, n={} |",
                    100.0 * b.accuracy(),
                    b.mean_confidence(),
                    b.edges
                );
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
