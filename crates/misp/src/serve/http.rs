//! Just enough HTTP/1.1 for `misp serve`: persistent connections (HTTP/1.1's default, as the
//! harnesses' clients use them: a request per round trip, no pipelining needed), bodies by
//! `Content-Length` only, limits on the head and the body, and `Expect: 100-continue` (curl
//! sends it for bodies over 1 KiB and waits a second for the go-ahead before sending the body).

use std::io::{BufRead, Write};

/// Most bytes of a request line plus headers.
pub const MAX_HEAD: usize = 64 * 1024;

/// One parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client keeps the connection for another request: HTTP/1.1 unless it sent
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
}

/// A request that cannot be served: the HTTP status and why.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Reads one request; `Ok(None)` when the client closed the connection (or let it idle past
/// the read timeout) before sending one. A body over `max_body` bytes is refused (413) before
/// it is read. A client that sent `Expect: 100-continue` is told `100 Continue` on `w` once
/// the head is accepted, and only then sends the body; one refused on its head (413) never
/// sends it.
pub fn read_request(
    r: &mut impl BufRead,
    w: &mut impl Write,
    max_body: usize,
) -> Result<Option<Request>, HttpError> {
    let mut head = 0usize;
    let mut line = String::new();
    let n = match r.read_line(&mut line) {
        Ok(n) => n,
        // An idle persistent connection timing out, or reset between requests: no request.
        Err(_) if line.is_empty() => return Ok(None),
        Err(e) => return Err(HttpError::new(400, format!("reading the request: {e}"))),
    };
    if n == 0 {
        return Ok(None);
    }
    head += n;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(HttpError::new(400, "malformed request line"));
    };
    let method = method.to_string();
    let path = target.split('?').next().unwrap_or("").to_string();
    let http10 = parts.next() == Some("HTTP/1.0");
    let mut keep_alive = !http10;
    let mut length: Option<usize> = None;
    let mut expect_continue = false;
    loop {
        let mut h = String::new();
        let n = r
            .read_line(&mut h)
            .map_err(|e| HttpError::new(400, format!("reading the headers: {e}")))?;
        head += n;
        if head > MAX_HEAD {
            return Err(HttpError::new(431, "request headers are too large"));
        }
        if n == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(HttpError::new(
                400,
                format!("malformed header: {}", h.trim_end()),
            ));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = Some(value.parse().map_err(|_| {
                HttpError::new(400, format!("Content-Length is not a number: {value}"))
            })?);
        } else if name == "connection" {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name == "expect" {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::new(
                    417,
                    format!("Expect: {value} is not supported (only 100-continue)"),
                ));
            }
            // HTTP/1.0 has no interim responses: such a client sends its body anyway.
            expect_continue = !http10;
        } else if name == "transfer-encoding" && !value.eq_ignore_ascii_case("identity") {
            return Err(HttpError::new(
                411,
                "chunked bodies are not accepted; send Content-Length",
            ));
        }
    }
    let len = length.unwrap_or(0);
    if len > max_body {
        return Err(HttpError::new(
            413,
            format!(
                "request body of {len} bytes is over the limit of {max_body} bytes (--max-body-mb)"
            ),
        ));
    }
    if expect_continue && len > 0 {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| w.flush())
            .map_err(|e| HttpError::new(400, format!("answering Expect: 100-continue: {e}")))?;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| HttpError::new(400, format!("body shorter than its Content-Length: {e}")))?;
    Ok(Some(Request {
        method,
        path,
        body,
        keep_alive,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a JSON response, saying whether the connection stays open for the next request.
/// Head and body go out in one write: two small writes on a persistent connection would wait
/// on the peer's delayed ACK (Nagle).
pub fn write_json(
    w: &mut impl Write,
    status: u16,
    body: &serde_json::Value,
    keep_alive: bool,
) -> std::io::Result<()> {
    let text = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{text}",
        reason(status),
        text.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    w.write_all(response.as_bytes())?;
    w.flush()
}

/// An OpenAI-style error body.
pub fn error_body(status: u16, message: &str) -> serde_json::Value {
    let kind = match status {
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    serde_json::json!({"error": {"message": message, "type": kind, "code": status}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn parse(raw: &str, max: usize) -> Result<Option<Request>, HttpError> {
        read_request(
            &mut BufReader::new(raw.as_bytes()),
            &mut std::io::sink(),
            max,
        )
    }

    #[test]
    fn requests_parse_and_limits_hold() {
        let r = parse(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcdXX",
            10,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(r.body, b"abcd");
        assert!(r.keep_alive, "HTTP/1.1 keeps the connection by default");
        let keeps = |raw: &str| parse(raw, 10).unwrap().unwrap().keep_alive;
        assert!(!keeps("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keeps("GET / HTTP/1.0\r\n\r\n"));
        assert!(keeps("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert_eq!(parse("", 10).unwrap(), None);
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 10)
                .unwrap_err()
                .status,
            413
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 10)
                .unwrap_err()
                .status,
            411
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 10)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", 10)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(parse("garbage\r\n\r\n", 10).unwrap_err().status, 400);
        // A persistent connection: requests follow each other on one stream.
        let mut two = BufReader::new(
            "POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nxyGET /b HTTP/1.1\r\n\r\n".as_bytes(),
        );
        let first = read_request(&mut two, &mut std::io::sink(), 10)
            .unwrap()
            .unwrap();
        assert_eq!(
            (first.path.as_str(), first.body.as_slice()),
            ("/a", &b"xy"[..])
        );
        let second = read_request(&mut two, &mut std::io::sink(), 10)
            .unwrap()
            .unwrap();
        assert_eq!(
            (second.method.as_str(), second.path.as_str()),
            ("GET", "/b")
        );
        assert_eq!(
            read_request(&mut two, &mut std::io::sink(), 10).unwrap(),
            None
        );
    }

    #[test]
    fn expect_100_continue_is_answered_once_the_head_is_accepted() {
        let mut said = Vec::new();
        let raw = "POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
        let r = read_request(&mut BufReader::new(raw.as_bytes()), &mut said, 10)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"abc");
        assert_eq!(said, b"HTTP/1.1 100 Continue\r\n\r\n");
        // Over the limit: 413, and no go-ahead, so the client never sends the body.
        let mut said = Vec::new();
        let raw = "POST /a HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 11\r\n\r\n";
        let e = read_request(&mut BufReader::new(raw.as_bytes()), &mut said, 10).unwrap_err();
        assert_eq!((e.status, said.len()), (413, 0));
        // No Expect header, or an HTTP/1.0 client: no interim response.
        for raw in [
            "POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            "POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        ] {
            let mut said = Vec::new();
            read_request(&mut BufReader::new(raw.as_bytes()), &mut said, 10)
                .unwrap()
                .unwrap();
            assert!(said.is_empty(), "{raw:?}");
        }
        let raw = "POST /a HTTP/1.1\r\nExpect: something-else\r\n\r\n";
        let e = read_request(
            &mut BufReader::new(raw.as_bytes()),
            &mut std::io::sink(),
            10,
        )
        .unwrap_err();
        assert_eq!(e.status, 417);
    }
}
