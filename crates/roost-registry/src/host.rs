//! Host names: the patterns a site claims, and the normalised form a request carries.
//!
//! Both sides are lower-cased, lose a trailing dot, and are checked label by label, so
//! that `Example.COM.` in a request finds the site registered as `example.com`. A port
//! never takes part in matching: patterns may not carry one, and requests drop theirs.

use std::fmt;

/// A host a site answers for: `example.com` exactly, or `*.example.com` for every
/// name below it (any depth, as nginx and Apache do), but not `example.com` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host name is empty")]
    Empty,
    #[error("host {0:?} is longer than 253 characters")]
    TooLong(String),
    #[error("host {0:?} has a port; roost matches hosts on any port, so write it without one")]
    HasPort(String),
    #[error("host {host:?} has an invalid label {label:?}: labels are 1 to 63 letters, digits, '-' or '_'")]
    BadLabel { host: String, label: String },
    #[error("host {0:?} has a '*' outside a leading '*.' wildcard")]
    BadWildcard(String),
    #[error("host {0:?} is not a valid bracketed IPv6 address")]
    BadIpv6(String),
}

impl HostPattern {
    /// Parses a pattern as written by an operator.
    pub fn parse(text: &str) -> Result<Self, HostError> {
        let lower = text.trim().to_ascii_lowercase();
        let host = lower.strip_suffix('.').unwrap_or(&lower);
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.contains('*') || suffix.starts_with('[') {
                return Err(HostError::BadWildcard(text.to_owned()));
            }
            check_name(suffix, text)?;
            return Ok(HostPattern::Wildcard(suffix.to_owned()));
        }
        if host.contains('*') {
            return Err(HostError::BadWildcard(text.to_owned()));
        }
        if host.starts_with('[') {
            check_ipv6(host, text)?;
            return Ok(HostPattern::Exact(host.to_owned()));
        }
        if host.contains(':') {
            return Err(HostError::HasPort(text.to_owned()));
        }
        check_name(host, text)?;
        Ok(HostPattern::Exact(host.to_owned()))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Normalises the Host header (or HTTP/2 authority) of a request: lower case, no port,
/// no trailing dot. Anything that is not a valid host name is an error (the front
/// answers 400), so routing never sees junk.
pub fn normalize_request_host(authority: &str) -> Result<String, HostError> {
    let lower = authority.to_ascii_lowercase();
    if lower.starts_with('[') {
        let end = lower
            .find(']')
            .ok_or_else(|| HostError::BadIpv6(authority.to_owned()))?;
        let (ip, rest) = lower.split_at(end + 1);
        if !(rest.is_empty() || is_port(rest)) {
            return Err(HostError::BadIpv6(authority.to_owned()));
        }
        check_ipv6(ip, authority)?;
        return Ok(ip.to_owned());
    }
    let host = match lower.rsplit_once(':') {
        Some((host, port)) if is_port(&format!(":{port}")) => host,
        Some(_) => return Err(HostError::HasPort(authority.to_owned())),
        None => &lower,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    check_name(host, authority)?;
    Ok(host.to_owned())
}

fn is_port(rest: &str) -> bool {
    rest.strip_prefix(':')
        .is_some_and(|p| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn check_name(host: &str, original: &str) -> Result<(), HostError> {
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if host.len() > 253 {
        return Err(HostError::TooLong(original.to_owned()));
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(HostError::BadLabel {
                host: original.to_owned(),
                label: label.to_owned(),
            });
        }
    }
    Ok(())
}

fn check_ipv6(bracketed: &str, original: &str) -> Result<(), HostError> {
    let inner = bracketed
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| HostError::BadIpv6(original.to_owned()))?;
    inner
        .parse::<std::net::Ipv6Addr>()
        .map(|_| ())
        .map_err(|_| HostError::BadIpv6(original.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            HostPattern::parse("Example.COM."),
            Ok(HostPattern::Exact("example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.example.com"),
            Ok(HostPattern::Wildcard("example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("[::1]"),
            Ok(HostPattern::Exact("[::1]".into()))
        );
        for bad in [
            "",
            "a..b",
            "a b",
            "ex*ample.com",
            "*.*.com",
            "x.com:80",
            "-",
        ] {
            let result = HostPattern::parse(bad);
            if bad == "-" {
                assert!(result.is_ok(), "a lone '-' label is legal in practice");
            } else {
                assert!(result.is_err(), "{bad:?} accepted");
            }
        }
        assert!(HostPattern::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn request_hosts() {
        assert_eq!(
            normalize_request_host("Hello.Localhost:8080").unwrap(),
            "hello.localhost"
        );
        assert_eq!(
            normalize_request_host("example.com.").unwrap(),
            "example.com"
        );
        assert_eq!(normalize_request_host("[::1]:80").unwrap(), "[::1]");
        assert_eq!(normalize_request_host("127.0.0.1").unwrap(), "127.0.0.1");
        for bad in [
            "",
            ":80",
            "a:b",
            "x.com:123456",
            "[::1",
            "[zz]",
            "a/b",
            "a\0b",
            "a b",
        ] {
            assert!(normalize_request_host(bad).is_err(), "{bad:?} accepted");
        }
    }
}
