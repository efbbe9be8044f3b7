//! Kernel same-page merging (KSM) for the processes that run Python, on request
//! (`roost serve --ksm`).
//!
//! Workers forked from one zygote share its address layout and run the same code, so
//! most of the pages they dirty after the fork (refcounts, the allocator's pools, the
//! loader's state) hold the same bytes in every worker of every site. Marked mergeable,
//! those pages are found by the kernel's `ksmd` and kept once (docs/benchmarks.md has
//! what it saves and what it costs; docs/security.md why it is not the default).
//!
//! The mark is `PR_SET_MEMORY_MERGE`, set before exec in the zygote (and in plainly
//! spawned workers): every fork inherits it, so templates and workers need no step of
//! their own. Linux keeps it across exec since 6.7.

use std::path::Path;

/// The first kernel that keeps `PR_SET_MEMORY_MERGE` across exec.
const SINCE: (u32, u32) = (6, 7);
const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Marks the calling process's memory, present and future, as mergeable. Runs between
/// fork and exec: one system call, async-signal-safe.
pub fn mark_mergeable() -> nix::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { nix::libc::prctl(nix::libc::PR_SET_MEMORY_MERGE, 1, 0, 0, 0) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Refuses a kernel that cannot merge our processes; warns when `ksmd` is not running
/// (the processes are marked, but nothing is merged until an operator starts it).
pub fn check() -> Result<(), String> {
    let release = super::kernel::release()
        .map_err(|e| format!("--ksm: cannot read the kernel's release: {e}"))?;
    match super::kernel::version(&release) {
        Some(v) if v >= SINCE => {}
        _ => {
            return Err(format!(
                "--ksm needs Linux {}.{} or newer (PR_SET_MEMORY_MERGE kept across exec); \
                 this kernel is {release}",
                SINCE.0, SINCE.1
            ))
        }
    }
    // SAFETY: prctl with integer arguments only; it reads the caller's flag.
    let rc = unsafe { nix::libc::prctl(nix::libc::PR_GET_MEMORY_MERGE, 0, 0, 0, 0) };
    if rc < 0 {
        return Err(format!(
            "--ksm: this kernel has no same-page merging (prctl PR_GET_MEMORY_MERGE: {})",
            nix::errno::Errno::last()
        ));
    }
    match ksmd_running(Path::new(KSM_RUN)) {
        Ok(true) => tracing::info!("same-page merging: workers are mergeable, ksmd runs"),
        Ok(false) => tracing::warn!(
            "same-page merging: workers are marked mergeable, but ksmd is stopped and \
             merges nothing until `echo 1 > {KSM_RUN}`"
        ),
        Err(e) => tracing::warn!("same-page merging: cannot read {KSM_RUN}: {e}"),
    }
    Ok(())
}

fn ksmd_running(run: &Path) -> std::io::Result<bool> {
    Ok(std::fs::read_to_string(run)?.trim() == "1")
}
