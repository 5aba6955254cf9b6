//! Talking to the daemon's HTTP endpoints: find the address it bound, GET a path, read
//! a metric, and wait (with a deadline) for a metric or an endpoint to say something.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::daemon::DaemonProcess;

const MARK: &str = "/readyz on http://";

/// The address of the daemon's endpoints, from its log (it was told to listen on port 0).
pub async fn endpoint(daemon: &DaemonProcess, secs: u64) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let log = daemon.log_text();
        if let Some(at) = log.find(MARK) {
            let rest = &log[at + MARK.len()..];
            let addr: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
            return addr.parse().unwrap_or_else(|_| panic!("not an address: {addr:?}"));
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not say where it listens:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send `raw` as the request and return the status code and body of the answer.
pub async fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let talk = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw).await.expect("send");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), talk).await.expect("an answer in time");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// GET `path`.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, format!("GET {path} HTTP/1.1\r\nHost: headend\r\n\r\n").as_bytes()).await
}

/// The sum of the samples of `name` whose labels include all of `labels` (None: no such
/// series). `name` is matched exactly (`_bucket`, `_count` are other names).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name || !labels.iter().all(|(k, v)| l.split(',').any(|p| p == format!("{k}=\"{v}\""))) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// Scrape `/metrics` until `ok` holds for the metric's value (None when absent); panics
/// with the last scrape after `secs`.
pub async fn wait_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    secs: u64,
    ok: impl Fn(Option<f64>) -> bool,
) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, text) = get(addr, "/metrics").await;
        assert_eq!(code, 200, "{text}");
        let v = metric(&text, name, labels);
        if ok(v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name}{labels:?} stayed at {v:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` until it answers `code`; returns the body.
pub async fn wait_status(addr: SocketAddr, path: &str, code: u16, secs: u64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (c, body) = get(addr, path).await;
        if c == code {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} stayed at {c}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
