//! Frame kinds, their limits, and the length-prefixed codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The wire version this build speaks; carried by [`Frame::Ready`].
pub const PROTOCOL_VERSION: u16 = 3;

/// Bytes before every payload: one kind byte and a big-endian u32 length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest request head the node sends (the front's header limits keep it far below).
pub const MAX_REQUEST_HEAD: usize = 1 << 20;
/// Largest response head (status and headers) a worker may send.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// Largest body chunk in either direction; bigger bodies are split.
pub const MAX_BODY_CHUNK: usize = 1 << 20;
/// Largest fatal-error report (an import traceback, say) a worker may send.
pub const MAX_FATAL: usize = 64 << 10;
/// Exact payload size of [`Frame::Ready`]: version u16, pid u32, import time u64 (µs).
const READY_LEN: usize = 2 + 4 + 8;

/// What a frame is. The numbering is part of the protocol: never reuse a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    // node → worker
    RequestHead = 0x01,
    RequestBody = 0x02,
    RequestEnd = 0x03,
    RequestAbort = 0x04,
    // worker → node
    Ready = 0x10,
    ResponseHead = 0x11,
    ResponseBody = 0x12,
    ResponseEnd = 0x13,
    Fatal = 0x14,
    ResponseAbort = 0x15,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::RequestHead,
            0x02 => Kind::RequestBody,
            0x03 => Kind::RequestEnd,
            0x04 => Kind::RequestAbort,
            0x10 => Kind::Ready,
            0x11 => Kind::ResponseHead,
            0x12 => Kind::ResponseBody,
            0x13 => Kind::ResponseEnd,
            0x14 => Kind::Fatal,
            0x15 => Kind::ResponseAbort,
            _ => return None,
        })
    }

    /// The largest payload this kind may carry; checked before any allocation.
    fn max_payload(self) -> usize {
        match self {
            Kind::RequestHead => MAX_REQUEST_HEAD,
            Kind::RequestBody | Kind::ResponseBody => MAX_BODY_CHUNK,
            Kind::RequestEnd | Kind::RequestAbort | Kind::ResponseEnd | Kind::ResponseAbort => 0,
            Kind::Ready => READY_LEN,
            Kind::ResponseHead => MAX_RESPONSE_HEAD,
            Kind::Fatal => MAX_FATAL,
        }
    }

    fn is_from_worker(self) -> bool {
        (self as u8) >= 0x10
    }
}

/// What a worker announces once per slot before it takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub version: u16,
    pub pid: u32,
    /// How long importing the site's application took, in microseconds.
    pub import_micros: u64,
}

/// One decoded frame. Payloads are zero-copy slices of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// NUL-separated environ pairs, see [`crate::EnvironWriter`].
    RequestHead(Bytes),
    RequestBody(Bytes),
    /// The request body is complete.
    RequestEnd,
    /// The request body will not be completed (client gone, or over the size limit).
    RequestAbort,
    Ready(Ready),
    /// NUL-separated status line and header pairs, see [`crate::ResponseHead`].
    ResponseHead(Bytes),
    ResponseBody(Bytes),
    ResponseEnd,
    /// The app failed after the head was sent; the client must see a broken response,
    /// not a short one. The slot stays usable.
    ResponseAbort,
    /// The worker cannot serve (the app failed to import); UTF-8 text.
    Fatal(Bytes),
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::RequestHead(_) => Kind::RequestHead,
            Frame::RequestBody(_) => Kind::RequestBody,
            Frame::RequestEnd => Kind::RequestEnd,
            Frame::RequestAbort => Kind::RequestAbort,
            Frame::Ready(_) => Kind::Ready,
            Frame::ResponseHead(_) => Kind::ResponseHead,
            Frame::ResponseBody(_) => Kind::ResponseBody,
            Frame::ResponseEnd => Kind::ResponseEnd,
            Frame::ResponseAbort => Kind::ResponseAbort,
            Frame::Fatal(_) => Kind::Fatal,
        }
    }
}

/// Why bytes on the wire are not a valid frame. Any of these ends the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("frame kind {kind:?} is not allowed in this direction")]
    WrongDirection { kind: Kind },
    #[error("frame {kind:?} claims {len} bytes, more than its limit of {max}")]
    FrameTooLarge { kind: Kind, len: usize, max: usize },
    #[error("ready frame has {len} bytes, expected {READY_LEN}")]
    BadReady { len: usize },
}

/// Decodes one worker → node frame from the front of `buf`, consuming it.
///
/// `Ok(None)` means more bytes are needed; the buffer is then left untouched.
pub fn decode_from_worker(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    decode(buf, true)
}

/// Decodes one node → worker frame (used by tests and the fuzzer; the loader has its own).
pub fn decode_from_node(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    decode(buf, false)
}

fn decode(buf: &mut BytesMut, from_worker: bool) -> Result<Option<Frame>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = Kind::from_byte(buf[0]).ok_or(WireError::UnknownKind(buf[0]))?;
    if kind.is_from_worker() != from_worker {
        return Err(WireError::WrongDirection { kind });
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let max = kind.max_payload();
    if len > max {
        return Err(WireError::FrameTooLarge { kind, len, max });
    }
    if kind == Kind::Ready && len != READY_LEN {
        return Err(WireError::BadReady { len });
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let mut payload = buf.split_to(len).freeze();
    Ok(Some(match kind {
        Kind::RequestHead => Frame::RequestHead(payload),
        Kind::RequestBody => Frame::RequestBody(payload),
        Kind::RequestEnd => Frame::RequestEnd,
        Kind::RequestAbort => Frame::RequestAbort,
        Kind::Ready => Frame::Ready(Ready {
            version: payload.get_u16(),
            pid: payload.get_u32(),
            import_micros: payload.get_u64(),
        }),
        Kind::ResponseHead => Frame::ResponseHead(payload),
        Kind::ResponseBody => Frame::ResponseBody(payload),
        Kind::ResponseEnd => Frame::ResponseEnd,
        Kind::ResponseAbort => Frame::ResponseAbort,
        Kind::Fatal => Frame::Fatal(payload),
    }))
}

/// Appends the 5-byte header of a frame whose payload the caller appends next.
///
/// # Panics
/// If `len` exceeds the kind's limit: the node never builds such a frame.
pub fn encode_header(buf: &mut BytesMut, kind: Kind, len: usize) {
    assert!(
        len <= kind.max_payload(),
        "frame {kind:?} of {len} bytes exceeds its limit; split it before encoding"
    );
    buf.put_u8(kind as u8);
    buf.put_u32(len as u32);
}

/// Appends a whole frame to `buf`.
pub fn encode(buf: &mut BytesMut, frame: &Frame) {
    match frame {
        Frame::RequestHead(p)
        | Frame::RequestBody(p)
        | Frame::ResponseHead(p)
        | Frame::ResponseBody(p)
        | Frame::Fatal(p) => {
            encode_header(buf, frame.kind(), p.len());
            buf.put_slice(p);
        }
        Frame::RequestEnd | Frame::RequestAbort | Frame::ResponseEnd | Frame::ResponseAbort => {
            encode_header(buf, frame.kind(), 0)
        }
        Frame::Ready(r) => {
            encode_header(buf, Kind::Ready, READY_LEN);
            buf.put_u16(r.version);
            buf.put_u32(r.pid);
            buf.put_u64(r.import_micros);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: Frame) {
        let mut buf = BytesMut::new();
        encode(&mut buf, &frame);
        let decoded = if frame.kind().is_from_worker() {
            decode_from_worker(&mut buf)
        } else {
            decode_from_node(&mut buf)
        };
        assert_eq!(decoded.unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_kind_roundtrips() {
        let p = Bytes::from_static(b"payload\0with\0nuls");
        roundtrip(Frame::RequestHead(p.clone()));
        roundtrip(Frame::RequestBody(p.clone()));
        roundtrip(Frame::RequestEnd);
        roundtrip(Frame::RequestAbort);
        roundtrip(Frame::Ready(Ready {
            version: PROTOCOL_VERSION,
            pid: 4242,
            import_micros: u64::MAX,
        }));
        roundtrip(Frame::ResponseHead(p.clone()));
        roundtrip(Frame::ResponseBody(p.clone()));
        roundtrip(Frame::ResponseEnd);
        roundtrip(Frame::ResponseAbort);
        roundtrip(Frame::Fatal(p));
    }

    #[test]
    fn a_huge_claim_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&[Kind::ResponseBody as u8, 0xff, 0xff, 0xff, 0xff][..]);
        let err = decode_from_worker(&mut buf).unwrap_err();
        assert_eq!(
            err,
            WireError::FrameTooLarge {
                kind: Kind::ResponseBody,
                len: u32::MAX as usize,
                max: MAX_BODY_CHUNK
            }
        );
        assert!(
            buf.capacity() < 1024,
            "decoder reserved for a refused frame"
        );
    }

    #[test]
    fn a_worker_cannot_send_request_frames() {
        let mut buf = BytesMut::new();
        encode(&mut buf, &Frame::RequestEnd);
        assert_eq!(
            decode_from_worker(&mut buf),
            Err(WireError::WrongDirection {
                kind: Kind::RequestEnd
            })
        );
    }

    #[test]
    fn unknown_kinds_and_bad_ready_are_errors() {
        let mut buf = BytesMut::from(&[0x7f, 0, 0, 0, 0][..]);
        assert_eq!(
            decode_from_worker(&mut buf),
            Err(WireError::UnknownKind(0x7f))
        );
        let mut buf = BytesMut::from(&[Kind::Ready as u8, 0, 0, 0, 3, 1, 2, 3][..]);
        assert_eq!(
            decode_from_worker(&mut buf),
            Err(WireError::BadReady { len: 3 })
        );
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut whole = BytesMut::new();
        encode(
            &mut whole,
            &Frame::ResponseBody(Bytes::from_static(b"hello")),
        );
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode_from_worker(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(&part[..], &whole[..cut], "partial input was consumed");
        }
    }

    proptest! {
        /// Any byte string decodes to frames, `None` or an error, and never panics;
        /// whatever decodes re-encodes to exactly the bytes it consumed.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&data[..]);
            let before = buf.len();
            if let Ok(Some(frame)) = decode_from_worker(&mut buf) {
                let mut again = BytesMut::new();
                encode(&mut again, &frame);
                prop_assert_eq!(&again[..], &data[..before - buf.len()]);
            }
        }
    }
}
