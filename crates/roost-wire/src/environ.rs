//! The request head: CGI/WSGI environ pairs, built by the node.
//!
//! The payload is `KEY NUL VALUE NUL KEY NUL VALUE …` (no trailing NUL), with values as
//! raw bytes that the loader decodes as ISO-8859-1, exactly as PEP 3333 wants native
//! strings. The node does the CGI work (HTTP_ names, joined repeated headers,
//! PATH_INFO decoding) so the loader builds its environ with one split and one dict().

use bytes::{BufMut, Bytes, BytesMut};

/// A key or value that would break the NUL-separated framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environ {what} {key:?} contains a NUL byte")]
pub struct EnvironError {
    pub what: &'static str,
    pub key: String,
}

/// Builds the payload of a [`crate::Frame::RequestHead`].
#[derive(Debug, Default)]
pub struct EnvironWriter {
    buf: BytesMut,
}

impl EnvironWriter {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(capacity),
        }
    }

    /// Appends one pair. NUL cannot be represented and is refused.
    pub fn push(&mut self, key: &str, value: &[u8]) -> Result<(), EnvironError> {
        if key.as_bytes().contains(&0) {
            return Err(EnvironError {
                what: "key",
                key: key.replace('\0', "\\0"),
            });
        }
        if value.contains(&0) {
            return Err(EnvironError {
                what: "value of",
                key: key.to_owned(),
            });
        }
        if !self.buf.is_empty() {
            self.buf.put_u8(0);
        }
        self.buf.put_slice(key.as_bytes());
        self.buf.put_u8(0);
        self.buf.put_slice(value);
        Ok(())
    }

    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }

    /// Splits a payload back into pairs (tests and the fuzzer use it).
    pub fn parse(payload: &[u8]) -> Vec<(&[u8], &[u8])> {
        let parts: Vec<&[u8]> = payload.split(|b| *b == 0).collect();
        parts.chunks_exact(2).map(|c| (c[0], c[1])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_roundtrip_and_nul_is_refused() {
        let mut w = EnvironWriter::default();
        w.push("REQUEST_METHOD", b"GET").unwrap();
        w.push("HTTP_X_EMPTY", b"").unwrap();
        w.push("PATH_INFO", "/caf\u{e9}".as_bytes()).unwrap();
        assert!(w.push("HTTP_BAD", b"a\0b").is_err());
        assert!(w.push("BAD\0KEY", b"x").is_err());
        let payload = w.finish();
        assert_eq!(
            EnvironWriter::parse(&payload),
            vec![
                (&b"REQUEST_METHOD"[..], &b"GET"[..]),
                (&b"HTTP_X_EMPTY"[..], &b""[..]),
                (&b"PATH_INFO"[..], "/caf\u{e9}".as_bytes()),
            ]
        );
    }
}
