//! One worker process: its start-up handshake, its life, its stop.
//!
//! A worker task owns the `Child` (so only it can signal or reap the pid, which can
//! then never be reused under it) and reports to its pool:
//!
//! ```text
//! Starting ──READY on every slot──► Ready (slots handed to the pool)
//!    │ FATAL / exit / timeout            │
//!    ▼                                   ▼
//! StartFailed                     Running ──Stop──► grace ──► SIGKILL ──► Exited
//!                                        └──Kill──────────────► SIGKILL ──► Exited
//! ```

mod conn;
mod inbox;

use std::sync::Arc;
use std::time::Duration;

use roost_registry::Site;
use roost_wire::{Frame, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

pub use conn::{ConnError, FrameReader, SlotConn};
pub use inbox::{has_inbox, Foreign, Inbox, Packet, ReadBack, INBOX_DEPTH, INBOX_MAX, TAG_LEN};

use crate::logs::{ProcessLog, SiteLogs};
use crate::spawn::{Ended, Role, SiteCgroup, SiteFiles, Spawn, SpawnRequest};

/// Identifies a worker within the node for its whole life (pids get reused).
pub type WorkerId = u64;

/// What a pool can ask of a worker task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerControl {
    /// All slots are closed; the loader exits on its own. SIGKILL after the grace period.
    Stop,
    /// At once, with SIGKILL to the whole process group (timeout, protocol violation).
    Kill,
}

/// The cheap side of a worker task.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    tx: mpsc::UnboundedSender<WorkerControl>,
}

impl WorkerHandle {
    pub fn stop(&self) {
        let _ = self.tx.send(WorkerControl::Stop);
    }

    pub fn kill(&self) {
        let _ = self.tx.send(WorkerControl::Kill);
    }
}

/// Why a worker never became ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Spawn(#[from] crate::spawn::SpawnError),
    #[error("the application failed to load (traceback in the error log)")]
    AppFailed,
    #[error("the worker exited during start-up ({0})")]
    Exited(Ended),
    #[error("the worker did not become ready within {0:?}")]
    Timeout(Duration),
    #[error("the worker speaks protocol version {0}, this node {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("the worker broke the start-up handshake")]
    Handshake(#[source] ConnError),
    #[error("stopped during start-up")]
    Stopped,
}

impl StartError {
    /// Whether the start was ended from outside (the worker, or the process forking it,
    /// killed by someone), rather than by the app (an exception, an exit, a crash).
    pub fn killed_from_outside(&self) -> bool {
        match self {
            StartError::Exited(ended) => ended.killed(),
            StartError::Spawn(error) => error.killed_from_outside(),
            _ => false,
        }
    }
}

/// What a worker task tells its pool.
#[derive(Debug)]
pub enum WorkerEvent {
    Ready {
        id: WorkerId,
        pid: u32,
        slots: Vec<SlotConn>,
        /// One per slot, or none (see [`has_inbox`]).
        inboxes: Vec<Inbox>,
        import_time: Duration,
        /// The error log it prints into, for the node's notes on it.
        log: ProcessLog,
    },
    StartFailed {
        id: WorkerId,
        error: StartError,
    },
    Exited {
        id: WorkerId,
        status: Ended,
    },
}

/// What a worker task needs besides its site: shared by all workers of a pool.
#[derive(Clone)]
pub struct WorkerContext {
    pub spawner: Arc<dyn Spawn>,
    pub logs: Arc<SiteLogs>,
    pub cgroup: Arc<SiteCgroup>,
    pub files: SiteFiles,
    pub startup_timeout: Duration,
    pub stop_grace: Duration,
}

/// Starts a worker task; events go to `events`, wrapped by `wrap`.
pub fn start<E: Send + 'static>(
    id: WorkerId,
    site: Arc<Site>,
    ctx: WorkerContext,
    events: mpsc::UnboundedSender<E>,
    wrap: fn(WorkerEvent) -> E,
) -> WorkerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("worker", site = %site.name, id);
    tokio::spawn(tracing::Instrument::instrument(
        run(id, site, ctx, rx, move |e| {
            let _ = events.send(wrap(e));
        }),
        span,
    ));
    WorkerHandle { tx }
}

async fn run(
    id: WorkerId,
    site: Arc<Site>,
    ctx: WorkerContext,
    mut control: mpsc::UnboundedReceiver<WorkerControl>,
    report: impl Fn(WorkerEvent),
) {
    let logs = &ctx.logs;
    let request = SpawnRequest {
        site: &site,
        role: Role::Worker {
            slots: site.pool.threads,
        },
        logs,
        cgroup: &ctx.cgroup,
        files: &ctx.files,
    };
    let spawned = ctx.spawner.spawn(request).await.map_err(StartError::from);
    let spawned = spawned.and_then(|s| {
        let slots = s
            .sockets
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
                    .map(|stream| SlotConn::new(stream, i))
            })
            .collect::<Result<Vec<_>, _>>();
        match slots {
            Ok(slots) => Ok((s.process, slots, s.inboxes, s.log)),
            Err(e) => Err(StartError::Spawn(crate::spawn::SpawnError::SocketPair(e))),
        }
    });
    let (mut process, mut slots, inboxes, log) = match spawned {
        Ok(s) => s,
        Err(error) => {
            logs.error(&format!(
                "cannot start a worker: {}",
                crate::error_chain(&error)
            ));
            return report(WorkerEvent::StartFailed { id, error });
        }
    };
    let pid = process.pid();
    tracing::debug!(pid, "worker spawned");
    let deadline = Instant::now() + ctx.startup_timeout;
    let handshake = async {
        let mut import = 0;
        for slot in &mut slots {
            match slot.read_frame().await {
                Ok(Frame::Ready(r)) if r.version != PROTOCOL_VERSION => {
                    return Err(StartError::Version(r.version))
                }
                Ok(Frame::Ready(r)) => import = r.import_micros,
                Ok(Frame::Fatal(_)) => return Err(StartError::AppFailed),
                Ok(_) => {
                    return Err(StartError::Handshake(ConnError::Protocol(
                        roost_wire::WireError::UnknownKind(0),
                    )))
                }
                Err(e) => return Err(StartError::Handshake(e)),
            }
        }
        Ok(Duration::from_micros(import))
    };
    let outcome = tokio::select! {
        r = timeout_at(deadline, handshake) => r.unwrap_or(Err(StartError::Timeout(ctx.startup_timeout))),
        _ = control.recv() => Err(StartError::Stopped),
    };
    match outcome {
        Ok(import_time) => {
            tracing::info!(
                pid,
                import_ms = import_time.as_secs_f64() * 1e3,
                "worker ready"
            );
            report(WorkerEvent::Ready {
                id,
                pid,
                slots,
                inboxes,
                import_time,
                log,
            });
        }
        Err(mut error) => {
            drop(slots);
            process.kill_group();
            let ended = process.wait().await;
            if matches!(error, StartError::Handshake(ref e) if e.is_closed())
                && !matches!(ended, Ended::Unknown)
            {
                error = StartError::Exited(ended);
            }
            if !matches!(error, StartError::AppFailed | StartError::Stopped) {
                // Where its own output went (it may have printed why), whoever has the
                // site now.
                log.error(&format!(
                    "worker pid {pid} failed to start: {}",
                    crate::error_chain(&error)
                ));
            }
            return report(WorkerEvent::StartFailed { id, error });
        }
    }

    let status = loop {
        tokio::select! {
            status = process.wait() => break status,
            order = control.recv() => match order {
                Some(WorkerControl::Kill) => process.kill_group(),
                Some(WorkerControl::Stop) | None => {
                    match tokio::time::timeout(ctx.stop_grace, process.wait()).await {
                        Ok(status) => break status,
                        Err(_) => {
                            tracing::warn!(pid, grace = ?ctx.stop_grace, "worker did not exit after its slots closed; killing it");
                            process.kill_group();
                        }
                    }
                }
            },
        }
    };
    tracing::debug!(pid, ?status, "worker exited");
    report(WorkerEvent::Exited { id, status });
}
