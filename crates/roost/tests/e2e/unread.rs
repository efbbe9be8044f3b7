//! A request no worker read goes to another worker: one whose worker ended (or shut
//! its end of the slot) after its last answer, before the pool knew, was seen by no
//! app, so the node sends it again instead of answering 502 (front/exchange.rs,
//! `UNREAD_RETRIES`).

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{get, pid_of, process_state, Node};

const RETRIED: &str = "ended before it read a request; the request goes to another worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_unread_in_a_killed_workers_slot_goes_to_another_worker() {
    let (node, pid) = one_idle_worker().await;
    // Stopped, the worker reads nothing more; the pool still has its slot as free.
    signal(pid, Signal::SIGSTOP);
    let addr = node.addr;
    let request = tokio::spawn(async move { get(addr, "one.test", "/pid").await.unwrap() });
    // The node writes the request into the stopped worker's slot at once; then the
    // worker dies with it unread, as a worker killed while idle does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(pid, Signal::SIGKILL);
    let answer = request.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_ne!(pid_of(&answer), pid, "answered by the killed worker");
    node.error_log_with("one", &format!("worker pid {pid} {RETRIED}"))
        .await;
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
