//! The response head a worker sends: `STATUS NUL NAME NUL VALUE NUL …`.
//!
//! The status is the WSGI status line (`"200 OK"`). This module checks the structure,
//! the byte classes RFC 9110 allows, and what would make the client misread the
//! response's framing (a 1xx status, a Content-Length that is not one plain number);
//! the node converts the result into `http` types. Everything here comes from tenant
//! code and is treated as hostile.

/// A structurally valid response head, borrowing from the frame payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub status: u16,
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    /// The body's length its Content-Length declares (every one of them agrees).
    pub content_length: Option<u64>,
}

/// Why a worker's response head is refused (the request then gets a 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseHeadError {
    #[error("status line {0:?} does not start with a 3-digit code from 200 to 599")]
    BadStatus(String),
    #[error("Content-Length {0:?} is not one decimal number")]
    BadContentLength(String),
    #[error("header fields are not in name/value pairs")]
    OddFields,
    #[error("header name {0:?} is not an HTTP token")]
    BadName(String),
    #[error("value of header {0:?} holds a control character")]
    BadValue(String),
    #[error("{0} headers, more than the limit of {MAX_RESPONSE_HEADERS}")]
    TooManyHeaders(usize),
}

/// Most headers a response may carry.
pub const MAX_RESPONSE_HEADERS: usize = 256;

impl<'a> ResponseHead<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<Self, ResponseHeadError> {
        let mut fields = payload.split(|b| *b == 0);
        let status_line = fields.next().unwrap_or_default();
        let status = parse_status(status_line)?;
        let rest: Vec<&[u8]> = fields.collect();
        if !rest.len().is_multiple_of(2) {
            return Err(ResponseHeadError::OddFields);
        }
        if rest.len() / 2 > MAX_RESPONSE_HEADERS {
            return Err(ResponseHeadError::TooManyHeaders(rest.len() / 2));
        }
        let mut headers = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks_exact(2) {
            let (name, value) = (pair[0], pair[1]);
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return Err(ResponseHeadError::BadName(lossy(name)));
            }
            if value
                .iter()
                .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
            {
                return Err(ResponseHeadError::BadValue(lossy(name)));
            }
            headers.push((name, value));
        }
        let content_length = content_length(&headers)?;
        Ok(ResponseHead {
            status,
            headers,
            content_length,
        })
    }
}

fn parse_status(line: &[u8]) -> Result<u16, ResponseHeadError> {
    let bad = || ResponseHeadError::BadStatus(lossy(line));
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    if line.len() > 3 && line[3] != b' ' {
        return Err(bad());
    }
    if line.iter().any(|b| *b < 0x20 && *b != b'\t') {
        return Err(bad());
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    // 1xx are interim answers the node gives itself (100 Continue); from an app, a 101
    // would leave the client expecting another protocol on the connection.
    if !(200..=599).contains(&code) {
        return Err(bad());
    }
    Ok(code)
}

/// Every Content-Length is digits only (no sign, space or `_`, which lenient parsers
/// such as Python's `int` accept), of at most 19 (a u64), and all of them agree: a
/// client or proxy must not be able to frame the body otherwise than the node does.
/// The length they declare, if any.
fn content_length(headers: &[(&[u8], &[u8])]) -> Result<Option<u64>, ResponseHeadError> {
    let mut seen: Option<&[u8]> = None;
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        let plain = !value.is_empty() && value.len() <= 19 && value.iter().all(u8::is_ascii_digit);
        if !plain || seen.is_some_and(|s| s != *value) {
            return Err(ResponseHeadError::BadContentLength(lossy(value)));
        }
        seen = Some(value);
    }
    // Digits only, at most 19 of them: a u64 holds any.
    Ok(seen.map(|digits| (digits.iter()).fold(0, |n, d| n * 10 + u64::from(d - b'0'))))
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(64)]);
    s.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_normal_head() {
        let head = ResponseHead::parse(b"200 OK\0Content-Type\0text/plain\0X-Empty\0").unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(
            head.headers,
            vec![
                (&b"Content-Type"[..], &b"text/plain"[..]),
                (&b"X-Empty"[..], &b""[..])
            ]
        );
        assert_eq!(head.content_length, None);
        assert_eq!(ResponseHead::parse(b"204").unwrap().status, 204);
    }

    #[test]
    fn refuses_hostile_heads() {
        for bad in [
            &b""[..],
            b"20 OK",
            b"2000 OK",
            b"099 Low",
            b"101 Switching Protocols",
            b"600 High",
            b"200\rOK",
            b"abc",
        ] {
            assert!(
                matches!(
                    ResponseHead::parse(bad),
                    Err(ResponseHeadError::BadStatus(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            ResponseHead::parse(b"200 OK\0X-Only-Name"),
            Err(ResponseHeadError::OddFields)
        );
        assert!(matches!(
            ResponseHead::parse(b"200 OK\0Bad Name\0v"),
            Err(ResponseHeadError::BadName(_))
        ));
        assert!(matches!(
            ResponseHead::parse(b"200 OK\0X-Split\0a\r\nInjected: yes"),
            Err(ResponseHeadError::BadValue(_))
        ));
        for bad in [
            &b"200 OK\0Content-Length\0-1"[..],
            b"200 OK\0Content-Length\0+5",
            b"200 OK\0content-length\0 5",
            b"200 OK\0Content-Length\x005_0",
            b"200 OK\0Content-Length\0",
            b"200 OK\0Content-Length\x0099999999999999999999",
            b"200 OK\0Content-Length\x005\0CONTENT-LENGTH\x0050",
        ] {
            assert!(
                matches!(
                    ResponseHead::parse(bad),
                    Err(ResponseHeadError::BadContentLength(_))
                ),
                "{bad:?}"
            );
        }
        let twice = ResponseHead::parse(b"200 OK\0Content-Length\x005\0content-length\x005");
        assert_eq!(twice.unwrap().content_length, Some(5));
        let most = ResponseHead::parse(b"200 OK\0Content-Length\x009999999999999999999");
        assert_eq!(
            most.unwrap().content_length,
            Some(9_999_999_999_999_999_999)
        );
    }
}
