//! The e2e harness: a real node in-process (port 0, a temp folder, an SQLite registry),
//! real Python workers, real HTTP over real sockets. Everything is cleaned up on drop.

pub mod http;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use roost::server::{run, NodeConfig};
use roost_registry::{FsChecks, Site, SiteSpec, SqliteStore};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::http::{get, pid_of, raw, send};

/// A running node and its folder.
pub struct Node {
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub registry: PathBuf,
    /// As root, sites run as this user, made for this node and removed with it.
    pub user: Option<TestUser>,
    /// This node's folder name in the cgroup hierarchies.
    pub cgroup_name: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails the test, saying why it needs root, unless it runs as root: a test that needs
/// root never passes without it.
pub fn need_root(because: &str) {
    assert!(
        is_root(),
        "this test needs root ({because}); run the suite as root, as CI does"
    );
}

/// A folder for a test's node (its registry, run folder, logs) and sites. As root, not
/// below /tmp: each worker sees its own TMPDIR there (spawn/private_mounts.rs), and a
/// site whose code is below /tmp is refused.
pub fn test_dir() -> tempfile::TempDir {
    if !is_root() {
        return tempfile::tempdir().expect("temp dir");
    }
    let base = Path::new("/var/lib/roost-e2e");
    std::fs::create_dir_all(base).expect("/var/lib/roost-e2e");
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    tempfile::tempdir_in(base).expect("temp dir in /var/lib/roost-e2e")
}

/// Runs a fixture script that drives the loader without a node
/// (`tests/fixtures/NAME`, given the loader's path); it must print "ok".
pub fn loader_fixture(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python())
        .arg(dir.join("tests/fixtures").join(name))
        .arg(dir.join("python/loader.py"))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{name}: {}\n{stdout}\n{stderr}",
        out.status
    );
}

/// The python3 the tests run sites with: as root the system's (site users must be
/// able to run it; a python under /root is out of their reach), else the first on PATH.
pub fn python() -> String {
    if is_root() && Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
        .expect("python3 must be on PATH for the e2e tests")
        .display()
        .to_string()
}

/// Gives `file` a modification time `ahead` from now: a touch no clock tick can hide.
pub fn touch_ahead(file: &Path, ahead: Duration) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + ahead)
        .unwrap();
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apps")
        .join(name)
}

impl Node {
    pub async fn start() -> Node {
        Node::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> Node {
        // Node logs go to the test's output; RUST_LOG=debug shows more.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
        let dir = test_dir();
        // Site users must reach the loader and the apps below it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let user = is_root().then(TestUser::create);
        let registry = dir.path().join("registry.db");
        SqliteStore::open(&registry).expect("registry");
        let mut config = NodeConfig::new(
            registry.clone(),
            dir.path().join("logs"),
            dir.path().join("run"),
        );
        config.stop_grace = Duration::from_secs(2);
        config.registry_poll = Duration::from_millis(100);
        config.front.shutdown_grace = Duration::from_secs(5);
        // Not half of whatever open file limit the test runs under (a test of a
        // thousand clients must not wait in the backlog); the CLI tests the default.
        config.front.max_connections = Some(10_000);
        // Tests run nodes side by side: each gets cgroup folders of its own.
        static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        config.cgroup_name = format!("roost-e2e-{}-{n}", std::process::id());
        let cgroup_name = config.cgroup_name.clone();
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            run(config, vec![listener], shutdown)
                .await
                .expect("node failed");
        });
        Node {
            addr,
            dir,
            registry,
            user,
            cgroup_name,
            stop,
            task: Some(task),
        }
    }

    /// Copies a fixture app into the node's folder (tests may then edit it), once: a
    /// second copy would touch the entry file of the sites already using it, and
    /// they would reload (as mod_wsgi's do) at a moment the test does not choose.
    pub fn app(&self, fixture_name: &str) -> PathBuf {
        let apps = self.dir.path().join("apps");
        std::fs::create_dir_all(&apps).unwrap();
        std::fs::set_permissions(&apps, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = apps.join(fixture_name);
        if !path.exists() {
            std::fs::copy(fixture(fixture_name), &path).expect("copy fixture");
        }
        path
    }

    /// The fixture app `fixture_name` with the Python `prelude` run first at each
    /// import (to log or slow the app's starts): the node's one copy of it changes.
    pub fn app_with_prelude(&self, fixture_name: &str, prelude: &str) -> PathBuf {
        let path = self.app(fixture_name);
        let app = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{prelude}\n{app}")).unwrap();
        path
    }

    pub fn spec(&self, name: &str, hosts: &[&str], entry: &Path) -> SiteSpec {
        SiteSpec {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            entry: Some(entry.display().to_string()),
            interpreter: Some(python()),
            user: self.user.as_ref().map(|u| u.name.clone()),
            ..SiteSpec::default()
        }
    }

    /// Adds a site (with the runtime it names) and waits until the node serves it.
    pub async fn add(&self, spec: SiteSpec) -> Site {
        let mut site = spec.validate(FsChecks::Full).expect("valid site");
        self.store()
            .attach_runtime(&spec, &mut site)
            .expect("the site's runtime");
        self.store().add(&site).expect("add site");
        let host = site.hosts[0].to_string().replace("*.", "probe.");
        self.eventually(&format!("{} to be served", site.name), || async {
            let served = get(self.addr, &host, "/__probe_route__")
                .await
                .is_ok_and(|r| r.status != 404);
            served
                && self
                    .log(&site.name, "access.log")
                    .contains("__probe_route__")
        })
        .await;
        site
    }

    /// The pid a tester endpoint answers (`/pid`: the worker; `/imported-by`: whoever
    /// imported the app).
    pub async fn pid(&self, host: &str, path: &str) -> u32 {
        http::pid_of(&get(self.addr, host, path).await.expect("request"))
    }

    /// Where the site's TMPDIR is on the host (its workers, as root, see it as /tmp).
    pub fn tmpdir(&self, site: &str) -> PathBuf {
        self.dir.path().join("run/tmp").join(site)
    }

    pub fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.registry).expect("registry")
    }

    /// Waits until `check` holds, up to 15 seconds.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        eventually(what, Duration::from_secs(15), &mut check).await
    }

    /// Pids of this node's workers (processes running this node's loader).
    /// Waits until `host` answers `path` with `status`.
    pub async fn until_status(&self, host: &str, path: &str, status: u16) {
        let what = format!("{host}{path} to answer {status}");
        self.eventually(&what, || async {
            get(self.addr, host, path)
                .await
                .is_ok_and(|r| r.status == status)
        })
        .await
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        pids_running(&self.dir.path().join("run/loader.py").display().to_string())
    }

    pub fn log(&self, site: &str, which: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(site).join(which))
            .unwrap_or_default()
    }

    /// The site's error log once `needle` appears in it: what a worker prints reaches
    /// the file through the node's output thread, a moment after the worker printed
    /// it (and so possibly after the response that followed).
    pub async fn error_log_with(&self, site: &str, needle: &str) -> String {
        self.eventually(&format!("{needle:?} in {site}'s error log"), || async {
            self.log(site, "error.log").contains(needle)
        })
        .await;
        self.log(site, "error.log")
    }

    /// How many times `needle` is in the site's error log, once that is `count`.
    pub async fn error_log_count(&self, site: &str, needle: &str, count: usize) {
        self.eventually(
            &format!("{count} × {needle:?} in {site}'s error log"),
            || async { self.log(site, "error.log").matches(needle).count() == count },
        )
        .await;
    }

    /// Stops the node and waits until it has finished.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node did not stop within 30 s")
                .expect("node task panicked");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A Unix user made for one test with useradd, removed with userdel on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn create() -> TestUser {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rst{}x{n}", std::process::id());
        let status = with_user_db_lock(|| {
            std::process::Command::new("useradd")
                .args([
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--key",
                    "UID_MIN=2000",
                ])
                .arg(&name)
                .status()
        })
        .expect("run useradd (the root tests need the passwd package)");
        assert!(status.success(), "useradd {name} failed");
        let uid = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("the new user")
            .uid
            .as_raw();
        TestUser { name, uid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Anything still running as the user (a test that failed early) goes first.
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-u"])
            .arg(self.uid.to_string())
            .status();
        let _ = with_user_db_lock(|| {
            std::process::Command::new("userdel")
                .arg("--force")
                .arg(&self.name)
                .status()
        });
    }
}

/// useradd and userdel refuse to run while another holds /etc/passwd: tests in
/// parallel processes take turns through a lock file.
fn with_user_db_lock<T>(f: impl FnOnce() -> T) -> T {
    let lock = std::fs::File::create("/run/lock/roost-e2e-users.lock")
        .or_else(|_| std::fs::File::create(std::env::temp_dir().join("roost-e2e-users.lock")))
        .expect("user lock file");
    let guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let out = f();
    drop(guard);
    out
}

/// Pids of live workers with `needle` (a node's loader path) on their command line.
pub fn pids_running(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        // A zygote has the loader on its command line too, but is no worker; the
        // workers it forks keep its command line and name themselves.
        let zygote = args.contains(&&b"zygote"[..]) && comm.trim() != "roost-worker";
        let is_ours = !zygote && args.contains(&needle.as_bytes());
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if is_ours && !zombie {
            pids.push(pid);
        }
    }
    pids
}

pub async fn eventually<F, Fut>(what: &str, limit: Duration, check: &mut F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fields of /proc/<pid>/stat after the command's parentheses (the state first,
/// the 3rd field), or `None` once the process is gone.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of a process (`T` stopped, `Z` a zombie), `None` once it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// True while a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// The parent of a process (the 4th field of /proc/<pid>/stat).
pub fn parent_of(pid: u32) -> u32 {
    stat_fields(pid).expect("the process exists")[1]
        .parse()
        .unwrap()
}

/// The name a process gave itself (/proc/<pid>/comm).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// `file` in the site's cgroup: in whichever hierarchy has it (v1), or the one (v2).
pub fn site_cgroup_file(node: &str, site: &str, file: &str) -> PathBuf {
    site_cgroup_dirs(node, site)
        .into_iter()
        .map(|dir| dir.join(file))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("the site's cgroups have no {file}"))
}

/// Every directory named `<node>/<site>` in the cgroup hierarchies.
pub fn site_cgroup_dirs(node: &str, site: &str) -> Vec<PathBuf> {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-type", "d", "-path"])
        .arg(format!("*/{node}/{site}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// The scheduling policy of a process (the 41st field of /proc/<pid>/stat).
pub fn sched_policy(pid: u32) -> i32 {
    stat_fields(pid).expect("the process exists")[38]
        .parse()
        .unwrap()
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

/// CPU time (user and system) the test process's thread named `name` has used: the
/// node runs in the test's own process, so its threads are there.
pub fn thread_cpu(name: &str) -> Duration {
    let tick = Duration::from_secs(1)
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .expect("sysconf")
            .expect("CLK_TCK") as u32;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("a task").path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(dir.join("stat")).expect("task stat");
            // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
            let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
            let ticks: u64 =
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            return tick * ticks as u32;
        }
    }
    panic!("no thread named {name}");
}

/// Clients asking `host` for `path` in a loop, each on a fresh connection, until
/// stopped: the steady neighbour of a test that does something rough elsewhere.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, host: &str, path: &str, clients: usize) -> Load {
        use std::sync::atomic::Ordering;
        let load = Load {
            stop: Default::default(),
            ok: Default::default(),
            failed: Default::default(),
            clients: Vec::new(),
        };
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (load.stop.clone(), load.ok.clone(), load.failed.clone());
                let (host, path) = (host.to_owned(), path.to_owned());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match get(addr, &host, &path).await {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                eprintln!("{host}{path} failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load { clients, ..load }
    }

    /// Stops the clients; how many requests were answered 200, and how many not.
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("a load client panicked");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
