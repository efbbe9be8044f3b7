//! What the node itself inherited: descriptors its parent left open (a shell's, a
//! supervisor's) would pass on to every worker started by exec (`--spawn plain`,
//! zygotes, templates) and so to tenant code. Marked close-on-exec first thing, they
//! stay usable by the node and reach no child.

use std::os::fd::RawFd;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Marks every open descriptor above stderr close-on-exec; how many were not yet.
pub fn seal_inherited_fds() -> std::io::Result<usize> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    let mut sealed = 0;
    for fd in fds {
        // The listing's own descriptor is closed by now: EBADF, nothing to do.
        let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) else {
            continue;
        };
        let flags = FdFlag::from_bits_truncate(flags);
        if !flags.contains(FdFlag::FD_CLOEXEC) {
            fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
            sealed += 1;
        }
    }
    Ok(sealed)
}
