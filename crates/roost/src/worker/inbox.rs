//! A slot's inbox: the pipe through which a busy slot is handed its next request, and
//! from which the node can take that request back for as long as no worker read it.
//!
//! Under load a worker that finishes a request and finds the next one already waiting
//! goes on without sleeping; one that finds nothing sleeps, and waking it again costs
//! more than the request itself on a small app (docs/benchmarks.md). So when every slot
//! of a site is busy, a request without a body is posted to the inbox of the slot
//! busy the longest (the pool's "follower"), and the worker reads it once it answered
//! the request before it. Should another slot come free first, the node reads the
//! request back and sends it there instead.
//!
//! The kernel decides who has it: a write of at most `PIPE_BUF` bytes into a pipe is
//! never split, and a read takes what is in the pipe whole, so either the worker has
//! the whole request (and answers it on the slot, after the one it is busy with) or the
//! node's read brings it back untouched and no process has seen any of it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// The largest request an inbox takes: what one write into a pipe keeps whole.
pub const INBOX_MAX: usize = nix::libc::PIPE_BUF;

/// A worker with more slots than this has no inboxes: a worker's descriptors travel in
/// one message to its zygote or template, which carries at most 253.
pub const INBOX_MAX_SLOTS: u32 = 64;

/// The node's ends of one slot's inbox; both non-blocking.
#[derive(Debug)]
pub struct Inbox {
    write: OwnedFd,
    /// The read end the worker has too (the same open pipe): reading it takes a request
    /// back.
    read: OwnedFd,
}

/// What [`Inbox::reclaim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// The request came back whole: no worker has any of it.
    Back,
    /// The worker read it; its answer follows the one it is busy with.
    Taken,
    /// The worker read part of it: it broke the protocol, and the request never
    /// reached it whole.
    Torn,
}

impl Inbox {
    /// A new inbox, and the worker's end of it.
    pub fn new() -> std::io::Result<(Inbox, OwnedFd)> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let worker_end = read.try_clone()?;
        Ok((Inbox { write, read }, worker_end))
    }

    /// True when no request waits in it.
    pub fn is_empty(&self) -> bool {
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Posts a request's frames (at most [`INBOX_MAX`] bytes) into an empty inbox;
    /// false if the pipe did not take them.
    pub fn post(&self, frames: &[u8]) -> bool {
        debug_assert!(frames.len() <= INBOX_MAX);
        matches!(nix::unistd::write(&self.write, frames), Ok(n) if n == frames.len())
    }

    /// Reads back a posted request of `len` bytes, if no worker read it first.
    pub fn reclaim(&self, len: usize) -> Reclaim {
        let mut buf = [0u8; INBOX_MAX + 1];
        match nix::unistd::read(self.read.as_raw_fd(), &mut buf[..len + 1]) {
            Ok(n) if n == len => Reclaim::Back,
            Err(Errno::EAGAIN) => Reclaim::Taken,
            Err(Errno::EINTR) => self.reclaim(len),
            _ => Reclaim::Torn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_comes_back_whole_or_not_at_all() {
        let (inbox, worker_end) = Inbox::new().unwrap();
        assert!(inbox.is_empty());
        assert!(inbox.post(b"first"));
        assert!(!inbox.is_empty());
        assert_eq!(inbox.reclaim(5), Reclaim::Back);
        assert!(inbox.is_empty());

        assert!(inbox.post(b"second"));
        let mut got = [0u8; INBOX_MAX];
        let n = nix::unistd::read(worker_end.as_raw_fd(), &mut got).unwrap();
        assert_eq!(&got[..n], b"second");
        assert_eq!(inbox.reclaim(6), Reclaim::Taken);

        assert!(inbox.post(b"third"));
        nix::unistd::read(worker_end.as_raw_fd(), &mut got[..2]).unwrap();
        assert_eq!(inbox.reclaim(5), Reclaim::Torn);
    }

    #[test]
    fn the_largest_request_goes_in_one_write() {
        let (inbox, _worker_end) = Inbox::new().unwrap();
        let frames = vec![7u8; INBOX_MAX];
        assert!(inbox.post(&frames));
        assert_eq!(inbox.reclaim(INBOX_MAX), Reclaim::Back);
    }
}
