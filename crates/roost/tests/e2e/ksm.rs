//! `--ksm`: the zygote, the templates and the workers have their memory marked for the
//! kernel's same-page merging, and ksmd then keeps the pages workers share once.

use std::time::Duration;

use roost::server::SpawnMode;

use crate::harness::{need_root, parent_of, Node};

/// What /proc/<pid>/ksm_stat says of a process.
struct KsmStat {
    merge_any: bool,
    merging_pages: u64,
}

fn ksm_stat(pid: u32) -> KsmStat {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_else(|e| {
        panic!("cannot read /proc/{pid}/ksm_stat ({e}): --ksm needs a kernel with KSM")
    });
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/ksm_stat:\n{text}"))
    };
    KsmStat {
        merge_any: field("ksm_merge_any") == "yes",
        merging_pages: field("ksm_merging_pages").parse().expect("a page count"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksm_marks_zygotes_templates_and_workers_and_nothing_else() {
    let node = Node::start_with(|c| c.ksm = true).await;
    let app = node.app("tester.py");
    node.add(node.spec("plain", &["plain.test"], &app)).await;
    let mut spec = node.spec("pre", &["pre.test"], &app);
    spec.preload = Some(true);
    node.add(spec).await;

    let worker = node.pid("plain.test", "/pid").await;
    let zygote = parent_of(worker);
    let template = node.pid("pre.test", "/imported-by").await;
    let forked = node.pid("pre.test", "/pid").await;
    assert_eq!(
        parent_of(forked),
        template,
        "the worker is not the template's"
    );
    for (what, pid) in [
        ("zygote", zygote),
        ("worker", worker),
        ("template", template),
        ("template's worker", forked),
    ] {
        assert!(
            ksm_stat(pid).merge_any,
            "the {what} ({pid}) is not mergeable"
        );
    }
    assert!(
        !ksm_stat(std::process::id()).merge_any,
        "the node marked itself mergeable"
    );
    node.stop().await;

    let node = Node::start_with(|c| {
        c.ksm = true;
        c.spawn = SpawnMode::Plain;
    })
    .await;
    let app = node.app("tester.py");
    node.add(node.spec("plain", &["plain.test"], &app)).await;
    let worker = node.pid("plain.test", "/pid").await;
    assert!(
        ksm_stat(worker).merge_any,
        "a plainly spawned worker is not mergeable"
    );
    node.stop().await;

    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("off", &["off.test"], &app)).await;
    let worker = node.pid("off.test", "/pid").await;
    assert!(
        !ksm_stat(worker).merge_any,
        "without --ksm a worker is mergeable"
    );
    assert!(
        !ksm_stat(parent_of(worker)).merge_any,
        "without --ksm the zygote is mergeable"
    );
    node.stop().await;
}

/// Starts ksmd, scanning faster than its default so the test takes seconds, and puts
/// both settings back when dropped.
struct Ksmd {
    saved: Vec<(&'static str, String)>,
}

impl Ksmd {
    const RUN: &'static str = "/sys/kernel/mm/ksm/run";
    const PAGES_TO_SCAN: &'static str = "/sys/kernel/mm/ksm/pages_to_scan";

    fn start() -> Ksmd {
        let mut saved = Vec::new();
        for (file, value) in [(Self::PAGES_TO_SCAN, "1000"), (Self::RUN, "1")] {
            let old = std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("cannot read {file} ({e}): this test needs KSM"));
            std::fs::write(file, value).unwrap_or_else(|e| panic!("cannot write {file}: {e}"));
            saved.push((file, old.trim().to_owned()));
        }
        Ksmd { saved }
    }
}

impl Drop for Ksmd {
    fn drop(&mut self) {
        for (file, old) in self.saved.iter().rev() {
            let _ = std::fs::write(file, old);
        }
    }
}

/// Workers of different sites forked from one zygote run the same code over the same
/// layout: ksmd finds pages they all hold and keeps one copy. Without the mark (a node
/// without --ksm) nothing of theirs is merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: starts the kernel's ksmd"]
async fn ksmd_merges_pages_that_workers_of_different_sites_share() {
    need_root("it starts ksmd");
    let _ksmd = Ksmd::start();
    let node = Node::start_with(|c| c.ksm = true).await;
    let app = node.app("tester.py");
    let mut workers = Vec::new();
    for i in 0..4 {
        let host = format!("s{i}.test");
        node.add(node.spec(&format!("s{i}"), &[&host], &app)).await;
        workers.push(node.pid(&host, "/pid").await);
    }
    let merged = || {
        workers
            .iter()
            .map(|p| ksm_stat(*p).merging_pages)
            .collect::<Vec<_>>()
    };
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        last = merged();
        // A hundred pages each: far more than chance (a zero-filled page or two).
        if last.iter().all(|pages| *pages >= 100) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.iter().all(|pages| *pages >= 100),
        "ksmd merged too little of the workers in 60 s: {last:?} pages each"
    );
    node.stop().await;
}
