//! Faults under load, the short form of `bench/faults.py` (which runs for a minute):
//! workers are killed with SIGKILL while clients load several sites, sites are added
//! to the registry, one loaded site's limits change again and again, and another is
//! removed and added back again and again. And the processes that fork workers (the
//! zygote, a site's template) killed under load.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::http::get;
use crate::harness::{comm, is_root, parent_of, process_state, site_cgroup_file, Node};

const SITES: usize = 4;
const CLIENTS: usize = 8;
const LOAD: Duration = Duration::from_secs(5);
/// The pids.max and memory.max the changed site takes in turn: each change renews its
/// workers, and a lowered pids.max waits for the old ones.
const CHANGES: [(u32, u64); 2] = [(24, 192 << 20), (64, 256 << 20)];

/// What the clients saw.
#[derive(Default)]
struct Seen {
    ok: usize,
    failed: usize,
    /// 404s of the site removed and added back, while it was not in the registry.
    not_found: usize,
    /// Requests that got no HTTP answer at all: the node must always answer.
    unanswered: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_under_load_fail_only_their_own_requests() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    for i in 0..SITES {
        let host = format!("s{i}.test");
        let mut spec = node.spec(&format!("s{i}"), &[&host], &app);
        spec.processes_max = Some(2);
        node.add(spec).await;
    }
    let changed_spec = node.store().get("s0").unwrap().unwrap();
    let removed = SITES - 1;
    let removed_spec = node.store().get(&format!("s{removed}")).unwrap().unwrap();
    let end = Instant::now() + LOAD;
    let sites: Vec<String> = (0..SITES).map(|i| format!("s{i}")).collect();
    let clients = load(&node, &sites, Some(removed), end);
    let killer = async {
        let mut killed = HashSet::new();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let workers: Vec<u32> = node
                .worker_pids()
                .into_iter()
                .filter(|&p| comm(p) == "roost-worker")
                .collect();
            if let Some(&victim) = workers.get(killed.len() % workers.len().max(1)) {
                if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
                    killed.insert(victim);
                }
            }
        }
        killed
    };
    let writer = async {
        let mut added = Vec::new();
        while Instant::now() < end {
            let name = format!("new{}", added.len());
            let host = format!("{name}.test");
            node.add(node.spec(&name, &[&host], &app)).await;
            added.push(host);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        added
    };
    let changer = async {
        let mut changes = 0;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (pids, memory) = CHANGES[changes % CHANGES.len()];
            let mut spec = changed_spec.clone();
            (spec.pids_max, spec.memory_max) = (Some(pids), Some(memory));
            node.store()
                .replace(&spec.validate(roost_registry::FsChecks::Full).unwrap())
                .unwrap();
            changes += 1;
        }
        changes
    };
    let remover = async {
        let mut removals = 0;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(400)).await;
            node.store().remove(&removed_spec.name).unwrap();
            removals += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            node.store()
                .add(
                    &removed_spec
                        .validate(roost_registry::FsChecks::Full)
                        .unwrap(),
                )
                .unwrap();
        }
        removals
    };
    let (seen, killed, added, changes, removals) =
        tokio::join!(clients, killer, writer, changer, remover);

    assert!(killed.len() >= 20, "only {} workers killed", killed.len());
    // One slot per worker: a kill can fail at most the request on it.
    let failed = failures_only_on(&node, &sites, &seen, &killed).await;
    assert!(
        failed <= killed.len(),
        "{failed} failed for {} kills",
        killed.len()
    );

    // The pipes of each killed worker ended with it: the node (this process) holds
    // three per live worker (its output, both ends of its one slot's inbox); the
    // test's own standard streams may be pipes too.
    node.eventually("no pipe of a killed worker left open", || async {
        let pipes = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count();
        pipes <= 3 * node.worker_pids().len() + 4
    })
    .await;

    // The registry writes made during the run all took effect.
    assert!(!added.is_empty());
    for host in &added {
        let r = get(node.addr, host, "/pid").await.unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    assert!(changes >= 10, "only {changes} changes of s0");
    let not_found: usize = seen.iter().map(|s| s.not_found).sum();
    eprintln!("{removals} removals of s{removed}, {not_found} requests to it while it was gone");
    assert!(removals >= 5, "only {removals} removals of s{removed}");
    let r = get(node.addr, &format!("s{removed}.test"), "/pid")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "s{removed}, added back: {}", r.text());
    let (pids, memory) = CHANGES[(changes - 1) % CHANGES.len()];
    let last = node.store().get("s0").unwrap().unwrap();
    assert_eq!((last.pids_max, last.memory_max), (Some(pids), Some(memory)));
    if is_root() {
        // The last limits are in force, a lowered pids.max too, once what it waited
        // for (workers killed, workers renewed) has gone.
        let pids_max = site_cgroup_file(&node.cgroup_name, "s0", "pids.max");
        node.eventually("s0's last pids.max in force", || async {
            std::fs::read_to_string(&pids_max).unwrap().trim() == pids.to_string()
        })
        .await;
    } else {
        eprintln!("not root: s0's cgroup limits not checked (no cgroups)");
    }
    node.stop().await;
}

/// A zygote killed under load takes every worker it forked with it, a template its
/// site's: the requests on those fail, and no other (a spawn on its way when its fork
/// server died is started again, not taken for the app failing to load); every death
/// is logged with its cause, and both sites serve after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fork_servers_killed_under_load_fail_only_their_workers_requests() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let sites: Vec<String> = ["forked", "preloaded"].map(String::from).to_vec();
    for name in &sites {
        let mut spec = node.spec(name, &[&format!("{name}.test")], &app);
        spec.processes_max = Some(2);
        spec.preload = Some(name == "preloaded");
        node.add(spec).await;
    }
    let end = Instant::now() + LOAD;
    let clients = load(&node, &sites, None, end);
    let killer = async {
        let mut killed = HashSet::new();
        let mut servers_killed = [0, 0];
        let mut round = 0;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            round += 1;
            let processes = loader_processes(&node);
            let workers: Vec<u32> = (processes.iter())
                .filter(|p| p.comm == "roost-worker")
                .map(|p| p.pid)
                .collect();
            // Every 700 ms the zygote or the template in turn, and with it its
            // workers; a worker otherwise.
            let victim = if round % 7 == 0 {
                let which = (round / 7) % 2;
                let server = processes.iter().find(|p| match which {
                    // The node's child not named by the loader (a worker spawned
                    // plainly, when a zygote was killed while it started, is one too).
                    0 => !p.comm.starts_with("roost-") && p.parent == std::process::id(),
                    _ => p.comm == "roost-template",
                });
                server.map(|p| (p.pid, which))
            } else {
                workers.get(round % workers.len().max(1)).map(|&w| (w, 2))
            };
            let Some((pid, which)) = victim else {
                continue;
            };
            let mut gone = vec![pid];
            if which < 2 {
                gone.extend(stop_forking_below(&node, pid).await);
            }
            if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                killed.extend(gone);
                if which < 2 {
                    servers_killed[which] += 1;
                }
            }
        }
        (killed, servers_killed)
    };
    let (seen, (killed, [zygotes, templates])) = tokio::join!(clients, killer);
    assert!(
        zygotes >= 2 && templates >= 2,
        "{zygotes} zygotes and {templates} templates killed"
    );
    failures_only_on(&node, &sites, &seen, &killed).await;
    for name in &sites {
        let r = get(node.addr, &format!("{name}.test"), "/pid")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    for (name, server) in [("forked", "zygote"), ("preloaded", "template")] {
        let with_it = format!("killed with the {server} that forked it");
        assert!(
            node.log(name, "error.log").contains(&with_it),
            "{name}'s error log never says {with_it:?}"
        );
    }
    node.stop().await;
}

/// Clients load `sites` (round robin, a few milliseconds in the app each, so kills
/// land mid-request) until `end`; requests to the site numbered `may_be_gone` may get
/// 404 (it is removed and added back meanwhile).
async fn load(
    node: &Node,
    sites: &[String],
    may_be_gone: Option<usize>,
    end: Instant,
) -> Vec<Seen> {
    futures_util::future::join_all((0..CLIENTS).map(|c| async move {
        let mut seen = Seen::default();
        let mut n = c;
        while Instant::now() < end {
            n += 1;
            let site = n % sites.len();
            // The app notes the id as it begins the request (`never_begun_twice`).
            let path = format!("/sleep?s=0.005&id={c}-{n}");
            match get(node.addr, &format!("{}.test", sites[site]), &path).await {
                Ok(r) if r.status == 200 => seen.ok += 1,
                Ok(r) if r.status == 404 && may_be_gone == Some(site) => seen.not_found += 1,
                Ok(_) => seen.failed += 1,
                Err(e) => seen.unanswered.push(e),
            }
        }
        seen
    }))
    .await
}

/// Checks that every request was answered, some failed, and every 5xx the node logged
/// was on a worker in `killed`, exactly the failures the clients saw; that the
/// workers' deaths were logged with their cause, none for breaking the protocol.
/// Returns how many failed.
async fn failures_only_on(
    node: &Node,
    sites: &[String],
    seen: &[Seen],
    killed: &HashSet<u32>,
) -> usize {
    let (ok, failed) = seen
        .iter()
        .fold((0, 0), |(o, f), s| (o + s.ok, f + s.failed));
    let unanswered: Vec<&String> = seen.iter().flat_map(|s| &s.unanswered).collect();
    assert!(
        unanswered.is_empty(),
        "requests without an answer: {unanswered:?}"
    );
    assert!(
        ok > 0 && failed > 0,
        "{ok} answered, {failed} failed: no kill hit a request"
    );
    // (A 404 of a removed site may be logged, by its draining pool.)
    let loaded = |line: &&str| line.contains("/sleep?") && status_of(line) != 404;
    node.eventually("every request in the access logs", || async {
        let lines: usize = (sites.iter())
            .map(|site| node.log(site, "access.log"))
            .map(|log| log.lines().filter(loaded).count())
            .sum();
        lines == ok + failed
    })
    .await;
    let mut logged_failures = 0;
    for site in sites {
        for line in node.log(site, "access.log").lines() {
            if status_of(line) < 500 {
                continue;
            }
            logged_failures += 1;
            let pid = line.rsplit(' ').next().unwrap();
            assert!(
                pid.parse().is_ok_and(|p| killed.contains(&p)),
                "a 5xx on a worker that was not killed: {line}\nits error log:\n{}",
                node.log(site, "error.log")
            );
        }
    }
    assert_eq!(logged_failures, failed);
    for site in sites {
        let errors = node.log(site, "error.log");
        assert!(!errors.contains("killing worker"), "{site}: {errors}");
        assert!(!errors.contains("unknown status"), "{site}: {errors}");
    }
    never_begun_twice(node, sites);
    failed
}

/// A request the node sent to another worker, as the one it went to had died with it
/// unread, was begun by no app before: no id is noted twice in the error logs.
fn never_begun_twice(node: &Node, sites: &[String]) {
    let mut begun = HashSet::new();
    for site in sites {
        let errors = node.log(site, "error.log");
        for id in errors.lines().filter_map(|l| l.split("began ").nth(1)) {
            assert!(
                begun.insert(id.to_owned()),
                "request {id} was begun twice; {site}'s error log:\n{errors}"
            );
        }
    }
    assert!(!begun.is_empty(), "no request noted its id");
}

/// A process running the node's loader: a zygote, a spare, a template or a worker.
struct LoaderProcess {
    pid: u32,
    parent: u32,
    comm: String,
}

fn loader_processes(node: &Node) -> Vec<LoaderProcess> {
    let loader = node.dir.path().join("run/loader.py");
    let loader = loader.to_string_lossy();
    (std::fs::read_dir("/proc").unwrap().flatten())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (cmdline.split(|b| *b == 0)).any(|arg| arg == loader.as_bytes())
        })
        .map(|pid| LoaderProcess {
            pid,
            parent: parent_of(pid),
            comm: comm(pid),
        })
        .collect()
}

/// Stops the fork server `pid` and every template below it (a zygote's), so that no
/// worker is forked unseen; returns every process below it then.
async fn stop_forking_below(node: &Node, pid: u32) -> Vec<u32> {
    let mut stopped = Vec::new();
    let mut servers = vec![pid];
    loop {
        for &server in &servers {
            let _ = kill(Pid::from_raw(server as i32), Signal::SIGSTOP);
            until_stopped(server).await;
        }
        stopped.extend(servers);
        let processes = loader_processes(node);
        let below = descendants(&processes, pid);
        servers = (processes.iter())
            .filter(|p| below.contains(&p.pid) && p.comm == "roost-template")
            .map(|p| p.pid)
            .filter(|p| !stopped.contains(p))
            .collect();
        if servers.is_empty() {
            return below;
        }
    }
}

/// Waits (a second at most) until `pid` is stopped, or gone.
async fn until_stopped(pid: u32) {
    for _ in 0..100 {
        match process_state(pid) {
            Some(state) if state != 'T' => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => return,
        }
    }
}

/// Every process below `pid` among `processes`.
fn descendants(processes: &[LoaderProcess], pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            processes
                .iter()
                .filter(|p| p.parent == parent)
                .map(|p| p.pid),
        );
        i += 1;
    }
    found.split_off(1)
}

/// The status of an access log line.
fn status_of(line: &str) -> u16 {
    let after_request = line.split('"').nth(2).unwrap();
    after_request
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
