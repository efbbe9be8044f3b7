//! Pool behaviour with real workers: spawn on demand, idle exit, processes.min, the
//! bounded queue, request timeouts, crashes, import failures, recycling.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{alive, get, parent_of, pid_of, raw, touch_ahead, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starts_on_demand_and_really_exits_when_idle() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("idle", &["idle.test"], &app);
    spec.idle_timeout = Some(Duration::from_millis(800));
    node.add(spec).await;
    // The routing probe of add() started a worker; let it go idle first.
    node.eventually("the probe's worker to exit", || async {
        node.worker_pids().is_empty()
    })
    .await;

    let pid = pid_of(&get(node.addr, "idle.test", "/pid").await.unwrap());
    assert!(alive(pid));
    assert_eq!(node.worker_pids(), vec![pid]);
    node.eventually("the idle worker to exit", || async { !alive(pid) })
        .await;
    assert!(node.worker_pids().is_empty());
    // And the next request gets a new one.
    let again = pid_of(&get(node.addr, "idle.test", "/pid").await.unwrap());
    assert_ne!(again, pid);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_min_are_kept_warm_without_requests() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("warm", &["warm.test"], &app);
    spec.processes_min = Some(2);
    spec.idle_timeout = Some(Duration::from_millis(300));
    node.add(spec).await;
    node.eventually("two warm workers", || async {
        node.worker_pids().len() == 2
    })
    .await;
    // Well past the idle timeout, both are still there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = node.worker_pids();
    assert_eq!(pids.len(), 2);
    node.stop().await;
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the node");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("busy", &["busy.test"], &app);
    spec.processes_max = Some(1);
    spec.queue_max = Some(1);
    node.add(spec).await;

    let addr = node.addr;
    let slow =
        || tokio::spawn(async move { get(addr, "busy.test", "/sleep?s=1.5").await.unwrap() });
    let first = slow();
    tokio::time::sleep(Duration::from_millis(300)).await; // first holds the only slot
    let second = slow(); // waits in the queue
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = get(addr, "busy.test", "/pid").await.unwrap(); // queue full
    assert_eq!(third.status, 503, "{}", third.text());
    assert_eq!(third.headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_503() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("slowq", &["slowq.test"], &app);
    spec.processes_max = Some(1);
    spec.queue_timeout = Some(Duration::from_millis(300));
    node.add(spec).await;
    let addr = node.addr;
    let first = tokio::spawn(async move { get(addr, "slowq.test", "/sleep?s=1.5").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waited = get(addr, "slowq.test", "/pid").await.unwrap();
    assert_eq!(waited.status, 503);
    assert_eq!(first.await.unwrap().status, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504_and_kills_the_hung_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("hang", &["hang.test"], &app);
    spec.request_timeout = Some(Duration::from_secs(1));
    spec.processes_max = Some(1);
    node.add(spec).await;
    let pid = pid_of(&get(node.addr, "hang.test", "/pid").await.unwrap());
    let r = get(node.addr, "hang.test", "/sleep?s=30").await.unwrap();
    assert_eq!(r.status, 504);
    node.eventually("the hung worker to be killed", || async { !alive(pid) })
        .await;
    let next = pid_of(&get(node.addr, "hang.test", "/pid").await.unwrap());
    assert_ne!(next, pid);
    node.eventually("the kill to be in the error log", || async {
        node.log("hang", "error.log").contains("request_timeout")
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_request_gives_502_and_the_next_request_a_fresh_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("crash", &["crash.test"], &app)).await;
    let pid = pid_of(&get(node.addr, "crash.test", "/pid").await.unwrap());
    let r = get(node.addr, "crash.test", "/exit").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains("Traceback"));
    let next = get(node.addr, "crash.test", "/pid").await.unwrap();
    let next_pid = pid_of(&next);
    // processes.max is 4: the next request may reach another live worker, never the dead one.
    assert!(!alive(pid) || next_pid != pid);
    node.eventually("the death to be logged", || async {
        node.log("crash", "error.log").contains("died")
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_it_starts_is_started_again_twice_then_backs_off() {
    killed_starts(false).await;
}

/// With `preload` the start that imports the app is the template's: killed, it is no
/// more the app failing than a killed worker is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_killed_while_it_starts_is_started_again_twice_then_backs_off() {
    killed_starts(true).await;
}

/// A node with the site "killed" (one worker), whose every start says so in the error
/// log, then takes a second to import.
async fn node_with_a_slow_start(preload: bool) -> Node {
    let node = Node::start().await;
    let app = node.app_with_prelude(
        "tester.py",
        "import os, sys, time\n\
         print('starting pid %d' % os.getpid(), file=sys.stderr, flush=True)\n\
         time.sleep(1)",
    );
    let mut spec = node.spec("killed", &["killed.test"], &app);
    spec.processes_max = Some(1);
    spec.preload = Some(preload);
    node.add(spec).await;
    node
}

async fn killed_starts(preload: bool) {
    let node = node_with_a_slow_start(preload).await;

    // Twice killed while it starts (an operator, a monitor, a fault): the waiting
    // request is served by the third, not failed as if the app could not load.
    let seen = kill_the_importer(&node, preload).await;
    let request = tokio::spawn(get(node.addr, "killed.test", "/pid"));
    kill_next_start(&node, kill_next_start(&node, seen).await).await;
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // Killed at every start (the OOM killer at every import, say): the third kill in
    // a row is the app failing, with the backoff.
    let mut seen = kill_the_importer(&node, preload).await;
    let request = tokio::spawn(get(node.addr, "killed.test", "/pid"));
    for _ in 0..3 {
        seen = kill_next_start(&node, seen).await;
    }
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("failed to start"), "{}", r.text());
    node.eventually("the site to serve after its backoff", || async {
        get(node.addr, "killed.test", "/pid")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    node.stop().await;
}

/// The zygote says how each of its children ended only after the node has seen it
/// gone (its pidfd). On a host short of CPU that word once came more than a second
/// late (CI), and a start killed from outside was taken for the app failing: 500 and
/// the backoff. Here the zygote is stopped for two seconds while the start is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_start_is_started_again_though_its_zygote_says_so_late() {
    for preload in [false, true] {
        let node = node_with_a_slow_start(preload).await;
        let seen = kill_the_importer(&node, preload).await;
        let request = tokio::spawn(get(node.addr, "killed.test", "/pid"));
        node.eventually(&format!("start {}", seen + 1), || async {
            starts(&node) > seen
        })
        .await;
        let importer = last_start(&node);
        let zygote = Pid::from_raw(parent_of(importer as u32) as i32);
        kill(zygote, Signal::SIGSTOP).unwrap();
        kill(Pid::from_raw(importer), Signal::SIGKILL).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        kill(zygote, Signal::SIGCONT).unwrap();
        let r = request.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "preload {preload}: {}", r.text());
        node.stop().await;
    }
}

/// How many starts the site "killed" logged (its app says so first).
fn starts(node: &Node) -> usize {
    node.log("killed", "error.log")
        .matches("starting pid")
        .count()
}

/// The pid of the last start the site "killed" logged: the process importing its app.
fn last_start(node: &Node) -> i32 {
    let log = node.log("killed", "error.log");
    let line = log.lines().rfind(|l| l.contains("starting pid")).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Kills the start after the `seen` ones while it imports; how many have been seen.
async fn kill_next_start(node: &Node, seen: usize) -> usize {
    node.eventually(&format!("start {}", seen + 1), || async {
        starts(node) > seen
    })
    .await;
    kill(Pid::from_raw(last_start(node)), Signal::SIGKILL).unwrap();
    seen + 1
}

/// Kills what imported the running site's app: its one worker, or with `preload` its
/// template (and the worker with it); how many starts it has logged then, once the
/// pool has seen the worker die (the error log says so). A request sent before then
/// may still reach the dead worker's slot, and fail without a start.
async fn kill_the_importer(node: &Node, preload: bool) -> usize {
    let worker = pid_of(&get(node.addr, "killed.test", "/pid").await.unwrap());
    let importer = last_start(node) as u32;
    let expected = if preload { parent_of(worker) } else { worker };
    assert_eq!(importer, expected, "the last start is not what serves");
    kill(Pid::from_raw(importer as i32), Signal::SIGKILL).unwrap();
    let died = if preload {
        format!("worker pid {worker} died: killed with the template that forked it")
    } else {
        format!("worker pid {worker} died: signal: 9 (SIGKILL)")
    };
    node.eventually("the error log to say how the worker died", || async {
        node.log("killed", "error.log").contains(&died)
    })
    .await;
    starts(node)
}

/// `sys.exit()` or a KeyboardInterrupt raised by the app in a request is its error,
/// as any other: 500 (or, after the head, a broken response) and the traceback in the
/// error log, and the worker serves on, as under mod_wsgi. They used to end a worker
/// of one slot (502, "worker setup failed") and, in a worker of several, end a slot's
/// thread silently, leaving the worker one slot short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_raising_system_exit_keeps_its_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    for (name, threads) in [("exit1", 1), ("exit2", 2)] {
        let mut spec = node.spec(name, &[&format!("{name}.test")], &app);
        spec.threads = Some(threads);
        spec.processes_max = Some(1);
        node.add(spec).await;
        let host = format!("{name}.test");
        let pid = pid_of(&get(node.addr, &host, "/pid").await.unwrap());
        for what in ["SystemExit", "KeyboardInterrupt"] {
            let r = get(node.addr, &host, &format!("/raise?what={what}"))
                .await
                .unwrap();
            assert_eq!(r.status, 500, "{name}: {what}: {}", r.text());
            let late = get(node.addr, &host, &format!("/raise?what={what}&late=1")).await;
            assert!(late.is_err(), "{name}: {what} after the head: {late:?}");
        }
        // Every slot still answers, in the same worker.
        let mut answers = Vec::new();
        for _ in 0..2 * threads {
            answers.push(get(node.addr, &host, "/sleep?s=0.2&report=1"));
        }
        for answer in futures_util::future::join_all(answers).await {
            let r = answer.unwrap();
            assert_eq!(r.status, 200, "{name}: {}", r.text());
            let same = format!("slept in {pid};");
            assert!(r.text().starts_with(&same), "{name}: {}", r.text());
        }
        node.error_log_count(name, "error in the application", 4)
            .await;
        let errors = node.log(name, "error.log");
        assert!(errors.contains("\nSystemExit"), "{errors}");
        assert!(errors.contains("\nKeyboardInterrupt"), "{errors}");
        assert!(!errors.contains("died"), "{errors}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_errors_give_500_and_a_traceback_in_the_error_log() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("errs", &["errs.test"], &app)).await;
    let pid = pid_of(&get(node.addr, "errs.test", "/pid").await.unwrap());
    // The access log names the worker that served each request.
    node.eventually("the /pid line in the access log", || async {
        node.log("errs", "access.log")
            .lines()
            .any(|l| l.contains("GET /pid ") && l.ends_with(&format!(" {pid}")))
    })
    .await;
    let r = get(node.addr, "errs.test", "/error").await.unwrap();
    assert_eq!(r.status, 500);
    assert!(
        !r.text().contains("RuntimeError"),
        "the page leaked the error"
    );
    node.error_log_with("errs", "RuntimeError: tester asked for an error")
        .await;
    // Response splitting: a header with a control character (or not a str) is the
    // app's error, never passed on.
    for (what, complaint) in [
        ("crlf-value", "ValueError: header value"),
        ("lf-name", "ValueError: header name"),
        ("nul-value", "ValueError: header value"),
        ("cr-name", "ValueError: header name"),
        (
            "bytes-value",
            "TypeError: header value must be a str, not bytes",
        ),
        (
            "negative-length",
            "ValueError: Content-Length '-1' is not one decimal number",
        ),
        (
            "spaced-length",
            "ValueError: Content-Length ' 5' is not one decimal number",
        ),
        // Beyond what the node takes: the app's error too, not the worker's end.
        (
            "euro-value",
            "ValueError: header 'X-Test: €' is not latin-1",
        ),
        ("huge-value", "ValueError: the response head is 65"),
    ] {
        let before = node.log("errs", "error.log").matches(complaint).count();
        let r = get(node.addr, "errs.test", &format!("/bad-header?what={what}"))
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{what}");
        assert!(!r.headers.contains_key("set-cookie"), "{what}");
        assert!(!r.text().contains("must not be sent"), "{what}");
        node.error_log_count("errs", complaint, before + 1).await;
    }
    // A status that is no final response (101 would switch the client's protocol),
    // or that is not latin-1.
    for line in [
        "101%20Switching%20Protocols",
        "999%20Weird",
        "200%20%E2%82%AC",
    ] {
        let r = get(node.addr, "errs.test", &format!("/status?line={line}"))
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{line}");
    }
    node.error_log_count("errs", "ValueError: status", 3).await;
    let r = get(node.addr, "errs.test", "/many-headers?n=257")
        .await
        .unwrap();
    assert_eq!(r.status, 500);
    node.error_log_with(
        "errs",
        "ValueError: 257 response headers, more than the limit of 256",
    )
    .await;
    // (More headers than hyper's client reads.)
    let most = raw(
        node.addr,
        b"GET /many-headers?n=256 HTTP/1.1\r\nHost: errs.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(most.starts_with("HTTP/1.1 200"), "{most}");
    assert_eq!(most.matches("\r\nx-").count(), 256, "{most}");
    // A failure after the head was sent breaks the response instead of faking success.
    let late = get(node.addr, "errs.test", "/late-error").await;
    assert!(
        late.is_err(),
        "a half-sent response looked complete: {late:?}"
    );
    // wsgi.errors lands in the error log; the worker survived all of it.
    assert_eq!(
        get(node.addr, "errs.test", "/stderr").await.unwrap().status,
        200
    );
    node.error_log_with("errs", "tester wrote to wsgi.errors")
        .await;
    // A write() callable kept past its response is refused, not let onto the slot
    // under the next response (the node killed the worker for that).
    assert_eq!(
        get(node.addr, "errs.test", "/keep-write")
            .await
            .unwrap()
            .text(),
        "kept"
    );
    let r = get(node.addr, "errs.test", "/stale-write").await.unwrap();
    assert_eq!(r.text(), "refused: write() of a response that has ended");
    // So does print(), at once: not when 8 KiB of it filled Python's buffer.
    let r = get(node.addr, "errs.test", "/print?text=tester%20printed")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    node.error_log_with("errs", "tester printed").await;
    assert_eq!(
        pid_of(&get(node.addr, "errs.test", "/pid").await.unwrap()),
        pid
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_error_answers_500_at_once_then_recovers_when_the_file_is_fixed() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let good = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, format!("import no_such_module_xyz\n{good}")).unwrap();
    let site = node
        .spec("broken", &["broken.test"], &app)
        .validate(roost_registry::FsChecks::Full)
        .unwrap();
    node.store().add(&site).unwrap();
    node.eventually("the broken site to answer 500", || async {
        get(node.addr, "broken.test", "/pid")
            .await
            .map(|r| r.status == 500)
            .unwrap_or(false)
    })
    .await;
    // While failing, requests are answered at once, without a spawn per request.
    let started = tokio::time::Instant::now();
    for _ in 0..20 {
        let r = get(node.addr, "broken.test", "/pid").await.unwrap();
        assert_eq!(r.status, 500);
        assert!(r.text().contains("failed to start"), "{}", r.text());
        assert!(
            !r.text().contains("no_such_module"),
            "the page leaked the traceback"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = node
        .error_log_with(
            "broken",
            "ModuleNotFoundError: No module named 'no_such_module_xyz'",
        )
        .await;
    let attempts = log.matches("cannot load the application").count();
    assert!(
        attempts <= 3,
        "{attempts} import attempts in a few seconds: a spawn storm"
    );

    std::fs::write(&app, good).unwrap();
    node.eventually("the fixed site to answer 200", || async {
        get(node.addr, "broken.test", "/pid")
            .await
            .map(|r| r.status == 200)
            .unwrap_or(false)
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_recycles_a_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("recycle", &["recycle.test"], &app);
    spec.max_requests = Some(3);
    spec.processes_max = Some(1);
    node.add(spec).await;
    node.eventually("a fresh worker", || async {
        get(node.addr, "recycle.test", "/pid").await.is_ok() && node.worker_pids().len() == 1
    })
    .await;
    let mut pids = Vec::new();
    for _ in 0..7 {
        pids.push(pid_of(
            &get(node.addr, "recycle.test", "/pid").await.unwrap(),
        ));
    }
    let distinct: std::collections::BTreeSet<_> = pids.iter().collect();
    assert!(distinct.len() >= 2, "no recycling in {pids:?}");
    for w in pids.windows(4) {
        assert!(
            !(w[0] == w[1] && w[1] == w[2] && w[2] == w[3]),
            "a worker served 4 in a row: {pids:?}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touching_the_entry_file_reloads_the_site() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("touch", &["touch.test"], &app);
    spec.processes_max = Some(1);
    node.add(spec).await;
    let pid = pid_of(&get(node.addr, "touch.test", "/pid").await.unwrap());
    touch_ahead(&app, Duration::from_secs(2));
    node.eventually("the old worker to be recycled", || async { !alive(pid) })
        .await;
    assert_ne!(
        pid_of(&get(node.addr, "touch.test", "/pid").await.unwrap()),
        pid
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_file_touched_while_the_site_was_idle_recycles_nothing() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("idle-touch", &["idle-touch.test"], &app);
    spec.processes_max = Some(1);
    spec.idle_timeout = Some(Duration::from_secs(1));
    node.add(spec).await;
    let first = node.pid("idle-touch.test", "/pid").await;
    node.eventually("the worker to exit idle", || async { !alive(first) })
        .await;
    touch_ahead(&app, Duration::from_secs(2));
    // The worker started now loads the file as it is: nothing for it to reload. Kept
    // busy for three seconds, three looks at the file and then some.
    let pid = node.pid("idle-touch.test", "/pid").await;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            node.pid("idle-touch.test", "/pid").await,
            pid,
            "the worker that loaded the touched file was recycled for it"
        );
    }
    assert!(!node
        .log("idle-touch", "error.log")
        .contains("entry file changed"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_soft_memory_limit_is_recycled_after_its_request() {
    let node = Node::start().await;
    let app = node.app("tenant.py");
    let mut spec = node.spec("soft", &["soft.test"], &app);
    spec.memory_worker_soft = Some(48 << 20);
    spec.processes_max = Some(1);
    node.add(spec).await;
    let pid = pid_of(&get(node.addr, "soft.test", "/pid").await.unwrap());
    let r = get(node.addr, "soft.test", "/hog?mib=96&keep=1")
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "the request itself must finish: {}",
        r.text()
    );
    node.eventually("the fat worker to be recycled", || async { !alive(pid) })
        .await;
    assert_ne!(
        pid_of(&get(node.addr, "soft.test", "/pid").await.unwrap()),
        pid
    );
    node.stop().await;
}
