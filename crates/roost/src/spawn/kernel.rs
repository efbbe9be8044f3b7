//! The running kernel's release, for features that arrived in a given version.

/// The release as `uname -r` says it, from /proc.
pub fn release() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

/// Whether the running kernel is `since` or newer; false when it cannot be told.
pub fn at_least(since: (u32, u32)) -> bool {
    release()
        .ok()
        .and_then(|r| version(&r))
        .is_some_and(|v| v >= since)
}

/// `6.18.44-fc` → (6, 18).
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::version;

    #[test]
    fn reads_the_kernel_version() {
        assert_eq!(version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(version("6.7.0"), Some((6, 7)));
        assert_eq!(version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(version("6"), None);
        assert_eq!(version(""), None);
        assert!(version("6.6.30").unwrap() < (6, 7));
        assert!(version("6.10.1").unwrap() >= (6, 7));
    }
}
