//! HTTP features of the front: HTTP/2 over cleartext, slow clients, trusted proxies.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{get, Node};

/// An HTTP/2 connection to the node (cleartext, prior knowledge).
async fn h2_client(addr: std::net::SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// A GET over an HTTP/2 connection: the status and the whole body.
async fn h2_get(sender: &mut SendRequest<Empty<Bytes>>, uri: &str) -> (u16, Bytes) {
    let request = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// An HTTP/2 connection with no request on it is closed at the keep-alive timeout
/// (hyper kept it for ever), PINGs or not; one whose request takes longer than that is
/// closed only after the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_gracefully() {
    let node = Node::start_with(|c| c.front.keepalive_timeout = Duration::from_secs(1)).await;
    let app = node.app("tester.py");
    node.add(node.spec("idle", &["idle.test"], &app)).await;
    let idle = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (_sender, connection) = h2::client::handshake(idle).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("an idle HTTP/2 connection was kept open")
        .expect("closed with an error rather than GOAWAY");

    // PINGs every 200 ms move bytes, but begin no request.
    let pinged = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (_sender, mut connection) = h2::client::handshake(pinged).await.unwrap();
    let mut pinger = connection.ping_pong().expect("the first to ask");
    let pinging = async {
        while pinger.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = &mut connection => {}
            () = pinging => {}
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "PINGs kept an HTTP/2 connection without requests open"
    );

    // 2.5 s in the app, in silence: the connection goes idle, and the request finishes.
    let mut sender = h2_client(node.addr).await;
    let (status, body) = h2_get(&mut sender, "http://idle.test/sleep?s=2.5").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body).trim(), "slept");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("h2", &["h2.test"], &app)).await;
    let mut sender = h2_client(node.addr).await;
    for _ in 0..3 {
        let (status, body) = h2_get(&mut sender, "http://h2.test/environ").await;
        assert_eq!(status, 200);
        let env: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(env["SERVER_PROTOCOL"], "HTTP/2");
        assert_eq!(env["HTTP_HOST"], "h2.test");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_with_its_headers_is_cut_off() {
    let node = Node::start_with(|c| c.front.header_read_timeout = Duration::from_millis(500)).await;
    let mut slow = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x.test\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the node kept a half-sent request open");
    // One that sends nothing at all is cut off too.
    let mut mute = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), mute.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the node kept a silent connection open");
    node.stop().await;
}

/// The environ a site sees for a request claiming to come through a proxy.
async fn forwarded_environ(node: &Node, forwarded_for: &str) -> serde_json::Value {
    let app = node.app("tester.py");
    node.add(node.spec("xff", &["xff.test"], &app)).await;
    let r = crate::harness::send(
        node.addr,
        Request::get("/environ")
            .header("Host", "xff.test")
            .header("X-Forwarded-For", forwarded_for)
            .header("X-Forwarded-Proto", "https")
            .body(Empty::<Bytes>::new())
            .unwrap(),
    )
    .await
    .unwrap();
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let trusting =
        Node::start_with(|c| c.front.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let env = forwarded_environ(&trusting, "198.51.100.7, 127.0.0.1").await;
    assert_eq!(env["REMOTE_ADDR"], "198.51.100.7");
    assert_eq!(env["wsgi.url_scheme"], "https");
    assert_eq!(env["HTTPS"], "on");
    trusting.stop().await;

    let untrusting = Node::start().await;
    let env = forwarded_environ(&untrusting, "198.51.100.7").await;
    assert_eq!(env["REMOTE_ADDR"], "127.0.0.1");
    assert_eq!(env["wsgi.url_scheme"], "http");
    untrusting.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_clients_do_not_shut_out_normal_ones() {
    let node = Node::start_with(|c| c.front.header_read_timeout = Duration::from_secs(2)).await;
    let app = node.app("tester.py");
    node.add(node.spec("busy", &["busy.test"], &app)).await;
    let mut slow = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: busy.test\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // Normal clients are served while the slow ones hold their connections.
    for i in 0..20 {
        let r = get(node.addr, "busy.test", "/").await.unwrap();
        assert_eq!(r.status, 200, "normal request {i}");
    }
    // Each slow client is cut off by the header read timeout.
    let mut closed = 0;
    for s in slow.iter_mut().step_by(50) {
        let mut rest = Vec::new();
        if tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 20,
        "slow clients kept their connections past the header timeout"
    );
    node.stop().await;
}

/// A site of one slot, with a short queue timeout: a request kept waiting behind a
/// slow client fails fast (503) instead of passing late.
async fn one_slot_site(node: &Node, name: &str) -> String {
    let app = node.app("tester.py");
    let host = format!("{name}.test");
    let mut spec = node.spec(name, &[&host], &app);
    spec.processes_max = Some(1);
    spec.queue_timeout = Some(Duration::from_secs(3));
    spec.request_timeout = Some(Duration::from_secs(30));
    node.add(spec).await;
    host
}

/// The site's only slot answers at once, in the worker `pid`: `after` neither held the
/// slot nor got the worker killed.
async fn assert_served_by(node: &Node, host: &str, pid: &str, after: &str) {
    let r = get(node.addr, host, "/pid").await.unwrap();
    assert_eq!(
        r.status,
        200,
        "after {after}, the slot was held: {}",
        r.text()
    );
    assert_eq!(r.text(), pid, "after {after}, the worker was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_hold_no_slot() {
    let node = Node::start_with(|c| c.front.body_read_timeout = Duration::from_secs(2)).await;
    let host = one_slot_site(&node, "upl").await;
    let pid = get(node.addr, &host, "/pid").await.unwrap().text();
    // Three clients send a form post a byte at a time.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 20\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        slow.push(s);
    }
    for _ in 0..10 {
        for s in &mut slow {
            s.write_all(b"x").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Meanwhile (3 s and more of dribbling) the site's only slot stays free.
    assert_served_by(&node, &host, &pid, "slow uploads").await;
    // Finished, each upload reaches the app whole.
    for s in &mut slow {
        s.write_all(&[b'x'; 10]).await.unwrap();
        let mut answer = vec![0; 4096];
        let n = s.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("\r\n\r\n20 "),
            "{answer}"
        );
    }
    // One that stops sending gets 408 at the body timeout.
    let mut stalled = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 20\r\n\r\nabc");
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut answer))
        .await
        .expect("a stalled upload was never answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_served_by(&node, &host, &pid, "a stalled upload").await;
    node.stop().await;
}

/// The read-ahead has a budget: past a site's quarter of it, a body goes to its worker
/// as it arrives (a slow one holds the slot again), and the other sites still read
/// ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_stops_at_the_sites_share_of_its_budget() {
    // 128 KiB for the node: 32 KiB per site.
    let node = Node::start_with(|c| c.front.request_buffer = 128 << 10).await;
    let greedy = one_slot_site(&node, "greedy").await;
    let other = one_slot_site(&node, "other").await;
    let other_pid = get(node.addr, &other, "/pid").await.unwrap().text();
    // Uploads that stop early: 48 KiB, more than the site's share, and 8 KiB.
    let mut stalled = Vec::new();
    for (host, sent) in [(&greedy, 48 << 10), (&other, 8 << 10)] {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1048576\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'x'; sent]).await.unwrap();
        stalled.push(s);
    }
    // Once its read-ahead stops, the first upload takes the only slot and keeps it:
    // requests then wait in vain (503 at the queue timeout).
    node.eventually("the upload past the share to take the slot", || async {
        get(node.addr, &greedy, "/pid")
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    assert_served_by(&node, &other, &other_pid, "an upload within the share").await;
    drop(stalled);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_frees_its_worker() {
    // Memory only: 64 MiB is more than one response may hold, so the worker waits for
    // its client until the send timeout.
    let node = Node::start_with(|c| {
        c.front.send_timeout = Duration::from_secs(1);
        c.front.response_spool = 0;
    })
    .await;
    let host = one_slot_site(&node, "dl").await;
    let pid = get(node.addr, &host, "/pid").await.unwrap().text();
    // 64 MiB, far more than the sockets between app and client can hold, and the
    // client never reads a byte of it.
    let reader = unread_download(&node, &host, 64 << 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // After the send timeout the connection is closed and the rest of the response
    // discarded: the slot is free again, with the same worker.
    assert_served_by(&node, &host, &pid, "an unread HTTP/1.1 response").await;

    // The same over HTTP/2, where the client's flow control window stalls the stream
    // and the connection itself stays writable.
    let mut sender = h2_client(node.addr).await;
    let unread = sender
        .send_request(
            Request::get(format!("http://{host}/download?bytes={}", 64 << 20))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(unread.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_served_by(&node, &host, &pid, "an unread HTTP/2 stream").await;
    // The abandoned stream ends broken, never short and looking complete.
    let rest = unread.into_body().collect().await;
    assert!(rest.is_err(), "an abandoned response ended as if complete");
    drop(reader);
    node.stop().await;
}

/// A client that reads steadily, too slowly for a response larger than the node may hold
/// for it: the worker waits for the client, and that wait is the client's, not the
/// app's. At request_timeout the client is left; the worker is neither killed nor
/// blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_past_request_timeout_is_left_and_the_worker_kept() {
    let node = Node::start_with(|c| {
        c.front.response_buffer = 0;
        c.front.response_spool = 0;
    })
    .await;
    let host = "steady.test";
    let mut spec = node.spec("steady", &[host], &node.app("tester.py"));
    spec.processes_max = Some(1);
    spec.request_timeout = Some(Duration::from_secs(2));
    node.add(spec).await;
    let pid = get(node.addr, host, "/pid").await.unwrap().text();
    const SIZE: usize = 64 << 20;
    let mut reader = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request =
        format!("GET /download?bytes={SIZE} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    reader.write_all(request.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (mut got, mut buf) = (0, vec![0; 64 << 10]);
    // At most 64 KiB every 20 ms: 20 s for all of it, long past request_timeout, yet
    // never silent for the send timeout.
    while let Ok(n @ 1..) = reader.read(&mut buf).await {
        got += n;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slow client was never left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        got < SIZE && started.elapsed() >= Duration::from_secs(2),
        "{got} bytes in {:?}",
        started.elapsed()
    );
    assert_served_by(&node, host, &pid, "a client reading past request_timeout").await;
    let errors = node.log("steady", "error.log");
    assert!(
        !errors.contains("request_timeout"),
        "the app was blamed: {errors}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_gets_its_whole_response_while_the_worker_moves_on() {
    let node = Node::start().await;
    let host = one_slot_site(&node, "big").await;
    let pid = get(node.addr, &host, "/pid").await.unwrap().text();
    // 16 MiB, more than the sockets hold, for a client that reads nothing for now.
    const SIZE: usize = 16 << 20;
    let mut reader = unread_download(&node, &host, SIZE).await;
    // The node holds what the client has not taken: the only slot serves others.
    for _ in 0..5 {
        assert_served_by(&node, &host, &pid, "a response not read yet").await;
    }
    // And the slow client still gets every byte.
    assert_eq!(downloaded(&mut reader).await, SIZE);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_beyond_memory_is_spooled_for_a_slow_client() {
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_owned();
    let node = Node::start_with(move |c| {
        c.front.response_buffer = 1 << 20;
        c.front.spool_dir = spool_dir;
    })
    .await;
    let host = one_slot_site(&node, "spool").await;
    let pid = get(node.addr, &host, "/pid").await.unwrap().text();
    // 64 MiB for a client that reads nothing for now: 1 MiB in memory, the rest on disk.
    const SIZE: usize = 64 << 20;
    let mut reader = unread_download(&node, &host, SIZE).await;
    node.eventually("the response to be spooled", || async {
        get(node.addr, &host, "/pid")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert_served_by(&node, &host, &pid, "a response spooled for its client").await;
    // The files are unlinked from the start: nothing is ever left in the folder.
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
    assert_eq!(downloaded(&mut reader).await, SIZE);
    node.stop().await;
}

/// A client that asks for `size` bytes from `host` and reads nothing of them (until
/// [`downloaded`], or until dropped).
async fn unread_download(node: &Node, host: &str, size: usize) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(node.addr).await.unwrap();
    let request =
        format!("GET /download?bytes={size} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    reader.write_all(request.as_bytes()).await.unwrap();
    reader
}

/// Reads the rest of an [`unread_download`]: the bytes of its body (the app's `x`s,
/// not the chunk sizes between them).
async fn downloaded(reader: &mut tokio::net::TcpStream) -> usize {
    let mut answer = Vec::new();
    reader.read_to_end(&mut answer).await.unwrap();
    let body = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    answer[body..].iter().filter(|&&b| b == b'x').count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sites_slow_clients_leave_room_for_the_others() {
    // 64 MiB of memory for all responses, a quarter of it per site; no spool.
    let node = Node::start_with(|c| {
        c.front.response_buffer = 64 << 20;
        c.front.response_spool = 0;
    })
    .await;
    let app = node.app("tester.py");
    let mut greedy = node.spec("greedy", &["greedy.test"], &app);
    greedy.processes_max = Some(2);
    node.add(greedy).await;
    let host = one_slot_site(&node, "modest").await;
    let pid = get(node.addr, &host, "/pid").await.unwrap().text();
    // Two clients of one site leave 64 MiB responses unread: without a share, they
    // would take all 64 MiB (32 MiB each).
    let greedy = [
        unread_download(&node, "greedy.test", 64 << 20).await,
        unread_download(&node, "greedy.test", 64 << 20).await,
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The other site's 12 MiB for its own slow client are still held for it.
    let modest = unread_download(&node, &host, 12 << 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_served_by(&node, &host, &pid, "another site's slow clients").await;
    drop((greedy, modest));
    node.stop().await;
}

/// The spool fills up (a 2 MiB tmpfs) while it holds bytes the client has not taken:
/// the response must end broken, never complete with its blocks out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a small tmpfs"]
async fn a_full_spool_cuts_a_response_off_rather_than_reorder_it() {
    crate::harness::need_root("it mounts a tmpfs");
    let spool = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(spool.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "cannot mount a tmpfs");
    let spool_dir = spool.path().to_owned();
    let node = Node::start_with(move |c| {
        c.front.response_buffer = 1 << 20;
        c.front.spool_dir = spool_dir;
    })
    .await;
    let host = one_slot_site(&node, "full").await;
    const BLOCKS: usize = 16;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(node.addr).await.unwrap();
    let request = format!(
        "GET /download?bytes={}&numbered=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        BLOCKS << 20
    );
    reader.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answer = Vec::new();
    let _ = reader.read_to_end(&mut answer).await;
    node.stop().await;
    let _ = Command::new("umount").arg(spool.path()).status();
    // Undo the chunked framing; a response without its last chunk is broken, and
    // that is a right answer here.
    let mut rest = &answer[answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let mut body = Vec::new();
    let complete = loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            break false;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
        if size == 0 {
            break true;
        }
        let Some(chunk) = rest.get(eol + 2..eol + 2 + size) else {
            break false;
        };
        body.extend_from_slice(chunk);
        rest = &rest[eol + 2 + size + 2..];
    };
    let in_order = body
        .iter()
        .enumerate()
        .all(|(at, &b)| b as usize == (at >> 20) % 251);
    assert!(
        in_order,
        "the client got the response's blocks out of order"
    );
    assert!(
        !complete || body.len() == BLOCKS << 20,
        "{} bytes",
        body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_response_buffer_left_a_response_streams_at_the_clients_pace() {
    let node = Node::start_with(|c| c.front.response_buffer = 0).await;
    let host = one_slot_site(&node, "nobuf").await;
    let r = get(node.addr, &host, &format!("/download?bytes={}", 3 << 20))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 3 << 20);
    node.stop().await;
}

/// CVE-2023-44487: a client opening HTTP/2 streams and resetting them at once makes the
/// server start work it never finishes. The node ends such a connection (h2's limit on
/// pending resets), and few of the requests reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("rr", &["rr.test"], &app)).await;
    let stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut refused = false;
    for _ in 0..20_000 {
        let request = Request::get("http://rr.test/sleep?s=0.5").body(()).unwrap();
        let Ok(ready) = client.clone().ready().await else {
            refused = true;
            break;
        };
        client = ready;
        let Ok((_response, mut stream)) = client.send_request(request, false) else {
            refused = true;
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    // The node ended the connection (GOAWAY) while the client still held it open.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the node kept the flooding connection open")
        .unwrap();
    assert!(
        refused || ended.is_err(),
        "the flood was accepted: {ended:?}"
    );
    drop(client);
    let r = get(node.addr, "rr.test", "/pid").await.unwrap();
    assert_eq!(r.status, 200);
    let served = node.log("rr", "access.log").lines().count();
    assert!(served < 100, "{served} reset requests reached the app");
    node.stop().await;
}

/// The HTTP/2 CONTINUATION flood (CVE-2024-27316 and its kin): a header block that
/// never ends, sent as endless CONTINUATION frames. The node stops it at its header
/// size limit (64 KiB) and closes the connection long before 10 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_continuation_flood_is_cut_off() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("cf", &["cf.test"], &app)).await;
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    };
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // HEADERS without END_HEADERS: GET, http, /, :authority cf.test (HPACK).
    s.write_all(&frame(0x1, 0x1, b"\x82\x86\x84\x01\x07cf.test"))
        .await
        .unwrap();
    // CONTINUATION frames of literal fields "x-pad: <100 bytes>", never ending.
    let field = [&b"\x00\x05x-pad\x64"[..], &[b'p'; 100]].concat();
    let continuation = frame(0x9, 0, &field.repeat(150));
    let (mut reader, mut writer) = s.into_split();
    let flood = async {
        let mut sent = 0;
        while sent < 10 << 20 {
            if writer.write_all(&continuation).await.is_err() {
                break;
            }
            sent += continuation.len();
        }
        sent
    };
    let closed = async {
        let mut buf = vec![0; 64 << 10];
        while matches!(reader.read(&mut buf).await, Ok(1..)) {}
    };
    let (sent, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(flood, closed)
    })
    .await
    .expect("the node kept reading the flood");
    assert!(sent < 10 << 20, "the node took 10 MiB of one header block");
    assert_eq!(get(node.addr, "cf.test", "/pid").await.unwrap().status, 200);
    node.stop().await;
}

/// An HTTP/2 client that asks for many responses on one connection and keeps its flow
/// control windows all but closed: what the node holds for it must be what it counts
/// against its response budget, not a response's worth per stream inside hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_http2_streams_cost_the_node_what_it_counts() {
    // 8 MiB for all responses: one site may hold 2 MiB of its clients' responses.
    let node = Node::start_with(|c| {
        c.front.response_buffer = 8 << 20;
        c.front.response_spool = 0;
    })
    .await;
    let app = node.app("tester.py");
    node.add(node.spec("wide", &["wide.test"], &app)).await;
    assert_eq!(
        get(node.addr, "wide.test", "/pid").await.unwrap().status,
        200
    );
    let before = crate::harness::peak_rss_kib("self");
    let stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    // A window of one byte per stream: the node may send a byte of each response.
    let (mut sender, connection) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    // As many streams as the node allows at once, each a response of two 1 MiB frames
    // that a worker finishes at once if the node takes them.
    let mut responses = Vec::new();
    for _ in 0..100 {
        sender = sender.ready().await.unwrap();
        let request = Request::get("http://wide.test/download?bytes=2097152")
            .body(())
            .unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        responses.push(response);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let growth_kib = crate::harness::peak_rss_kib("self").saturating_sub(before);
    eprintln!("the node grew by {growth_kib} KiB for 100 unread responses of 2 MiB");
    // Counted: the site's 2 MiB. Not: hyper's own buffers, and a small response
    // handed over whole (none here). Before, each stream kept its 2 MiB: 200 MiB.
    assert!(
        growth_kib < 32 << 10,
        "the node grew by {growth_kib} KiB holding 100 unread responses of 2 MiB"
    );
    // Gone with the connection, not only reset: a stop right after the resets once
    // waited the whole shutdown for these requests (CI, once in five runs).
    drop(responses);
    connection.abort();
    node.stop().await;
}

/// Past `--max-connections` a new connection waits in the listen backlog (the node
/// keeps the rest of its file descriptors for its sites) and is served once another
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let node = Node::start_with(|c| {
        c.front.max_connections = Some(3);
        c.front.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let app = node.app("tester.py");
    node.add(node.spec("lim", &["lim.test"], &app)).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(tokio::net::TcpStream::connect(node.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = node.addr;
    let fourth = tokio::spawn(async move { get(addr, "lim.test", "/pid").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !fourth.is_finished(),
        "a fourth connection was served with three open and a limit of three"
    );
    drop(open.pop());
    let r = tokio::time::timeout(Duration::from_secs(10), fourth)
        .await
        .expect("the waiting connection was not served once one closed")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    node.stop().await;
}
