//! PEP 3333 through wsgiref.validate: any violation by roost or the app raises inside
//! the validator and shows as a 500 and a traceback in the error log.

use bytes::Bytes;
use futures_util::stream;
use http::Request;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;

use crate::harness::{get, raw, send, Node};

const BODY: &str = "line one\nline two\nthird line without newline";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_shape_passes_the_wsgiref_validator() {
    let node = Node::start().await;
    let app = node.app("pep3333.py");
    node.add(node.spec("pep", &["pep.test"], &app)).await;

    let joined = |sep: &str| BODY.split_inclusive('\n').collect::<Vec<_>>().join(sep);
    for (mode, expected_body) in [
        ("sized", BODY.to_owned()),
        ("readline", joined("|")),
        ("readlines", joined("|")),
        ("iterate", joined("|")),
    ] {
        for style in ["write", "generator", "file", "list"] {
            let uri = format!("/{style}?read={mode}");
            // A Content-Length body.
            let r = send(
                node.addr,
                Request::post(&uri)
                    .header("Host", "pep.test")
                    .body(Full::new(Bytes::from(BODY)))
                    .unwrap(),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "{uri}: {}", r.text());
            assert!(r.text().ends_with(&expected_body), "{uri}: {:?}", r.text());
            // A chunked body, in pieces that split lines.
            let pieces: Vec<Result<Frame<Bytes>, std::io::Error>> = BODY
                .as_bytes()
                .chunks(5)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let r = send(
                node.addr,
                Request::post(&uri)
                    .header("Host", "pep.test")
                    .body(StreamBody::new(stream::iter(pieces)))
                    .unwrap(),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "chunked {uri}: {}", r.text());
            assert!(
                r.text().ends_with(&expected_body),
                "chunked {uri}: {:?}",
                r.text()
            );
        }
    }

    // Query strings, encoded paths, HEAD, exc_info.
    let r = get(node.addr, "pep.test", "/list/caf%C3%A9?a=1&b=%20")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // PATH_INFO holds the decoded bytes as latin-1; the app sends them back as bytes.
    assert!(
        r.text().starts_with("GET  /list/caf\u{e9} a=1&b=%20 http"),
        "{}",
        r.text()
    );
    let head = send(
        node.addr,
        Request::head("/list")
            .header("Host", "pep.test")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(head.headers.contains_key("content-length"));
    let r = get(node.addr, "pep.test", "/exc-info").await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "recovered with exc_info\n");

    let errors = node.error_log_with("pep", "pep3333 handled").await;
    assert!(
        errors.contains("pep3333 handled"),
        "wsgi.errors did not reach the error log"
    );
    for bad in [
        "Traceback",
        "AssertionError",
        "Warning",
        "Exception ignored",
    ] {
        assert!(!errors.contains(bad), "validator complained:\n{errors}");
    }
    node.stop().await;
}

/// PEP 3333: "the server should stop iterating over the response when enough data has
/// been sent" (and the end of the response then goes with its last bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iteration_stops_at_the_declared_content_length() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("sized", &["sized.test"], &app)).await;
    let r = get(node.addr, "sized.test", "/sized-then-error")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "first part\n");
    // The same worker goes on serving: its slot was left clean.
    let pid = get(node.addr, "sized.test", "/pid").await.unwrap().text();
    let r = get(node.addr, "sized.test", "/sized-then-error")
        .await
        .unwrap();
    assert_eq!(r.text(), "first part\n");
    assert_eq!(
        get(node.addr, "sized.test", "/pid").await.unwrap().text(),
        pid
    );
    let errors = node.log("sized", "error.log");
    assert!(
        !errors.contains("iterated past its Content-Length"),
        "the loader iterated past the declared length:\n{errors}"
    );
    node.stop().await;
}

/// A body shorter than its Content-Length: whole (a list, a file) it never leaves the
/// worker, and the app gets a 500 and a line in its error log; streamed (a generator)
/// its head went out first, and the response ends broken, never complete-looking
/// with the next response's start read as its end. The worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_short_of_its_content_length_is_refused_or_broken_off() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("short", &["short.test"], &app)).await;
    let pid = get(node.addr, "short.test", "/pid").await.unwrap().text();
    for via in ["list", "file"] {
        let r = get(node.addr, "short.test", &format!("/short?via={via}"))
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{via}: {}", r.text());
    }
    let cut = get(node.addr, "short.test", "/short?via=generator").await;
    assert!(cut.is_err(), "a short body looked complete: {cut:?}");
    // A HEAD's Content-Length describes a body that is not sent.
    let head = Request::head("/short?via=list")
        .header("Host", "short.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(node.addr, head).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "10");

    assert_eq!(
        get(node.addr, "short.test", "/pid").await.unwrap().text(),
        pid,
        "the worker did not survive its app's short bodies"
    );
    let errors = node.error_log_with("short", "bytes fewer than").await;
    assert!(
        errors.contains("Content-Length is 10, but its body has 3 bytes"),
        "{errors}"
    );
    assert!(!errors.contains("killing worker"), "{errors}");
    node.stop().await;
}

/// A 204 has no body and must not say it has (RFC 9110 §8.6), whatever the app
/// declares. Neither a 204 nor a 304 sends the body the app gave, and the connection
/// goes on in step. `write()` followed by a `wsgi.file_wrapper` sends both, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_keep_the_connection_in_step() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("bodiless", &["bodiless.test"], &app))
        .await;
    let host = "Host: bodiless.test\r\n";
    let out = raw(
        node.addr,
        format!(
            "GET /bodiless?status=204 HTTP/1.1\r\n{host}\r\n\
             GET /bodiless?status=304 HTTP/1.1\r\n{host}\r\n\
             GET /echo?text=next HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert!(answers[0].starts_with("204"), "{out}");
    assert!(
        !answers[0].to_ascii_lowercase().contains("content-length"),
        "{out}"
    );
    for (status, answer) in ["204", "304"].iter().zip(&answers) {
        assert!(answer.starts_with(status), "{out}");
        assert!(
            answer.ends_with("\r\n\r\n"),
            "a body after the {status}:\n{out}"
        );
    }
    assert!(answers[2].starts_with("200"), "{out}");
    assert!(answers[2].ends_with("\r\n\r\nnext"), "{out}");

    let r = get(node.addr, "bodiless.test", "/write-then-file")
        .await
        .unwrap();
    assert_eq!(r.text(), "abcdef");
    let errors = node.log("bodiless", "error.log");
    assert!(!errors.contains("killing worker"), "{errors}");
    node.stop().await;
}
