//! 1 GiB up and 1 GiB down through one site while the node's and the worker's memory
//! stay small: bodies stream both ways, nobody buffers them whole.

use bytes::Bytes;
use futures_util::stream;
use http::Request;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};

use crate::harness::{get, peak_rss_kib, send, Node};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 << 10;
/// Generous bounds: a buffered gibibyte would blow far past them.
const NODE_GROWTH_LIMIT_KIB: u64 = 96 << 10;
const WORKER_PEAK_LIMIT_KIB: u64 = 96 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_with_bounded_memory() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("big", &["big.test"], &app);
    spec.body_max = Some(2 * GIB);
    spec.processes_max = Some(1);
    spec.request_timeout = Some(std::time::Duration::from_secs(600));
    node.add(spec).await;
    let node_before = peak_rss_kib("self");

    // Upload: the app reads in 64 KiB pieces and hashes.
    let block = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut expected = Sha256::new();
    for _ in 0..(GIB as usize / CHUNK) {
        expected.update(&block);
    }
    let expected = format!("{} {:x}", GIB, expected.finalize());
    let blocks = stream::iter((0..GIB as usize / CHUNK).map({
        let block = block.clone();
        move |_| Ok::<_, std::io::Error>(Frame::data(block.clone()))
    }));
    let r = send(
        node.addr,
        Request::post("/upload")
            .header("Host", "big.test")
            .body(StreamBody::new(blocks))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), expected);

    // Download: counted as it arrives, never collected.
    let stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get(format!("/download?bytes={GIB}"))
                .header("Host", "big.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, GIB);

    let worker_peak: u64 = get(node.addr, "big.test", "/rss")
        .await
        .unwrap()
        .text()
        .trim()
        .parse()
        .unwrap();
    let node_growth = peak_rss_kib("self").saturating_sub(node_before);
    eprintln!(
        "peak RSS: worker {worker_peak} KiB, node (with the test client) grew {node_growth} KiB"
    );
    assert!(
        worker_peak < WORKER_PEAK_LIMIT_KIB,
        "worker peaked at {worker_peak} KiB"
    );
    assert!(
        node_growth < NODE_GROWTH_LIMIT_KIB,
        "node grew by {node_growth} KiB"
    );
    node.stop().await;
}

/// wsgi.file_wrapper goes out with sendfile; a file far larger than the socket's buffer
/// makes the loader wait for room many times, and every byte must arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_wrapper_response_arrives_whole() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("file", &["file.test"], &app)).await;
    let size = (32 << 20) + 7;
    let resp = get(node.addr, "file.test", &format!("/file?bytes={size}"))
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", node.log("file", "error.log")));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), size);
    let expected = (0..size).map(|i| ((i % 251) % 251) as u8);
    let wrong = resp
        .body
        .iter()
        .zip(expected)
        .position(|(got, want)| *got != want);
    assert_eq!(wrong, None, "the body differs from the file at this offset");
    node.stop().await;
}

/// A file_wrapper whose sending fails inside a body frame (here: a file-like that lies
/// about its position): the response must break off at once, not hang until the
/// request timeout behind an abort frame the node would read as body bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_fails_mid_frame_breaks_the_response_off_at_once() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    let mut spec = node.spec("liar", &["liar.test"], &app);
    spec.request_timeout = Some(std::time::Duration::from_secs(30));
    node.add(spec).await;
    let started = tokio::time::Instant::now();
    let broken = get(node.addr, "liar.test", "/lying-file").await;
    assert!(broken.is_err(), "a broken file looked complete: {broken:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the broken response took {:?}",
        started.elapsed()
    );
    assert_eq!(get(node.addr, "liar.test", "/").await.unwrap().status, 200);
    node.stop().await;
}
