//! A slot's inbox: the pipe through which a busy slot is handed the requests that
//! follow the one it is busy with, and from which the node can take them back for as
//! long as no worker read them.
//!
//! Under load a worker that finishes a request and finds the next one already waiting
//! goes on without sleeping; one that finds nothing sleeps, and waking it again costs
//! more than the request itself on a small app (docs/benchmarks.md). So when every slot
//! of a site is busy, a request without a body is posted to the inbox of a busy slot
//! (the pool's "follower"), and the worker reads it once it answered the requests before
//! it. Should another slot come free first, the node reads one back and sends it there.
//!
//! The kernel decides who has a request. The pipe is in packet mode (`O_DIRECT`): a
//! write of at most `PIPE_BUF` bytes is one packet, and a read takes one packet whole,
//! so a request is either with the worker whole or in the pipe untouched. Both read
//! the packets in the order they were written, and each packet ends with a tag the
//! node chose: the packet the node reads back is the oldest no worker took, and every
//! packet posted before it is with the worker.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;

/// The tag that ends every packet, so the node can tell which request it read back.
pub const TAG_LEN: usize = 8;

/// The largest request an inbox takes: what one packet of a pipe holds, but the tag.
pub const INBOX_MAX: usize = nix::libc::PIPE_BUF - TAG_LEN;

/// How many requests may wait in an inbox besides the one its slot is busy with: the
/// worker then answers bursts of up to eight without sleeping between them
/// (docs/benchmarks.md, "Ninth session"). A pipe holds sixteen packets.
pub const INBOX_DEPTH: usize = 8;

/// Only a worker of one slot has an inbox. A threaded worker's threads share one
/// interpreter lock, and one that finds its next request waiting keeps the lock while
/// its siblings' requests wait: with followers, Flask on four threads had a canary p99
/// of 20–82 ms under load, against 10 ms without (docs/benchmarks.md, "Ninth session").
pub fn has_inbox(slots: u32) -> bool {
    slots == 1
}

/// Packets a pipe holds at the kernel's default size: an inbox the node filled never
/// holds more, so a read back stops past it (a worker could enlarge its pipe and keep
/// writing into it).
const PIPE_PACKETS: usize = 16;

/// The node's ends of one slot's inbox; both non-blocking.
#[derive(Debug)]
pub struct Inbox {
    write: OwnedFd,
    /// The read end the worker has too (the same open pipe): reading it takes a request
    /// back.
    read: OwnedFd,
}

/// One request posted to an inbox, as the node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub tag: u64,
    /// Its length in the pipe, tag included: bytes a worker wrote into the pipe run
    /// together with the next packet, and change its length.
    pub len: usize,
}

/// What one read back found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadBack {
    /// Nothing: the worker took every request posted.
    Empty,
    /// The oldest request no worker took.
    Packet(Packet),
    /// A packet the node did not write: the worker wrote into its own inbox.
    Foreign,
}

impl Inbox {
    /// A new inbox, and the worker's end of it.
    pub fn new() -> std::io::Result<(Inbox, OwnedFd)> {
        let flags = OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_DIRECT;
        let (read, write) = nix::unistd::pipe2(flags)?;
        let worker_end = read.try_clone()?;
        Ok((Inbox { write, read }, worker_end))
    }

    /// Posts a request's frames (at most [`INBOX_MAX`] bytes) and its tag as one packet;
    /// false if the pipe did not take them.
    pub fn post(&self, frames: &[u8], tag: u64) -> bool {
        debug_assert!(frames.len() <= INBOX_MAX);
        let tag = tag.to_be_bytes();
        let iov = [IoSlice::new(frames), IoSlice::new(&tag)];
        matches!(nix::sys::uio::writev(&self.write, &iov), Ok(n) if n == frames.len() + TAG_LEN)
    }

    /// Bytes in the pipe now: the packets no worker took yet (the node reads nothing
    /// meanwhile, and the worker can only take from the front). `None` if the kernel
    /// would not say.
    #[allow(unsafe_code)] // nix has no FIONREAD
    pub fn queued(&self) -> Option<usize> {
        let mut n: nix::libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which lives meanwhile.
        let rc = unsafe { nix::libc::ioctl(self.read.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
        (rc == 0).then(|| usize::try_from(n).ok()).flatten()
    }

    /// Reads back the oldest request no worker took.
    pub fn read_back(&self) -> ReadBack {
        let mut buf = [0u8; nix::libc::PIPE_BUF];
        loop {
            return match nix::unistd::read(self.read.as_raw_fd(), &mut buf) {
                Ok(n) if n > TAG_LEN => {
                    let tag: [u8; TAG_LEN] = buf[n - TAG_LEN..n].try_into().expect("TAG_LEN");
                    ReadBack::Packet(Packet {
                        tag: u64::from_be_bytes(tag),
                        len: n,
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(_) => ReadBack::Empty,
                Ok(_) => ReadBack::Foreign,
            };
        }
    }

    /// Reads back every request no worker took, oldest first; stops at what a pipe
    /// can hold.
    pub fn read_back_all(&self) -> Result<Vec<Packet>, Foreign> {
        let mut packets = Vec::new();
        while packets.len() <= PIPE_PACKETS {
            match self.read_back() {
                ReadBack::Empty => return Ok(packets),
                ReadBack::Packet(p) => packets.push(p),
                ReadBack::Foreign => return Err(Foreign),
            }
        }
        Err(Foreign)
    }
}

/// An inbox held what the node never posted.
#[derive(Debug, PartialEq, Eq)]
pub struct Foreign;

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_reads(worker_end: &OwnedFd, buf: &mut [u8]) -> Vec<u8> {
        let n = nix::unistd::read(worker_end.as_raw_fd(), buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn requests_come_back_whole_in_order_by_their_tags() {
        let (inbox, worker_end) = Inbox::new().unwrap();
        assert_eq!(inbox.read_back(), ReadBack::Empty);
        for (tag, r) in [&b"first"[..], b"second", b"third"].iter().enumerate() {
            assert!(inbox.post(r, tag as u64));
        }
        assert_eq!(inbox.queued(), Some(5 + 6 + 5 + 3 * TAG_LEN));
        let mut buf = [0u8; 4096];
        // One read takes one request and its tag, however large the buffer.
        assert_eq!(
            worker_reads(&worker_end, &mut buf),
            b"first\0\0\0\0\0\0\0\0"
        );
        assert_eq!(inbox.queued(), Some(6 + 5 + 2 * TAG_LEN));
        let packet = |tag, len| Packet {
            tag,
            len: len + TAG_LEN,
        };
        assert_eq!(inbox.read_back(), ReadBack::Packet(packet(1, 6)));
        assert_eq!(inbox.read_back_all(), Ok(vec![packet(2, 5)]));
        assert_eq!(inbox.queued(), Some(0));

        // A worker that reads part of one loses the rest: the node never sees half.
        assert!(inbox.post(b"fourth", 3));
        assert!(inbox.post(b"fifth", 4));
        assert_eq!(worker_reads(&worker_end, &mut buf[..2]), b"fo");
        assert_eq!(inbox.read_back_all(), Ok(vec![packet(4, 5)]));
    }

    #[test]
    fn the_largest_request_goes_in_one_packet_and_depth_fits() {
        let (inbox, _worker_end) = Inbox::new().unwrap();
        let frames = vec![7u8; INBOX_MAX];
        for tag in 0..=INBOX_DEPTH as u64 {
            assert!(inbox.post(&frames, tag));
        }
        let back = inbox.read_back_all().unwrap();
        let tags: Vec<u64> = back.iter().map(|p| p.tag).collect();
        assert_eq!(tags, (0..=INBOX_DEPTH as u64).collect::<Vec<_>>());
        assert!(back.iter().all(|p| p.len == INBOX_MAX + TAG_LEN));
    }

    #[test]
    fn what_a_worker_writes_into_its_inbox_shows() {
        let (inbox, worker_end) = Inbox::new().unwrap();
        // A worker of the node's own user can reopen its end for writing through
        // /proc, without packet mode: its bytes run together with the next packet.
        let path = format!("/proc/self/fd/{}", worker_end.as_raw_fd());
        let forged = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        nix::unistd::write(&forged, b"junk").unwrap();
        assert!(inbox.post(b"x", 5));
        let merged = Packet {
            tag: 5,
            len: 4 + 1 + TAG_LEN,
        };
        assert_eq!(inbox.read_back(), ReadBack::Packet(merged));
        nix::unistd::write(&forged, b"short").unwrap();
        assert_eq!(inbox.read_back(), ReadBack::Foreign);
        // Nor can a worker that enlarged its pipe keep the node reading.
        let bigger = nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20);
        nix::fcntl::fcntl(inbox.write.as_raw_fd(), bigger).unwrap();
        for _ in 0..2 * PIPE_PACKETS {
            assert!(inbox.post(b"x", 1));
        }
        assert_eq!(inbox.read_back_all(), Err(Foreign));
    }
}
