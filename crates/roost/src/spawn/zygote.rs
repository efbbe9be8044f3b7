//! Zygote spawn: one warm, preloaded Python process per interpreter forks the workers.
//!
//! The zygote is the loader in zygote mode (`python -I loader.py zygote`), started on
//! first need as the node's user (root on a shared host) with a SOCK_SEQPACKET control
//! socket on fd 3. Per worker the node sends one SPAWN message carrying the site's
//! identity, limits and entry point, with the worker's log, cgroup and slot descriptors
//! attached (SCM_RIGHTS). The zygote forks; the child does the tenant steps of
//! docs/security.md and only then imports the app; the zygote answers SPAWNED with the
//! child's pid and a pidfd, through which the node watches a process it did not fork.
//! The zygote reaps its children and reports each exit status (EXITED).
//!
//! A zygote that dies is started again on the next need; spawns in flight fail at once.
//! An interpreter whose zygote cannot start (python older than 3.9) falls back to plain
//! spawn. Messages: docs/protocol.md.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use roost_wire::EnvironWriter;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use super::child::{ChildPlan, WORKER_NOFILE};
use super::plain::{entry_args, into_tokio, slot_pairs, PlainSpawner};
use super::prepare::{prepare, SpawnConfig};
use super::process::{watch, Forked};
use super::{Spawn, SpawnError, SpawnFuture, SpawnRequest, SpawnedWorker, WorkerProcess};

const Z_SPAWN: u8 = 0x20;
const Z_READY: u8 = 0x21;
const Z_SPAWNED: u8 = 0x22;
const Z_SPAWN_FAILED: u8 = 0x23;
const Z_EXITED: u8 = 0x24;
/// Largest control message either side sends.
const MAX_MESSAGE: usize = 64 << 10;
/// How long a zygote may take to preload, and a fork to be answered.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const FORK_TIMEOUT: Duration = Duration::from_secs(10);

/// Forks workers from one zygote per interpreter; plain spawn where none can run.
pub struct ZygoteSpawner {
    config: SpawnConfig,
    plain: PlainSpawner,
    /// One zygote per runtime → its actor, or why it has none.
    zygotes: Mutex<HashMap<ZygoteKey, Runtime>>,
}

/// What makes two sites share a zygote: the interpreter it runs and what it preloads.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ZygoteKey {
    python: PathBuf,
    preload: Vec<String>,
}

impl ZygoteKey {
    fn of(site: &roost_registry::Site) -> Result<ZygoteKey, SpawnError> {
        if let Some(runtime) = &site.runtime {
            // A named runtime: its own python (its venv's, so its packages are seen).
            // The zygote execs the link in the runtime's venv: the folders holding the
            // link must be as trusted as the interpreter it points to.
            return Ok(ZygoteKey {
                python: runtime.executable(),
                preload: runtime.preload.clone(),
            });
        }
        // A virtualenv's python is a link to its base interpreter: one zygote serves
        // every site on that interpreter; the venv is layered in the child.
        let python = site
            .python
            .canonicalize()
            .map_err(|source| SpawnError::Exec {
                python: site.python.clone(),
                source,
            })?;
        Ok(ZygoteKey {
            python,
            preload: Vec::new(),
        })
    }
}

#[derive(Clone)]
enum Runtime {
    Zygote(mpsc::UnboundedSender<Msg>),
    /// Its zygote could not start; workers are spawned plainly.
    Plain,
}

enum Msg {
    /// Start the zygote if it is not running; answers once it is ready.
    Start(oneshot::Sender<Result<(), String>>),
    Spawn(SpawnOrder),
}

struct SpawnOrder {
    payload: EnvironWriter,
    fds: Vec<OwnedFd>,
    reply: oneshot::Sender<Result<Forked, String>>,
}

impl ZygoteSpawner {
    pub fn new(config: SpawnConfig) -> ZygoteSpawner {
        ZygoteSpawner {
            plain: PlainSpawner::new(config.clone()),
            config,
            zygotes: Mutex::new(HashMap::new()),
        }
    }

    fn runtime(&self, key: &ZygoteKey) -> Runtime {
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        zygotes
            .entry(key.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let python = key.python.clone();
                let mut config = self.config.clone();
                config.preload.extend(key.preload.iter().cloned());
                let actor = ZygoteActor {
                    python: python.clone(),
                    config,
                };
                let span = tracing::info_span!("zygote", python = %python.display());
                tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
                Runtime::Zygote(tx)
            })
            .clone()
    }

    fn is_plain(&self, key: &ZygoteKey) -> bool {
        let zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        matches!(zygotes.get(key), Some(Runtime::Plain))
    }

    fn mark_plain(&self, key: &ZygoteKey) {
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        zygotes.insert(key.clone(), Runtime::Plain);
    }

    async fn fork(
        &self,
        request: SpawnRequest<'_>,
        key: ZygoteKey,
    ) -> Result<SpawnedWorker, SpawnError> {
        let python = key.python.clone();
        let zygote_err = |reason: String| SpawnError::Zygote {
            python: python.clone(),
            reason,
        };
        if self.is_plain(&key) {
            return self.plain.spawn_now(request);
        }
        let trusted = trusted_interpreter(&key.python).and_then(|()| match &request.site.runtime {
            // The zygote imports the runtime's packages with the node's rights.
            Some(rt) => trusted_packages(rt),
            None => Ok(()),
        });
        if let Err(why) = trusted {
            // The zygote runs with the node's rights: never on an interpreter a tenant
            // could have written. Plain spawn execs it only after dropping to the site
            // user, which is safe.
            tracing::warn!(site = %request.site.name, python = %key.python.display(), %why, "no zygote for an untrusted interpreter; spawning its workers plainly");
            self.mark_plain(&key);
            return self.plain.spawn_now(request);
        }
        let tx = match self.runtime(&key) {
            Runtime::Plain => return self.plain.spawn_now(request),
            Runtime::Zygote(tx) => tx,
        };
        let (ready, started) = oneshot::channel();
        tx.send(Msg::Start(ready))
            .map_err(|_| zygote_err("its actor stopped".into()))?;
        match started.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::warn!(python = %python.display(), %reason, "no zygote for this interpreter; spawning its workers plainly");
                self.mark_plain(&key);
                return self.plain.spawn_now(request);
            }
            Err(_) => return Err(zygote_err("its actor stopped".into())),
        }

        let site = request.site;
        let prepared = prepare(&self.config, &request)?;
        let (node_ends, worker_ends) = slot_pairs(request.slots)?;
        let cgroup_fds = request.cgroup.open_procs()?;
        let (kind, target) = entry_args(&site.entry);
        let mut payload = EnvironWriter::with_capacity(1024);
        let mut fields: Vec<(String, String)> = vec![
            ("cgroups".into(), cgroup_fds.len().to_string()),
            ("slots".into(), worker_ends.len().to_string()),
            ("nofile".into(), WORKER_NOFILE.to_string()),
            ("kind".into(), kind.into()),
            ("target".into(), target),
            ("directory".into(), site.directory.display().to_string()),
        ];
        if let Some(id) = &prepared.identity {
            fields.push(("uid".into(), id.uid.to_string()));
            fields.push(("gid".into(), id.gid.to_string()));
        }
        if site.interpreter.is_dir() {
            fields.push(("venv".into(), site.interpreter.display().to_string()));
        }
        fields.extend(
            prepared
                .env
                .iter()
                .map(|(k, v)| (format!("env.{k}"), v.clone())),
        );
        for (k, v) in &fields {
            payload
                .push(k, v.as_bytes())
                .map_err(|e| SpawnError::Fork(e.to_string()))?;
        }
        let mut fds: Vec<OwnedFd> = vec![OwnedFd::from(request.error_log)];
        fds.extend(cgroup_fds);
        fds.extend(worker_ends.into_iter().map(OwnedFd::from));

        let (reply, forked) = oneshot::channel();
        tx.send(Msg::Spawn(SpawnOrder {
            payload,
            fds,
            reply,
        }))
        .map_err(|_| zygote_err("its actor stopped".into()))?;
        let forked = match tokio::time::timeout(FORK_TIMEOUT, forked).await {
            Ok(Ok(Ok(forked))) => forked,
            Ok(Ok(Err(reason))) => return Err(SpawnError::Fork(reason)),
            Ok(Err(_)) => return Err(zygote_err("it died during the fork".into())),
            Err(_) => return Err(zygote_err(format!("no answer within {FORK_TIMEOUT:?}"))),
        };
        Ok(SpawnedWorker {
            process: WorkerProcess::Forked(forked),
            slots: into_tokio(node_ends)?,
        })
    }
}

impl Spawn for ZygoteSpawner {
    fn spawn<'a>(&'a self, request: SpawnRequest<'a>) -> SpawnFuture<'a> {
        Box::pin(async move {
            let key = ZygoteKey::of(request.site)?;
            self.fork(request, key).await
        })
    }
}

/// Whether an interpreter may run with the node's rights: the file it resolves to and
/// every folder on the way (the link's folders, the target's folder) must belong to
/// root or the node's user and be writable by nobody else.
fn trusted_interpreter(python: &std::path::Path) -> Result<(), String> {
    let real = python
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", python.display()))?;
    let mut paths = vec![real.clone()];
    paths.extend(real.parent().map(std::path::Path::to_path_buf));
    if real != python {
        // A link (a venv's bin/python): whoever can replace it chooses what runs.
        paths.extend(python.parent().map(std::path::Path::to_path_buf));
        paths.extend(
            python
                .parent()
                .and_then(|p| p.parent())
                .map(std::path::Path::to_path_buf),
        );
    }
    let paths: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
    roost_registry::check_code_files(&paths, nix::unistd::geteuid().as_raw())
        .map_err(|e| e.to_string())
}

/// A runtime's shared packages, imported by its zygote: as trusted as its interpreter.
fn trusted_packages(runtime: &roost_registry::Runtime) -> Result<(), String> {
    let Some(venv) = &runtime.venv else {
        return Ok(());
    };
    let dirs = roost_registry::site_packages(venv);
    let dirs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
    roost_registry::check_code_files(&dirs, nix::unistd::geteuid().as_raw())
        .map_err(|e| e.to_string())
}

/// Owns one interpreter's zygote process and its control socket.
struct ZygoteActor {
    python: PathBuf,
    config: SpawnConfig,
}

struct Running {
    child: tokio::process::Child,
    ctl: AsyncFd<OwnedFd>,
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Result<Forked, String>>>,
    exits: HashMap<u32, oneshot::Sender<i32>>,
}

impl ZygoteActor {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut zygote: Option<Running> = None;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => break,
                    Some(Msg::Start(reply)) => {
                        if zygote.is_none() {
                            match self.start().await {
                                Ok(z) => zygote = Some(z),
                                Err(reason) => {
                                    let _ = reply.send(Err(reason));
                                    continue;
                                }
                            }
                        }
                        let _ = reply.send(Ok(()));
                    }
                    Some(Msg::Spawn(order)) => match &mut zygote {
                        Some(z) => z.send(order),
                        None => {
                            let _ = order.reply.send(Err("the zygote is not running".into()));
                        }
                    },
                },
                died = async {
                    match &mut zygote {
                        Some(z) => z.events().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let z = zygote.take().expect("events only run with a zygote");
                    tracing::warn!(python = %self.python.display(), reason = %died, "zygote stopped; a new one starts on the next need");
                    z.fail_all(&died);
                }
            }
        }
    }

    /// Starts the zygote and waits for its READY.
    async fn start(&self) -> Result<Running, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        // The zygote's end blocks; only ours is driven by the runtime.
        nix::fcntl::fcntl(
            theirs.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| format!("fcntl: {e}"))?;
        let mut cmd = std::process::Command::new(&self.python);
        cmd.arg("-I")
            .arg(&self.config.loader)
            .arg("zygote")
            .arg(self.config.preload.join(","))
            .arg(self.config.zygote_spares.to_string())
            .env_clear()
            .envs(self.config.base_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let plan = ChildPlan {
            cgroup_procs: Vec::new(),
            slots: vec![theirs.as_raw_fd()],
            parent: nix::unistd::getpid(),
            drop_to: None,
            workdir: CString::new("/").expect("no NUL in /"),
        };
        // SAFETY: as for plain spawn: the closure only makes async-signal-safe calls on
        // memory and descriptors the parent keeps alive until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || plan.run());
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.python.display()))?;
        drop(theirs);
        let ctl = watch(ours).map_err(|e| format!("cannot watch the control socket: {e}"))?;
        let z = Running {
            child,
            ctl,
            next_id: 1,
            pending: HashMap::new(),
            exits: HashMap::new(),
        };
        let ready = tokio::time::timeout(START_TIMEOUT, recv(&z.ctl))
            .await
            .map_err(|_| format!("no READY within {START_TIMEOUT:?}"))??;
        match ready {
            (Z_READY, fields, _) => {
                let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("?");
                tracing::info!(
                    python = %self.python.display(),
                    version = get("python"),
                    pid = get("pid"),
                    preload_ms = get("preload_us").parse::<f64>().map_or(-1.0, |us| us / 1e3),
                    "zygote ready"
                );
                Ok(z)
            }
            (kind, _, _) => Err(format!("the zygote said 0x{kind:02x} instead of READY")),
        }
    }
}

impl Running {
    fn send(&mut self, order: SpawnOrder) {
        let id = self.next_id;
        self.next_id += 1;
        let mut payload = EnvironWriter::with_capacity(16);
        payload
            .push("id", id.to_string().as_bytes())
            .expect("digits have no NUL");
        let mut message = vec![Z_SPAWN];
        message.extend_from_slice(&payload.finish());
        message.push(0);
        message.extend_from_slice(&order.payload.finish());
        let raw: Vec<RawFd> = order.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = sendmsg::<()>(
            self.ctl.get_ref().as_raw_fd(),
            &[IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        );
        // The descriptors are the zygote's now (or nobody's): ours close here.
        drop(order.fds);
        match sent {
            Ok(_) => {
                self.pending.insert(id, order.reply);
            }
            Err(e) => {
                let _ = order
                    .reply
                    .send(Err(format!("cannot reach the zygote: {e}")));
            }
        }
    }

    /// Handles messages until the zygote goes away; returns why.
    async fn events(&mut self) -> String {
        loop {
            let message = tokio::select! {
                m = recv(&self.ctl) => m,
                status = self.child.wait() => {
                    return match status {
                        Ok(s) => format!("it exited ({s})"),
                        Err(e) => format!("cannot wait for it: {e}"),
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
                    let (Some(id), Some(pid), Some(pidfd)) =
                        (number("id"), number("pid"), fds.pop())
                    else {
                        return "it sent a SPAWNED without id, pid or pidfd".into();
                    };
                    let Some(reply) = self.pending.remove(&id) else {
                        continue;
                    };
                    let (tx, rx) = oneshot::channel();
                    match watch(pidfd) {
                        Ok(pidfd) => {
                            self.exits.insert(pid as u32, tx);
                            let _ = reply.send(Ok(Forked {
                                pid: pid as u32,
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
                    if let (Some(pid), Some(status)) = (number("pid"), fields.get("status")) {
                        if let (Some(tx), Ok(raw)) =
                            (self.exits.remove(&(pid as u32)), status.parse())
                        {
                            let _ = tx.send(raw);
                        }
                    }
                }
                other => return format!("it sent an unknown message 0x{other:02x}"),
            }
        }
    }

    fn fail_all(self, why: &str) {
        for (_, reply) in self.pending {
            let _ = reply.send(Err(format!("the zygote stopped: {why}")));
        }
        // Its workers died with it (their parent-death signal); their pidfds say so.
    }
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
