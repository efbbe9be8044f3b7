//! One slot's socket, read as frames with a deadline on every wait.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use roost_wire::{decode_from_worker, Frame, WireError};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

/// Why reading a frame from a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("worker closed its slot")]
    Closed,
    /// Its end of the slot closed with bytes the node wrote still unread in it: of a
    /// request written in one packet, the worker then read none (front/exchange.rs).
    #[error("worker closed its slot with a request unread")]
    Unread,
    #[error("worker broke the protocol")]
    Protocol(#[from] WireError),
    #[error("reading from the worker failed")]
    Io(#[source] std::io::Error),
}

impl ConnError {
    /// A reset is how a killed worker's socket ends when what the node wrote was still
    /// unread in it (Linux sets it on the survivor of a Unix socket pair whose other
    /// end closed with data queued): the worker is gone, it broke no protocol.
    fn from_read(e: std::io::Error) -> ConnError {
        match e.kind() {
            std::io::ErrorKind::ConnectionReset => ConnError::Unread,
            _ => ConnError::Io(e),
        }
    }

    /// The worker is gone, one way or the other: the slot is lost, nobody is to blame.
    pub fn is_closed(&self) -> bool {
        matches!(self, ConnError::Closed | ConnError::Unread)
    }
}

/// The node's end of one slot, idle between requests.
#[derive(Debug)]
pub struct SlotConn {
    stream: UnixStream,
    /// Bytes read past the last frame of the previous exchange; a well-behaved worker
    /// leaves none, so a non-empty buffer at check-in ends the worker.
    buf: BytesMut,
    /// Its place among the worker's slots (and inboxes).
    slot: usize,
    /// The last request written to the slot took more than one write (a streamed body,
    /// or frames over one packet). The loader reads what is left of a request after it
    /// answered, so it may still be reading that when the next request is written, and
    /// take part of the next with it: then a worker that dies with bytes unread may
    /// have begun the next all the same.
    split_request: bool,
}

impl SlotConn {
    pub fn new(stream: UnixStream, slot: usize) -> SlotConn {
        SlotConn {
            stream,
            buf: BytesMut::with_capacity(8 << 10),
            slot,
            split_request: false,
        }
    }

    pub fn slot(&self) -> usize {
        self.slot
    }

    pub fn split(self) -> (FrameReader, OwnedWriteHalf) {
        let (read, write) = self.stream.into_split();
        (
            FrameReader {
                half: read,
                buf: self.buf,
                slot: self.slot,
                split_request: self.split_request,
            },
            write,
        )
    }

    pub fn join(reader: FrameReader, writer: OwnedWriteHalf) -> Option<SlotConn> {
        let stream = reader.half.reunite(writer).ok()?;
        Some(SlotConn {
            stream,
            buf: reader.buf,
            slot: reader.slot,
            split_request: reader.split_request,
        })
    }

    /// True if the worker sent bytes nobody asked for.
    pub fn has_stray_bytes(&self) -> bool {
        !self.buf.is_empty()
    }

    pub async fn read_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            if let Some(frame) = decode_from_worker(&mut self.buf)? {
                return Ok(frame);
            }
            let n = tokio::io::AsyncReadExt::read_buf(&mut self.stream, &mut self.buf)
                .await
                .map_err(ConnError::from_read)?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
        }
    }
}

/// The read side of a slot during an exchange.
#[derive(Debug)]
pub struct FrameReader {
    half: OwnedReadHalf,
    buf: BytesMut,
    slot: usize,
    split_request: bool,
}

impl FrameReader {
    /// Records whether the request now sent on the slot goes in more than one write
    /// (one that came through the inbox wrote nothing here), and gives whether the one
    /// before did ([`SlotConn`]'s `split_request`).
    pub fn request_written(&mut self, split: bool) -> bool {
        std::mem::replace(&mut self.split_request, split)
    }

    /// A frame already in the buffer, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Frame>, ConnError> {
        Ok(decode_from_worker(&mut self.buf)?)
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, ConnError>> {
        loop {
            if let Some(frame) = decode_from_worker(&mut self.buf)? {
                return Poll::Ready(Ok(frame));
            }
            match poll_read_buf(Pin::new(&mut self.half), cx, &mut self.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ConnError::Closed)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ConnError::from_read(e))),
            }
        }
    }

    pub async fn next_frame(&mut self) -> Result<Frame, ConnError> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// How the slot ended, once the worker's process is known gone but no read has
    /// said so yet: [`ConnError::Unread`] if the worker's end closed with what the
    /// node wrote still in it, else [`ConnError::Closed`] (also while some other
    /// process, a child it forked, still holds that end). A peek that never waits.
    pub fn after_exit(&self) -> ConnError {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let stream: &UnixStream = self.half.as_ref();
        let mut byte = [0u8; 1];
        match recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Err(nix::errno::Errno::ECONNRESET) => ConnError::Unread,
            _ => ConnError::Closed,
        }
    }

    /// Reads the rest of a response and drops it: its client left. `Err(None)` if the
    /// worker is gone (its slot closed, or `gone` fired); `Err(Some(why))` if it broke
    /// the protocol or did not end the response by `deadline`: it is to be killed.
    pub async fn skip_response(
        &mut self,
        deadline: Instant,
        gone: &CancellationToken,
    ) -> Result<(), Option<String>> {
        let skip = async {
            loop {
                let frame = tokio::select! {
                    frame = self.next_frame() => frame,
                    _ = gone.cancelled() => Err(ConnError::Closed),
                };
                match frame {
                    Ok(Frame::ResponseEnd | Frame::ResponseAbort) => return Ok(()),
                    Ok(Frame::ResponseHead(_) | Frame::ResponseBody(_)) => continue,
                    Ok(other) => return Err(Some(format!("unexpected {:?} frame", other.kind()))),
                    Err(e) if e.is_closed() => return Err(None),
                    Err(e) => return Err(Some(crate::error_chain(&e))),
                }
            }
        };
        tokio::time::timeout_at(deadline, skip)
            .await
            .unwrap_or_else(|_| Err(Some("request_timeout passed after the client left".into())))
    }
}
