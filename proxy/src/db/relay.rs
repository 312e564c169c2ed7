//! Both directions of a database session, forwarded as they arrive.
//!
//! Each direction reads a chunk, shows it to the inspector, then writes it
//! to the other side unchanged: the inspector only ever sees a copy. The
//! one exception is opt-in: with `databases[].annotate`, the inspector may
//! hold back a client's simple-protocol statement until it is whole and
//! forward it with a sqlcommenter comment appended (`annotate.rs`). Looking
//! first matters: when a client receives the rows of a statement, the
//! sidecar has already recorded what they held, so the chain's next call is
//! checked with that taint (decoding a chunk costs microseconds). The two directions run
//! as two futures of one task, so a peer that writes while it is not
//! reading (a large `COPY` with notices coming back) cannot deadlock the
//! relay. When one side ends its stream, the other side's write half is
//! shut down and the remaining direction drains.

use std::sync::{Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::{DbBytesLabels, Metrics};

/// Size of each direction's read buffer.
const CHUNK: usize = 32 * 1024;

/// Looks at the bytes of a session; changes client bytes only to annotate
/// statements (`annotate.rs`), and only when configured to.
pub(crate) trait Inspect: Send {
    /// Bytes the client sent, about to be forwarded. Returns `true` when
    /// `out` (empty on entry) holds what to forward instead of `data`.
    fn client_bytes(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool;
    /// Bytes the server sent, about to be forwarded.
    fn server_bytes(&mut self, data: &[u8]);
    /// The client's stream ended: bytes still held back go into `out`.
    fn client_end(&mut self, _out: &mut Vec<u8>) {}
}

async fn pump<R, W, F, E>(mut from: R, mut to: W, mut inspect: F, mut end: E) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnMut(&[u8], &mut Vec<u8>) -> bool,
    E: FnMut(&mut Vec<u8>),
{
    let mut buf = vec![0u8; CHUNK];
    let mut replaced = Vec::new();
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                replaced.clear();
                end(&mut replaced);
                if !replaced.is_empty() && to.write_all(&replaced).await.is_ok() {
                    total += replaced.len() as u64;
                }
                break;
            }
            Ok(n) => n,
        };
        replaced.clear();
        let out = if inspect(&buf[..n], &mut replaced) {
            &replaced[..]
        } else {
            &buf[..n]
        };
        if out.is_empty() {
            continue;
        }
        if to.write_all(out).await.is_err() || to.flush().await.is_err() {
            break;
        }
        total += out.len() as u64;
    }
    let _ = to.shutdown().await;
    total
}

/// Relays until both directions are done; returns the inspector and the
/// bytes sent (client to server, server to client).
pub(crate) async fn run<I, C, S>(
    client: C,
    server: S,
    inspector: I,
    metrics: &Metrics,
    system: &'static str,
) -> (I, (u64, u64))
where
    I: Inspect,
    C: AsyncRead + AsyncWrite + Send,
    S: AsyncRead + AsyncWrite + Send,
{
    let inspector = Mutex::new(inspector);
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let lock = || inspector.lock().unwrap_or_else(PoisonError::into_inner);
    let up = pump(
        client_read,
        server_write,
        |data, out| lock().client_bytes(data, out),
        |out| lock().client_end(out),
    );
    let down = pump(
        server_read,
        client_write,
        |data, _| {
            lock().server_bytes(data);
            false
        },
        |_| {},
    );
    let (up, down) = tokio::join!(up, down);
    for (direction, bytes) in [("client", up), ("server", down)] {
        metrics
            .db_bytes
            .get_or_create(&DbBytesLabels { system, direction })
            .inc_by(bytes);
    }
    (
        inspector
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
        (up, down),
    )
}
