//! The control API: a little JSON over HTTP/1.1, written by hand on a TcpStream.
//!
//! | request | answer |
//! |---|---|
//! | `GET /meters[?offset=N&limit=M]` | array of meter views |
//! | `GET /meters/{id}` | one meter view |
//! | `POST /meters/{id}/button` | the view after the button press |
//! | `PUT /meters/{id}/faults` with a JSON `Faults` body (missing fields = 0/false) | the view |
//! | `GET /endpoints` | the bound endpoints |
//!
//! One request per connection (`Connection: close`). Malformed requests get 400, unknown
//! meters and paths 404, a wrong method 405; nothing a client sends stops the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Faults;
use crate::meter::Fleet;
use crate::sim::{BoundEndpoint, Simulator};
use crate::{net, SimError};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// Serve the control API on `bind` until the simulator shuts down; returns the address
/// actually bound.
///
/// # Errors
/// [`SimError::Bind`] when the address cannot be bound.
pub async fn serve_control(sim: &Simulator, bind: SocketAddr) -> Result<SocketAddr, SimError> {
    let listener = TcpListener::bind(bind).await.map_err(|source| SimError::Bind { addr: bind, source })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind { addr: bind, source })?;
    let api = Arc::new(Api { fleet: Arc::clone(sim.fleet()), endpoints: sim.endpoints().to_vec() });
    let stop = sim.shutdown_signal();
    let task = tokio::spawn(net::accept_loop(listener, stop, move |stream| connection(stream, Arc::clone(&api))));
    sim.add_task(task);
    Ok(addr)
}

pub(crate) struct Api {
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) endpoints: Vec<BoundEndpoint>,
}

async fn connection(mut stream: TcpStream, api: Arc<Api>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let answer = loop {
        match parse_request(&buffer) {
            Parsed::Request(req) => break api.route(&req),
            Parsed::Bad(why) => break (400, error_body(why)),
            Parsed::Incomplete => {}
        }
        // A client that stops half-way gets dropped rather than holding a task forever.
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buffer.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            _ => return,
        }
    };
    let _ = stream.write_all(&response(answer.0, &answer.1)).await;
    let _ = stream.shutdown().await;
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Incomplete,
    Bad(&'static str),
    Request(HttpRequest),
}

/// Parse one HTTP/1.x request from the start of `buf`.
pub(crate) fn parse_request(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD { Parsed::Bad("request head too large") } else { Parsed::Incomplete };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else { return Parsed::Bad("request head is not UTF-8") };
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Bad("malformed request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Parsed::Bad("malformed request line");
    }
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return Parsed::Bad("malformed header") };
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            match value.trim().parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = n,
                _ => return Parsed::Bad("bad content-length"),
            }
        } else if name == "transfer-encoding" {
            return Parsed::Bad("chunked bodies are not supported");
        }
    }
    let body_start = end + 4;
    let Some(body) = buf.get(body_start..body_start + length) else { return Parsed::Incomplete };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Parsed::Request(HttpRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        body: body.to_vec(),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn error_body(why: &str) -> String {
    json(&serde_json::json!({ "error": why }))
}

fn query_number(query: &str, key: &str) -> Option<usize> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok())
}

impl Api {
    /// Answer a request: (status, JSON body).
    pub(crate) fn route(&self, req: &HttpRequest) -> (u16, String) {
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let Some(segments) = segments.iter().map(|s| percent_decode(s)).collect::<Option<Vec<String>>>() else {
            return (400, error_body("bad percent-encoding in path"));
        };
        let method = req.method.as_str();
        let names: Vec<&str> = segments.iter().map(String::as_str).collect();
        match names.as_slice() {
            ["meters"] if method == "GET" => {
                let offset = query_number(&req.query, "offset").unwrap_or(0);
                let limit = query_number(&req.query, "limit").unwrap_or(usize::MAX);
                let views: Vec<_> =
                    self.fleet.meters.iter().skip(offset).take(limit).map(|m| m.view(&self.fleet)).collect();
                (200, json(&views))
            }
            ["endpoints"] if method == "GET" => (200, json(&self.endpoints)),
            ["meters", id] if method == "GET" => self.view(id),
            ["meters", id, "button"] if method == "POST" => match self.fleet.press_button(id) {
                Ok(()) => self.view(id),
                Err(e) => (404, error_body(&e.to_string())),
            },
            ["meters", id, "faults"] if method == "PUT" => {
                let Ok(faults) = serde_json::from_slice::<Faults>(&req.body) else {
                    return (400, error_body("the body must be a JSON Faults object"));
                };
                match self.fleet.set_faults(id, faults) {
                    Ok(()) => self.view(id),
                    Err(e) => (404, error_body(&e.to_string())),
                }
            }
            ["meters"] | ["endpoints"] | ["meters", _] | ["meters", _, "button" | "faults"] => {
                (405, error_body("method not allowed"))
            }
            _ => (404, error_body("no such resource")),
        }
    }

    fn view(&self, id: &str) -> (u16, String) {
        match self.fleet.meter(id) {
            Some(m) => (200, json(&m.view(&self.fleet))),
            None => (404, error_body("no such meter")),
        }
    }
}

fn response(status: u16, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_incrementally() {
        let raw = b"PUT /meters/A%20B/faults?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let Parsed::Request(req) = parse_request(raw) else { panic!("complete request") };
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.query.as_str()),
            ("PUT", "/meters/A%20B/faults", "x=1")
        );
        assert_eq!(req.body, b"{}");
        assert_eq!(percent_decode("A%20B").as_deref(), Some("A B"));
    }

    #[test]
    fn malformed_requests_are_bad_not_fatal() {
        for raw in [
            &b"GET\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"\xff\xfe / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(parse_request(raw), Parsed::Bad(_)), "{raw:?}");
        }
        assert!(matches!(parse_request(&[b'a'; MAX_HEAD + 1]), Parsed::Bad(_)));
    }
}
