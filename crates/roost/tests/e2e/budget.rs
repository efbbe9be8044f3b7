//! The node-wide worker budget: a full node evicts the least recently used idle worker
//! of any site, workers over the memory budget are stopped in that order, a busy site
//! cannot starve a small one, and a preloaded site that gives up its last worker lets
//! its template go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roost::pool::BudgetLimits;

use crate::harness::{alive, get, need_root, pid_of, Node};

async fn budget_node(max_workers: usize) -> Node {
    Node::start_with(|c| {
        c.budget = BudgetLimits {
            max_workers,
            max_memory: 0,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_evicts_the_least_recently_used_idle_worker() {
    let node = budget_node(2).await;
    let app = node.app("tester.py");
    for name in ["a", "b", "c"] {
        node.add(node.spec(name, &[&format!("{name}.test")], &app))
            .await;
    }
    // The routing probes started workers; start from a known order of use.
    let a = pid_of(&get(node.addr, "a.test", "/pid").await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = pid_of(&get(node.addr, "b.test", "/pid").await.unwrap());
    node.eventually("two workers at most", || async {
        node.worker_pids().len() <= 2
    })
    .await;
    let c = pid_of(&get(node.addr, "c.test", "/pid").await.unwrap());
    assert!(alive(c));
    node.eventually("a's worker, used least recently, to be evicted", || async {
        !alive(a)
    })
    .await;
    assert!(
        alive(b),
        "b was used more recently than a and should have stayed"
    );
    assert!(node.worker_pids().len() <= 2, "{:?}", node.worker_pids());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_site_does_not_starve_a_small_one() {
    let node = budget_node(2).await;
    let app = node.app("tester.py");
    let mut busy = node.spec("busy", &["busy.test"], &app);
    busy.processes_max = Some(2);
    node.add(busy).await;
    node.add(node.spec("small", &["small.test"], &app)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let hammer: Vec<_> = (0..3)
        .map(|_| {
            let (stop, addr) = (stop.clone(), node.addr);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = get(addr, "busy.test", "/sleep?s=0.2").await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        let r = get(node.addr, "small.test", "/pid").await.unwrap();
        assert_eq!(r.status, 200, "small request {i} starved: {}", r.text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hammer {
        h.await.unwrap();
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_site_that_gives_its_last_worker_to_another_lets_its_template_go() {
    let node = budget_node(1).await;
    let app = node.app("tester.py");
    for name in ["a", "b"] {
        let mut spec = node.spec(name, &[&format!("{name}.test")], &app);
        spec.preload = Some(true);
        // Only the budget may end a's template within the test.
        spec.idle_timeout = Some(Duration::from_secs(60));
        node.add(spec).await;
    }
    let template = node.pid("a.test", "/imported-by").await;
    // a's only worker is busy when b asks for the node's one room: it gives it up
    // once its request is answered (not evicted idle: the other way a site goes quiet).
    let addr = node.addr;
    let busy = tokio::spawn(async move { get(addr, "a.test", "/sleep?s=1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = get(node.addr, "b.test", "/pid").await.unwrap();
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(busy.await.unwrap().unwrap().status, 200);
    node.eventually(
        "a's template to exit with a's last worker, not at its idle_timeout",
        || async { !alive(template) },
    )
    .await;
    assert_eq!(get(node.addr, "a.test", "/pid").await.unwrap().status, 200);
    node.stop().await;
}

/// `--max-worker-memory`: while the sites' memory is over it, idle workers are
/// stopped; a site asked for again gets a new worker. (A limit of one byte: every idle
/// worker must go. That one check stops as many as it takes, oldest first, is
/// `pool::budget`'s unit test; which goes when one is enough,
/// `the_memory_budget_counts_what_workers_add_not_what_they_share`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_the_memory_budget_are_stopped_as_many_as_it_takes() {
    let node = Node::start_with(|c| {
        c.budget = BudgetLimits {
            max_workers: 0,
            max_memory: 1,
        }
    })
    .await;
    let app = node.app("tester.py");
    for name in ["a", "b"] {
        node.add(node.spec(name, &[&format!("{name}.test")], &app))
            .await;
    }
    let a = pid_of(&get(node.addr, "a.test", "/pid").await.unwrap());
    let b = pid_of(&get(node.addr, "b.test", "/pid").await.unwrap());
    node.eventually("both workers to be stopped", || async {
        !alive(a) && !alive(b)
    })
    .await;
    let again = pid_of(&get(node.addr, "a.test", "/pid").await.unwrap());
    assert_ne!(again, a, "served by a worker that was stopped");
    node.stop().await;
}

/// `--max-worker-memory` counts what the sites' processes add to the host, as their
/// memory cgroups count it, not their RSS, which counts again in every worker the
/// pages it shares with its zygote. Four idle workers whose RSS adds up to more than
/// the limit, and whose own pages do not, are left running; a worker that then takes
/// 64 MiB of its own puts the node over, and it alone is stopped, being the one used
/// least recently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the sites' memory cgroups"]
async fn the_memory_budget_counts_what_workers_add_not_what_they_share() {
    need_root("the memory budget reads the sites' memory cgroups");
    const LIMIT: u64 = 48 << 20;
    let node = Node::start_with(|c| {
        c.budget = BudgetLimits {
            max_workers: 0,
            max_memory: LIMIT,
        }
    })
    .await;
    let app = node.app("tester.py");
    let names = ["a", "b", "c", "d"];
    for name in names {
        node.add(node.spec(name, &[&format!("{name}.test")], &app))
            .await;
    }
    let mut pids = Vec::new();
    for name in names {
        pids.push(pid_of(
            &get(node.addr, &format!("{name}.test"), "/pid")
                .await
                .unwrap(),
        ));
    }
    let rss: u64 = pids.iter().map(|pid| rss_bytes(*pid)).sum();
    assert!(
        rss > LIMIT,
        "the workers' RSS ({rss} bytes) must exceed the limit for this test to tell"
    );
    // Three checks of the budget (one a second).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for (name, pid) in names.iter().zip(&pids) {
        assert!(alive(*pid), "{name}'s worker was stopped, its RSS counted");
    }

    // a's worker takes the memory a second after it answered: a check of the budget
    // that came while it took it within a request would find it busy, and evict the
    // idle others (all of them: they cannot make up the excess) in its place.
    let held = get(node.addr, "a.test", "/hold?mib=64&after=1")
        .await
        .unwrap();
    assert_eq!(pid_of(&held), pids[0]);
    for name in &names[1..] {
        get(node.addr, &format!("{name}.test"), "/pid")
            .await
            .unwrap();
    }
    node.eventually("a's worker, over the limit, to be stopped", || async {
        !alive(pids[0])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (name, pid) in names.iter().zip(&pids).skip(1) {
        assert!(alive(*pid), "{name}'s worker was stopped once a's had gone");
    }
    node.stop().await;
}

/// A process's resident memory, from /proc/<pid>/statm.
fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
