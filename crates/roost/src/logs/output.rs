//! What workers print. A worker's (and a template's) stdout and stderr are the write
//! end of a pipe whose read end the node's output thread holds; the thread copies what
//! arrives into the site's error log ([`ErrorLog`]), within the log's size limit and
//! at its pace. Tenant code never holds a log file: it cannot fill the disk, and a
//! rotated log needs no new workers.
//!
//! The node's own notes on a site's workers come to the same thread as messages. The
//! thread runs a small tokio runtime of its own, so a slow disk stalls the pipes (and
//! the processes printing into them), never the request path. One read buffer serves
//! every pipe; a waiting pipe costs a task, not a buffer.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::error::ErrorLog;

/// Bytes read from a pipe at once (a Linux pipe holds 64 KiB).
const READ_SIZE: usize = 64 << 10;
/// Bytes each read counts against the site's pace, however few it brought: a whole
/// read's worth. An app writing a byte at a time would otherwise cost the node a
/// wake-up, a read and a write per byte (a whole CPU for one busy loop); past its
/// burst a site's pipes are now read at most 64 times a second, and lines printed
/// meanwhile wait in the pipe and come in the next read together.
const READ_CHARGE: usize = READ_SIZE;
/// At the node's stop, how long the thread waits for the pipes of processes that
/// are gone to be read to their end: an orphan of a worker may hold one open.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

enum OutputMessage {
    /// Copy what arrives on this pipe into this log.
    Copy(OwnedFd, Arc<ErrorLog>),
    /// A line of the node's in this log (`ErrorLog::note`).
    Note(Arc<ErrorLog>, String),
    /// Read the pipes to their end (within [`DRAIN_LIMIT`]), then end.
    Stop,
}

/// The node's output thread.
pub struct WorkerOutput {
    tx: mpsc::UnboundedSender<OutputMessage>,
    thread: JoinHandle<()>,
}

/// Makes pipes for one site's processes.
#[derive(Clone)]
pub struct OutputPipes {
    tx: mpsc::UnboundedSender<OutputMessage>,
}

impl WorkerOutput {
    pub fn start() -> std::io::Result<WorkerOutput> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("worker-output".into())
            .spawn(move || runtime.block_on(copy_all(rx)))?;
        Ok(WorkerOutput { tx, thread })
    }

    pub fn pipes(&self) -> OutputPipes {
        OutputPipes {
            tx: self.tx.clone(),
        }
    }

    /// Copies what the pipes still hold, then ends the thread. Blocks until then.
    pub fn stop(self) {
        if self.tx.send(OutputMessage::Stop).is_ok() {
            let _ = self.thread.join();
        }
    }
}

impl OutputPipes {
    /// A new pipe into `log`: the returned end is for a new process's stdout and
    /// stderr (close-on-exec: give it to the child explicitly).
    pub fn open(&self, log: Arc<ErrorLog>) -> std::io::Result<OwnedFd> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        self.tx
            .send(OutputMessage::Copy(read, log))
            .map_err(|_| std::io::Error::other("the node is stopping"))?;
        Ok(write)
    }

    /// Writes a line of the node's into `log` on the output thread, so that a slow
    /// disk never holds up the thread that noticed what the line says.
    pub fn note(&self, log: Arc<ErrorLog>, message: String) {
        // Sent after the node's stop: no site is left to read it.
        let _ = self.tx.send(OutputMessage::Note(log, message));
    }

    /// Pipes that lead nowhere: [`OutputPipes::open`] fails (tests of other modules).
    #[cfg(test)]
    pub fn detached() -> OutputPipes {
        OutputPipes {
            tx: mpsc::unbounded_channel().0,
        }
    }
}

async fn copy_all(mut rx: mpsc::UnboundedReceiver<OutputMessage>) {
    let readers = TaskTracker::new();
    while let Some(message) = rx.recv().await {
        match message {
            OutputMessage::Copy(read, log) => {
                readers.spawn(copy(read, log));
            }
            OutputMessage::Note(log, message) => log.note(&message),
            OutputMessage::Stop => break,
        }
    }
    readers.close();
    let _ = tokio::time::timeout(DRAIN_LIMIT, readers.wait()).await;
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_SIZE]);
}

/// Copies one pipe into `log` until every process holding its write end is gone.
async fn copy(read: OwnedFd, log: Arc<ErrorLog>) {
    let fail = |e: std::io::Error| {
        tracing::error!(log = %log.path().display(), error = %e, "cannot read a worker's output any more; it is lost");
    };
    let mut pipe = match pipe::Receiver::from_owned_fd(read) {
        Ok(pipe) => pipe,
        Err(e) => return fail(e),
    };
    loop {
        let wait = match copy_while_allowed(&pipe, &log).await {
            Ok(Some(wait)) => wait,
            Ok(None) => return,
            Err(e) => return fail(e),
        };
        // Out of the reactor while it waits: each write into a watched pipe wakes its
        // watcher, so an app writing a byte at a time would cost the node a wake-up
        // per byte even though nobody reads.
        let fd = match pipe.into_nonblocking_fd() {
            Ok(fd) => fd,
            Err(e) => return fail(e),
        };
        tokio::time::sleep(wait).await;
        pipe = match pipe::Receiver::from_owned_fd_unchecked(fd) {
            Ok(pipe) => pipe,
            Err(e) => return fail(e),
        };
    }
}

/// Copies what arrives until the site's pace asks for a wait (returned), or the pipe
/// ends (`None`).
async fn copy_while_allowed(
    pipe: &pipe::Receiver,
    log: &ErrorLog,
) -> std::io::Result<Option<Duration>> {
    loop {
        pipe.readable().await?;
        // No await while the buffer is borrowed: the copy is one synchronous step.
        let copied = BUFFER.with_borrow_mut(|buffer| {
            let n = pipe.try_read(buffer)?;
            if n > 0 {
                log.write(&buffer[..n]);
            }
            Ok::<_, std::io::Error>(n)
        });
        let n = match copied {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let wait = log.pace(n.max(READ_CHARGE));
        if !wait.is_zero() {
            return Ok(Some(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn what_is_printed_reaches_the_log_and_the_stop_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        let log = Arc::new(ErrorLog::new(path.clone(), 1 << 20));
        let output = WorkerOutput::start().unwrap();
        let pipes = output.pipes();
        let mut first = std::fs::File::from(pipes.open(log.clone()).unwrap());
        let mut second = std::fs::File::from(pipes.open(log).unwrap());
        first.write_all(b"one\n").unwrap();
        second.write_all(b"two\n").unwrap();
        drop((first, second));
        output.stop();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("one\n") && text.contains("two\n"), "{text:?}");
        assert_eq!(text.len(), 8);
        assert!(pipes.open(Arc::new(ErrorLog::new(path, 1 << 20))).is_err());
    }
}
