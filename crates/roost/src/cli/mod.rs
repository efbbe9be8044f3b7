//! The `roost` command line: `serve`, `site add|set|rm|list|show`, and `demo`.
//!
//! Commands print plain sentences for people and JSON with `--json`. The registry
//! is written directly; a running node sees the change within its poll interval.

mod apply;
mod demo;
mod runtime;
mod site;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use roost_registry::{parse_bytes, parse_duration};

use crate::server::NodeConfig;

#[derive(Debug, Parser)]
#[command(
    name = "roost",
    version,
    about = "Hosts many Python WSGI sites, each in its own processes, started on demand."
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// The registry: sqlite:PATH (or a plain path). Default: /var/lib/roost/registry.db
    /// as root, else $XDG_DATA_HOME/roost/registry.db (~/.local/share/roost/).
    #[arg(
        long,
        global = true,
        env = "ROOST_REGISTRY",
        value_name = "sqlite:PATH"
    )]
    pub registry: Option<String>,

    /// Lowest uid a site may run as; site writes and the node both check it.
    #[arg(long, global = true, env = "ROOST_MIN_UID", default_value_t = roost_registry::DEFAULT_MIN_UID)]
    pub min_uid: u32,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: serve every site of the registry until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Add, change, remove and inspect sites.
    #[command(subcommand)]
    Site(Box<site::SiteCommand>),
    /// Make the registry hold the sites of a site file (TOML), all or nothing.
    Apply(apply::ApplyArgs),
    /// Add, remove and list runtimes (interpreters with preloaded shared packages).
    #[command(subcommand)]
    Runtime(runtime::RuntimeCommand),
    /// Run a node with three bundled example sites on a registry of its own.
    Demo(demo::DemoArgs),
}

impl Command {
    /// Long-running commands log at info by default; one-shot ones only warnings.
    pub fn is_server(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::Demo(_))
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; repeat for several.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: Vec<SocketAddr>,
    /// Folder of the per-site log folders. Default: /var/log/roost as root, else
    /// the data folder's logs/.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Size at which a site's error.log is renamed error.log.old (replacing the one
    /// before) and a new one begun, so no site's printing fills the disk; at least
    /// 1MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_error_log_size)]
    pub error_log_size: u64,
    /// Folder for the node's runtime files (the loader). Default: /run/roost as root,
    /// else the data folder's run/.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Folder holding each site's private TMPDIR (emptied at every start). Keep it on
    /// a disk, not a tmpfs such as /run: what a site writes in a tmpfs is held in
    /// memory and fills it for everyone. Default: /var/lib/roost/tmp as root, else the
    /// data folder's tmp/.
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// A proxy (address or CIDR) whose X-Forwarded-For/-Proto headers are believed;
    /// repeat for several.
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<String>,
    /// Longest time a client may take to send its request headers (and a new
    /// connection its first byte).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub header_timeout: Duration,
    /// Longest wait for the next bytes of a request body; then 408 (past the first
    /// 64KiB, which are read before a worker is involved: the app's read fails).
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub body_timeout: Duration,
    /// Longest time a client may leave its response unread; then the connection is
    /// closed and the worker freed.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub send_timeout: Duration,
    /// Longest time a client connection may stay open with no request begun on it;
    /// then it is closed gracefully (requests in flight finish). An HTTP/1.1
    /// connection waiting for its next request is closed sooner, at --header-timeout.
    #[arg(long, default_value = "75s", value_parser = parse_timeout)]
    pub keepalive_timeout: Duration,
    /// Most memory the node holds of request bodies read before a worker is involved
    /// (64KiB each), all requests together (one site: a quarter); when full, a body
    /// goes to its worker as it arrives.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub request_buffer: u64,
    /// Most memory the node holds of responses its clients have not taken yet, all
    /// together (one response: at most 32MiB; one site: a quarter), so that workers
    /// need not wait for slow clients; when full, workers wait.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub response_buffer: u64,
    /// Most disk the node uses for such responses beyond memory, all together (one
    /// response: at most 1GiB; one site: a quarter), in unlinked temporary files; 0
    /// holds them in memory only.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub response_spool: u64,
    /// Folder of those temporary files. Default: /var/tmp, else $TMPDIR or /tmp.
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Most client connections open at once, all listeners together; past it new ones
    /// wait in the listen backlog until some close. Default: half the open file limit
    /// (the other half is for the sites' files, sockets and pipes).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,
    /// Largest request head (request line and headers), 8KiB to 1MiB; beyond: 431.
    #[arg(long, default_value = "64KiB", value_parser = parse_header_size)]
    pub max_header_size: u64,
    /// Most header fields in a request, 1 to 10000; beyond: 431.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_headers: u64,
    /// How long a stopping worker may take before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,
    /// This node's folder in each cgroup hierarchy; nodes sharing a machine need
    /// different names.
    #[arg(long, default_value = "roost")]
    pub cgroup_name: String,
    /// How workers start: forked from a warm, preloaded zygote per interpreter, or a
    /// fresh interpreter each.
    #[arg(long, value_enum, default_value = "zygote")]
    pub spawn: SpawnArg,
    /// Modules the zygotes import besides the usual standard library ones
    /// (comma-separated), e.g. flask,django; a missing one is logged and skipped.
    #[arg(long, value_delimiter = ',')]
    pub preload: Vec<String>,
    /// Do not use cgroups, even where the host has them (memory.max then falls back to
    /// RSS polling; pids.max and cpu.weight are not enforced). For benchmarks, or hosts
    /// whose limits are managed elsewhere.
    #[arg(long)]
    pub no_cgroups: bool,
    /// Leave the kernel's cgroup locking as it is. By default a root node mounts a
    /// small cgroup hierarchy with `favordynmods` while it runs, so that moving a new
    /// worker into its site's cgroup does not wait for an RCU grace period (15-20 ms
    /// per cold start on cgroup v1); forks and exits get slightly dearer machine-wide.
    #[arg(long)]
    pub no_favordynmods: bool,
    /// Run workers under the kernel's normal policy instead of SCHED_BATCH. By default
    /// a worker woken by a request does not preempt the node, which then finishes
    /// handing out work before the worker runs (fewer context switches; see
    /// docs/benchmarks.md); the node still preempts workers.
    #[arg(long)]
    pub no_batch_workers: bool,
    /// Mark the memory of zygotes, templates and workers for the kernel's same-page
    /// merging (KSM; Linux 6.7 or newer, and ksmd started by the operator): identical
    /// pages of workers forked from one zygote are kept once. Costs ksmd's CPU time,
    /// and lets a site time whether a page's content exists elsewhere on the machine
    /// (see docs/security.md).
    #[arg(long)]
    pub ksm: bool,
    /// Let workers see the host's /tmp, /var/tmp, /dev/shm, /proc and System V IPC. By
    /// default (as root) each worker has its own: /tmp and /var/tmp show its site's
    /// TMPDIR, /dev/shm is a tmpfs of its own (what it leaves there goes with it), and
    /// its /proc shows its own user's processes only. For apps that reach a local
    /// service through a socket in /tmp.
    #[arg(long)]
    pub shared_tmp: bool,
    /// Most workers on this node, all sites together; when full, the idle worker used
    /// least recently is stopped to make room. 0 is unlimited. Default: one per 64 MiB
    /// of the host's memory, at least 8.
    #[arg(long)]
    pub max_workers: Option<usize>,
    /// Most memory all sites' processes hold together (what their memory cgroups
    /// count; without cgroups, their workers' RSS); above it, idle workers are
    /// stopped, least recently used first. 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse_bytes)]
    pub max_worker_memory: u64,
    /// Children each zygote keeps forked ahead of need, so a cold start skips the fork.
    #[arg(long, default_value_t = 1)]
    pub zygote_spares: u32,
    /// Threads of the node itself (HTTP, routing, pools). The sites' workers are
    /// processes of their own and need the other cores [default: half the CPUs, at
    /// least 1].
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SpawnArg {
    Zygote,
    Plain,
}

pub fn init_tracing(verbose: u8, server: bool) {
    let level = match (verbose, server) {
        (0, false) => "warn",
        (0, true) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let registry = registry_path(cli.registry.as_deref())?;
    match cli.command {
        Command::Serve(args) => serve(registry, cli.min_uid, *args).map(|()| ExitCode::SUCCESS),
        Command::Site(command) => site::run(&registry, cli.min_uid, *command),
        Command::Apply(args) => apply::run(&registry, cli.min_uid, args),
        Command::Runtime(command) => runtime::run(&registry, command),
        Command::Demo(args) => demo::run(args),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where roost keeps its files when not run as root.
fn data_dir() -> anyhow::Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("roost"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --registry")?;
    Ok(PathBuf::from(home).join(".local/share/roost"))
}

fn registry_path(given: Option<&str>) -> anyhow::Result<PathBuf> {
    match given {
        Some(text) if text.starts_with("postgres:") || text.starts_with("postgresql:") => {
            bail!("PostgreSQL registries are not supported by this build yet; use sqlite:PATH")
        }
        Some(text) => {
            let path = text.strip_prefix("sqlite:").unwrap_or(text);
            if path.is_empty() {
                bail!("--registry sqlite: needs a file path");
            }
            Ok(absolute(PathBuf::from(path))?)
        }
        None if is_root() => Ok(PathBuf::from("/var/lib/roost/registry.db")),
        None => Ok(data_dir()?.join("registry.db")),
    }
}

/// The current folder, as an absolute path without a trailing `.`.
fn current_dir() -> anyhow::Result<PathBuf> {
    std::env::current_dir().context("cannot read the current directory")
}

/// `path` from the current folder, without `.` components (`./app.wsgi` is stored as
/// `/srv/site/app.wsgi`). `..` stays: through a symbolic link it is not the parent.
fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    Ok(under(&current_dir()?, &path))
}

/// A client timeout: zero would close every connection at once.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text} is no time: a client needs some")),
        d => Ok(d),
    }
}

/// A request head limit that hyper can take (its read buffer is at least 8 KiB) and
/// that does not invite floods: a head of over a megabyte is no browser's.
fn parse_header_size(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if !(8 << 10..=1 << 20).contains(&bytes) {
        return Err(format!("{text} is not between 8KiB and 1MiB"));
    }
    Ok(bytes)
}

fn parse_error_log_size(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        bytes if bytes < crate::logs::MIN_ERROR_LOG_SIZE => {
            Err(format!("{text} is less than 1MiB"))
        }
        bytes => Ok(bytes),
    }
}

/// `path` from `base` (unless it is absolute), without `.` components.
fn under(base: &Path, path: &Path) -> PathBuf {
    base.join(path).components().collect()
}

fn serve(registry: PathBuf, min_uid: u32, args: ServeArgs) -> anyhow::Result<()> {
    let (log_dir, run_dir) = match (is_root(), &args.log_dir, &args.run_dir) {
        (_, Some(l), Some(r)) => (absolute(l.clone())?, absolute(r.clone())?),
        (true, l, r) => (
            l.clone().unwrap_or_else(|| "/var/log/roost".into()),
            r.clone().unwrap_or_else(|| "/run/roost".into()),
        ),
        (false, l, r) => {
            let data = data_dir()?;
            (
                l.clone().unwrap_or_else(|| data.join("logs")),
                r.clone().unwrap_or_else(|| data.join("run")),
            )
        }
    };
    let tmp_dir = match &args.tmp_dir {
        Some(dir) => absolute(dir.clone())?,
        None if is_root() => PathBuf::from("/var/lib/roost/tmp"),
        None => data_dir()?.join("tmp"),
    };
    let mut config = NodeConfig::new(registry, log_dir, run_dir);
    config.tmp_dir = tmp_dir;
    config.error_log_size = args.error_log_size;
    config.front.header_read_timeout = args.header_timeout;
    config.front.body_read_timeout = args.body_timeout;
    config.front.send_timeout = args.send_timeout;
    config.front.keepalive_timeout = args.keepalive_timeout;
    config.front.request_buffer = args.request_buffer;
    config.front.response_buffer = args.response_buffer;
    config.front.response_spool = args.response_spool;
    if let Some(dir) = &args.spool_dir {
        config.front.spool_dir = absolute(dir.clone())?;
    }
    config.front.max_header_bytes = args.max_header_size as usize;
    config.front.max_headers = args.max_headers as usize;
    config.front.max_connections = args.max_connections.map(|n| n as usize);
    config.stop_grace = args.stop_grace;
    config.min_uid = min_uid;
    config.cgroup_name = args.cgroup_name.clone();
    config.spawn = match args.spawn {
        SpawnArg::Zygote => crate::server::SpawnMode::Zygote,
        SpawnArg::Plain => crate::server::SpawnMode::Plain,
    };
    config.preload = args.preload.clone();
    config.cgroups = !args.no_cgroups;
    config.favordynmods = !args.no_favordynmods;
    config.batch_workers = !args.no_batch_workers;
    config.ksm = args.ksm;
    config.private_tmp = !args.shared_tmp;
    config.zygote_spares = args.zygote_spares;
    config.budget = crate::pool::BudgetLimits {
        max_workers: args
            .max_workers
            .unwrap_or_else(crate::pool::default_max_workers),
        max_memory: args.max_worker_memory,
    };
    for text in &args.trusted_proxy {
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .with_context(|| format!("--trusted-proxy {text:?} is not an address or CIDR"))?;
        config.front.trusted_proxies.push(net);
    }
    run_node(config, &args.listen, args.threads)
}

/// The node's own threads by default: half the CPUs. On 2 cores one thread took a
/// quarter less CPU per request than two, and served more (docs/benchmarks.md): the
/// workers are busy on the other core, and a second node thread only adds wake-ups.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Threads for blocking work: the node's own (spooling, removals) and its looks at
/// sites' files, of which a site whose files stopped answering holds one until they
/// answer. Tokio's default, 512, would let that many such sites (a dead NFS server
/// with the homes of a busy node) hold every thread, and every other site's looks and
/// the node's own work would queue behind them. A thread that waits costs a few KiB.
const MAX_BLOCKING_THREADS: usize = 16_384;

/// Binds the listeners, runs the node until SIGINT/SIGTERM.
fn run_node(
    config: NodeConfig,
    listen: &[SocketAddr],
    threads: Option<usize>,
) -> anyhow::Result<()> {
    let threads = threads.unwrap_or_else(default_threads).max(1);
    match crate::spawn::seal_inherited_fds() {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            n,
            "inherited descriptors marked close-on-exec: no worker gets them"
        ),
        Err(e) => anyhow::bail!("cannot mark inherited descriptors close-on-exec: {e}"),
    }
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        let mut listeners = Vec::new();
        for addr in listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            listeners.push(listener);
        }
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down (again to force)");
            let _ = stop.send(true);
            wait_for_signal().await;
            std::process::exit(130);
        });
        crate::server::run(config, listeners, shutdown).await?;
        Ok(())
    });
    // A look at a site's files that a silent file system holds never returns, and
    // dropping the runtime would wait for its thread for ever. What the node waits for
    // when it stops (logs flushed, cgroups removed) is done by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Every client connection costs the node a file descriptor, and the usual soft limit
/// (1024) is less than a thousand idle keep-alive clients need: the node takes the
/// hard limit, as Go programs do by themselves and nginx with `worker_rlimit_nofile`.
/// Workers set their own.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // An unlimited hard limit still stops at the kernel's ceiling.
    let target = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(soft)
    } else {
        hard
    };
    if soft >= target {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => tracing::info!(from = soft, to = target, "raised the open file limit"),
        Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open file limit"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    #[test]
    fn paths_are_stored_without_dot_components() {
        let under = |base: &str, path: &str| super::under(Path::new(base), Path::new(path));
        assert_eq!(
            under("/srv/a", "./app.wsgi"),
            PathBuf::from("/srv/a/app.wsgi")
        );
        assert_eq!(under("/srv/a", "x/./y/."), PathBuf::from("/srv/a/x/y"));
        assert_eq!(under("/srv/a", "/abs/./p"), PathBuf::from("/abs/p"));
        // `..` through a symbolic link is not the parent: kept as written.
        assert_eq!(under("/srv/a", "../b"), PathBuf::from("/srv/a/../b"));
    }
}
