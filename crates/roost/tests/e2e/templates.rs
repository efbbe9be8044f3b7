//! Per-site preloading (`preload`): the app imported once in a template that runs as
//! the site user, the site's workers forked from it; its life follows the workers'.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use roost_registry::FsChecks;

use crate::harness::{alive, comm, get, parent_of, pid_of, sched_policy, touch_ahead, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_fork_from_the_template_which_exits_with_the_last_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("t", &["t.test"], &app);
    spec.preload = Some(true);
    spec.processes_max = Some(2);
    spec.idle_timeout = Some(Duration::from_secs(1));
    node.add(spec).await;

    let worker = node.pid("t.test", "/pid").await;
    let template = node.pid("t.test", "/imported-by").await;
    assert_ne!(worker, template, "the worker imported the app itself");
    assert_eq!(
        parent_of(worker),
        template,
        "the worker is not the template's child"
    );
    assert_eq!(comm(template), "roost-template");
    assert_eq!(sched_policy(template), nix::libc::SCHED_BATCH);
    assert_eq!(
        sched_policy(worker),
        nix::libc::SCHED_BATCH,
        "a fork keeps it"
    );
    if let Some(user) = &node.user {
        let status = std::fs::read_to_string(format!("/proc/{template}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid_line
                .split_whitespace()
                .skip(1)
                .all(|u| u == user.uid.to_string()),
            "the template does not run as the site user: {uid_line}"
        );
    }

    // A second worker, needed while the first is busy: forked from the same template.
    let addr = node.addr;
    let busy = tokio::spawn(async move { get(addr, "t.test", "/sleep?s=1.5").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = node.pid("t.test", "/pid").await;
    assert_ne!(second, worker, "no second worker was started");
    assert_eq!(parent_of(second), template);
    assert_eq!(busy.await.unwrap().unwrap().status, 200);

    // Idle for 1 s: both workers retire, and the template goes with the last one.
    node.eventually("the template to exit with the last worker", || async {
        !alive(template) && !alive(worker) && !alive(second)
    })
    .await;
    let next = node.pid("t.test", "/imported-by").await;
    assert_ne!(
        next, template,
        "the next request did not start a new template"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touched_entry_file_or_a_changed_site_replaces_the_template() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("r", &["r.test"], &app);
    spec.preload = Some(true);
    spec.processes_max = Some(1);
    let site = node.add(spec.clone()).await;
    let first = node.pid("r.test", "/imported-by").await;

    // Touching the entry file reloads the app: a new template imports it.
    touch_ahead(&app, Duration::from_secs(5));
    node.eventually("a new template after the entry file changed", || async {
        get(node.addr, "r.test", "/imported-by")
            .await
            .is_ok_and(|r| r.status == 200 && pid_of(&r) != first)
    })
    .await;
    node.eventually("the old template to exit", || async { !alive(first) })
        .await;

    // preload off: the workers import the app themselves again.
    spec.preload = Some(false);
    let mut changed = spec.validate(FsChecks::Full).unwrap();
    changed.runtime = site.runtime.clone();
    node.store().replace(&changed).unwrap();
    node.eventually("workers that import the app themselves", || async {
        let worker = get(node.addr, "r.test", "/pid").await;
        let importer = get(node.addr, "r.test", "/imported-by").await;
        match (worker, importer) {
            (Ok(w), Ok(i)) => w.status == 200 && pid_of(&w) == pid_of(&i),
            _ => false,
        }
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_whose_app_fails_to_import_gets_5xx_and_a_traceback() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    std::fs::write(&app, "raise RuntimeError('broken at import')\n").unwrap();
    let mut spec = node.spec("b", &["b.test"], &app);
    spec.preload = Some(true);
    node.add(spec).await;
    let status = get(node.addr, "b.test", "/").await.unwrap().status;
    assert!(status >= 500, "a broken app answered {status}");
    node.error_log_with("b", "broken at import").await;
    // The node's note on the failed start names the template.
    node.error_log_with("b", "template").await;
    node.stop().await;
}

/// A tenant controls its template: its app can take over the control socket at import.
/// The node must not take a process the template did not fork for one of its workers
/// (it would kill that process's group later, as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_cannot_pass_off_another_process_as_its_worker() {
    let node = Node::start().await;
    let mut victim = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let app = node.app("liar.py");
    let mut spec = node.spec("liar", &["liar.test"], &app);
    spec.preload = Some(true);
    spec.env
        .insert("VICTIM_PID".into(), victim.id().to_string());
    node.add(spec).await;
    let status = get(node.addr, "liar.test", "/").await.unwrap().status;
    assert!(status >= 500, "the liar's site answered {status}");
    node.eventually("the refusal in the error log", || async {
        node.log("liar", "error.log")
            .contains("which it did not fork")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the node killed a process the template claimed as its worker"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    node.stop().await;
}

/// A fork server's new process that exits at once and is reaped before the node looks
/// at it (a worker whose start fails early, or is killed) is no lie: the spawn fails
/// and the server lives on. The zygote is a fork server too: taking such a process for
/// a lie killed it, and with it every worker of every site on its interpreter (seen in
/// the faults test under load: 502s on workers nobody had killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_servers_process_that_died_at_once_is_no_lie() {
    let node = Node::start().await;
    // Without VICTIM_PID, the liar answers with a child it forked and reaped.
    let app = node.app("liar.py");
    let mut spec = node.spec("reaper", &["reaper.test"], &app);
    spec.preload = Some(true);
    node.add(spec).await;
    let status = get(node.addr, "reaper.test", "/").await.unwrap().status;
    assert!(status >= 500, "the site answered {status}");
    let log = node
        .error_log_with("reaper", "exited as soon as it was forked")
        .await;
    assert!(!log.contains("which it did not fork"), "{log}");
    let template: u32 = log
        .lines()
        .find_map(|l| l.split("liar template pid ").nth(1))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("the template's pid in the error log");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(template), "the node killed the fork server: {log}");
    node.stop().await;
}

/// With `--spawn plain` the template is the node's own child (`loader.py template`,
/// its control socket on fd 3); its workers are still its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plainly_spawned_template_forks_the_workers_too() {
    let node = Node::start_with(|c| c.spawn = roost::server::SpawnMode::Plain).await;
    let app = node.app("tester.py");
    let mut spec = node.spec("p", &["p.test"], &app);
    spec.preload = Some(true);
    node.add(spec).await;
    let worker = node.pid("p.test", "/pid").await;
    let template = node.pid("p.test", "/imported-by").await;
    assert_ne!(worker, template, "the worker imported the app itself");
    assert_eq!(parent_of(worker), template);
    assert_eq!(
        parent_of(template),
        std::process::id(),
        "not the node's child"
    );
    node.stop().await;
}

/// Recycling (max_requests) replaces a worker with a new fork of the same template,
/// even when the old worker is gone before the next request comes: the template goes
/// only when the site goes quiet. A template serves multi-threaded workers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_and_threaded_workers_fork_from_the_same_template() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("cycle", &["cycle.test"], &app);
    spec.preload = Some(true);
    spec.processes_max = Some(1);
    spec.threads = Some(2);
    spec.max_requests = Some(3);
    node.add(spec).await;
    let template = node.pid("cycle.test", "/imported-by").await;
    let mut workers = std::collections::BTreeSet::new();
    for _ in 0..3 {
        // The probe and the line above count: the worker is recycled by this loop.
        let worker = node.pid("cycle.test", "/pid").await;
        workers.insert(worker);
        node.eventually("the recycled worker to exit", || async {
            !alive(worker) || node.pid("cycle.test", "/pid").await == worker
        })
        .await;
    }
    assert!(
        workers.len() >= 2,
        "max_requests did not recycle: {workers:?}"
    );
    // Asked of the worker itself: one at its max_requests may be gone once answered.
    assert_eq!(
        node.pid("cycle.test", "/ppid").await,
        template,
        "a worker not forked by the template"
    );
    assert_eq!(node.pid("cycle.test", "/imported-by").await, template);
    node.stop().await;
}

/// A template whose import never finishes is killed at the start-up timeout (at least
/// 10 s), and the request gets a 5xx instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_never_finishes_importing_is_killed() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    std::fs::write(
        &app,
        "import os, time\n\
         with open(os.path.join(os.environ['TMPDIR'], 'template.pid'), 'w') as f:\n\
         \x20   f.write(str(os.getpid()))\n\
         time.sleep(600)\n",
    )
    .unwrap();
    let mut spec = node.spec("hang", &["hang.test"], &app);
    spec.preload = Some(true);
    spec.request_timeout = Some(Duration::from_secs(1));
    spec.queue_timeout = Some(Duration::from_secs(30));
    node.add(spec).await;
    let pid_file = node.tmpdir("hang").join("template.pid");
    let template: u32 = std::fs::read_to_string(&pid_file)
        .expect("the template wrote its pid")
        .trim()
        .parse()
        .unwrap();
    node.eventually("the hanging template to be killed", || async {
        !alive(template)
    })
    .await;
    node.error_log_with("hang", "no READY within").await;
    node.stop().await;
}

/// A template that stops answering its forks (stopped here; the tenant's code stuck on
/// the lock the fork needs, in life) is replaced: the fork fails after its timeout, the
/// workers it forked retire gracefully (they finish what they serve), a new template
/// imports the app, and the old one is killed at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_stops_answering_forks_is_replaced() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let node = Node::start().await;
    let imports = "the app is imported";
    let prelude = format!("import sys\nprint({imports:?}, file=sys.stderr, flush=True)");
    let app = node.app_with_prelude("tester.py", &prelude);
    let mut spec = node.spec("stuck", &["stuck.test"], &app);
    spec.preload = Some(true);
    spec.processes_max = Some(3);
    // Two slots a worker: no inbox for requests to wait in behind a busy one.
    spec.threads = Some(2);
    spec.request_timeout = Some(Duration::from_secs(3));
    node.add(spec).await;
    let template = node.pid("stuck.test", "/imported-by").await;
    kill(Pid::from_raw(template as i32), Signal::SIGSTOP).unwrap();

    // With its worker busy, three more requests make the pool fork one or two more
    // workers (as they come): unanswered. The busy worker serves them when it is free.
    let get_all = |path: &'static str, n| {
        (0..n)
            .map(|_| tokio::spawn(get(node.addr, "stuck.test", path)))
            .collect::<Vec<_>>()
    };
    let busy = get_all("/sleep?s=1", 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for request in get_all("/pid", 3).into_iter().chain(busy) {
        let r = request.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    node.error_log_with("stuck", "did not answer a fork within")
        .await;
    node.eventually("the stuck template to be killed", || async {
        !alive(template)
    })
    .await;
    let r = get(node.addr, "stuck.test", "/imported-by").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let new_template = pid_of(&r);
    assert_ne!(new_template, template);
    assert_eq!(comm(new_template), "roost-template");
    // One new template for both unanswered forks, not a second to replace the first.
    assert_eq!(node.log("stuck", "error.log").matches(imports).count(), 2);
    node.stop().await;
}

/// A site whose only worker died (here: it exits mid-request) and that nobody asks for
/// again must not keep its template forever: it goes after idle_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_left_without_workers_goes_after_idle_timeout() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("orphan", &["orphan.test"], &app);
    spec.preload = Some(true);
    spec.idle_timeout = Some(Duration::from_secs(1));
    node.add(spec).await;
    let template = node.pid("orphan.test", "/imported-by").await;
    let worker = node.pid("orphan.test", "/pid").await;
    assert_eq!(
        get(node.addr, "orphan.test", "/exit").await.unwrap().status,
        502
    );
    node.eventually("the worker to be gone", || async { !alive(worker) })
        .await;
    node.eventually("the template to go after idle_timeout", || async {
        !alive(template)
    })
    .await;
    node.stop().await;
}
