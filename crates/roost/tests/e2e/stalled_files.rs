//! A site whose files stop answering (its owner's home on an NFS server that went away)
//! holds up none of the other sites, as root: the site's code and virtualenv are served
//! by `fixtures/stallfs.py`, a FUSE mirror the test tells to go silent. The node runs
//! on one runtime thread, as on a two-core host: one look at the silent files from
//! that thread and every site stops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{fixture, need_root, python, Node, TestUser};

fn need_root_and_fuse() {
    need_root("it mounts a FUSE file system");
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test needs FUSE (/dev/fuse; `modprobe fuse`)"
    );
}

/// `owner`'s "home" under `dir`, as on a network share: the tester app (and a
/// virtualenv if `venv`) in a folder of theirs, mirrored at `dir/home`.
fn mirrored_home(dir: &Path, owner: &TestUser, venv: bool) -> StallFs {
    let source = dir.join("home-source");
    std::fs::create_dir(&source).unwrap();
    std::fs::copy(fixture("tester.py"), source.join("app.py")).unwrap();
    if venv {
        let made = Command::new(python())
            .args(["-m", "venv", "--without-pip"])
            .arg(source.join("venv"))
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
    }
    let chown = Command::new("chown")
        .args(["-R", &owner.name])
        .arg(&source)
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o755)).unwrap();
    StallFs::mount(&source, &dir.join("home"))
}

/// A FUSE mirror of a folder that stops answering on demand.
struct StallFs {
    server: Child,
    mountpoint: PathBuf,
}

impl StallFs {
    fn mount(source: &Path, mountpoint: &Path) -> StallFs {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut server = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stallfs.py"))
            .arg(source)
            .arg(mountpoint)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start stallfs.py");
        let mut line = String::new();
        let stdout = server.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mounted", "stallfs.py did not mount");
        StallFs {
            server,
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.server.id() as i32), signal).unwrap();
    }
}

impl Drop for StallFs {
    fn drop(&mut self) {
        // Every look still waiting fails (ENOTCONN), then the mount goes.
        self.signal(Signal::SIGTERM);
        let _ = self.server.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// One request over a plain blocking socket, answered within `limit` or an error: the
/// test's own runtime is the node's, and must not be what waits on a stuck node.
fn status_within(addr: SocketAddr, host: &str, path: &str, limit: Duration) -> Result<u16, String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(limit)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("no answer within {limit:?}: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    text[9..12]
        .parse()
        .map_err(|_| format!("not HTTP: {text:?}"))
}

fn answers_200(addr: SocketAddr, host: &str, what: &str) {
    let started = Instant::now();
    let status = status_within(addr, host, "/", Duration::from_secs(5));
    assert_eq!(
        status,
        Ok(200),
        "{host} {what} (after {:?})",
        started.elapsed()
    );
}

/// Waits until `needle` is in the site's error log (a line lands a moment after what
/// it tells of), up to 10 s, without the test's runtime.
fn error_log_with(node: &Node, site: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log(site, "error.log").contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {site}'s error log: {}",
            node.log(site, "error.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the remote site's worker, waits until the node has seen it die, then asks the
/// site (for a new worker) on a thread, which answers within `limit`.
fn kill_and_ask(
    node: &Node,
    worker: u32,
    limit: Duration,
) -> std::thread::JoinHandle<Result<u16, String>> {
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    error_log_with(node, "remote", "died");
    let addr = node.addr;
    std::thread::spawn(move || status_within(addr, "remote.test", "/", limit))
}

/// The local site answers each of `rounds` requests, half a second apart.
fn keeps_answering(node: &Node, rounds: usize, what: &str) {
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(500));
        answers_200(node.addr, "local.test", what);
    }
}

/// `roost serve` on `addr` for the registry in `dir`, its folders there too.
fn serve(dir: &Path, addr: SocketAddr, extra: &[&str]) -> std::process::Child {
    let registry = format!("sqlite:{}", dir.join("registry.db").display());
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .args([
            "--registry",
            &registry,
            "serve",
            "--listen",
            &addr.to_string(),
        ])
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--tmp-dir")
        .arg(dir.join("tmp"))
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A free port on 127.0.0.1, for a node run as a command.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Asks `host` until it answers 200, within `limit`, without the test's runtime.
fn until_200(addr: SocketAddr, host: &str, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let status = status_within(addr, host, "/", Duration::from_secs(5));
        if status == Ok(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {host} answered {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "needs root: mounts a FUSE file system and creates Unix users"]
async fn a_site_whose_files_stop_answering_holds_up_no_other_site() {
    need_root_and_fuse();
    let node = Node::start().await;
    let owner = node.user.as_ref().expect("root nodes have a site user");
    let fs = mirrored_home(node.dir.path(), owner, true);
    let home = fs.mountpoint.clone();

    let mut remote = node.spec("remote", &["remote.test"], &home.join("app.py"));
    remote.interpreter = Some(home.join("venv").display().to_string());
    node.add(remote).await;
    let tester = node.app("tester.py");
    node.add(node.spec("local", &["local.test"], &tester)).await;
    answers_200(node.addr, "remote.test", "serves from the mirror");
    answers_200(node.addr, "local.test", "serves");
    let remote_worker = node.pid("remote.test", "/pid").await;

    fs.signal(Signal::SIGUSR1);
    // The remote site's pool looks at its entry file each second, and its worker
    // is busy with nothing: three seconds of looks that never end.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        answers_200(node.addr, "local.test", "answers while remote's files hang");
        answers_200(
            node.addr,
            "remote.test",
            "answers from its live worker, which needs no file",
        );
    }

    // A registry change sorts the zygotes by every site's interpreter: remote's is
    // in the silent mirror.
    let added = node.spec("added", &["added.test"], &tester);
    let site = added.validate(roost_registry::FsChecks::Full).unwrap();
    node.store().add(&site).unwrap();
    until_200(
        node.addr,
        "added.test",
        Duration::from_secs(10),
        "a site added while remote's files hang is served",
    );

    // A new worker for remote needs its files: its start is given up at the look's
    // deadline (10 s), with the reason in its error log; local answers throughout.
    let waiting = kill_and_ask(&node, remote_worker, Duration::from_secs(30));
    keeps_answering(&node, 8, "answers while remote's worker cannot start");
    let status = waiting.join().unwrap();
    assert_eq!(
        status,
        Ok(500),
        "a request to the site whose files hang: its app cannot start"
    );
    error_log_with(
        &node,
        "remote",
        "the site's files did not answer within 10 s",
    );

    // The files answer again: the site recovers on its own.
    fs.signal(Signal::SIGUSR2);
    until_200(
        node.addr,
        "remote.test",
        Duration::from_secs(45),
        "the site whose files answer again recovers",
    );
    answers_200(node.addr, "local.test", "still answers");
    node.stop().await;
    drop(fs);
}

/// `roost serve` stopping while a look at a site's files hangs: the look's thread
/// never returns, and the node must not wait for it.
#[test]
#[ignore = "needs root: mounts a FUSE file system and creates Unix users"]
fn a_node_stops_while_a_sites_files_hang() {
    need_root_and_fuse();
    let dir = crate::harness::test_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let owner = TestUser::create();
    let fs = mirrored_home(dir.path(), &owner, false);
    let registry = format!("sqlite:{}", dir.path().join("registry.db").display());
    let entry = fs.mountpoint.join("app.py");
    let added = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(["--registry", &registry, "site", "add", "remote"])
        .args(["--host", "remote.test", "--user", &owner.name, "--entry"])
        .arg(&entry)
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let addr = free_addr();
    let cgroup_name = format!("roost-e2e-{}-stop", std::process::id());
    let mut node = serve(dir.path(), addr, &["--cgroup-name", &cgroup_name]);
    until_200(
        addr,
        "remote.test",
        Duration::from_secs(20),
        "the node serves",
    );

    fs.signal(Signal::SIGUSR1);
    // A look at the entry file (once a second) is under way, and hangs.
    std::thread::sleep(Duration::from_millis(2500));
    kill(Pid::from_raw(node.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        match node.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    if exited.is_none() {
        let _ = node.kill();
        let _ = node.wait();
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "roost serve after SIGTERM, with a look at a site's files hanging: {exited:?}"
    );
    drop(fs);
}

/// Hundreds of sites whose files hang at once (a dead NFS server with the homes of a
/// busy node) each hold a thread for blocking work until the files answer; past
/// tokio's default of 512 such threads, every other site's looks queued behind them
/// and no site could start a worker.
#[test]
#[ignore = "needs root: mounts a FUSE file system and creates Unix users"]
fn hundreds_of_silent_sites_leave_room_for_the_others() {
    const SILENT: usize = 600;
    need_root_and_fuse();
    let dir = crate::harness::test_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let owner = TestUser::create();
    let fs = mirrored_home(dir.path(), &owner, false);
    let local_app = dir.path().join("local/app.py");
    std::fs::create_dir(local_app.parent().unwrap()).unwrap();
    std::fs::copy(fixture("tester.py"), &local_app).unwrap();
    let chown = Command::new("chown")
        .args(["-R", &owner.name])
        .arg(local_app.parent().unwrap())
        .status()
        .unwrap();
    assert!(chown.success());
    let registry = dir.path().join("registry.db");
    let mut store = roost_registry::SqliteStore::open(&registry).unwrap();
    let spec = |name: String, entry: &Path| roost_registry::SiteSpec {
        hosts: vec![format!("{name}.test")],
        name,
        entry: Some(entry.display().to_string()),
        interpreter: Some(python()),
        user: Some(owner.name.clone()),
        ..Default::default()
    };
    let home_app = fs.mountpoint.join("app.py");
    for n in 0..SILENT {
        let site = spec(format!("s{n}"), &home_app);
        store
            .add(&site.validate(roost_registry::FsChecks::Full).unwrap())
            .unwrap();
    }
    let local = spec("local".into(), &local_app);
    store
        .add(&local.validate(roost_registry::FsChecks::Full).unwrap())
        .unwrap();
    drop(store);
    let addr = free_addr();
    let mut node = serve(dir.path(), addr, &["--no-cgroups"]);
    until_200(addr, "s0.test", Duration::from_secs(20), "the node serves");

    fs.signal(Signal::SIGUSR1);
    // A request to each silent site: each starts a worker, whose look hangs.
    let asked: Vec<_> = (1..SILENT)
        .map(|n| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            write!(stream, "GET / HTTP/1.1\r\nHost: s{n}.test\r\n\r\n").unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let local_status = status_within(addr, "local.test", "/", Duration::from_secs(30));
    let _ = node.kill();
    let _ = node.wait();
    drop(asked);
    assert_eq!(
        local_status,
        Ok(200),
        "a site on another file system, asked while {SILENT} sites' files hang"
    );
    drop(fs);
}

/// A plainly spawned worker whose interpreter is on the silent file system: the fork's
/// caller waits until the child has exec'd, and the exec of that python hangs. Its
/// folder (a local virtualenv) and its code answer, so the look before the spawn does
/// not catch it; the node execs a local trampoline first, which waits in its stead.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "needs root: mounts a FUSE file system and creates Unix users"]
async fn a_plain_spawn_whose_interpreter_hangs_holds_up_no_other_site() {
    need_root_and_fuse();
    let node = Node::start_with(|c| c.spawn = roost::server::SpawnMode::Plain).await;
    let owner = node.user.as_ref().expect("root nodes have a site user");
    let fs = mirrored_home(node.dir.path(), owner, false);
    // A python on the mirror, and a local virtualenv whose python links to it.
    let real = std::fs::canonicalize(python()).unwrap();
    std::fs::copy(&real, node.dir.path().join("home-source/python3")).unwrap();
    let venv = node.dir.path().join("venv");
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    let home = real.parent().unwrap().display().to_string();
    std::fs::write(venv.join("pyvenv.cfg"), format!("home = {home}\n")).unwrap();
    std::os::unix::fs::symlink(fs.mountpoint.join("python3"), venv.join("bin/python")).unwrap();

    let tester = node.app("tester.py");
    let mut remote = node.spec("remote", &["remote.test"], &tester);
    remote.interpreter = Some(venv.display().to_string());
    node.add(remote).await;
    node.add(node.spec("local", &["local.test"], &tester)).await;
    let remote_worker = node.pid("remote.test", "/pid").await;
    answers_200(node.addr, "local.test", "serves");

    fs.signal(Signal::SIGUSR1);
    let waiting = kill_and_ask(&node, remote_worker, Duration::from_secs(60));
    keeps_answering(
        &node,
        6,
        "answers while remote's interpreter cannot be exec'd",
    );
    fs.signal(Signal::SIGUSR2);
    assert_eq!(
        waiting.join().unwrap(),
        Ok(200),
        "the request that waited for remote's new worker, once its files answer"
    );
    node.stop().await;
    drop(fs);
}

/// A worker's spawn held up after its zygote said ready (the site's files went
/// silent while the node prepared it), and the site removed meanwhile: the zygote
/// no site needs any more is retired before the fork order reaches it. The drained
/// site's queued request still gets a new worker at once. Before, the order sat unread
/// for the fork's 10 s timeout, and the request waited for the busy worker instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a FUSE file system and creates Unix users"]
async fn a_spawn_whose_zygote_retires_meanwhile_still_starts_its_worker() {
    need_root_and_fuse();
    let node = Node::start().await;
    let owner = node.user.as_ref().expect("root nodes have a site user");
    let fs = mirrored_home(node.dir.path(), owner, false);
    node.add(node.spec("remote", &["remote.test"], &fs.mountpoint.join("app.py")))
        .await;
    let first = node.pid("remote.test", "/pid").await;
    let addr = node.addr;
    let busy = tokio::spawn(crate::harness::get(addr, "remote.test", "/sleep?s=8"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    fs.signal(Signal::SIGUSR1);
    // A second worker for this one: its zygote is ready, its files are silent.
    let queued = tokio::spawn(crate::harness::get(addr, "remote.test", "/pid"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.store().remove("remote").unwrap();
    // The registry is looked at every 200 ms: the zygote is retired by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fs.signal(Signal::SIGUSR2);

    let answer = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("the queued request was never answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        !busy.is_finished(),
        "the queued request waited for the busy worker: its own never started"
    );
    assert_ne!(crate::harness::pid_of(&answer), first);
    assert_eq!(busy.await.unwrap().unwrap().status, 200);
    node.stop().await;
    drop(fs);
}
