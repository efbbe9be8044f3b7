//! A fork server: a Python process that forks workers on the node's order over a
//! SOCK_SEQPACKET control socket. Two kinds exist: a runtime's zygote (`zygote.rs`, the
//! node's own code with the node's rights) and a site's template (`template.rs`, running
//! the tenant's code as the site user). Both speak the same messages (docs/protocol.md),
//! and both are treated as untrusted: every message is bounded and checked, and a
//! forked pid is accepted only if the server really is its parent.
//!
//! One actor task per server owns the process and the socket. It starts the process on
//! first need and waits for READY; forks are matched to their answers by id; a server
//! that dies fails the forks in flight at once, and the next need starts a new one.

use std::collections::HashMap;
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use roost_wire::EnvironWriter;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::process::{watch, Forked};
use super::WorkerProcess;

// node -> server
const Z_SPAWN: u8 = 0x20;
const Z_RETIRE: u8 = 0x25;
// server -> node
const Z_READY: u8 = 0x21;
const Z_SPAWNED: u8 = 0x22;
const Z_SPAWN_FAILED: u8 = 0x23;
const Z_EXITED: u8 = 0x24;
/// Largest control message either side sends.
const MAX_MESSAGE: usize = 64 << 10;
/// How long a fork may take to be answered.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// What an order to a retired server gets, at once.
const RETIRED: &str = "it was retired";

/// A started server process and the node's end of its control socket.
pub struct Launched {
    pub process: WorkerProcess,
    pub ctl: OwnedFd,
}

pub type LaunchFuture = Pin<Box<dyn Future<Output = Result<Launched, String>> + Send>>;
/// Starts the server process; called again after it died.
pub type Launch = Arc<dyn Fn() -> LaunchFuture + Send + Sync>;

/// What READY said.
pub type ReadyFields = HashMap<String, String>;

/// The node's handle on one fork server; cheap to clone.
#[derive(Clone)]
pub struct ForkServer {
    tx: mpsc::UnboundedSender<Msg>,
    /// Set by [`ForkServer::retire`]: an order that failed may have raced it.
    retired: Arc<AtomicBool>,
}

enum Msg {
    /// Start the server if it is not running; answers once it is ready.
    Start(oneshot::Sender<Result<(), String>>),
    Fork(ForkOrder),
    /// No more forks: the server exits once its children did; SIGKILL at the deadline.
    Retire(Instant),
}

struct ForkOrder {
    payload: EnvironWriter,
    fds: Vec<OwnedFd>,
    reply: oneshot::Sender<Result<Forked, String>>,
}

impl ForkServer {
    /// Starts the actor (not the process: that waits for the first need).
    /// `on_ready` sees every READY, for the log; `start_timeout` bounds the wait for it.
    pub fn new(
        launch: Launch,
        start_timeout: Duration,
        on_ready: fn(&ReadyFields),
        span: tracing::Span,
    ) -> ForkServer {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            launch,
            start_timeout,
            on_ready,
        };
        tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
        ForkServer {
            tx,
            retired: Arc::default(),
        }
    }

    /// Starts the process if needed and waits until it is ready.
    pub async fn ready(&self) -> Result<(), String> {
        let (reply, started) = oneshot::channel();
        self.tx
            .send(Msg::Start(reply))
            .map_err(|_| "its actor stopped".to_string())?;
        started
            .await
            .unwrap_or_else(|_| Err("its actor stopped".into()))
    }

    /// Asks the (ready) server to fork; `fds` go with the order.
    pub async fn fork(&self, payload: EnvironWriter, fds: Vec<OwnedFd>) -> Result<Forked, String> {
        let (reply, forked) = oneshot::channel();
        self.tx
            .send(Msg::Fork(ForkOrder {
                payload,
                fds,
                reply,
            }))
            .map_err(|_| "its actor stopped".to_string())?;
        match tokio::time::timeout(FORK_TIMEOUT, forked).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("it stopped during the fork".into()),
            Err(_) => Err(format!("no answer within {FORK_TIMEOUT:?}")),
        }
    }

    /// Tells the server to exit once its children have; it is killed at `deadline`.
    /// Orders after this one are refused at once.
    pub fn retire(&self, deadline: Instant) {
        self.retired.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Retire(deadline));
    }

    /// Whether [`ForkServer::retire`] was called: an order that failed may have been
    /// refused for that, not for anything wrong with the server.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
}

struct Actor {
    launch: Launch,
    start_timeout: Duration,
    on_ready: fn(&ReadyFields),
}

/// Where the actor is in the server's life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Takes orders.
    Open,
    /// Told to exit once its children have; killed if still there at the deadline.
    Retired(Instant),
    /// Killed at its deadline; only its death is awaited.
    Killed,
}

struct Running {
    process: WorkerProcess,
    ctl: AsyncFd<OwnedFd>,
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Result<Forked, String>>>,
    exits: HashMap<u32, oneshot::Sender<i32>>,
}

impl Actor {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut server: Option<Running> = None;
        let mut phase = Phase::Open;
        let mut orphaned = false;
        loop {
            tokio::select! {
                msg = rx.recv(), if !orphaned => match msg {
                    // Every handle is gone: nobody can ask for forks any more.
                    None => {
                        orphaned = true;
                        match &mut server {
                            Some(s) if phase == Phase::Open => {
                                phase = s.retire(Instant::now() + FORK_TIMEOUT)
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    // Orders that were on their way when the server was retired (a
                    // spawn in flight as its last site went) are refused at once, not
                    // left unread until the server has gone.
                    Some(Msg::Start(reply)) if phase != Phase::Open => {
                        let _ = reply.send(Err(RETIRED.into()));
                    }
                    Some(Msg::Fork(order)) if phase != Phase::Open => {
                        let _ = order.reply.send(Err(RETIRED.into()));
                    }
                    Some(Msg::Retire(_)) if phase != Phase::Open => {}
                    Some(Msg::Start(reply)) => {
                        if server.is_none() {
                            match self.start().await {
                                Ok(s) => server = Some(s),
                                Err(reason) => {
                                    let _ = reply.send(Err(reason));
                                    continue;
                                }
                            }
                        }
                        let _ = reply.send(Ok(()));
                    }
                    Some(Msg::Fork(order)) => match &mut server {
                        Some(s) => s.send(order),
                        None => {
                            let _ = order.reply.send(Err("it is not running".into()));
                        }
                    },
                    Some(Msg::Retire(deadline)) => match &mut server {
                        Some(s) => phase = s.retire(deadline),
                        None => break,
                    },
                },
                _ = async {
                    match phase {
                        Phase::Retired(deadline) => tokio::time::sleep_until(deadline).await,
                        _ => std::future::pending().await,
                    }
                } => {
                    if let Some(s) = &server {
                        tracing::warn!(pid = s.process.pid(), "retired fork server still running at its deadline; killing it");
                        s.process.kill_group();
                    }
                    phase = Phase::Killed;
                }
                died = async {
                    match &mut server {
                        Some(s) => s.events().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let s = server.take().expect("events only run with a server");
                    if phase != Phase::Open {
                        tracing::debug!(reason = %died, "retired fork server exited");
                        break;
                    }
                    tracing::warn!(reason = %died, "fork server stopped; a new one starts on the next need");
                    s.process.kill_group();
                    s.fail_all(&died);
                }
            }
        }
    }

    /// Starts the server and waits for its READY.
    async fn start(&self) -> Result<Running, String> {
        let Launched { process, ctl } = (self.launch)().await?;
        let ctl = watch(ctl).map_err(|e| format!("cannot watch the control socket: {e}"))?;
        let mut s = Running {
            process,
            ctl,
            next_id: 1,
            pending: HashMap::new(),
            exits: HashMap::new(),
        };
        let ready = tokio::select! {
            r = tokio::time::timeout(self.start_timeout, recv(&s.ctl)) => r
                .unwrap_or_else(|_| Err(format!("no READY within {:?}", self.start_timeout))),
            status = s.process.wait() => Err(match status {
                Some(status) => format!("it exited before READY ({status})"),
                None => "it exited before READY".into(),
            }),
        };
        let result = match ready {
            Ok((Z_READY, fields, _)) => {
                (self.on_ready)(&fields);
                return Ok(s);
            }
            Ok((kind, _, _)) => format!("it said 0x{kind:02x} instead of READY"),
            Err(reason) => reason,
        };
        s.process.kill_group();
        let _ = s.process.wait().await;
        Err(result)
    }
}

impl Running {
    fn send(&mut self, order: ForkOrder) {
        let id = self.next_id;
        self.next_id += 1;
        let mut head = EnvironWriter::with_capacity(16);
        head.push("id", id.to_string().as_bytes())
            .expect("digits have no NUL");
        let mut message = vec![Z_SPAWN];
        message.extend_from_slice(&head.finish());
        message.push(0);
        message.extend_from_slice(&order.payload.finish());
        match self.send_message(&message, &order.fds) {
            Ok(()) => {
                self.pending.insert(id, order.reply);
            }
            Err(e) => {
                let _ = order.reply.send(Err(format!("cannot reach it: {e}")));
            }
        }
        // The descriptors are the server's now (or nobody's): ours close here.
        drop(order.fds);
    }

    fn send_message(&self, message: &[u8], fds: &[OwnedFd]) -> nix::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            self.ctl.get_ref().as_raw_fd(),
            &[IoSlice::new(message)],
            if raw.is_empty() { &[] } else { &rights },
            MsgFlags::empty(),
            None,
        )
        .map(drop)
    }

    /// Sends RETIRE; the actor kills the server if it is still there at `deadline`.
    fn retire(&mut self, deadline: Instant) -> Phase {
        if self.send_message(&[Z_RETIRE], &[]).is_err() {
            self.process.kill_group();
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(RETIRED.into()));
        }
        Phase::Retired(deadline)
    }

    /// Handles messages until the server goes away or breaks the protocol; returns why.
    async fn events(&mut self) -> String {
        loop {
            let message = tokio::select! {
                m = recv(&self.ctl) => m,
                status = self.process.wait() => {
                    return match status {
                        Some(s) => format!("it exited ({s})"),
                        None => "it exited".into(),
                    };
                }
            };
            let (kind, fields, mut fds) = match message {
                Ok(m) => m,
                Err(reason) => return reason,
            };
            let number = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
            match kind {
                Z_SPAWNED => {
                    let (Some(id), Some(pid), Some(pidfd), true) =
                        (number("id"), number("pid"), fds.pop(), fds.is_empty())
                    else {
                        return "it sent a SPAWNED without id, pid and one pidfd".into();
                    };
                    let pid = match u32::try_from(pid) {
                        Ok(pid) if is_child(&pidfd, pid, self.process.pid()) => pid,
                        // Gone (and reaped) before it could be checked: the child died
                        // at once, a worker's start failing early or killed; no lie
                        // can hurt through a process that is no more. Taking it for one
                        // killed the server, and a zygote's workers, of every site on
                        // its interpreter, with it.
                        _ if has_exited(&pidfd) => {
                            if let Some(reply) = self.pending.remove(&id) {
                                let _ = reply.send(Err(format!(
                                    "the new process (pid {pid}) exited as soon as it was forked"
                                )));
                            }
                            continue;
                        }
                        _ => {
                            return format!(
                                "it sent a SPAWNED for pid {pid}, which it did not fork"
                            )
                        }
                    };
                    let Some(reply) = self.pending.remove(&id) else {
                        continue;
                    };
                    let (tx, rx) = oneshot::channel();
                    match watch(pidfd) {
                        Ok(pidfd) => {
                            self.exits.insert(pid, tx);
                            let _ = reply.send(Ok(Forked {
                                pid,
                                pidfd,
                                status: Some(rx),
                            }));
                        }
                        Err(e) => {
                            let _ =
                                reply.send(Err(format!("cannot watch the worker's pidfd: {e}")));
                        }
                    }
                }
                Z_SPAWN_FAILED => {
                    if let Some(reply) = number("id").and_then(|id| self.pending.remove(&id)) {
                        let why = fields.get("error").cloned().unwrap_or_default();
                        let _ = reply.send(Err(why));
                    }
                }
                Z_EXITED => {
                    let pid = number("pid").and_then(|p| u32::try_from(p).ok());
                    let status = fields.get("status").and_then(|s| s.parse().ok());
                    if let (Some(pid), Some(status)) = (pid, status) {
                        if let Some(tx) = self.exits.remove(&pid) {
                            let _ = tx.send(status);
                        }
                    }
                }
                other => return format!("it sent an unknown message 0x{other:02x}"),
            }
        }
    }

    fn fail_all(self, why: &str) {
        for (_, reply) in self.pending {
            let _ = reply.send(Err(format!("it stopped: {why}")));
        }
        // Its children died with it (their parent-death signal); their pidfds say so.
    }
}

/// Whether `pidfd` refers to `pid` and `parent` forked it: a server may only hand the
/// node processes of its own, never one it merely can see (pidfd_open needs no rights).
fn is_child(pidfd: &OwnedFd, pid: u32, parent: u32) -> bool {
    let fdinfo = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
    let refers = std::fs::read_to_string(fdinfo).is_ok_and(|text| {
        text.lines()
            .filter_map(|l| l.strip_prefix("Pid:"))
            .any(|v| v.trim().parse() == Ok(pid))
    });
    refers && parent_of(pid) == Some(parent)
}

/// Whether the process of `pidfd` has exited (a pidfd turns readable then).
fn has_exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// The parent pid from /proc/<pid>/stat (its 4th field, after the command's parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// A SOCK_SEQPACKET pair: the node's end non-blocking, the server's blocking; both
/// close-on-exec (the server's end is placed on its fd 3 by dup2, which clears it).
pub fn control_pair() -> Result<(OwnedFd, OwnedFd), String> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| format!("fcntl: {e}"))?;
    Ok((ours, theirs))
}

/// One control message: its kind, its fields, and any descriptors it carried.
async fn recv(
    ctl: &AsyncFd<OwnedFd>,
) -> Result<(u8, HashMap<String, String>, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut guard = ctl
            .readable()
            .await
            .map_err(|e| format!("control socket: {e}"))?;
        let received = guard.try_io(|fd| {
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                fd.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            Ok((msg.bytes, fds))
        });
        let (len, fds) = match received {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(format!("control socket: {e}")),
            Err(_would_block) => continue,
        };
        if len == 0 {
            return Err("it closed its control socket".into());
        }
        let fields = EnvironWriter::parse(&buf[1..len])
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        return Ok((buf[0], fields, fds));
    }
}
