//! Fast cgroup moves: the kernel's `favordynmods`.
//!
//! Moving a process into a cgroup takes the kernel's global `cgroup_threadgroup_rwsem`
//! for writing. By default that write waits for an RCU grace period unless another
//! move happened moments before: on this project's cgroup v1 test host, 15–20 ms of
//! every cold start (docs/benchmarks.md). The `favordynmods` mount option switches the
//! lock to a mode in which moves do not wait, at the price of slightly dearer fork and
//! exit on the whole machine — the trade a host that starts processes on demand wants.
//!
//! On cgroup v1 the option can only be given when a hierarchy is first mounted, and it
//! acts for the whole machine while any hierarchy mounted with it exists. So a root
//! node mounts a named hierarchy without controllers (`none,name=roost-dynmods,
//! favordynmods`) in its run folder while it runs, and unmounts it when it stops (the
//! kernel keeps the hierarchy while any node still has it mounted). A host whose
//! hierarchies already have the option needs nothing; `--no-favordynmods` leaves the
//! kernel as it is.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

const HIERARCHY: &str = "roost-dynmods";

/// The mounted hierarchy; unmounted on drop.
#[derive(Debug)]
pub struct FavorDynmods {
    point: PathBuf,
}

/// What [`enable`] did.
#[derive(Debug)]
pub enum Outcome {
    /// Mounted by this node, until it stops.
    Mounted(FavorDynmods),
    /// A cgroup hierarchy of the host already has the option.
    AlreadyOn,
}

/// Turns `favordynmods` on for as long as the result lives (see the module's text).
pub fn enable(run_dir: &Path) -> Result<Outcome, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("cannot read /proc/self/mounts: {e}"))?;
    if already_on(&mounts) {
        return Ok(Outcome::AlreadyOn);
    }
    let point = run_dir.join("cgroup-favordynmods");
    std::fs::create_dir_all(&point)
        .map_err(|e| format!("cannot create {}: {e}", point.display()))?;
    let options = format!("none,name={HIERARCHY},favordynmods");
    mount(
        Some("cgroup"),
        &point,
        Some("cgroup"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|e| {
        let _ = std::fs::remove_dir(&point);
        format!(
            "cannot mount a cgroup v1 hierarchy with -o {options} on {}: {e}",
            point.display()
        )
    })?;
    Ok(Outcome::Mounted(FavorDynmods { point }))
}

/// Whether one of the host's cgroup hierarchies (v1 or v2) is mounted with the option.
/// Other nodes' mounts do not count: they go when those nodes stop.
fn already_on(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let options: Vec<&str> = fields.get(3).map_or(Vec::new(), |o| o.split(',').collect());
        matches!(fields.get(2), Some(&"cgroup") | Some(&"cgroup2"))
            && options.contains(&"favordynmods")
            && !options.contains(&format!("name={HIERARCHY}").as_str())
    })
}

impl FavorDynmods {
    pub fn point(&self) -> &Path {
        &self.point
    }
}

impl Drop for FavorDynmods {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.point, MntFlags::MNT_DETACH) {
            tracing::warn!(point = %self.point.display(), error = %e, "cannot unmount the favordynmods hierarchy");
            return;
        }
        let _ = std::fs::remove_dir(&self.point);
    }
}

#[cfg(test)]
mod tests {
    use super::already_on;

    #[test]
    fn sees_the_option_on_any_cgroup_mount_only() {
        let plain = "cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
                     cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n";
        assert!(!already_on(plain));
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nsdelegate,favordynmods 0 0\n";
        assert!(already_on(v2));
        let v1 = "cgroup /run/x cgroup rw,relatime,favordynmods,name=systemd 0 0\n";
        assert!(already_on(v1));
        let another_node = "cgroup /run/x cgroup rw,relatime,favordynmods,name=roost-dynmods 0 0\n";
        assert!(!already_on(another_node));
        let other = "tmpfs /favordynmods tmpfs rw,favordynmods 0 0\n";
        assert!(!already_on(other));
    }
}
