//! Both directions of a database session, forwarded as they arrive.
//!
//! Each direction reads a chunk, shows it to the inspector, then writes it
//! to the other side unchanged: the inspector only ever sees a copy. Looking
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

/// Looks at the bytes of a session; never changes them.
pub(crate) trait Inspect: Send {
    /// Bytes the client sent, about to be forwarded.
    fn client_bytes(&mut self, data: &[u8]);
    /// Bytes the server sent, about to be forwarded.
    fn server_bytes(&mut self, data: &[u8]);
}

async fn pump<R, W, F>(mut from: R, mut to: W, mut inspect: F) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnMut(&[u8]),
{
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        inspect(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
        total += n as u64;
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
    let up = pump(client_read, server_write, |data| lock().client_bytes(data));
    let down = pump(server_read, client_write, |data| lock().server_bytes(data));
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
