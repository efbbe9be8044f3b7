//! Followers: a request without a body that comes while every slot of its site is busy
//! waits in the inbox of the busy slot with the fewest such requests (up to eight, in
//! workers of one slot), and moves to whichever slot comes free first
//! (pool/actor/follow.rs, worker/inbox.rs).

use std::time::Duration;

use crate::harness::http::post;
use crate::harness::{get, is_root, pid_of, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_in_the_inbox_of_a_busy_worker_and_is_answered_after() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("one", &["one.test"], &app);
    spec.processes_max = Some(1);
    node.add(spec).await;
    let pid = pid_of(&get(node.addr, "one.test", "/pid").await.unwrap());

    let addr = node.addr;
    let busy =
        tokio::spawn(async move { get(addr, "one.test", "/sleep?s=1&report=1").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = get(addr, "one.test", "/pid").await.unwrap();
    let busy = busy.await.unwrap();
    // The worker saw the next request in its inbox while it answered the first.
    let busy = busy.text();
    assert!(
        busy.starts_with(&format!("slept in {pid}; inbox: ")),
        "{busy}"
    );
    assert!(busy.ends_with(" bytes"), "{busy}");
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(pid_of(&next), pid);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_requests_wait_in_one_inbox_and_are_answered_in_turn() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("deep", &["deep.test"], &app);
    spec.processes_max = Some(1);
    node.add(spec).await;
    get(node.addr, "deep.test", "/pid").await.unwrap();

    let one = waiting_behind(&node, "deep.test", 1, 1).await;
    let three = waiting_behind(&node, "deep.test", 1, 3).await;
    // Three requests of about one's size wait together: none waited in the node.
    assert!(
        three > 2 * one,
        "one follower: {one} bytes, three: {three} bytes"
    );

    // A worker of two threads has no inbox (its threads share the interpreter lock):
    // the requests wait in the node.
    let mut spec = node.spec("threads", &["threads.test"], &app);
    spec.processes_max = Some(1);
    spec.threads = Some(2);
    node.add(spec).await;
    get(node.addr, "threads.test", "/pid").await.unwrap();
    assert_eq!(waiting_behind(&node, "threads.test", 2, 4).await, 0);
    node.stop().await;
}

/// Bytes waiting in a site's only worker's inbox at the end of a one-second request
/// (as its app sees them), with `busy` such requests and then `followers` short ones
/// sent meanwhile; each short one gets its own answer.
async fn waiting_behind(node: &Node, host: &'static str, busy: usize, followers: usize) -> usize {
    let addr = node.addr;
    let busy: Vec<_> = (0..busy)
        .map(|_| tokio::spawn(async move { get(addr, host, "/sleep?s=1&report=1").await.unwrap() }))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let echoes: Vec<_> = (0..followers)
        .map(|n| {
            tokio::spawn(async move {
                let path = format!("/echo?text=follower-{n}");
                get(addr, host, &path).await.unwrap().text()
            })
        })
        .collect();
    let mut reports = Vec::new();
    for b in busy {
        reports.push(b.await.unwrap().text());
    }
    for (n, echo) in echoes.into_iter().enumerate() {
        assert_eq!(echo.await.unwrap(), format!("follower-{n}"));
    }
    // Every report is the whole worker's; the first one sees the most.
    let bytes = match reports[0].rsplit("inbox: ").next() {
        Some("empty") => Some(0),
        Some(waiting) => waiting.strip_suffix(" bytes").and_then(|b| b.parse().ok()),
        None => None,
    };
    bytes.unwrap_or_else(|| panic!("{reports:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_moves_to_the_first_worker_that_comes_free() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("two", &["two.test"], &app);
    spec.processes_min = Some(2);
    spec.processes_max = Some(2);
    node.add(spec).await;
    node.eventually("two warm workers", || async {
        node.worker_pids().len() == 2
    })
    .await;

    let addr = node.addr;
    let sleep = |path: &'static str| {
        tokio::spawn(async move { get(addr, "two.test", path).await.unwrap() })
    };
    let long = sleep("/sleep?s=3&report=1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let short = sleep("/sleep?s=0.8&report=1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Posted behind the long request (busy the longest), read back when the short
    // one ends, and answered by the short one's worker: not after three seconds.
    let next = get(addr, "two.test", "/pid").await.unwrap();
    let (long, short) = (long.await.unwrap().text(), short.await.unwrap().text());
    let worker_of = |text: &str| -> u32 {
        let pid = text
            .strip_prefix("slept in ")
            .and_then(|t| t.split(';').next());
        pid.and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{text}"))
    };
    assert_ne!(worker_of(&long), worker_of(&short));
    assert_eq!(
        pid_of(&next),
        worker_of(&short),
        "long: {long}; short: {short}"
    );
    assert!(long.ends_with("inbox: empty"), "{long}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_behind_a_killed_one_is_served_by_the_next_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("hang", &["hang.test"], &app);
    spec.processes_max = Some(1);
    spec.request_timeout = Some(Duration::from_secs(1));
    node.add(spec).await;
    let first = pid_of(&get(node.addr, "hang.test", "/pid").await.unwrap());

    let addr = node.addr;
    let hung = tokio::spawn(async move { get(addr, "hang.test", "/sleep?s=30").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It waits in the hung worker's inbox; the kill at request_timeout gives it back
    // unread, and a new worker answers it.
    let next = get(addr, "hang.test", "/pid").await.unwrap();
    assert_eq!(hung.await.unwrap().status, 504);
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(pid_of(&next), first);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_answer_is_its_own_requests() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("load", &["load.test"], &app);
    spec.processes_min = Some(2);
    spec.processes_max = Some(2);
    node.add(spec).await;

    // Many more clients than slots, requests of uneven length (so followers move
    // between workers), and uploads among them (which never follow).
    let clients: Vec<_> = (0..16)
        .map(|client| {
            let addr = node.addr;
            tokio::spawn(async move {
                let mut wrong = Vec::new();
                for n in 0..40 {
                    let (got, want) = if n % 5 == 4 {
                        let size = 1000 * client + n;
                        let r = post(addr, "load.test", "/upload", vec![b'x'; size]).await;
                        (r.map(|r| r.text()), format!("{size} "))
                    } else {
                        let text = format!("{client}-{n}");
                        let path = format!("/echo?text={text}&s=0.00{}", (client + n) % 10);
                        (get(addr, "load.test", &path).await.map(|r| r.text()), text)
                    };
                    match got {
                        Ok(got) if got == want || got.starts_with(&want) && want.ends_with(' ') => {
                        }
                        other => wrong.push(format!("{want:?}: {other:?}")),
                    }
                }
                wrong
            })
        })
        .collect();
    for client in clients {
        let wrong = client.await.unwrap();
        assert!(wrong.is_empty(), "answers not their request's: {wrong:?}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_slip_a_packet_into_its_inbox() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("forger", &["forger.test"], &app);
    spec.processes_max = Some(1);
    spec.request_timeout = Some(Duration::from_secs(1));
    node.add(spec).await;
    let first = pid_of(&get(node.addr, "forger.test", "/pid").await.unwrap());

    if is_root() {
        // The site runs as its own user, and the pipe is the node's (root's, 0600):
        // the worker cannot open its end again for writing.
        let forge = get(node.addr, "forger.test", "/forge-inbox?s=0")
            .await
            .unwrap();
        assert_eq!(forge.text(), "Permission denied");
    } else {
        // Sites run as the node's user: the worker can write into its inbox. It does,
        // then hangs; a request is posted behind what it wrote (and runs together
        // with it). When the worker is killed at request_timeout, the node reads the
        // inbox back, finds a packet it never posted, and trusts nothing there: the
        // request fails with the worker. The site serves again from a new worker.
        let addr = node.addr;
        let hung = tokio::spawn(async move { get(addr, "forger.test", "/forge-inbox?s=30").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = get(addr, "forger.test", "/pid").await.unwrap();
        assert_eq!(hung.await.unwrap().unwrap().status, 504);
        assert_eq!(next.status, 502, "{}", next.text());
        node.error_log_with("forger", "wrote into its inbox").await;
        let after = get(node.addr, "forger.test", "/pid").await.unwrap();
        assert_ne!(pid_of(&after), first);
    }
    node.stop().await;
}

/// The loader's side of the order rules, driven without a node (fixtures/loader_inbox.py):
/// the socket before the inbox, a request posted while busy or idle, a closed inbox, a
/// broken inbox message.
#[test]
fn the_loader_serves_its_socket_before_its_inbox() {
    crate::harness::loader_fixture("loader_inbox.py");
}
