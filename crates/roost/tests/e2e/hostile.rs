//! A malicious worker writes to its own slot socket behind the loader's back: every
//! such request gets a 5xx (or, once a head went out, a broken response), the worker
//! is gone, and the site and its neighbour go on serving.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::harness::{alive, get, peak_rss_kib, raw, thread_cpu, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_cost_the_worker_and_nothing_else() {
    let node = Node::start().await;
    let hostile = node.app("hostile.py");
    let calm = node.app("tester.py");
    let mut spec = node.spec("evil", &["evil.test"], &hostile);
    spec.request_timeout = Some(Duration::from_secs(20));
    node.add(spec).await;
    node.add(node.spec("calm", &["calm.test"], &calm)).await;
    let worker = |text: String| -> u32 { text.trim_start_matches("ok ").parse().unwrap() };

    for (path, expect) in [
        ("/garbage", 502),
        ("/huge", 502),
        ("/order", 502),
        ("/length", 502),
        ("/switch", 502),
        ("/overlong", 502),
        ("/underlong", 502),
    ] {
        let before = worker(get(node.addr, "evil.test", "/").await.unwrap().text());
        let started = tokio::time::Instant::now();
        let r = get(node.addr, "evil.test", path).await.unwrap();
        assert_eq!(r.status, expect, "{path}: {}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path} was not refused at once"
        );
        node.eventually(
            &format!("the worker behind {path} to be killed"),
            || async { !alive(before) },
        )
        .await;
        assert_eq!(get(node.addr, "calm.test", "/").await.unwrap().status, 200);
    }

    // A response cut off after its head: the client sees a broken response, never a
    // short one that looks complete.
    let cut = get(node.addr, "evil.test", "/cut").await;
    assert!(cut.is_err(), "a cut response looked complete: {cut:?}");

    // The worker exits while a child of its keeps the socket open: no wait for the
    // request timeout, the request fails as soon as the worker is gone.
    let started = tokio::time::Instant::now();
    let r = get(node.addr, "evil.test", "/fork").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );

    assert_eq!(get(node.addr, "evil.test", "/").await.unwrap().status, 200);
    assert_eq!(get(node.addr, "calm.test", "/").await.unwrap().status, 200);
    node.error_log_with("evil", "killing worker").await;
    node.stop().await;
}

/// A worker whose body belies its Content-Length, by bytes past it (a forged response)
/// or by bytes it never sends: on a kept-alive connection (a load balancer's, shared
/// by many clients and sites) the client would take those bytes for the next
/// response, or the next response's start for the end of this one. Whether the body
/// comes with its head or after it, nothing past the declared length reaches the
/// client, and a short body ends the connection. A HEAD's answer sends no body at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_belies_its_content_length_never_frames_the_next_response() {
    let node = Node::start().await;
    let hostile = node.app("hostile.py");
    let cases = [
        ("GET", "/overlong", "502"),
        ("GET", "/underlong", "502"),
        ("GET", "/overlong?stream", "200"),
        ("GET", "/underlong?stream", "200"),
        ("HEAD", "/overlong", "200"),
    ];
    // A site each: a liar that is not killed sleeps on in its request, and a request
    // sent to its slot (which the node believes free) would wait for it.
    for (i, (method, target, first)) in cases.into_iter().enumerate() {
        let (site, host) = (format!("evil{i}"), format!("evil{i}.test"));
        node.add(node.spec(&site, &[&host], &hostile)).await;
        let next = match method {
            "GET" => format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            _ => String::new(),
        };
        let close = if next.is_empty() {
            "Connection: close\r\n"
        } else {
            ""
        };
        let pipelined = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n{next}");
        let out = raw(node.addr, pipelined.as_bytes()).await;
        let what = format!("{method} {target}");
        assert!(
            !out.contains("injected"),
            "{what}: a forged response went out:\n{out}"
        );
        assert!(
            out.starts_with(&format!("HTTP/1.1 {first}")),
            "{what}:\n{out}"
        );
        match (method, target) {
            ("HEAD", _) => assert!(out.ends_with("\r\n\r\n"), "{what}: a body:\n{out}"),
            // Its head went out before the lie: the connection ends after "abc".
            (_, "/underlong?stream") => {
                let answers = out.matches("HTTP/1.1 ").count();
                assert_eq!(answers, 1, "{what}: the connection went on:\n{out}");
            }
            // Its client may get "abc", complete under its own length, and the
            // connection go on, or end.
            (_, "/overlong?stream") => {}
            _ => assert!(
                out.contains("\r\n\r\nok "),
                "{what}: no second answer:\n{out}"
            ),
        }
    }
    for (site, lie) in [
        ("evil0", "of 3 and ended after 49"),
        ("evil1", "of 10 and ended after 3"),
    ] {
        node.error_log_with(site, &format!("declared a Content-Length {lie} bytes"))
            .await;
    }
    node.stop().await;
}

/// A worker streaming its response as one-byte frames to a client that reads nothing:
/// the node holds a response's bytes for the client up to its budget, and must not
/// hold many times that for the frames they came in (each a slice pinning the buffer
/// it was read into, plus a queue entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_frames_cost_the_node_what_they_hold() {
    // 4 MiB for all responses: one site may hold 1 MiB of its clients' responses.
    let node = Node::start_with(|c| {
        c.front.response_buffer = 4 << 20;
        c.front.response_spool = 0;
    })
    .await;
    let hostile = node.app("hostile.py");
    node.add(node.spec("crumbs", &["crumbs.test"], &hostile))
        .await;
    let before = peak_rss_kib("self");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(node.addr).await.unwrap();
    // 4 million frames of one byte (24 MB on the wire), far past what the node holds.
    reader
        .write_all(b"GET /crumbs?n=4000000 HTTP/1.1\r\nHost: crumbs.test\r\n\r\n")
        .await
        .unwrap();
    // The node reads until the site's share is held, then the worker waits.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let growth_kib = peak_rss_kib("self").saturating_sub(before);
    assert!(
        growth_kib < 16 << 10,
        "the node grew by {growth_kib} KiB holding 1 MiB of one-byte frames"
    );
    drop(reader);
    node.stop().await;
}

/// An app printing without end: its processes hold no log file, only a pipe to the
/// node, which keeps the site's error log under its size limit (the full file becomes
/// `error.log.old`) and the newest lines in it; the neighbour goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_printing_without_end_fills_no_disk() {
    const LIMIT: u64 = 1 << 20;
    let node = Node::start_with(|c| c.error_log_size = LIMIT).await;
    let hostile = node.app("hostile.py");
    let calm = node.app("tester.py");
    node.add(node.spec("spew", &["spew.test"], &hostile)).await;
    node.add(node.spec("calm", &["calm.test"], &calm)).await;
    let answer = get(node.addr, "spew.test", "/").await.unwrap().text();
    let pid: u32 = answer.trim_start_matches("ok ").parse().unwrap();
    for fd in [1, 2] {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert!(
            target.to_string_lossy().starts_with("pipe:"),
            "the worker's fd {fd} is {}",
            target.display()
        );
    }

    // 12 MiB: 12 times the limit, and past what the node copies without slowing it.
    let r = get(node.addr, "spew.test", "/spew?mib=12").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    node.eventually("the last line in the error log", || async {
        node.log("spew", "error.log").contains("spew done")
    })
    .await;
    let dir = node.dir.path().join("logs/spew");
    let size = |name: &str| std::fs::metadata(dir.join(name)).unwrap().len();
    assert!(
        size("error.log") <= LIMIT,
        "error.log: {}",
        size("error.log")
    );
    assert!(
        size("error.log.old") <= LIMIT,
        "error.log.old: {}",
        size("error.log.old")
    );
    assert!(size("error.log.old") > LIMIT / 2);
    let log = node.log("spew", "error.log");
    assert!(
        log.contains("[roost] the error log reached its limit of 1048576 bytes"),
        "{}",
        &log[..log.len().min(400)]
    );
    assert_eq!(get(node.addr, "calm.test", "/").await.unwrap().status, 200);
    node.stop().await;
}

/// An app writing its stderr a byte at a time: the node reads its pipes at the pace of
/// what they bring, so a write that costs the app one system call does not cost the
/// node one read, one write and one wake-up each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_printing_a_byte_at_a_time_costs_the_node_little() {
    let node = Node::start().await;
    let hostile = node.app("hostile.py");
    node.add(node.spec("drip", &["drip.test"], &hostile)).await;
    assert_eq!(get(node.addr, "drip.test", "/").await.unwrap().status, 200);
    let before = thread_cpu("worker-output");
    let r = get(node.addr, "drip.test", "/drip?s=3").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let spent = thread_cpu("worker-output") - before;
    eprintln!("the node's output thread spent {spent:?} copying 3 s of one-byte writes");
    // Unbounded, a read per byte or so: about all of a CPU for the 3 s.
    assert!(
        spent < Duration::from_millis(500),
        "the node spent {spent:?} of CPU reading one-byte writes"
    );
    node.stop().await;
}
