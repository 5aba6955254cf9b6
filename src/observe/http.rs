//! `/metrics`, `/healthz` and `/readyz`: a minimal HTTP/1.1 responder on tokio.
//!
//! One request per connection (`Connection: close`). A request head is read with a size
//! limit and a deadline, so a slow or hostile client costs one task for a few seconds
//! at most, and at most [`MAX_CONNECTIONS`] at once; anything else is closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{ObservabilityConfig, Sources};

/// Largest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, and to take the answer.
const IO_DEADLINE: Duration = Duration::from_secs(5);
/// Time the journal has to answer the readiness probe.
const JOURNAL_PROBE: Duration = Duration::from_secs(2);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// The exporter keeps every histogram sample until a render folds it into the buckets;
/// rendering this often bounds that memory when nobody scrapes.
const FOLD_SAMPLES: Duration = Duration::from_secs(60);

/// The endpoints could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The listen address could not be bound.
    #[error("[observability] listen = \"{addr}\": {error}")]
    Bind {
        /// What was configured.
        addr: SocketAddr,
        /// Why not.
        error: std::io::Error,
    },
}

/// A bound listener, not serving yet.
pub struct Endpoints {
    listener: TcpListener,
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
}

/// The endpoints serving; [`Running::stop`] ends them.
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Bind `[observability] listen` (none configured: `Ok(None)`) and install the metrics
/// recorder. Call it before anything else starts, so a taken port fails the start-up.
pub async fn bind(cfg: &ObservabilityConfig) -> Result<Option<Endpoints>, ObserveError> {
    let Some(addr) = cfg.listen else {
        super::reset();
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.map_err(|error| ObserveError::Bind { addr, error })?;
    let addr = listener.local_addr().map_err(|error| ObserveError::Bind { addr, error })?;
    let metrics = super::exporter::handle();
    super::reset();
    Ok(Some(Endpoints { listener, addr, metrics }))
}

impl Endpoints {
    /// The address bound (the port chosen when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until stopped.
    pub fn serve(self, sources: Sources) -> Running {
        let stop = CancellationToken::new();
        tracing::info!("observability: /metrics, /healthz and /readyz on http://{}", self.addr);
        let task = tokio::spawn(accept_loop(self.listener, Arc::new((sources, self.metrics)), stop.clone()));
        Running { stop, task }
    }
}

impl Running {
    /// Stop accepting and wait for the accept loop (connections in progress are bounded
    /// by their own deadlines).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Stop the endpoints, if any (the daemon's last step).
pub async fn stop(running: Option<Running>) {
    if let Some(r) = running {
        r.stop().await;
    }
}

type Shared = Arc<(Sources, Option<PrometheusHandle>)>;

async fn accept_loop(listener: TcpListener, shared: Shared, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut fold = tokio::time::interval(FOLD_SAMPLES);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            _ = fold.tick() => {
                if let Some(h) = &shared.1 {
                    drop(h.render());
                }
                continue;
            }
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "observability: accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            serve_one(stream, &shared).await;
            drop(permit);
        });
    }
}

/// What the client asked.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// GET (or HEAD: the answer without its body) of a path.
    Get { path: String, head: bool },
    /// A method other than GET or HEAD.
    OtherMethod,
    /// Not an HTTP request line.
    Malformed,
    /// The head did not fit in [`MAX_HEAD`].
    TooLarge,
}

/// Read a request head: up to the blank line, within the size limit.
async fn read_head(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_blank_line(&buf) {
            return Some(parse_head(buf.get(..end).unwrap_or_default()));
        }
        if buf.len() >= MAX_HEAD {
            return Some(Request::TooLarge);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            // The client closed before finishing its head.
            return (!buf.is_empty()).then_some(Request::Malformed);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

fn parse_head(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else { return Request::Malformed };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Malformed;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_owned();
    match method {
        "GET" => Request::Get { path, head: false },
        "HEAD" => Request::Get { path, head: true },
        _ => Request::OtherMethod,
    }
}

struct Response {
    code: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(code: u16, body: impl Into<String>) -> Self {
        Self { code, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    fn json(code: u16, body: serde_json::Value) -> Self {
        Self { code, content_type: "application/json", body: format!("{body}\n") }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn serve_one(mut stream: TcpStream, shared: &Shared) {
    let request = match tokio::time::timeout(IO_DEADLINE, read_head(&mut stream)).await {
        Ok(Some(r)) => r,
        // Timed out, or closed without asking anything: nothing to answer.
        _ => return,
    };
    let (response, head_only) = match request {
        Request::Get { path, head } => (route(&path, shared).await, head),
        Request::OtherMethod => (Response::text(405, "only GET and HEAD\n"), false),
        Request::Malformed => (Response::text(400, "bad request\n"), false),
        Request::TooLarge => (Response::text(431, "request head too large\n"), false),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        response.code,
        reason(response.code),
        response.content_type,
        response.body.len()
    );
    if !head_only {
        out.push_str(&response.body);
    }
    let _ = tokio::time::timeout(IO_DEADLINE, async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn route(path: &str, shared: &Shared) -> Response {
    let (sources, metrics) = &**shared;
    match path {
        "/metrics" => {
            sources.refresh();
            let body = metrics.as_ref().map(PrometheusHandle::render).unwrap_or_default();
            Response { code: 200, content_type: "text/plain; version=0.0.4; charset=utf-8", body }
        }
        "/healthz" => Response::json(200, json!({"alive": true})),
        "/readyz" => {
            let mut reasons = Vec::new();
            if super::is_draining() {
                reasons.push("shutting down".to_owned());
            }
            if !super::broker_is_up() {
                reasons.push("broker not connected".to_owned());
            }
            match tokio::time::timeout(JOURNAL_PROBE, sources.journal.record(Vec::new())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => reasons.push(format!("journal not writable: {e}")),
                Err(_) => reasons.push("journal not answering".to_owned()),
            }
            if reasons.is_empty() {
                Response::json(200, json!({"ready": true}))
            } else {
                Response::json(503, json!({"ready": false, "reasons": reasons}))
            }
        }
        _ => Response::text(404, "not found: /metrics, /healthz, /readyz\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a"),
            Request::Get { path: "/metrics".into(), head: false }
        );
        assert_eq!(parse_head(b"HEAD /healthz HTTP/1.0"), Request::Get { path: "/healthz".into(), head: true });
        assert_eq!(parse_head(b"POST /metrics HTTP/1.1"), Request::OtherMethod);
        for bad in [&b"GET /metrics"[..], b"GET metrics HTTP/1.1", b"GET / HTTP/2 extra", b"\xff\xfe", b"", b"SSH-2.0"]
        {
            assert_eq!(parse_head(bad), Request::Malformed, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_head_ends_at_the_blank_line() {
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\n"), None);
    }
}
