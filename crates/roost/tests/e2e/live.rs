//! Sites added, changed and removed while the node runs and another site is under load.

use std::time::Duration;

use roost_registry::{FsChecks, SiteSpec};

use crate::harness::{alive, get, pid_of, Load, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_add_change_remove_without_a_failed_request_elsewhere() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("steady", &["steady.test"], &app)).await;

    let load = Load::start(node.addr, "steady.test", "/", 4);

    // Add: served shortly after the write, no restart.
    let spec = node.spec("fresh", &["fresh.test"], &app);
    let written = tokio::time::Instant::now();
    node.store()
        .add(&spec.clone().validate(FsChecks::Full).unwrap())
        .unwrap();
    node.eventually("the new site", || async {
        get(node.addr, "fresh.test", "/pid")
            .await
            .map(|r| r.status == 200)
            .unwrap_or(false)
    })
    .await;
    eprintln!(
        "new site served {:?} after the registry write",
        written.elapsed()
    );
    let old_pid: u32 = get(node.addr, "fresh.test", "/pid")
        .await
        .unwrap()
        .text()
        .parse()
        .unwrap();

    // Change: a request in flight finishes on the old worker; new ones see the change.
    let addr = node.addr;
    let in_flight =
        tokio::spawn(async move { get(addr, "fresh.test", "/sleep?s=1").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed = SiteSpec {
        env: [("GREETING".into(), "changed".into())].into(),
        ..spec.clone()
    };
    node.store()
        .replace(&changed.validate(FsChecks::Full).unwrap())
        .unwrap();
    node.eventually("the change to take effect", || async {
        get(node.addr, "fresh.test", "/osenv?key=GREETING")
            .await
            .map(|r| r.text() == "changed")
            .unwrap_or(false)
    })
    .await;
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status,
        200,
        "the in-flight request was cut by the change: {}",
        r.text()
    );
    node.eventually("the old worker to retire", || async { !alive(old_pid) })
        .await;
    let new_pid: u32 = get(node.addr, "fresh.test", "/pid")
        .await
        .unwrap()
        .text()
        .parse()
        .unwrap();
    assert_ne!(new_pid, old_pid);

    // Remove: in-flight work drains, then 404.
    let in_flight =
        tokio::spawn(async move { get(addr, "fresh.test", "/sleep?s=1").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.store().remove("fresh").unwrap();
    node.eventually("the removed site to answer 404", || async {
        get(node.addr, "fresh.test", "/pid")
            .await
            .map(|r| r.status == 404)
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        in_flight.await.unwrap().status,
        200,
        "removal cut a request in flight"
    );
    node.eventually("the removed site's workers to exit", || async {
        !alive(new_pid)
    })
    .await;

    let (ok, failed) = load.stop().await;
    eprintln!("steady site: {ok} ok, {failed} failed during the changes");
    assert!(ok > 50, "the load did not run ({ok} requests)");
    assert_eq!(failed, 0);
    node.stop().await;
}

/// Log rotation without copytruncate: the files are renamed, SIGUSR1 makes the node
/// open new ones; every later line lands in the new files, none in the renamed ones,
/// and the workers go on (they print into a pipe, not into the file).
/// (The signal reaches the whole test process: nextest runs each test in its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_logs_and_keeps_the_workers() {
    use std::os::unix::fs::MetadataExt;

    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("rot", &["rot.test"], &app)).await;
    let before = pid_of(&get(node.addr, "rot.test", "/pid").await.unwrap());
    assert_eq!(
        get(node.addr, "rot.test", "/stderr").await.unwrap().status,
        200
    );
    let dir = node.dir.path().join("logs/rot");
    node.eventually("the first lines in both logs", || async {
        node.log("rot", "error.log")
            .contains("tester wrote to wsgi.errors")
            && node.log("rot", "access.log").contains("GET /stderr ")
    })
    .await;
    for name in ["access.log", "error.log"] {
        std::fs::rename(dir.join(name), dir.join(format!("{name}.1"))).unwrap();
    }

    nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR1).unwrap();
    // Reopening closes both files; the next line of each makes a new one.
    node.eventually("the old files closed", || async {
        node_holds(&dir).is_empty()
    })
    .await;
    assert_eq!(
        pid_of(&get(node.addr, "rot.test", "/pid").await.unwrap()),
        before
    );
    assert_eq!(
        get(node.addr, "rot.test", "/stderr?after")
            .await
            .unwrap()
            .status,
        200
    );
    node.eventually("the later lines in the new logs", || async {
        node.log("rot", "error.log")
            .contains("tester wrote to wsgi.errors")
            && node.log("rot", "access.log").contains("GET /stderr?after ")
    })
    .await;
    let old_access = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
    let old_error = std::fs::read_to_string(dir.join("error.log.1")).unwrap();
    assert!(!old_access.contains("?after"), "{old_access}");
    assert_eq!(
        old_error.matches("tester wrote to wsgi.errors").count(),
        1,
        "{old_error}"
    );
    // The site's group may read the new files, as it could the old ones.
    let folder_gid = std::fs::metadata(&dir).unwrap().gid();
    for name in ["access.log", "error.log"] {
        assert_eq!(
            std::fs::metadata(dir.join(name)).unwrap().gid(),
            folder_gid,
            "{name}"
        );
    }
    node.stop().await;
}

/// A site removed and added back under the same name while its old self still drains a
/// request: it is served again at once (its draining pool takes it back, as after a
/// change), and the drain's end (the site's cgroup removed, its room in the budget
/// given up) does not reach it: it keeps its worker and gets room for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_added_back_while_its_old_self_drains_is_left_alone_by_the_drain() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let spec = node.spec("again", &["again.test"], &app);
    node.add(spec.clone()).await;
    let old_pid = pid_of(&get(node.addr, "again.test", "/pid").await.unwrap());
    let addr = node.addr;
    let in_flight =
        tokio::spawn(async move { get(addr, "again.test", "/sleep?s=3").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.store().remove("again").unwrap();
    node.until_status("again.test", "/pid", 404).await;
    node.store()
        .add(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();
    node.until_status("again.test", "/pid", 200).await;
    let new_pid = pid_of(&get(node.addr, "again.test", "/pid").await.unwrap());
    assert!(
        !in_flight.is_finished(),
        "the site added back waited for its old self's drain"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the drained request: {}", r.text());
    assert_ne!(
        new_pid, old_pid,
        "the site added back is served by the old worker"
    );
    node.eventually("the old worker to exit", || async { !alive(old_pid) })
        .await;
    // The old pool ends right after its last worker: its cgroup goes, its budget entry
    // with it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        alive(new_pid),
        "the old site's end killed the worker of the site added back"
    );
    assert_eq!(
        pid_of(&get(node.addr, "again.test", "/pid").await.unwrap()),
        new_pid
    );
    // A new worker needs room from the budget.
    let _ = get(node.addr, "again.test", "/exit").await;
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        get(node.addr, "again.test", "/pid"),
    )
    .await
    .expect("no new worker for the site added back within 10 s")
    .unwrap();
    assert_eq!(next.status, 200, "{}", next.text());
    node.stop().await;
}

/// A registry replaced by another file (a backup restored; a configuration tool that
/// writes a copy and renames it over the old one): the node serves the new file's
/// sites, not the old file's it had open; a file that is no registry changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_file_replaced_by_another_is_loaded() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("before", &["before.test"], &app)).await;

    // A file that is no registry is refused, and the sites loaded last go on.
    let garbage = node.registry.with_extension("garbage");
    std::fs::write(
        &garbage,
        "no database, though long enough for a header".repeat(4),
    )
    .unwrap();
    std::fs::rename(&garbage, &node.registry).unwrap();
    for _ in 0..5 {
        let r = get(node.addr, "before.test", "/pid").await.unwrap();
        assert_eq!(r.status, 200, "a broken registry file took the sites down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let copy = node.registry.with_extension("new");
    let mut store = roost_registry::SqliteStore::open(&copy).unwrap();
    let spec = node.spec("after", &["after.test"], &app);
    store.add(&spec.validate(FsChecks::Full).unwrap()).unwrap();
    drop(store);
    std::fs::rename(&copy, &node.registry).unwrap();

    node.until_status("after.test", "/pid", 200).await;
    node.until_status("before.test", "/pid", 404).await;
    // And the new file is the one watched from now on.
    node.store().remove("after").unwrap();
    node.until_status("after.test", "/pid", 404).await;
    node.stop().await;
}

/// A commit is read when it is written, not at the next poll: with a poll once an hour,
/// a site added, changed and removed by another process is served, changed and gone,
/// and a registry file renamed over the old one is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_read_when_it_is_written_not_at_the_next_poll() {
    let node = Node::start_with(|c| c.registry_poll = Duration::from_secs(3600)).await;
    let app = node.app("tester.py");
    node.add(node.spec("woken", &["woken.test"], &app)).await;
    let mut spec = node.spec("woken", &["woken.test", "alias.test"], &app);
    spec.threads = Some(2);
    node.store()
        .replace(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();
    node.until_status("alias.test", "/pid", 200).await;
    node.store().remove("woken").unwrap();
    node.until_status("woken.test", "/pid", 404).await;

    let copy = node.registry.with_extension("new");
    let mut store = roost_registry::SqliteStore::open(&copy).unwrap();
    let spec = node.spec("renamed", &["renamed.test"], &app);
    store.add(&spec.validate(FsChecks::Full).unwrap()).unwrap();
    store.close().unwrap();
    std::fs::rename(&copy, &node.registry).unwrap();
    node.until_status("renamed.test", "/pid", 200).await;
    node.stop().await;
}

/// A registry reached through a symbolic link wakes the watcher too: SQLite writes its
/// log beside the file the link points to, which is the folder watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_to_a_registry_behind_a_symbolic_link_is_read_when_it_is_written() {
    let link = tempfile::tempdir().unwrap();
    let linked = link.path().join("registry.db");
    let node = Node::start_with(|c| {
        std::os::unix::fs::symlink(&c.registry, &linked).unwrap();
        c.registry = linked.clone();
        c.registry_poll = Duration::from_secs(3600);
    })
    .await;
    let app = node.app("tester.py");
    node.add(node.spec("linked", &["linked.test"], &app)).await;
    node.store().remove("linked").unwrap();
    node.until_status("linked.test", "/pid", 404).await;
    node.stop().await;
}

/// A removed site's TMPDIR goes with it, with what its workers left there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_site_takes_its_tmpdir_with_it() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("temp", &["temp.test"], &app)).await;
    node.pid("temp.test", "/pid").await;
    let tmp = node.tmpdir("temp");
    assert!(tmp.is_dir(), "{tmp:?}");
    std::fs::write(tmp.join("cache"), b"left behind").unwrap();
    node.store().remove("temp").unwrap();
    node.until_status("temp.test", "/pid", 404).await;
    // Renamed aside at once, then removed without anyone waiting for it.
    let root = tmp.parent().unwrap().to_path_buf();
    node.eventually("the removed site's TMPDIR to go, all of it", || async {
        !tmp.exists() && std::fs::read_dir(&root).unwrap().next().is_none()
    })
    .await;
    node.stop().await;
}

/// A node's start removes the TMPDIRs its last run left (a crash leaves them all; a
/// stop does not wait for the removals it begins), and what it had set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_removes_the_tmpdirs_of_the_last_run() {
    let mut left = Vec::new();
    let node = Node::start_with(|config| {
        let tmp_root = config.run_dir.join("tmp");
        for folder in [tmp_root.join("gone-site"), tmp_root.join(".removed-x-1")] {
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("session"), b"stale").unwrap();
            left.push(folder);
        }
        let aside = config.run_dir.join(".tmp.removed-1");
        std::fs::create_dir_all(aside.join("deep")).unwrap();
        left.push(aside);
    })
    .await;
    let app = node.app("tester.py");
    node.add(node.spec("fresh", &["fresh.test"], &app)).await;
    node.pid("fresh.test", "/pid").await;
    assert!(node.tmpdir("fresh").is_dir());
    node.eventually("the last run's TMPDIRs to go", || async {
        let removed = |name: &str| name.starts_with(".tmp.removed-");
        let run = std::fs::read_dir(node.dir.path().join("run")).unwrap();
        left.iter().all(|f| !f.exists())
            && !run
                .flatten()
                .any(|e| removed(&e.file_name().to_string_lossy()))
    })
    .await;
    node.stop().await;
}

/// A site whose log folder cannot be made (a file has its name) is served all the
/// same: its lines are lost meanwhile (said in the node's log; the first request's
/// access line may come after the fault is gone), and its logs begin once the fault
/// is gone, with no change to the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_logs_cannot_be_made_is_served_and_logs_once_they_can() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let blocker = node.dir.path().join("logs").join("late");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a folder").unwrap();
    let spec = node.spec("late", &["late.test"], &app);
    node.store()
        .add(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();
    // Another site added after it is served: the node has read the registry.
    node.add(node.spec("other", &["other.test"], &app)).await;
    let r = get(node.addr, "late.test", "/stderr").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    std::fs::remove_file(&blocker).unwrap();
    let r = get(node.addr, "late.test", "/stderr?later").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    node.eventually("the later lines in the site's logs", || async {
        node.log("late", "access.log")
            .contains("GET /stderr?later ")
            && node
                .log("late", "error.log")
                .contains("tester wrote to wsgi.errors")
    })
    .await;
    node.stop().await;
}

/// A site nobody visits holds no log file open, and has no log folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvisited_site_holds_no_log_file() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let spec = node.spec("quiet", &["quiet.test"], &app);
    node.store()
        .add(&spec.validate(FsChecks::Full).unwrap())
        .unwrap();
    // Added after it, and visited: the node has read the registry.
    node.add(node.spec("busy", &["busy.test"], &app)).await;
    let logs = node.dir.path().join("logs");
    assert!(!node_holds(&logs.join("busy")).is_empty());
    assert!(!logs.join("quiet").exists());
    assert_eq!(node_holds(&logs), node_holds(&logs.join("busy")));
    node.stop().await;
}

/// The files below `dir` this process (the node, run in the test's process) holds open.
fn node_holds(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    (std::fs::read_dir("/proc/self/fd").unwrap().flatten())
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}
