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
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;
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

use super::process::{watch, Ended, Forked};
use super::WorkerProcess;

// node -> server
const Z_SPAWN: u8 = 0x20;
const Z_RETIRE: u8 = 0x25;
// server -> node
const Z_READY: u8 = 0x21;
const Z_SPAWNED: u8 = 0x22;
const Z_SPAWN_FAILED: u8 = 0x23;
const Z_EXITED: u8 = 0x24;
/// How long a server whose control socket failed is given to exit (how it ended may
/// take longer to be told: [`super::WorkerProcess::wait`]).
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(1);
/// Largest control message either side sends.
const MAX_MESSAGE: usize = 64 << 10;
/// How long a fork may take to be answered.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);

/// A started server process and the node's end of its control socket.
pub struct Launched {
    pub process: WorkerProcess,
    pub ctl: OwnedFd,
}

pub type LaunchFuture = Pin<Box<dyn Future<Output = Result<Launched, ForkServerError>> + Send>>;
/// Starts the server process; called again after it died.
pub type Launch = Arc<dyn Fn() -> LaunchFuture + Send + Sync>;

/// What READY said.
pub type ReadyFields = HashMap<String, String>;

/// Why a fork server did not start, or did not fork.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ForkServerError {
    #[error("it could not be started: {reason}")]
    Launch {
        reason: String,
        /// Stopped from outside on its way (the zygote a template comes from died).
        killed: bool,
    },
    #[error("it exited before READY ({0})")]
    ExitedBeforeReady(Ended),
    #[error("it stopped: it exited ({0})")]
    Exited(Ended),
    #[error("it was retired")]
    Retired,
    #[error("it did not answer a fork within {0:?}")]
    NoAnswer(Duration),
    #[error("{0}")]
    Failed(String),
}

impl ForkServerError {
    /// Whether the server was stopped from outside (killed, or with the zygote that
    /// forked it) rather than failing by itself.
    pub fn killed(&self) -> bool {
        match self {
            ForkServerError::Launch { killed, .. } => *killed,
            ForkServerError::ExitedBeforeReady(ended) | ForkServerError::Exited(ended) => {
                ended.killed()
            }
            ForkServerError::Retired
            | ForkServerError::NoAnswer(_)
            | ForkServerError::Failed(_) => false,
        }
    }
}

/// The node's handle on one fork server; cheap to clone.
#[derive(Clone)]
pub struct ForkServer {
    tx: mpsc::UnboundedSender<Msg>,
    /// Set by [`ForkServer::retire`]: an order that failed may have raced it.
    retired: Arc<AtomicBool>,
}

enum Msg {
    /// Start the server if it is not running; answers once it is ready.
    Start(oneshot::Sender<Result<(), ForkServerError>>),
    Fork(ForkOrder),
    /// No more forks: the server exits once its children did; SIGKILL at the deadline.
    Retire(Instant),
}

struct ForkOrder {
    payload: EnvironWriter,
    fds: Vec<OwnedFd>,
    reply: oneshot::Sender<Result<Forked, ForkServerError>>,
}

impl ForkServer {
    /// Starts the actor (not the process: that waits for the first need). `kind` says
    /// what the server is ("zygote", "template"); `on_ready` sees every READY, for the
    /// log; `start_timeout` bounds the wait for it.
    pub fn new(
        kind: &'static str,
        launch: Launch,
        start_timeout: Duration,
        on_ready: fn(&ReadyFields),
        span: tracing::Span,
    ) -> ForkServer {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            kind,
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
    pub async fn ready(&self) -> Result<(), ForkServerError> {
        let (reply, started) = oneshot::channel();
        self.tx
            .send(Msg::Start(reply))
            .map_err(|_| actor_stopped())?;
        started.await.unwrap_or_else(|_| Err(actor_stopped()))
    }

    /// Asks the (ready) server to fork; `fds` go with the order.
    pub async fn fork(
        &self,
        payload: EnvironWriter,
        fds: Vec<OwnedFd>,
    ) -> Result<Forked, ForkServerError> {
        let (reply, forked) = oneshot::channel();
        let order = ForkOrder {
            payload,
            fds,
            reply,
        };
        self.tx
            .send(Msg::Fork(order))
            .map_err(|_| actor_stopped())?;
        match tokio::time::timeout(FORK_TIMEOUT, forked).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ForkServerError::Failed("it stopped during the fork".into())),
            Err(_) => Err(ForkServerError::NoAnswer(FORK_TIMEOUT)),
        }
    }

    /// Tells the server to exit once its children have; it is killed at `deadline`.
    /// Orders after this one are refused at once.
    pub fn retire(&self, deadline: Instant) {
        self.retired.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Retire(deadline));
    }

    /// Whether `other` is a handle on this same server.
    pub fn is(&self, other: &ForkServer) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Whether [`ForkServer::retire`] was called: an order that failed may have been
    /// refused for that, not for anything wrong with the server.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
}

fn actor_stopped() -> ForkServerError {
    ForkServerError::Failed("its actor stopped".into())
}

struct Actor {
    kind: &'static str,
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
    pending: HashMap<u64, oneshot::Sender<Result<Forked, ForkServerError>>>,
    exits: HashMap<u32, oneshot::Sender<Ended>>,
    /// What the server is, for its children's end ([`Ended::WithItsForkServer`]).
    kind: &'static str,
}

impl Actor {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut server: Option<Running> = None;
        // How the last server ended: a fork ordered after it was ready fails with that.
        let mut last_death: Option<ForkServerError> = None;
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
                        let _ = reply.send(Err(ForkServerError::Retired));
                    }
                    Some(Msg::Fork(order)) if phase != Phase::Open => {
                        let _ = order.reply.send(Err(ForkServerError::Retired));
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
                            let why = last_death.clone().unwrap_or_else(|| {
                                ForkServerError::Failed("it is not running".into())
                            });
                            let _ = order.reply.send(Err(why));
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
                        s.fail_all(&died);
                        break;
                    }
                    tracing::warn!(reason = %died, "fork server stopped; a new one starts on the next need");
                    s.process.kill_group();
                    s.fail_all(&died);
                    last_death = Some(died);
                }
            }
        }
    }

    /// Starts the server and waits for its READY.
    async fn start(&self) -> Result<Running, ForkServerError> {
        let Launched { process, ctl } = (self.launch)().await?;
        let ctl = watch(ctl).map_err(|e| {
            ForkServerError::Failed(format!("cannot watch the control socket: {e}"))
        })?;
        let mut s = Running {
            process,
            ctl,
            next_id: 1,
            pending: HashMap::new(),
            exits: HashMap::new(),
            kind: self.kind,
        };
        let ready = tokio::select! {
            r = tokio::time::timeout(self.start_timeout, recv(&s.ctl)) => match r {
                Ok(Ok(message)) => Ok(message),
                Ok(Err(reason)) => Err(match s.exited_or(reason).await {
                    Ok(ended) => ForkServerError::ExitedBeforeReady(ended),
                    Err(reason) => ForkServerError::Failed(reason),
                }),
                Err(_) => Err(ForkServerError::Failed(format!(
                    "no READY within {:?}",
                    self.start_timeout
                ))),
            },
            ended = s.process.wait() => Err(ForkServerError::ExitedBeforeReady(ended)),
        };
        let result = match ready {
            Ok((Z_READY, fields, _)) => {
                (self.on_ready)(&fields);
                return Ok(s);
            }
            Ok((kind, _, _)) => {
                ForkServerError::Failed(format!("it said 0x{kind:02x} instead of READY"))
            }
            Err(error) => error,
        };
        s.process.kill_group();
        s.process.gone().await;
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
            // Its end is closed: it is on its way out, and the order fails with how it
            // ended, as those in flight do, when the actor sees it go.
            Ok(()) | Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                self.pending.insert(id, order.reply);
            }
            Err(e) => {
                let unreachable = ForkServerError::Failed(format!("cannot reach it: {e}"));
                let _ = order.reply.send(Err(unreachable));
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
            let _ = reply.send(Err(ForkServerError::Retired));
        }
        Phase::Retired(deadline)
    }

    /// The control socket failed for `reason`. A server that dies closes it on its way
    /// out: how it ended, if seen within [`EXIT_AFTER_CLOSE`], says more.
    async fn exited_or(&mut self, reason: String) -> Result<Ended, String> {
        match tokio::time::timeout(EXIT_AFTER_CLOSE, self.process.gone()).await {
            Ok(()) => Ok(self.process.wait().await),
            Err(_) => Err(reason),
        }
    }

    /// Handles messages until the server goes away or breaks the protocol; returns why.
    async fn events(&mut self) -> ForkServerError {
        match self.handle_messages().await {
            Ok(ended) => ForkServerError::Exited(ended),
            Err(reason) => ForkServerError::Failed(format!("it stopped: {reason}")),
        }
    }

    /// Handles messages until the server exits (how) or breaks the protocol (why).
    async fn handle_messages(&mut self) -> Result<Ended, String> {
        loop {
            let message = tokio::select! {
                m = recv(&self.ctl) => m,
                ended = self.process.wait() => return Ok(ended),
            };
            let (kind, fields, mut fds) = match message {
                Ok(m) => m,
                Err(reason) => return self.exited_or(reason).await,
            };
            let number = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
            match kind {
                Z_SPAWNED => {
                    let (Some(id), Some(pid), Some(pidfd), true) =
                        (number("id"), number("pid"), fds.pop(), fds.is_empty())
                    else {
                        return Err("it sent a SPAWNED without id, pid and one pidfd".into());
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
                                let _ = reply.send(Err(ForkServerError::Failed(format!(
                                    "the new process (pid {pid}) exited as soon as it was forked"
                                ))));
                            }
                            continue;
                        }
                        _ => {
                            return Err(format!(
                                "it sent a SPAWNED for pid {pid}, which it did not fork"
                            ))
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
                            let _ = reply.send(Err(ForkServerError::Failed(format!(
                                "cannot watch the worker's pidfd: {e}"
                            ))));
                        }
                    }
                }
                Z_SPAWN_FAILED => {
                    if let Some(reply) = number("id").and_then(|id| self.pending.remove(&id)) {
                        let why = fields.get("error").cloned().unwrap_or_default();
                        let _ = reply.send(Err(ForkServerError::Failed(why)));
                    }
                }
                Z_EXITED => {
                    let pid = number("pid").and_then(|p| u32::try_from(p).ok());
                    let status = fields.get("status").and_then(|s| s.parse().ok());
                    if let (Some(pid), Some(status)) = (pid, status) {
                        if let Some(tx) = self.exits.remove(&pid) {
                            let _ = tx.send(Ended::Status(ExitStatus::from_raw(status)));
                        }
                    }
                }
                other => return Err(format!("it sent an unknown message 0x{other:02x}")),
            }
        }
    }

    /// The server is gone: the forks in flight fail with `why`, and its children died
    /// with it (their parent-death signal), which is all that can be said of their end.
    fn fail_all(self, why: &ForkServerError) {
        for (_, reply) in self.pending {
            let _ = reply.send(Err(why.clone()));
        }
        for (_, exit) in self.exits {
            let _ = exit.send(Ended::WithItsForkServer(self.kind));
        }
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
