//! The supervisor ⇄ worker wire of roost: a pure codec, no runtime, no I/O.
//!
//! Every slot of a worker is one Unix stream socket. Over it the node sends one request
//! at a time and the worker answers it. Both directions are a sequence of frames:
//!
//! ```text
//! +------+----------------+-----------------+
//! | kind | length (u32 BE)| payload (length) |
//! +------+----------------+-----------------+
//! ```
//!
//! The worker speaks first on every slot with [`Frame::Ready`], which carries the
//! protocol version; the node refuses any other version. `docs/protocol.md` describes
//! every frame; the loader (`crates/roost/python/loader.py`) implements the worker side.
//!
//! Frames from a worker are untrusted: the decoder checks the kind and the length
//! against a per-kind maximum *before* it allocates anything, and never panics on any
//! input (it is fuzzed). This crate must stay free of I/O so that the fuzzer, the node
//! and the tests all share one implementation.

mod environ;
mod frame;
mod response;

pub use environ::{EnvironError, EnvironWriter};
pub use frame::{
    decode_from_node, decode_from_worker, encode, encode_header, Frame, Kind, Ready, WireError,
    FRAME_HEADER_LEN, MAX_BODY_CHUNK, MAX_FATAL, MAX_REQUEST_HEAD, MAX_RESPONSE_HEAD,
    PROTOCOL_VERSION,
};
pub use response::{ResponseHead, ResponseHeadError, MAX_RESPONSE_HEADERS};
