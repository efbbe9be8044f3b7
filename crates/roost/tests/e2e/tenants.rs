//! Hostile tenants, as root: each site runs as its own Unix user inside its own cgroup,
//! and one site can neither reach another nor take the node down. These tests need
//! root (users, cgroups); CI runs them with `--run-ignored all`, and without root they
//! fail with a clear message rather than pass.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use roost_registry::{FsChecks, SiteSpec};

use roost::server::SpawnMode;

use crate::harness::{
    alive, get, python, site_cgroup_dirs, site_cgroup_file, Load, Node, TestUser,
};

fn need_root() {
    crate::harness::need_root("it creates Unix users and cgroups");
}

/// A site folder owned by `user` holding the tenant fixture, and the site's spec.
fn tenant_site(node: &Node, name: &str, user: &TestUser) -> SiteSpec {
    tenant_site_in(&node.dir.path().join("sites").join(name), name, user)
}

/// The same, in `dir`.
fn tenant_site_in(dir: &std::path::Path, name: &str, user: &TestUser) -> SiteSpec {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(
        dir.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = dir.join("app.py");
    std::fs::copy(crate::harness::fixture("tenant.py"), &app).unwrap();
    std::os::unix::fs::chown(dir, Some(user.uid), Some(user.uid)).unwrap();
    std::os::unix::fs::chown(&app, Some(user.uid), None).unwrap();
    SiteSpec {
        name: name.into(),
        hosts: vec![format!("{name}.test")],
        entry: Some(app.display().to_string()),
        interpreter: Some(python()),
        user: Some(user.name.clone()),
        ..SiteSpec::default()
    }
}

/// The ways a worker is made: forked by a zygote from a spare, which made what is its
/// own ahead of its order, or forked at the order (no spare left); spawned plainly.
const SPAWN_WAYS: [(SpawnMode, u32); 3] = [
    (SpawnMode::Zygote, 1),
    (SpawnMode::Zygote, 0),
    (SpawnMode::Plain, 0),
];

async fn node_spawning(mode: SpawnMode, zygote_spares: u32) -> Node {
    Node::start_with(|c| {
        c.spawn = mode;
        c.zygote_spares = zygote_spares;
    })
    .await
}

async fn text(node: &Node, host: &str, path: &str) -> String {
    let r = get(node.addr, host, path).await.unwrap();
    assert_eq!(
        r.status,
        200,
        "{host}{path}: {}\nthe site's error log:\n{}",
        r.text(),
        node.log(host.trim_end_matches(".test"), "error.log")
    );
    r.text()
}

/// Asks `host` for each probe's path: each answer must start with the probe's
/// expectation ("ok…" or "denied…"); `who` names the asking site in a failure.
async fn probe<const N: usize>(
    node: &Node,
    host: &str,
    who: &str,
    probes: [(&str, String, &str); N],
) {
    for (what, path, expect) in probes {
        let answer = text(node, host, &path).await;
        assert!(answer.starts_with(expect), "{who} and {what}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates Unix users and per-site cgroups"]
async fn tenants_cannot_reach_each_other() {
    need_root();
    let node = Node::start().await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    node.add(tenant_site(&node, "alice", &alice)).await;
    node.add(tenant_site(&node, "bob", &bob)).await;
    let secret = node.dir.path().join("sites/bob/secret.txt");
    std::fs::write(&secret, "bob's secret").unwrap();
    std::os::unix::fs::chown(&secret, Some(bob.uid), Some(bob.uid)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let who: serde_json::Value =
        serde_json::from_str(&text(&node, "alice.test", "/whoami").await).unwrap();
    assert_eq!(who["uid"], alice.uid);
    assert_eq!(who["euid"], alice.uid);
    assert_eq!(
        who["groups"],
        serde_json::json!([]),
        "supplementary groups were kept"
    );
    assert_eq!(who["sid"], who["pid"], "the worker is not a session leader");
    assert_eq!(who["tmp_owner"], alice.uid);
    assert_eq!(who["tmp_mode"], 0o700);
    let env: Vec<String> = serde_json::from_value(who["env"].clone()).unwrap();
    for key in &env {
        assert!(
            ["HOME", "LANG", "LOGNAME", "PATH", "TMPDIR", "USER", "LC_CTYPE"]
                .contains(&key.as_str()),
            "the node's environment leaked into the worker: {key}"
        );
    }

    // Bob's files, logs, processes and sockets are out of Alice's reach.
    let bob_pid = text(&node, "bob.test", "/pid").await;
    let bob_log = node.dir.path().join("logs/bob/error.log");
    let own_log = node.dir.path().join("logs/alice/access.log");
    let probes = [
        (
            "bob's file",
            format!("/read?path={}", secret.display()),
            "denied",
        ),
        (
            "bob's error log",
            format!("/read?path={}", bob_log.display()),
            "denied",
        ),
        ("bob's worker", format!("/kill?pid={bob_pid}"), "denied"),
        (
            "bob's slot socket",
            format!("/open?path=/proc/{bob_pid}/fd/3"),
            "denied",
        ),
        (
            "her own log",
            format!("/read?path={}", own_log.display()),
            "ok",
        ),
        // Listing them would name every site of the node.
        (
            "the folder of every site's logs",
            format!("/ls?path={}", node.dir.path().join("logs").display()),
            "denied",
        ),
        (
            "the folder of every site's TMPDIR",
            format!("/ls?path={}", node.dir.path().join("run/tmp").display()),
            "denied",
        ),
        (
            "the folder of every site's cgroup",
            format!(
                "/ls?path={}",
                site_cgroup_dirs(&node.cgroup_name, "bob")[0]
                    .parent()
                    .unwrap()
                    .display()
            ),
            "denied",
        ),
        // It holds every site's environment: their secrets.
        (
            "the registry",
            format!("/read?path={}", node.registry.display()),
            "denied",
        ),
        (
            "the registry's write-ahead log",
            format!("/read?path={}-wal", node.registry.display()),
            "denied",
        ),
    ];
    probe(&node, "alice.test", "alice", probes).await;
    assert!(alive(bob_pid.parse().unwrap()));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users"]
async fn root_low_uids_and_writable_code_are_refused_before_any_spawn() {
    need_root();
    let node = Node::start().await;
    let tenant = TestUser::create();
    let mut cases = Vec::new();
    for (name, user, expect) in [
        ("asroot", "root", "never run as root"),
        ("lowuid", "daemon", "below the minimum"),
    ] {
        let mut spec = tenant_site(&node, name, &tenant);
        spec.user = Some(user.into());
        // Written past the CLI's checks, as a hostile or careless registry writer could.
        node.store()
            .add(&spec.validate(FsChecks::Skip).unwrap())
            .unwrap();
        cases.push((name, expect));
    }
    let spec = tenant_site(&node, "writable", &tenant);
    node.store()
        .add(&spec.clone().validate(FsChecks::Full).unwrap())
        .unwrap();
    std::fs::set_permissions(
        spec.entry.as_deref().unwrap(),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    cases.push(("writable", "writable by others"));

    for (name, expect) in cases {
        let host = format!("{name}.test");
        node.eventually(&format!("{name} to be refused"), || async {
            get(node.addr, &host, "/whoami")
                .await
                .is_ok_and(|r| r.status == 500)
        })
        .await;
        node.eventually(&format!("{name}'s refusal in its error log"), || async {
            node.log(name, "error.log").contains(expect)
        })
        .await;
    }
    assert!(node.worker_pids().is_empty(), "a refused site got a worker");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site memory cgroups"]
async fn a_memory_hog_dies_alone_in_its_cgroup() {
    need_root();
    let node = Node::start().await;
    let (hog_user, calm_user) = (TestUser::create(), TestUser::create());
    let mut hog = tenant_site(&node, "hog", &hog_user);
    hog.memory_max = Some(64 << 20);
    node.add(hog).await;
    node.add(tenant_site(&node, "steady", &calm_user)).await;
    let load = Load::start(node.addr, "steady.test", "/pid", 4);

    let r = get(node.addr, "hog.test", "/hog?mib=128").await.unwrap();
    assert_eq!(
        r.status,
        502,
        "a hog twice its limit was not killed: {}",
        r.text()
    );
    // The site serves again on the next request.
    text(&node, "hog.test", "/pid").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (ok, failed) = load.stop().await;
    eprintln!("neighbour during the OOM kill: {ok} ok, {failed} failed");
    assert!(ok > 10);
    assert_eq!(failed, 0, "the neighbour noticed the hog");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site memory cgroups"]
async fn a_memory_limit_lowered_below_what_the_site_holds_takes_effect() {
    need_root();
    let node = Node::start().await;
    let user = TestUser::create();
    let mut spec = tenant_site(&node, "shrink", &user);
    spec.memory_max = Some(256 << 20);
    node.add(spec.clone()).await;
    let dir = site_cgroup_dirs(&node.cgroup_name, "shrink")
        .into_iter()
        .find(|dir| dir.join("memory.max").exists() || dir.join("memory.limit_in_bytes").exists())
        .expect("the site has no memory cgroup");
    let v1 = dir.join("memory.limit_in_bytes").exists();
    let (limit_file, usage_file) = match v1 {
        true => ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        false => ("memory.max", "memory.current"),
    };
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).map(|v| v.trim().to_owned());
    // memsw (v1 with swap accounting) must never be left lifted.
    let limits = |bytes: u64| {
        ["memory.memsw.limit_in_bytes", limit_file]
            .iter()
            .all(|file| read(file).map_or(!file.contains("memsw"), |v| v == bytes.to_string()))
    };

    let hog = tokio::spawn(get(node.addr, "shrink.test", "/hog?mib=96&hold=3"));
    node.eventually("the worker to hold 96 MiB", || async {
        read(usage_file).is_ok_and(|v| v.parse::<u64>().unwrap() > 96 << 20)
    })
    .await;
    spec.memory_max = Some(64 << 20);
    // Raised: a lowered pids.max waits for the old workers too (the test below).
    spec.pids_max = Some(96);
    node.store()
        .replace(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();
    let pids_max = site_cgroup_file(&node.cgroup_name, "shrink", "pids.max");
    if v1 {
        // v1 refuses a limit below the group's usage (EBUSY): the old one stays, whole,
        // until the worker holding the memory has gone.
        node.error_log_with("shrink", "hold more memory than its new limit of 64MiB")
            .await;
        assert!(limits(256 << 20), "the old limit was not kept whole");
        // The site's other limits are in force meanwhile.
        assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "96");
        let r = hog.await.unwrap().unwrap();
        assert_eq!(r.text(), "survived 96 MiB");
        node.error_log_with("shrink", "the memory limit of 64MiB is in force")
            .await;
    } else {
        // v2 reclaims, then kills.
        assert_eq!(hog.await.unwrap().unwrap().status, 502);
    }
    assert!(limits(64 << 20), "the new limit is not written");
    text(&node, "shrink.test", "/pid").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site pids cgroups"]
async fn a_pids_limit_the_old_and_new_workers_together_pass_waits_for_the_old_ones() {
    need_root();
    let node = Node::start().await;
    let user = TestUser::create();
    let mut spec = tenant_site(&node, "fewer", &user);
    spec.threads = Some(4);
    node.add(spec.clone()).await;
    let pids_file = |file| site_cgroup_file(&node.cgroup_name, "fewer", file);
    let (pids_max, pids_current) = (pids_file("pids.max"), pids_file("pids.current"));
    let usage = site_cgroup_dirs(&node.cgroup_name, "fewer")
        .into_iter()
        .flat_map(|dir| {
            [
                dir.join("memory.usage_in_bytes"),
                dir.join("memory.current"),
            ]
        })
        .find(|file| file.exists())
        .expect("the site has no memory cgroup");
    let read = |file: &PathBuf| std::fs::read_to_string(file).unwrap().trim().to_owned();
    let old_pid = text(&node, "fewer.test", "/pid").await;
    let busy = tokio::spawn(get(node.addr, "fewer.test", "/hog?mib=48&hold=4"));
    node.eventually("the old worker to be busy", || async {
        read(&usage).parse::<u64>().unwrap() > 48 << 20
    })
    .await;
    // Room for the old worker (main thread and four slots) and one task more: its
    // successor, started beside it, needs as many.
    let fewer: u32 = read(&pids_current).parse::<u32>().unwrap() + 1;
    spec.pids_max = Some(fewer);
    node.store()
        .replace(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();

    node.error_log_with(
        "fewer",
        "waits until the 1 worker(s) being replaced have gone",
    )
    .await;
    assert_eq!(read(&pids_max), "64", "the lower limit was written early");
    for _ in 0..4 {
        let pid = text(&node, "fewer.test", "/pid").await;
        assert_ne!(pid, old_pid, "the old worker served after the change");
    }
    assert_eq!(busy.await.unwrap().unwrap().text(), "survived 48 MiB");
    node.error_log_with(
        "fewer",
        &format!("the limit of {fewer} processes and threads is in force"),
    )
    .await;
    assert_eq!(read(&pids_max), fewer.to_string());
    text(&node, "fewer.test", "/pid").await;
    let log = node.log("fewer", "error.log");
    assert!(
        !log.contains("died") && !log.contains("can't start new thread"),
        "the new workers did not start whole:\n{log}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site pids cgroups"]
async fn a_fork_bomb_stops_at_pids_max() {
    need_root();
    let node = Node::start().await;
    let (bomber, calm_user) = (TestUser::create(), TestUser::create());
    let mut bomb = tenant_site(&node, "bomb", &bomber);
    bomb.pids_max = Some(16);
    node.add(bomb).await;
    node.add(tenant_site(&node, "steady", &calm_user)).await;
    let load = Load::start(node.addr, "steady.test", "/pid", 4);

    let children: u32 = text(&node, "bomb.test", "/forkbomb")
        .await
        .trim()
        .parse()
        .unwrap();
    eprintln!("the fork bomb got {children} children");
    assert!(children < 16, "{children} forks with pids.max 16");
    // The bomb's children live on for a while: the neighbour keeps answering meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (ok, failed) = load.stop().await;
    assert!(ok > 10);
    assert_eq!(failed, 0, "the neighbour noticed the fork bomb");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site cgroups"]
async fn a_removed_site_loses_its_cgroups() {
    need_root();
    let node = Node::start().await;
    let user = TestUser::create();
    node.add(tenant_site(&node, "gone", &user)).await;
    text(&node, "gone.test", "/pid").await;
    let dirs: Vec<PathBuf> = site_cgroup_dirs(&node.cgroup_name, "gone");
    assert!(!dirs.is_empty(), "the site has no cgroup at all");
    node.store().remove("gone").unwrap();
    node.eventually("the site's cgroups to be removed", || async {
        dirs.iter().all(|d| !d.exists())
    })
    .await;
    node.stop().await;
}

/// A site's cgroups are made with its first process, with the limits the site has
/// then (here changed before anyone visited it): a site nobody visits costs the
/// kernel nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site cgroups"]
async fn a_site_has_cgroups_from_its_first_process_on() {
    need_root();
    let node = Node::start().await;
    let (quiet_user, busy_user) = (TestUser::create(), TestUser::create());
    let mut quiet = tenant_site(&node, "quiet", &quiet_user);
    quiet.pids_max = Some(80);
    node.store()
        .add(&quiet.validate(FsChecks::Full).unwrap())
        .unwrap();
    // Added after it, and visited: the node has read the registry.
    node.add(tenant_site(&node, "busy", &busy_user)).await;
    assert!(!site_cgroup_dirs(&node.cgroup_name, "busy").is_empty());
    assert_eq!(
        site_cgroup_dirs(&node.cgroup_name, "quiet"),
        [] as [PathBuf; 0]
    );

    quiet.pids_max = Some(72);
    node.store()
        .replace(&quiet.validate(FsChecks::Full).unwrap())
        .unwrap();
    node.add(tenant_site(&node, "later", &busy_user)).await;
    assert_eq!(
        site_cgroup_dirs(&node.cgroup_name, "quiet"),
        [] as [PathBuf; 0]
    );
    node.until_status("quiet.test", "/pid", 200).await;
    let pids_max = site_cgroup_file(&node.cgroup_name, "quiet", "pids.max");
    assert_eq!(std::fs::read_to_string(pids_max).unwrap().trim(), "72");
    node.stop().await;
}

#[test]
#[ignore = "needs root: runs sites as another user"]
fn sigkill_of_the_node_leaves_no_worker_behind() {
    need_root();
    let dir = crate::harness::test_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = TestUser::create();
    let registry = dir.path().join("r.db");
    let app = dir.path().join("app.py");
    std::fs::copy(crate::harness::fixture("tenant.py"), &app).unwrap();
    let mut store = roost_registry::SqliteStore::open(&registry).unwrap();
    let spec = SiteSpec {
        name: "orphan".into(),
        hosts: vec!["orphan.test".into()],
        entry: Some(app.display().to_string()),
        interpreter: Some(python()),
        user: Some(user.name.clone()),
        processes_min: Some(3),
        ..SiteSpec::default()
    };
    store.add(&spec.validate(FsChecks::Full).unwrap()).unwrap();
    let cgroup_name = format!("roost-e2e-orphan-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("--registry")
        .arg(format!("sqlite:{}", registry.display()))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cgroup-name",
        ])
        .arg(&cgroup_name)
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--tmp-dir")
        .arg(dir.path().join("tmp"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let loader = dir.path().join("run/loader.py").display().to_string();
    let workers = || crate::harness::pids_running(&loader);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while workers().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "processes.min workers never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = workers();
    node.kill().unwrap(); // SIGKILL: no cleanup code of the node runs
    node.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "workers {pids:?} outlived the node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The killed node could not remove its cgroups (the next node would sweep them)
    // nor unmount its favordynmods hierarchy, which would keep the temporary folder.
    for dir in site_cgroup_dirs(&cgroup_name, "orphan") {
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(dir.parent().unwrap());
    }
    let _ = nix::mount::umount2(
        &dir.path().join("run/cgroup-favordynmods"),
        nix::mount::MntFlags::MNT_DETACH,
    );
}

#[test]
#[ignore = "needs root: switches to the user nobody to run a node without root"]
fn without_root_the_node_serves_as_the_invoking_user() {
    need_root();
    let dir = crate::harness::test_dir();
    // The node's folder: nobody's own (one others could write in is refused).
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(nobody.uid.as_raw()), None).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("node.log");
    let mut node = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_roost"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
        .arg(dir.path().join("demo"))
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux) runs the node as nobody");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let mut last = String::new();
        for _ in 0..200 {
            match get(addr, "hello.localhost", "/").await {
                Ok(r) if r.status == 200 => return r.text(),
                Ok(r) => last = r.text(),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the unprivileged demo never answered: {last}");
    });
    assert!(answer.starts_with("Hello from roost!"), "{answer}");
    let pid: u32 = answer
        .split("worker pid: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.contains("65534"),
        "the worker is not running as nobody: {uid_line}"
    );
    node.kill().unwrap();
    node.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not running as root"), "{text}");
    assert!(
        text.contains("not enforced") || text.contains("polling"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: a tenant-owned interpreter must never run as root"]
async fn a_tenant_owned_interpreter_never_runs_with_the_nodes_rights() {
    need_root();
    let node = Node::start().await;
    let tenant = TestUser::create();
    let mut spec = tenant_site(&node, "ownpy", &tenant);
    // The tenant's own copy of python, which the tenant could replace at any time.
    let bin = node.dir.path().join("sites/ownpy/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let own_python = bin.join("python3");
    std::fs::copy("/usr/bin/python3", &own_python).unwrap();
    for path in [&bin, &own_python] {
        std::os::unix::fs::chown(path, Some(tenant.uid), Some(tenant.uid)).unwrap();
    }
    spec.interpreter = Some(own_python.display().to_string());
    node.add(spec).await;
    let who: serde_json::Value =
        serde_json::from_str(&text(&node, "ownpy.test", "/whoami").await).unwrap();
    assert_eq!(who["uid"], tenant.uid, "served, by the site's user");
    // Nothing runs the tenant's binary with root's rights (a zygote would).
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe == own_python {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
            assert!(
                uid_line.split_whitespace().nth(1).is_none_or(|u| u != "0"),
                "the tenant's python runs as root"
            );
        }
    }
    node.stop().await;
}

/// Cold starts on cgroup v1 wait for an RCU grace period per cgroup move unless the
/// kernel favours moves: a root node mounts a hierarchy with `favordynmods` while it
/// runs (unless the host's own hierarchies have it), and unmounts it when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a cgroup hierarchy"]
async fn a_root_node_favours_cgroup_moves_while_it_runs() {
    need_root();
    let mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
    let host_has_it = mounts().lines().any(|l| {
        (l.contains(" cgroup ") || l.contains(" cgroup2 "))
            && l.contains("favordynmods")
            && !l.contains("name=roost-dynmods")
    });
    let node = Node::start().await;
    let point = node.dir.path().join("run/cgroup-favordynmods");
    let point = format!(" {} ", point.display());
    // Once the node serves, its start-up is over.
    node.eventually("the node to serve", || async {
        get(node.addr, "nothing.test", "/").await.is_ok()
    })
    .await;
    let ours = mounts()
        .lines()
        .find(|l| l.contains(&point))
        .map(str::to_owned);
    if host_has_it {
        assert!(ours.is_none(), "mounted although the host has favordynmods");
    } else {
        let line = ours.expect("no favordynmods hierarchy mounted by the node");
        assert!(line.contains("favordynmods"), "{line}");
    }
    node.stop().await;
    assert!(
        !mounts().contains(&point),
        "the hierarchy outlived the node"
    );
}

/// A site given to another user (or its name reused by another user's site) gets a
/// private TMPDIR and logs of its own: the previous owner's files are not handed over
/// with it; their logs are set aside where only root can read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users"]
async fn a_site_that_changes_hands_does_not_hand_over_its_tmpdir_or_logs() {
    need_root();
    let node = Node::start().await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    node.add(tenant_site(&node, "shop", &alice)).await;
    let written = text(&node, "shop.test", "/tmp-write?name=orders.csv").await;
    assert!(written.starts_with("ok"), "{written}");
    assert_eq!(text(&node, "shop.test", "/tmp-list").await, "orders.csv");

    hand_over(&node, "shop", &bob).await;
    let whoami: serde_json::Value =
        serde_json::from_str(&text(&node, "shop.test", "/whoami").await).unwrap();
    assert_eq!(whoami["tmp_owner"], bob.uid);
    assert_eq!(whoami["tmp_mode"], 0o700);
    assert_eq!(
        text(&node, "shop.test", "/tmp-list").await,
        "",
        "the new owner sees the previous owner's files"
    );
    let tmp_root = node.dir.path().join("run/tmp");
    node.eventually("the previous owner's TMPDIR to be removed", || async {
        std::fs::read_dir(&tmp_root).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".previous-")
        })
    })
    .await;

    let logs = node.dir.path().join("logs").join("shop");
    assert!(
        !node.log("shop", "access.log").contains("orders.csv"),
        "the new owner can read the previous owner's access log"
    );
    let asides: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(asides.len(), 1, "{asides:?}");
    let aside = std::fs::metadata(&asides[0]).unwrap();
    assert_eq!((aside.uid(), aside.mode() & 0o777), (0, 0o700));
    let kept = std::fs::read_to_string(asides[0].join("access.log")).unwrap();
    assert!(
        kept.contains("orders.csv"),
        "the previous owner's log was lost"
    );
    let bob_gid = nix::unistd::User::from_name(&bob.name)
        .unwrap()
        .unwrap()
        .gid;
    assert_eq!(
        std::fs::metadata(logs.join("access.log")).unwrap().gid(),
        bob_gid.as_raw()
    );
    node.stop().await;
}

/// Gives the site `name` to `user`, and waits until its new workers run as that user.
async fn hand_over(node: &Node, name: &str, user: &TestUser) {
    let given = tenant_site(node, name, user);
    node.store()
        .replace(&given.validate(FsChecks::Full).unwrap())
        .unwrap();
    let host = format!("{name}.test");
    node.eventually("the site to run as its new owner", || async {
        // Answers in between may be errors: the old owner's workers are retiring.
        let r = get(node.addr, &host, "/whoami").await;
        r.is_ok_and(|r| {
            r.status == 200
                && serde_json::from_str::<serde_json::Value>(&r.text()).unwrap()["uid"] == user.uid
        })
    })
    .await;
}

/// What the node says of the previous owner's workers still finishing after the site
/// changed hands (here: one killed mid-request) goes to that owner's set-aside log,
/// where their own output goes, not to the new owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users"]
async fn the_nodes_notes_on_the_previous_owners_workers_follow_its_logs() {
    need_root();
    let node = Node::start().await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    let spec = SiteSpec {
        processes_max: Some(2),
        ..tenant_site(&node, "shop", &alice)
    };
    node.add(spec).await;
    let pid: u32 = text(&node, "shop.test", "/pid").await.parse().unwrap();
    let addr = node.addr;
    let busy = tokio::spawn(async move { get(addr, "shop.test", "/hog?mib=1&hold=30").await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    hand_over(&node, "shop", &bob).await;
    // Alice's worker, retiring but busy, is killed from outside.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(busy.await.unwrap().unwrap().status, 502);

    let logs = node.dir.path().join("logs").join("shop");
    let aside = (std::fs::read_dir(&logs).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("the previous owner's logs set aside");
    let died = format!("worker pid {pid} died");
    node.eventually("the note in the previous owner's error log", || async {
        std::fs::read_to_string(aside.join("error.log")).is_ok_and(|log| log.contains(&died))
    })
    .await;
    let current = node.log("shop", "error.log");
    assert!(
        !current.contains(&format!("pid {pid}")),
        "the new owner's error log tells of the previous owner's worker:\n{current}"
    );
    node.stop().await;
}

/// A process a worker left behind in a session of its own (setsid, double fork) does not
/// outlive the site's last worker: a site gone idle runs nothing, as the idle site's
/// promise says. With `preload`, the retired template exits on its own and is not
/// counted among what is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: per-site cgroups"]
async fn nothing_of_a_site_runs_on_once_it_is_idle() {
    need_root();
    let node = Node::start().await;
    let alice = TestUser::create();
    for (name, preload) in [("plain", false), ("preloaded", true)] {
        let spec = SiteSpec {
            idle_timeout: Some(Duration::from_secs(1)),
            preload: Some(preload),
            ..tenant_site(&node, name, &alice)
        };
        node.add(spec).await;
        let host = format!("{name}.test");
        let worker: u32 = text(&node, &host, "/pid").await.parse().unwrap();
        let daemon: u32 = text(&node, &host, "/daemon").await.parse().unwrap();
        assert!(alive(daemon));
        node.eventually("the idle worker to exit", || async { !alive(worker) })
            .await;
        node.eventually("the process it left behind to be killed", || async {
            !alive(daemon)
        })
        .await;
        node.error_log_with(name, "killed 1 process(es) left behind")
            .await;
        // The site starts again on its next request.
        text(&node, &host, "/pid").await;
    }
    node.stop().await;
}

/// A site handed from one user to another and back, six times, while eight clients
/// load it: no request fails (its code is root's, so either user may run it). The
/// workers of the new owner start together, and used to race to make its TMPDIR: the
/// losers failed to start and the site answered 500 until its backoff ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users"]
async fn a_site_handed_back_and_forth_under_load_fails_no_request() {
    need_root();
    let node = Node::start().await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    let spec = tenant_site(&node, "shop", &alice);
    let code = node.dir.path().join("sites").join("shop");
    for path in [code.clone(), code.join("app.py")] {
        std::os::unix::fs::chown(path, Some(0), Some(0)).unwrap();
    }
    node.add(spec.clone()).await;

    let load = Load::start(node.addr, "shop.test", "/pid", 8);
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let owner = if round % 2 == 0 { &bob } else { &alice };
        let given = SiteSpec {
            user: Some(owner.name.clone()),
            ..spec.clone()
        };
        node.store()
            .replace(&given.validate(FsChecks::Full).unwrap())
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("{ok} ok, {failed} failed while the site changed hands six times");
    assert!(ok > 100, "the load did not run ({ok} requests)");
    assert_eq!(failed, 0);
    node.stop().await;
}

/// What a worker leaves where memory or files outlive processes: /dev/shm (a tmpfs,
/// so RAM), a System V segment, /tmp and /var/tmp. Each worker has a private /dev/shm
/// and System V namespace that end with it, and sees its site's TMPDIR as /tmp and
/// /var/tmp: nothing it parks there is seen by another site, and nothing stays
/// charged to the host once the site is idle. Before, 32 MiB parked in /dev/shm by a
/// site stayed in the host's RAM for good, every tenant could read what another left
/// world-readable in /tmp, and System V segments outlived their site. Its /proc shows
/// its own user's processes only (before: every process of the host, other tenants'
/// with their command lines and memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users, in namespaces of their own"]
async fn tmp_shared_memory_and_proc_are_the_workers_own() {
    need_root();
    for (mode, spares) in SPAWN_WAYS {
        let node = node_spawning(mode, spares).await;
        let (alice, bob) = (TestUser::create(), TestUser::create());
        node.add(tenant_site(&node, "bob", &bob)).await;
        let sites: &[(&str, bool)] = match mode {
            SpawnMode::Zygote => &[("forked", false), ("preloaded", true)],
            SpawnMode::Plain => &[("plain", false)],
        };
        for &(name, preload) in sites {
            let spec = SiteSpec {
                idle_timeout: Some(Duration::from_secs(1)),
                preload: Some(preload),
                ..tenant_site(&node, name, &alice)
            };
            node.add(spec).await;
            let host = format!("{name}.test");
            let parked = Parked(format!("roost-park-{}-{name}", std::process::id()));
            let worker: u32 = text(&node, &host, "/pid").await.parse().unwrap();
            let answer = text(&node, &host, &format!("/park?mib=32&name={}", parked.0)).await;
            assert!(answer.starts_with("ok"), "{name}: parking failed: {answer}");

            for path in parked.host_paths() {
                assert!(!path.exists(), "{name}: {} is on the host", path.display());
            }
            let segments = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
            assert!(
                !segments
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(&PARK_KEY.to_string())),
                "{name}: its System V segment is the host's:\n{segments}"
            );
            for (folder, expect) in [
                ("/dev/shm", "ok: read 33554432"),
                ("/tmp", "ok"),
                ("/var/tmp", "ok"),
            ] {
                let own = text(&node, &host, &format!("/read?path={folder}/{}", parked.0)).await;
                assert!(own.starts_with(expect), "{name}: its own {folder}: {own}");
                let other = text(
                    &node,
                    "bob.test",
                    &format!("/read?path={folder}/{}", parked.0),
                )
                .await;
                assert!(
                    other.starts_with("denied"),
                    "{name}: bob reads its {folder}: {other}"
                );
            }
            // Its /tmp is its TMPDIR, which goes with the site (spawn/tmpdir.rs).
            let listed = text(&node, &host, "/tmp-list").await;
            assert!(
                listed.lines().any(|l| l == parked.0),
                "{name}: TMPDIR holds {listed:?}"
            );
            let locked = text(&node, &host, "/semaphore").await;
            assert_eq!(locked, "ok: locked", "{name}: multiprocessing");
            // Its /proc shows its own user's processes, not bob's or the host's.
            let bob_pid = text(&node, "bob.test", "/pid").await;
            let probes = [
                (
                    "bob's worker",
                    format!("/read?path=/proc/{bob_pid}/status"),
                    "denied",
                ),
                ("init", "/read?path=/proc/1/cmdline".to_string(), "denied"),
                (
                    "its own worker",
                    format!("/read?path=/proc/{worker}/status"),
                    "ok",
                ),
            ];
            probe(&node, &host, name, probes).await;

            node.eventually("the idle worker to exit", || async { !alive(worker) })
                .await;
            let charged = || {
                site_cgroup_dirs(&node.cgroup_name, name)
                    .iter()
                    .find_map(|dir| memory_charged(dir))
                    .expect("the site has a memory cgroup")
            };
            node.eventually("the parked memory to be freed", || async {
                charged() < 16 << 20
            })
            .await;
        }
        node.stop().await;
    }
}

/// What Unix users do not keep apart: abstract Unix sockets have no file and no
/// permissions, so any process could connect to one, whoever listens; two sites of one
/// owner run as one user, so one could signal and trace the other's workers. Each
/// worker is in a Landlock domain of its own: it reaches neither another tenant's nor
/// the host's abstract sockets, nor signals nor traces the workers of its owner's other
/// sites, and still reaches its own sockets and its multiprocessing children. Before,
/// every one of those was reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users, each in a Landlock domain of its own"]
async fn abstract_sockets_signals_and_traces_stay_inside_a_worker() {
    need_root();
    let tag = std::process::id();
    let host_name = format!("roost-host-{tag}");
    let _host = {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener};
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&host_name).unwrap()).unwrap()
    };
    for (mode, spares) in SPAWN_WAYS {
        let node = node_spawning(mode, spares).await;
        let (alice, bob) = (TestUser::create(), TestUser::create());
        node.add(tenant_site(&node, "bob", &bob)).await;
        // Another site of the same owner: the same Unix user.
        node.add(tenant_site(&node, "neighbour", &alice)).await;
        let bob_name = format!("roost-bob-{tag}-{mode:?}-{spares}");
        let listening = text(&node, "bob.test", &format!("/listen?name={bob_name}")).await;
        assert_eq!(listening, "ok: listening");
        let neighbour = text(&node, "neighbour.test", "/pid").await;
        let sites: &[(&str, bool)] = match mode {
            SpawnMode::Zygote => &[("forked", false), ("preloaded", true)],
            SpawnMode::Plain => &[("plain", false)],
        };
        for &(name, preload) in sites {
            let spec = SiteSpec {
                preload: Some(preload),
                ..tenant_site(&node, name, &alice)
            };
            node.add(spec).await;
            let host = format!("{name}.test");
            let own_name = format!("roost-own-{tag}-{name}-{spares}");
            let listening = text(&node, &host, &format!("/listen?name={own_name}")).await;
            assert_eq!(listening, "ok: listening", "{name}");
            let probes = [
                (
                    "bob's abstract socket",
                    format!("/connect?name={bob_name}"),
                    "denied",
                ),
                (
                    "the host's abstract socket",
                    format!("/connect?name={host_name}"),
                    "denied",
                ),
                (
                    "the neighbour's worker (signal 0)",
                    format!("/kill?pid={neighbour}&sig=0"),
                    "denied",
                ),
                (
                    "the neighbour's environment",
                    format!("/read?path=/proc/{neighbour}/environ"),
                    "denied",
                ),
                (
                    "its own abstract socket",
                    format!("/connect?name={own_name}"),
                    "ok: connected",
                ),
                ("a multiprocessing manager", "/manager".into(), "ok: 42"),
            ];
            let who = format!(
                "{name}, {spares} spare(s) (Landlock scopes need Linux 6.12 or newer; the node logs at start whether workers get them)"
            );
            probe(&node, &host, &who, probes).await;
        }
        assert!(alive(neighbour.parse().unwrap()));
        node.stop().await;
    }
}

/// A zygote forks the workers of every site on its interpreter, and a forked worker
/// starts with a copy of the zygote's memory: whatever the zygote read of one site's
/// order (its environment, with the site's secrets; its paths) would be in the next
/// site's worker, freed but not cleared. A tenant scans its worker's memory for a
/// neighbour's secret and the path of its code, after the neighbour's worker was
/// forked from the same zygote. Before, it found the secret three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs sites as other users"]
async fn a_forked_worker_holds_no_other_sites_secrets() {
    need_root();
    let node = Node::start_with(|c| c.spawn = SpawnMode::Zygote).await;
    let (alice, bob) = (TestUser::create(), TestUser::create());
    let secret = format!("roost-secret-{:032x}", rand_token());
    let spec = SiteSpec {
        env: [("SECRET_KEY".to_string(), secret.clone())].into(),
        ..tenant_site(&node, "alice", &alice)
    };
    let code = spec.entry.clone().unwrap();
    node.add(spec).await;
    // Shifted by one, byte by byte: what is sought never travels to bob's worker.
    let scan = |sought: &str| {
        let shifted: String = (sought.bytes())
            .map(|b| format!("{:02x}", b.wrapping_add(1)))
            .collect();
        format!("/scan?shifted={shifted}")
    };
    for sought in [&secret, &code] {
        let found = text(&node, "alice.test", &scan(sought)).await;
        assert!(
            found.starts_with("ok: ") && found != "ok: 0",
            "alice's worker does not find its own {sought}: {found}"
        );
    }
    // Each of bob's sites starts a worker forked after alice's order went through.
    for round in 0..3 {
        let name = format!("bob{round}");
        node.add(tenant_site(&node, &name, &bob)).await;
        for (what, sought) in [("secret", &secret), ("code's path", &code)] {
            let found = text(&node, &format!("{name}.test"), &scan(sought)).await;
            assert_eq!(found, "ok: 0", "{name}'s worker holds alice's {what}");
        }
    }
    node.stop().await;
}

fn rand_token() -> u128 {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    u128::from_le_bytes(bytes)
}

/// A site whose code is below /tmp cannot run where /tmp is its worker's own: it is
/// refused before any fork, with the reason in its error log (and not a worker that
/// fails to find its code), and the neighbour is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: only a root node gives workers a /tmp of their own"]
async fn a_site_whose_code_is_below_tmp_is_refused_with_the_reason() {
    need_root();
    let node = Node::start().await;
    let alice = TestUser::create();
    let below_tmp = tempfile::tempdir().unwrap();
    let code = below_tmp.path().join("site");
    node.add(tenant_site_in(&code, "intmp", &alice)).await;
    let r = get(node.addr, "intmp.test", "/pid").await.unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    node.error_log_with("intmp", "is below /tmp, which each worker sees as its own")
        .await;
    assert!(node.worker_pids().is_empty(), "a worker was forked for it");
    node.add(tenant_site(&node, "elsewhere", &alice)).await;
    text(&node, "elsewhere.test", "/pid").await;
    node.stop().await;
}

/// Bytes charged to a memory cgroup folder (v1 or v2); None for other controllers.
fn memory_charged(dir: &std::path::Path) -> Option<u64> {
    ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The System V key `/park` uses ("ROOS").
const PARK_KEY: u32 = 0x524F_4F53;

/// What `/park` leaves on the host when its worker shares the host's folders;
/// removed at the end whatever the test found.
struct Parked(String);

impl Parked {
    fn host_paths(&self) -> Vec<PathBuf> {
        ["/dev/shm", "/tmp", "/var/tmp"]
            .iter()
            .map(|folder| PathBuf::from(folder).join(&self.0))
            .collect()
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for path in self.host_paths() {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::process::Command::new("ipcrm")
            .arg("--shmem-key")
            .arg(PARK_KEY.to_string())
            .output();
    }
}
