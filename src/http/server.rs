//! The HTTP accept loop: axum's router on hyper's connection builder, with what `axum::serve`
//! leaves out and an exposed server needs: a cap on open connections (at the cap the server
//! stops accepting, so new clients wait in the listen backlog instead of costing memory),
//! a header read timeout (a client that never finishes its headers, or leaves a kept-alive
//! connection idle, is closed), HTTP/2 keep-alive pings and a stream cap. Body read timeouts
//! are the handlers' (they answer 408); see `input`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::error::ApiError;

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections, at most.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may stay idle.
    pub header_read_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits (at most `limit`) until the client has sent enough to tell HTTP/1 from HTTP/2.
/// hyper's version sniffing reads without a timeout, so a client that connects and sends
/// nothing (or the first bytes of the HTTP/2 preface) would hold its connection forever;
/// after this, hyper's own header read timeout applies. False: close the connection.
async fn first_bytes_tell_the_version(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; 24];
        loop {
            if stream.readable().await.is_err() {
                return false;
            }
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
                return true;
            }
            // A prefix of the preface: the bytes stay readable until consumed, so wait a
            // moment for more instead of spinning on readiness.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(limit, sniff).await.unwrap_or(false)
}

/// hyper's default cap on a request's headers; more is hyper's 431, not a malformed request.
const MAX_HEADERS: usize = 100;
/// How much of a first request is read ahead to judge it (hyper's first read is 8 KiB).
const LOOK_AHEAD: usize = 8 * 1024;

/// Answers a connection's first request here when what has arrived of its request line and
/// headers cannot be HTTP/1.1: 400 with the JSON `{error, code}` of every other refusal, then
/// the connection is closed. hyper would answer the same 400 with an empty body and has no
/// hook to choose one; it reads with the same parser (httparse), so both agree on what is
/// malformed. True when answered. What hyper refuses only after parsing (a bad
/// Content-Length, a target that is no URI) and a malformed later request on a kept-alive
/// connection keep hyper's empty 400 (see the README's *Limits*).
async fn answered_as_malformed(stream: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; LOOK_AHEAD];
    let n = match stream.peek(&mut buf).await {
        Ok(n) if !buf[..n].starts_with(H2_PREFACE) => n,
        _ => return false,
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let error = match httparse::Request::new(&mut headers).parse(&buf[..n]) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return false,
        Err(e) => e,
    };
    let refusal = ApiError::BadRequest(format!("malformed HTTP request: {error}"));
    let body = refusal.body().to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The client may be gone already; either way the connection ends here.
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    true
}

/// How long to wait before accepting again after an accept error (out of descriptors, say),
/// so that the loop does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets requests
/// in flight finish and closes idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    open: prometheus::IntGauge,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, app, graceful_watcher) = (builder.clone(), app.clone(), graceful.watcher());
        let (open, limit) = (open.clone(), limits.header_read_timeout);
        open.inc();
        tokio::spawn(async move {
            let mut stream = stream;
            if first_bytes_tell_the_version(&stream, limit).await
                && !answered_as_malformed(&mut stream).await
            {
                let service = TowerToHyperService::new(app);
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = graceful_watcher.watch(connection).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
