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
    let cases: [(&str, &[u8]); 10] = [
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
        // A front before the node routing by the target and the node by the Host
        // header would disagree on the site.
        (
            "target's host is not the Host header's",
            b"GET http://other.test/ HTTP/1.1\r\nHost: lim.test\r\n\r\n",
        ),
        (
            "Host header is not the target's host",
            b"GET http://lim.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
        ),
        ("authority form for GET", b"GET lim.test:80 HTTP/1.1\r\nHost: lim.test:80\r\n\r\n"),
    ];
    for (what, bytes) in cases {
        let response = raw(node.addr, bytes).await;
        assert_eq!(status_of(&response), "400", "{what}: {response:?}");
    }
    // The page says what was wrong (HTTP/1.0 has no Host header to require, but a
    // node of many sites cannot tell which one is asked for without one).
    for (request, why) in [
        (
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            "the request has no Host header",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: lim.test\r\nHost: other.test\r\n\r\n",
            "more than one Host header",
        ),
    ] {
        let response = raw(node.addr, request).await;
        let page = format!("The request was refused: {why}.");
        assert!(response.contains(&page), "{response:?}");
    }
    // The asterisk form is about the server: answered by the front, never by an app.
    let options = raw(
        node.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: lim.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&options), "200", "{options:?}");
    let star = raw(node.addr, b"GET * HTTP/1.1\r\nHost: lim.test\r\n\r\n").await;
    assert_eq!(status_of(&star), "400", "{star:?}");
    // A tunnel is nothing a WSGI application can serve.
    let connect = raw(
        node.addr,
        b"CONNECT lim.test:80 HTTP/1.1\r\nHost: lim.test:80\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&connect), "501", "{connect:?}");
    // The absolute form is fine when it names the Host header's host, or stands alone
    // (the port and user information are not part of the match).
    for request in [
        &b"GET http://lim.test/a HTTP/1.1\r\nHost: LIM.test:80\r\nConnection: close\r\n\r\n"[..],
        b"GET http://u@lim.test:80/a HTTP/1.1\r\nHost: lim.test\r\nConnection: close\r\n\r\n",
        b"GET http://lim.test/a HTTP/1.1\r\nConnection: close\r\n\r\n",
    ] {
        let response = raw(node.addr, request).await;
        assert_eq!(status_of(&response), "200", "{response:?}");
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
    assert!(
        !log.contains("OPTIONS"),
        "an app answered OPTIONS *:\n{log}"
    );
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

/// Request smuggling vectors, each followed in the same write by a second request that
/// must not be answered unless the first was framed without any ambiguity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_vectors_are_refused_or_framed_unambiguously() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("lim", &["lim.test"], &app)).await;
    enum Outcome {
        /// 400 (or the given status) and nothing after it.
        Refused(&'static str),
        /// Answered, then the connection closed: the rest is never read as a request.
        ClosedAfter,
        /// Valid HTTP, parsed one way only: both requests answered.
        Pipelined,
    }
    use Outcome::*;
    let host = "Host: lim.test\r\n";
    let vectors: Vec<(&str, String, Outcome)> = vec![
        ("TE.CL", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"), ClosedAfter),
        ("obfuscated TE", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"), Refused("400")),
        ("space before colon", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"), Refused("400")),
        ("TE twice", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"), Refused("400")),
        ("TE list", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"), Refused("400")),
        ("TE in HTTP/1.0", format!("POST / HTTP/1.0\r\n{host}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), Refused("400")),
        ("NUL in a header", format!("GET / HTTP/1.1\r\n{host}X: a\0b\r\n\r\n"), Refused("400")),
        ("CR in a header", format!("GET / HTTP/1.1\r\n{host}X: a\rb\r\n\r\n"), Refused("400")),
        ("space in a name", format!("GET / HTTP/1.1\r\n{host}X Y: 1\r\n\r\n"), Refused("400")),
        ("obs-fold", format!("GET / HTTP/1.1\r\n{host}X: a\r\n b\r\n\r\n"), Refused("400")),
        ("signed length", format!("POST / HTTP/1.1\r\n{host}Content-Length: +3\r\n\r\nabc"), Refused("400")),
        ("overlong line", format!("GET /{} HTTP/1.1\r\n{host}\r\n", "a".repeat(70_000)), Refused("431")),
        ("chunk size overflow", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"), ClosedAfter),
        ("bare LF", "GET / HTTP/1.1\nHost: lim.test\n\n".to_owned(), Pipelined),
        ("tab before TE value", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n"), Pipelined),
    ];
    for (name, request, outcome) in vectors {
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(
            b"GET /osenv?key=SMUGGLED HTTP/1.1\r\nHost: lim.test\r\nConnection: close\r\n\r\n",
        );
        let answer = raw(node.addr, &bytes).await;
        let statuses: Vec<&str> = answer
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| answer.get(i + 9..i + 12))
            .collect();
        let smuggled = answer.contains("<unset>");
        match outcome {
            Refused(status) => {
                assert_eq!(statuses, [status], "{name}: {answer:?}");
                assert!(!smuggled, "{name}: the second request was served");
            }
            ClosedAfter => {
                assert_eq!(statuses.len(), 1, "{name}: {answer:?}");
                assert!(!smuggled, "{name}: the second request was served");
            }
            Pipelined => {
                assert_eq!(statuses, ["200", "200"], "{name}: {answer:?}");
            }
        }
    }
    assert_eq!(get(node.addr, "lim.test", "/").await.unwrap().status, 200);
    node.stop().await;
}
