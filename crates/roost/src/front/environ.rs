//! The request head for the worker: the CGI/WSGI environ, built once here so that the
//! loader only splits and zips (PEP 3333 values, ISO-8859-1 bytes).

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::request::Parts;
use http::{header, Version};
use ipnet::IpNet;
use roost_wire::EnvironWriter;

use super::FrontError;

/// Where a connection came from and arrived at.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// The client as the site should see it, after trusted proxies are peeled off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub addr: IpAddr,
    pub port: u16,
    pub scheme: &'static str,
}

/// X-Forwarded-For and X-Forwarded-Proto are believed only from these peers.
pub fn client(parts: &Parts, conn: &ConnInfo, trusted: &[IpNet]) -> Client {
    let mut client = Client {
        addr: conn.peer.ip(),
        port: conn.peer.port(),
        scheme: "http",
    };
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    if !is_trusted(&client.addr) {
        return client;
    }
    // The rightmost address not added by a trusted proxy is the client.
    let forwarded: Vec<IpAddr> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if let Some(ip) = forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(forwarded.first())
    {
        client.addr = *ip;
        client.port = 0;
    }
    if let Some(proto) = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        match proto.trim().to_ascii_lowercase().as_str() {
            "https" => client.scheme = "https",
            "http" => client.scheme = "http",
            _ => {}
        }
    }
    client
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Builds the environ pairs of one request.
pub fn build(
    parts: &Parts,
    host: &str,
    conn: &ConnInfo,
    client: &Client,
) -> Result<Bytes, FrontError> {
    let bad = |what: &str| FrontError::BadRequest(what.to_owned());
    let mut env = EnvironWriter::with_capacity(512);
    let mut push = |k: &str, v: &[u8]| {
        env.push(k, v)
            .map_err(|e| FrontError::BadRequest(e.to_string()))
    };

    let path = parts.uri.path();
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    if decoded.contains(&0) {
        return Err(bad("the path contains an encoded NUL byte"));
    }
    push("REQUEST_METHOD", parts.method.as_str().as_bytes())?;
    push("SCRIPT_NAME", b"")?;
    push("PATH_INFO", &decoded)?;
    push("QUERY_STRING", parts.uri.query().unwrap_or("").as_bytes())?;
    let target = parts.uri.path_and_query().map_or(path, |pq| pq.as_str());
    push("REQUEST_URI", target.as_bytes())?;
    push("SERVER_NAME", host.as_bytes())?;
    push("SERVER_PORT", conn.local.port().to_string().as_bytes())?;
    push("SERVER_PROTOCOL", protocol(parts.version).as_bytes())?;
    push("REMOTE_ADDR", client.addr.to_string().as_bytes())?;
    push("REMOTE_PORT", client.port.to_string().as_bytes())?;
    push("wsgi.url_scheme", client.scheme.as_bytes())?;
    if client.scheme == "https" {
        push("HTTPS", b"on")?;
    }
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        push("CONTENT_TYPE", ct.as_bytes())?;
    }
    if let Some(cl) = parts.headers.get(header::CONTENT_LENGTH) {
        push("CONTENT_LENGTH", cl.as_bytes())?;
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            push("HTTP_HOST", authority.as_str().as_bytes())?;
        }
    }
    let mut name = String::with_capacity(64);
    for key in parts.headers.keys() {
        let k = key.as_str();
        // CGI names cannot tell '-' from '_': a client could pass "X_Forwarded_For"
        // off as "X-Forwarded-For". Like nginx and Apache, drop names with '_'.
        // "Proxy" would become HTTP_PROXY, which tools read as a proxy (httpoxy).
        if k.contains('_') || k == "content-type" || k == "content-length" || k == "proxy" {
            continue;
        }
        name.clear();
        name.push_str("HTTP_");
        name.extend(k.chars().map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        }));
        let mut values = parts.headers.get_all(key).iter();
        let first = values.next().map(|v| v.as_bytes()).unwrap_or_default();
        match values.next() {
            None => push(&name, first)?,
            Some(second) => {
                // Repeated fields join with ", " (RFC 9110), cookies with "; ".
                let sep: &[u8] = if key == header::COOKIE { b"; " } else { b", " };
                let mut joined = first.to_vec();
                for v in std::iter::once(second).chain(values) {
                    joined.extend_from_slice(sep);
                    joined.extend_from_slice(v.as_bytes());
                }
                push(&name, &joined)?;
            }
        }
    }
    Ok(env.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
        }
    }

    fn environ(payload: &[u8]) -> std::collections::HashMap<String, String> {
        EnvironWriter::parse(payload)
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    v.iter().map(|b| *b as char).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn cgi_variables() {
        let p = parts(
            http::Request::post("/caf%C3%A9/a%2Fb?x=1&y=%20")
                .header("Host", "Site.Example:8080")
                .header("Content-Type", "text/plain")
                .header("Content-Length", "3")
                .header("X-Multi", "a")
                .header("X-Multi", "b")
                .header("Cookie", "a=1")
                .header("Cookie", "b=2")
                .header("X_Sneaky", "1")
                .header("Proxy", "http://evil"),
        );
        let c = conn("10.1.2.3:5555");
        let client = client(&p, &c, &[]);
        let env = environ(&build(&p, "site.example", &c, &client).unwrap());
        assert_eq!(env["REQUEST_METHOD"], "POST");
        assert_eq!(env["PATH_INFO"], "/caf\u{c3}\u{a9}/a/b");
        assert_eq!(env["QUERY_STRING"], "x=1&y=%20");
        assert_eq!(env["REQUEST_URI"], "/caf%C3%A9/a%2Fb?x=1&y=%20");
        assert_eq!(env["SERVER_NAME"], "site.example");
        assert_eq!(env["SERVER_PORT"], "8080");
        assert_eq!(env["REMOTE_ADDR"], "10.1.2.3");
        assert_eq!(env["REMOTE_PORT"], "5555");
        assert_eq!(env["CONTENT_TYPE"], "text/plain");
        assert_eq!(env["CONTENT_LENGTH"], "3");
        assert_eq!(env["HTTP_HOST"], "Site.Example:8080");
        assert_eq!(env["HTTP_X_MULTI"], "a, b");
        assert_eq!(env["HTTP_COOKIE"], "a=1; b=2");
        assert_eq!(env["wsgi.url_scheme"], "http");
        assert!(!env.contains_key("HTTP_X_SNEAKY"));
        assert!(!env.contains_key("HTTP_PROXY"));
        assert!(!env.contains_key("HTTP_CONTENT_TYPE"));
    }

    #[test]
    fn encoded_nul_is_refused() {
        let p = parts(http::Request::get("/a%00b").header("Host", "x"));
        let c = conn("127.0.0.1:1");
        let client = client(&p, &c, &[]);
        assert!(matches!(
            build(&p, "x", &c, &client),
            Err(FrontError::BadRequest(_))
        ));
    }

    #[test]
    fn forwarded_headers_only_from_trusted_proxies() {
        let p = parts(
            http::Request::get("/")
                .header("X-Forwarded-For", "203.0.113.9, 10.0.0.2")
                .header("X-Forwarded-Proto", "https"),
        );
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let untrusted_peer = client(&p, &conn("192.0.2.1:1"), &trusted);
        assert_eq!(untrusted_peer.addr.to_string(), "192.0.2.1");
        assert_eq!(untrusted_peer.scheme, "http");
        let via_proxy = client(&p, &conn("10.0.0.1:1"), &trusted);
        assert_eq!(via_proxy.addr.to_string(), "203.0.113.9");
        assert_eq!(via_proxy.scheme, "https");
    }
}
