//! The two ways to start workers: forked from a warm zygote (the default) and plain
//! spawn, and what happens when a zygote dies.

use roost::server::SpawnMode;
use roost_registry::SiteSpec;

use std::time::Duration;

use crate::harness::{
    alive, comm, eventually, get, parent_of, pid_of, pids_running, sched_policy, Node,
};

/// The zygote processes of a node: the loader in zygote mode, not renamed as a worker
/// or a spare.
fn zygotes(node: &Node) -> Vec<u32> {
    let loader = node.dir.path().join("run/loader.py").display().to_string();
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&loader.as_bytes())
                && args.contains(&&b"zygote"[..])
                && !["roost-spare", "roost-template"].contains(&comm(*pid).as_str())
        })
        .collect();
    let workers = pids_running(&loader);
    all.into_iter()
        .filter(|p| !workers.contains(p) && alive(*p))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_forked_by_the_zygote_which_restarts_when_killed() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("z", &["z.test"], &app)).await;
    let worker = pid_of(&get(node.addr, "z.test", "/pid").await.unwrap());
    let zygote = zygotes(&node);
    assert_eq!(zygote.len(), 1, "expected one zygote, found {zygote:?}");
    assert_eq!(
        parent_of(worker),
        zygote[0],
        "the worker is not the zygote's child"
    );
    assert_eq!(comm(worker), "roost-worker");
    // Woken workers do not preempt the node; the zygote, on every cold start's path,
    // keeps the normal policy.
    assert_eq!(sched_policy(worker), nix::libc::SCHED_BATCH);
    assert_eq!(sched_policy(zygote[0]), nix::libc::SCHED_OTHER);

    // Kill the zygote: its workers die with it, and the next request brings both back.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zygote[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    node.eventually("the zygote's worker to die with it", || async {
        !alive(worker)
    })
    .await;
    // Nobody is left to say how it ended but the node, which knows why.
    let died = format!("worker pid {worker} died: killed with the zygote that forked it");
    node.eventually("the error log to say how the worker died", || async {
        node.log("z", "error.log").contains(&died)
    })
    .await;
    node.until_status("z.test", "/pid", 200).await;
    let next = pid_of(&get(node.addr, "z.test", "/pid").await.unwrap());
    assert_ne!(next, worker);
    let again = zygotes(&node);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0], zygote[0]);
    assert_eq!(parent_of(next), again[0]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_spawn_serves_crashes_and_recovers() {
    let node = Node::start_with(|c| c.spawn = SpawnMode::Plain).await;
    let app = node.app("tester.py");
    node.add(node.spec("p", &["p.test"], &app)).await;
    let worker = pid_of(&get(node.addr, "p.test", "/pid").await.unwrap());
    assert_eq!(
        parent_of(worker),
        std::process::id(),
        "a plain worker is the node's child"
    );
    assert!(zygotes(&node).is_empty(), "plain spawn started a zygote");
    assert_eq!(sched_policy(worker), nix::libc::SCHED_BATCH);
    assert_eq!(get(node.addr, "p.test", "/exit").await.unwrap().status, 502);
    pid_of(&get(node.addr, "p.test", "/pid").await.unwrap());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_workers_leaves_the_normal_policy() {
    for mode in [SpawnMode::Zygote, SpawnMode::Plain] {
        let node = Node::start_with(|c| {
            c.spawn = mode;
            c.batch_workers = false;
        })
        .await;
        let app = node.app("tester.py");
        node.add(node.spec("n", &["n.test"], &app)).await;
        let worker = pid_of(&get(node.addr, "n.test", "/pid").await.unwrap());
        assert_eq!(sched_policy(worker), nix::libc::SCHED_OTHER, "{mode:?}");
        node.stop().await;
    }
}

/// A worker may hold 4,096 descriptors (`WORKER_NOFILE`); the node may hold far more
/// (each site's two log files, each client). Between fork and exec the child still has
/// every one of the node's, so a step that needs a new descriptor once the worker's
/// limit is set finds none free below it: with 2,000 sites registered, or 4,000
/// clients connected, no worker or zygote could start (every request 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_more_descriptors_than_a_worker_may_still_starts_workers() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const HELD: u64 = roost::spawn::WORKER_NOFILE + 200;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= HELD + 1024,
        "this test needs an open file limit of at least {} (the hard limit is {hard})",
        HELD + 1024
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // The node's own descriptors come after these, as they would after many sites'.
    let null = std::fs::File::open("/dev/null").unwrap();
    let held: Vec<std::os::fd::OwnedFd> = (0..HELD)
        .map(|_| {
            std::os::fd::AsFd::as_fd(&null)
                .try_clone_to_owned()
                .unwrap()
        })
        .collect();
    for mode in [SpawnMode::Zygote, SpawnMode::Plain] {
        let node = Node::start_with(|c| c.spawn = mode).await;
        let app = node.app("tester.py");
        node.add(node.spec("d", &["d.test"], &app)).await;
        let r = get(node.addr, "d.test", "/pid").await.unwrap();
        assert_eq!(r.status, 200, "{mode:?}: {}", r.text());
        if mode == SpawnMode::Zygote {
            assert_eq!(zygotes(&node).len(), 1, "no zygote started");
            assert!(
                zygotes(&node).contains(&parent_of(pid_of(&r))),
                "the worker was not forked by the zygote"
            );
        }
        node.stop().await;
    }
    drop(held);
}

/// A zygote serves a runtime (an interpreter and its preloads); once no site names that
/// runtime any more, the zygote exits (after its workers), instead of staying until the
/// node restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_no_site_needs_any_more_goes_away() {
    let node = Node::start().await;
    let runtime = roost_registry::Runtime::validate(
        "extra",
        &crate::harness::python(),
        None,
        &["json".into()],
        roost_registry::FsChecks::Full,
    )
    .unwrap();
    node.store().add_runtime(&runtime).unwrap();
    let app = node.app("tester.py");
    let mut spec = node.spec("moving", &["moving.test"], &app);
    spec.runtime = Some("extra".into());
    node.add(spec.clone()).await;
    let preloads_json = |pid: &u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .any(|arg| arg == b"json")
    };
    let worker = pid_of(&get(node.addr, "moving.test", "/pid").await.unwrap());
    let runtime_zygote = parent_of(worker);
    assert!(
        zygotes(&node).contains(&runtime_zygote) && preloads_json(&runtime_zygote),
        "the worker does not come from the runtime's zygote"
    );

    // The site leaves the runtime: its workers recycle, and nothing needs that zygote.
    spec.runtime = None;
    let moved = spec.validate(roost_registry::FsChecks::Full).unwrap();
    node.store().replace(&moved).unwrap();
    node.eventually("the runtime's zygote to exit", || async {
        let served = get(node.addr, "moving.test", "/pid")
            .await
            .is_ok_and(|r| r.status == 200 && !preloads_json(&parent_of(pid_of(&r))));
        served && !alive(runtime_zygote)
    })
    .await;
    node.stop().await;
}

/// Whether `python` can import Flask.
fn imports_flask(python: &std::path::Path) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import flask"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A python that can import Flask: the tests' own (CI installs python3-flask), else a
/// virtualenv of it with Flask from PyPI, made once under the target folder, so the
/// suite needs nothing installed by hand.
fn python_with_flask() -> std::path::PathBuf {
    let own = std::path::PathBuf::from(crate::harness::python());
    if imports_flask(&own) {
        return own;
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("flask-venv");
    let venv_python = venv.join("bin/python3");
    if !imports_flask(&venv_python) {
        let run = |program: &std::path::Path, args: &[&str]| {
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
            assert!(
                out.status.success(),
                "{} {args:?} failed (Flask for this test comes from PyPI when {} lacks it; \
                 or install python3-flask): {}",
                program.display(),
                own.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&own, &["-m", "venv", "--clear", venv.to_str().unwrap()]);
        run(&venv.join("bin/pip"), &["install", "--quiet", "flask"]);
    }
    venv_python
}

/// A zygote that preloads Flask practises on a Flask app before it forks (loader.py,
/// warm_up; python/warm_up.py), so a Flask site's first request finds Flask's set-up
/// done; one without Flask practises on a plain WSGI app. Then a Flask site is served
/// by workers forked from that zygote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_preloading_flask_practises_on_flask() {
    let python = python_with_flask();
    let practised = |imports: &str| {
        let script = format!(
            "import sys; sys.path.insert(0, {:?}); {imports}import loader; print(loader.warm_up())",
            concat!(env!("CARGO_MANIFEST_DIR"), "/python")
        );
        let out = std::process::Command::new(&python)
            .args(["-c", &script])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(practised("import flask; "), "flask");
    assert_eq!(practised(""), "plain");

    let node = Node::start_with(|c| c.preload = vec!["flask".into()]).await;
    let app = node.app("flask_app.py");
    let mut spec = node.spec("f", &["f.test"], &app);
    spec.interpreter = Some(python.display().to_string());
    node.add(spec).await;
    let r = get(node.addr, "f.test", "/").await.unwrap();
    assert_eq!((r.status, r.text()), (200, "hello from flask\n".to_owned()));
    node.stop().await;
}

/// A zygote that may not run (its interpreter sits in a folder its group may write)
/// leaves the interpreter's workers spawned plainly, and is tried again a while later:
/// once the folder is fixed, workers fork from a zygote again, with no restart of the
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_refused_once_is_tried_again() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::start().await;
    let app = node.app("tester.py");
    let bin = node.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let python = bin.join("python3");
    std::fs::copy(crate::harness::python(), &python).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o775)).unwrap();
    let spec = SiteSpec {
        interpreter: Some(python.display().to_string()),
        ..node.spec("z", &["z.test"], &app)
    };
    node.add(spec).await;
    let plain = pid_of(&get(node.addr, "z.test", "/pid").await.unwrap());
    assert_eq!(
        parent_of(plain),
        std::process::id(),
        "without its zygote, the worker is the node's child"
    );
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut forked = || async {
        // Each round replaces the worker: the next one shows how it was started.
        let _ = get(node.addr, "z.test", "/exit").await;
        get(node.addr, "z.test", "/pid")
            .await
            .is_ok_and(|r| r.status == 200 && zygotes(&node).contains(&parent_of(pid_of(&r))))
    };
    eventually(
        "a worker forked by a zygote again",
        Duration::from_secs(40),
        &mut forked,
    )
    .await;
    node.stop().await;
}

/// A zygote that stops answering (stopped here; stuck, in life) is retired, not
/// killed: the workers it forked keep serving, the spawn that waited for it is done
/// plainly, the next worker is forked by a new zygote, and the old one exits once its
/// workers have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_that_hangs_is_replaced_and_its_workers_live_on() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("a", &["a.test"], &app)).await;
    node.add(node.spec("b", &["b.test"], &app)).await;
    let a_worker = pid_of(&get(node.addr, "a.test", "/pid").await.unwrap());
    let hung = parent_of(a_worker);
    assert_eq!(zygotes(&node), vec![hung]);
    let b_worker = pid_of(&get(node.addr, "b.test", "/pid").await.unwrap());
    kill(Pid::from_raw(hung as i32), Signal::SIGSTOP).unwrap();

    // b needs a worker: its zygote does not answer within the fork timeout.
    let _ = get(node.addr, "b.test", "/exit").await;
    node.eventually("b's worker to exit", || async { !alive(b_worker) })
        .await;
    let r = get(node.addr, "b.test", "/pid").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        parent_of(pid_of(&r)),
        std::process::id(),
        "not spawned plainly"
    );
    // a's worker, forked by the hung zygote, serves on.
    assert_eq!(
        pid_of(&get(node.addr, "a.test", "/pid").await.unwrap()),
        a_worker
    );

    // The next worker comes from a new zygote.
    let _ = get(node.addr, "b.test", "/exit").await;
    let r = get(node.addr, "b.test", "/pid").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let parent = parent_of(pid_of(&r));
    assert!(
        parent != hung && zygotes(&node).contains(&parent),
        "b's worker's parent {parent} is no new zygote (the hung one: {hung})"
    );

    // Retired, the old zygote exits once its last worker has.
    kill(Pid::from_raw(hung as i32), Signal::SIGCONT).unwrap();
    assert!(
        alive(hung),
        "the hung zygote was killed, and its workers with it"
    );
    let _ = get(node.addr, "a.test", "/exit").await;
    node.eventually("the retired zygote to exit", || async { !alive(hung) })
        .await;
    node.stop().await;
}

/// A worker whose zygote or template exits while it forks it (the node retired or lost
/// that parent) says so in one line of the site's error log, without the traceback of
/// an app that failed to start (fixtures/loader_parent_gone.py: the loader's two forked
/// starts, driven without a node, each told a parent that is not its own).
#[test]
fn a_worker_whose_parent_exits_while_it_forks_says_so_in_one_line() {
    crate::harness::loader_fixture("loader_parent_gone.py");
}

/// A fork server reports each child's exit while it waits for its next order, however
/// close to that wait the child dies (fixtures/loader_reports_every_exit.py: a template
/// driven without a node, its workers killed as their SPAWNED arrives). Its SIGCHLD
/// handler once reaped: one that came just before the wait ran only with the next
/// order, and the node, which waits 5 s for the report, took a killed start for the
/// app failing (the pool tests' killed starts, a few percent of runs under load).
#[test]
fn a_fork_server_reports_an_exit_without_waiting_for_its_next_order() {
    crate::harness::loader_fixture("loader_reports_every_exit.py");
}
