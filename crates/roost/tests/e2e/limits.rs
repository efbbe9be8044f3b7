//! Malformed and oversized requests: refused by the front with the right status,
//! without reaching a worker and without hurting the node.

use bytes::Bytes;
use futures_util::stream;
use http::Request;
use http_body_util::StreamBody;
use hyper::body::Frame;

use crate::harness::{get, raw, send, Node};

fn status_of(response: &str) -> &str {
    response.split(' ').nth(1).unwrap_or("<no response>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("lim", &["lim.test"], &app)).await;
    let cases: [(&str, &[u8]); 7] = [
        ("garbage request line", b"HELLO\r\n\r\n"),
        ("bad header line", b"GET / HTTP/1.1\r\nHost: lim.test\r\nno colon here\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: lim.test\r\nHost: other.test\r\n\r\n"),
        ("bad Host", b"GET / HTTP/1.1\r\nHost: lim test\r\n\r\n"),
        ("encoded NUL in path", b"GET /a%00b HTTP/1.1\r\nHost: lim.test\r\n\r\n"),
        (
            "conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: lim.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
    ];
    for (what, bytes) in cases {
        let response = raw(node.addr, bytes).await;
        assert_eq!(status_of(&response), "400", "{what}: {response:?}");
    }
    // CL.TE: either refused, or framed by the encoding alone and the connection closed,
    // so no byte of it can be read as a second request.
    let smuggle = b"POST / HTTP/1.1\r\nHost: lim.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: lim.test\r\n\r\n";
    let response = raw(node.addr, smuggle).await;
    assert!(
        status_of(&response) == "400"
            || response.to_ascii_lowercase().contains("connection: close"),
        "{response:?}"
    );
    assert_eq!(
        response.matches("HTTP/1.1").count(),
        1,
        "a smuggled request was answered: {response:?}"
    );

    // The node is fine and nothing reached the app.
    assert_eq!(get(node.addr, "lim.test", "/").await.unwrap().status, 200);
    node.eventually("the access log", || async {
        !node.log("lim", "access.log").is_empty()
    })
    .await;
    let log = node.log("lim", "access.log");
    for line in log.lines().filter(|l| l.contains("%00")) {
        assert!(
            line.contains("\" 400 "),
            "a malformed request was served: {line}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("lim", &["lim.test"], &app)).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: lim.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 << 10)
    );
    assert_eq!(status_of(&raw(node.addr, big.as_bytes()).await), "431");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: lim.test\r\n{many}\r\n");
    assert_eq!(status_of(&raw(node.addr, many.as_bytes()).await), "431");
    assert_eq!(get(node.addr, "lim.test", "/").await.unwrap().status, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_site_limit_get_413() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("small", &["small.test"], &app);
    spec.body_max = Some(1000);
    node.add(spec).await;

    // Declared too large: refused before any worker is involved.
    let declared = format!(
        "POST /upload HTTP/1.1\r\nHost: small.test\r\nContent-Length: 5000\r\n\r\n{}",
        "x".repeat(5000)
    );
    assert_eq!(status_of(&raw(node.addr, declared.as_bytes()).await), "413");

    // Chunked, found too large while streaming.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 200]))))
        .collect();
    let r = send(
        node.addr,
        Request::post("/upload")
            .header("Host", "small.test")
            .body(StreamBody::new(stream::iter(chunks)))
            .unwrap(),
    )
    .await;
    match r {
        Ok(r) => assert_eq!(r.status, 413, "{}", r.text()),
        Err(e) => panic!("no 413 for an oversized chunked body: {e}"),
    }

    // Within the limit is fine, and the worker that saw the aborted body still serves.
    let r = crate::harness::http::post(node.addr, "small.test", "/upload", vec![b'y'; 999])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("999 "));
    node.stop().await;
}
