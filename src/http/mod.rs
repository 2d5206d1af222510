//! The HTTP endpoint's protocol side: requests read from a connection's bytes, responses
//! written to bytes. No I/O: `shard::http` feeds a [`Reader`] what it reads off the socket
//! and writes what a [`Response`] serializes to.
//!
//! HTTP/1.1 with keep-alive, parsed with `httparse`. Limits: the request line and headers
//! together at most `http.head_max` bytes (431), a body at most `http.body_max` (413, refused
//! from its `Content-Length` before it is read). Bodies need a `Content-Length`: chunked
//! request bodies get 411 (every client we serve — curl, Python, browsers' `fetch` with a
//! string body — sends a length). `Expect: 100-continue` is answered so curl does not wait.
//!
//! Every error is JSON: `{"error": "..."}` with a 4xx or 5xx status.

pub mod access;
pub mod admin;
pub mod audit;

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Headers parsed per request; more is a 431 (browsers send about 15).
const HEADERS_MAX: usize = 64;

/// One request, read whole.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query, percent-decoded.
    pub path: String,
    /// The query's `name=value` pairs, decoded, in order.
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// A header's value (the first, by case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter's value (the first).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON of type `T`; a 400 saying what is wrong otherwise.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Response> {
        if self.body.is_empty() {
            return Err(Response::error(400, "the request needs a JSON body"));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))
    }

    /// A cookie's value, from the `Cookie` header.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

/// One response.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `value` as JSON.
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json".into(),
                headers: Vec::new(),
                body,
            },
            Err(e) => Response::error(500, format!("cannot serialize the answer: {e}")),
        }
    }

    /// `{"error": why}`.
    pub fn error(status: u16, why: impl std::fmt::Display) -> Response {
        let body = serde_json::to_vec(&serde_json::json!({ "error": why.to_string() }))
            .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
        Response {
            status,
            content_type: "application/json".into(),
            headers: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: content_type.into(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The response on the wire; `head` (a HEAD request): headers only.
    pub fn to_bytes(&self, keep_alive: bool, head: bool) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(256);
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\
             X-Content-Type-Options: nosniff\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("cache-control"))
        {
            out.push_str("Cache-Control: no-store\r\n");
        }
        for (name, value) in &self.headers {
            // A value never carries a line break into the head (header injection).
            let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    }
}

/// What the bytes read so far give.
#[derive(Debug)]
pub enum Step {
    /// Read more.
    Need,
    /// Send `100 Continue` (the client waits for it before its body), then read more.
    Continue,
    Request(Box<Request>),
    /// Send this and close: the connection's bytes cannot be read further.
    Fail(Response),
}

/// The head of a request whose body is still being read.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
    head_len: usize,
    body_len: usize,
    continued: bool,
}

/// Requests out of a connection's bytes, one after another (pipelining works: bytes past one
/// request start the next).
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    head: Option<Head>,
    head_max: usize,
    body_max: usize,
}

impl Reader {
    pub fn new(head_max: usize, body_max: usize) -> Reader {
        Reader {
            buf: Vec::new(),
            head: None,
            head_max,
            body_max,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether part of a request has arrived (its timeout runs).
    pub fn in_request(&self) -> bool {
        !self.buf.is_empty() || self.head.is_some()
    }

    /// The next step for the bytes fed so far.
    pub fn step(&mut self, peer: SocketAddr) -> Step {
        if self.head.is_none() {
            match self.parse_head() {
                Ok(Some(head)) => self.head = Some(head),
                Ok(None) => return Step::Need,
                Err(response) => return Step::Fail(response),
            }
        }
        let Some(head) = self.head.as_mut() else {
            return Step::Need;
        };
        let have = self.buf.len() - head.head_len;
        if have < head.body_len {
            if !head.continued
                && head.body_len > 0
                && headers_get(&head.headers, "expect")
                    .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            {
                head.continued = true;
                return Step::Continue;
            }
            return Step::Need;
        }
        let Some(head) = self.head.take() else {
            return Step::Need;
        };
        let rest = self.buf.split_off(head.head_len + head.body_len);
        let mut body = std::mem::replace(&mut self.buf, rest);
        body.drain(..head.head_len);
        let (path, query) = split_target(&head.target);
        Step::Request(Box::new(Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            body,
            peer,
            keep_alive: head.keep_alive,
        }))
    }

    fn parse_head(&mut self) -> Result<Option<Head>, Response> {
        let mut slots = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut parsed = httparse::Request::new(&mut slots);
        let status = match parsed.parse(&self.buf) {
            Ok(status) => status,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Response::error(
                    431,
                    format!("more than {HEADERS_MAX} headers"),
                ))
            }
            Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
        };
        let head_len = match status {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => {
                if self.buf.len() > self.head_max {
                    return Err(Response::error(
                        431,
                        format!(
                            "request line and headers longer than {} bytes",
                            self.head_max
                        ),
                    ));
                }
                return Ok(None);
            }
        };
        if head_len > self.head_max {
            return Err(Response::error(
                431,
                format!(
                    "request line and headers longer than {} bytes",
                    self.head_max
                ),
            ));
        }
        let method = parsed.method.unwrap_or("GET").to_owned();
        let target = parsed.path.unwrap_or("/").to_owned();
        let version = parsed.version.unwrap_or(1);
        let mut headers = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| Response::error(400, format!("header {} is not UTF-8", h.name)))?;
            headers.push((h.name.to_owned(), value.trim().to_owned()));
        }
        if headers_get(&headers, "transfer-encoding").is_some() {
            return Err(Response::error(
                411,
                "chunked request bodies are not supported: send a Content-Length",
            ));
        }
        let body_len = match headers_get(&headers, "content-length") {
            None => 0,
            Some(text) => text.parse::<usize>().map_err(|_| {
                Response::error(400, format!("Content-Length `{text}` is not a number"))
            })?,
        };
        if body_len > self.body_max {
            return Err(Response::error(
                413,
                format!(
                    "request body of {body_len} bytes is larger than http.body_max ({} bytes)",
                    self.body_max
                ),
            ));
        }
        let connection = headers_get(&headers, "connection").map(str::to_ascii_lowercase);
        let keep_alive = match (version, connection.as_deref()) {
            (_, Some(c)) if c.contains("close") => false,
            (0, Some(c)) => c.contains("keep-alive"),
            (0, None) => false,
            _ => true,
        };
        Ok(Some(Head {
            method,
            target,
            headers,
            keep_alive,
            head_len,
            body_len,
            continued: false,
        }))
    }
}

fn headers_get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A request target's decoded path and query pairs.
fn split_target(target: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (percent_decode(path, false), parse_form(query))
}

/// `a=1&b=two` (a query, or an `application/x-www-form-urlencoded` body), decoded.
pub fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(n, true), percent_decode(v, true))
        })
        .collect()
}

/// `%XX` decoded (and `+` as a space in forms); bad escapes are kept as written.
pub fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit())
        .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
        .flatten()
        .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') if plus_is_space => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
