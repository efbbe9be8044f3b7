//! A request no worker read goes to another worker: one whose worker ended (or shut
//! its end of the slot) after its last answer, before the pool knew, was seen by no
//! app, so the node sends it again instead of answering 502, when it fits one packet
//! (front/exchange.rs, `UNREAD_RETRIES`).

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use sha2::{Digest, Sha256};

use crate::harness::http::{post, Resp};
use crate::harness::{get, pid_of, process_state, Node};

const RETRIED: &str = "ended before it read a request; the request goes to another worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_unread_in_a_killed_workers_slot_goes_to_another_worker() {
    let (node, pid) = one_idle_worker().await;
    let addr = node.addr;
    let answer =
        killed_with_request_unread(
            pid,
            async move { get(addr, "one.test", "/pid").await.unwrap() },
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    node.error_log_with("one", &format!("worker pid {pid} {RETRIED}"))
        .await;
    let next = pid_of(&answer);
    assert_ne!(next, pid, "answered by the killed worker");

    // A request with a body is read whole or not at all too, when it fits one packet.
    let form = "name=roost&kind=form";
    let answer = killed_with_request_unread(next, async move {
        post(addr, "one.test", "/upload", form).await.unwrap()
    })
    .await;
    assert_eq!(answer.text(), uploaded(form.as_bytes()));
    node.error_log_with("one", &format!("worker pid {next} {RETRIED}"))
        .await;
    node.stop().await;
}

/// A request that followed a busy one into its worker's inbox, and had the slot when
/// the worker died without taking it from there: the pool finds it still in the inbox,
/// and it goes to another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_left_unread_in_a_killed_workers_inbox_goes_to_another_worker() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("one", &["one.test"], &app);
    spec.processes_max = Some(1);
    node.add(spec).await;
    let addr = node.addr;
    // The only worker answers this after a moment, then stops itself before it
    // reads its inbox.
    let busy =
        tokio::spawn(async move { get(addr, "one.test", "/stop-at-close?s=0.5").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let follower = tokio::spawn(async move { get(addr, "one.test", "/pid").await.unwrap() });
    let busy = busy.await.unwrap();
    assert_eq!(busy.status, 200, "{}", busy.text());
    let pid = pid_of(&busy);
    node.eventually("the worker to stop itself", || async {
        process_state(pid) == Some('T')
    })
    .await;
    signal(pid, Signal::SIGKILL);
    let answer = follower.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_ne!(pid_of(&answer), pid, "answered by the killed worker");
    node.error_log_with("one", &format!("worker pid {pid} {RETRIED}"))
        .await;
    node.stop().await;
}

/// The request after one whose body went in several writes is not sent again: the
/// loader reads what is left of a body after it answered, and a read of that may
/// take the start of the next request with it, which the worker may then begin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_body_in_several_writes_is_not_sent_again() {
    let (node, pid) = one_idle_worker().await;
    let addr = node.addr;
    let body = vec![b'x'; 64 << 10];
    let up = post(addr, "one.test", "/upload", body.clone())
        .await
        .unwrap();
    assert_eq!(up.text(), uploaded(&body));
    let answer =
        killed_with_request_unread(
            pid,
            async move { get(addr, "one.test", "/pid").await.unwrap() },
        )
        .await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    node.error_log_with("one", &format!("worker pid {pid} died"))
        .await;
    assert!(!node.log("one", "error.log").contains(RETRIED));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_worker_can_no_longer_read_goes_to_another_worker() {
    let (node, _) = one_idle_worker().await;
    let shut = get(node.addr, "one.test", "/shut-slot?s=0.2")
        .await
        .unwrap();
    assert_eq!(shut.status, 200, "{}", shut.text());
    let pid = pid_of(&shut);
    node.eventually("the worker to stop itself", || async {
        process_state(pid) == Some('T')
    })
    .await;
    // The worker lives, but its end of the slot takes nothing: the node's write fails.
    let answer = get(node.addr, "one.test", "/pid").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_ne!(
        pid_of(&answer),
        pid,
        "answered by the worker that shut its slot"
    );
    node.error_log_with("one", &format!("worker pid {pid} {RETRIED}"))
        .await;
    // The node retired it; stopped, it cannot leave by itself.
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    node.stop().await;
}

/// A node with one site, "one.test", running one worker (of up to two), idle; and
/// that worker's pid.
async fn one_idle_worker() -> (Node, u32) {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("one", &["one.test"], &app);
    spec.processes_max = Some(2);
    node.add(spec).await;
    let pid = pid_of(&get(node.addr, "one.test", "/pid").await.unwrap());
    (node, pid)
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// What the tester app's /upload answers for `body`.
fn uploaded(body: &[u8]) -> String {
    format!("{} {:x}", body.len(), Sha256::digest(body))
}

/// Stops the site's worker `pid` (it reads nothing more, while the pool still has its
/// slot as free), makes `request` (which the node writes into that slot), kills the
/// worker with the request unread, as a worker killed while idle, and gives the
/// request's answer.
async fn killed_with_request_unread(
    pid: u32,
    request: impl std::future::Future<Output = Resp> + Send + 'static,
) -> Resp {
    signal(pid, Signal::SIGSTOP);
    let request = tokio::spawn(request);
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(pid, Signal::SIGKILL);
    request.await.unwrap()
}
