//! A small real HTTP client for the tests: hyper's HTTP/1 client over a fresh TCP
//! connection, and raw bytes for malformed requests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The pid a fixture app answered with (`/pid`); the answer must be a 200.
pub fn pid_of(r: &Resp) -> u32 {
    assert_eq!(r.status, 200, "{}", r.text());
    r.text().trim().parse().expect("a pid")
}

/// Sends one request on a new connection; the whole body is collected.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Result<Resp, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Resp, String> {
    let req = Request::get(path)
        .header("Host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(addr, req).await
}

pub async fn post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Result<Resp, String> {
    let req = Request::post(path)
        .header("Host", host)
        .body(Full::new(body.into()))
        .unwrap();
    send(addr, req).await
}

/// Writes raw bytes and returns what the server answered before closing (or 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
