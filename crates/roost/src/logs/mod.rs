//! Per-site log files, in one folder per site under the node's log folder:
//! `access.log` (Apache combined plus duration and worker pid; `access.rs`) and
//! `error.log` (what the site's processes print: its stdout and stderr, wsgi.errors,
//! tracebacks; and the node's notes on its workers; `error.rs`, fed by `output.rs`).

mod access;
mod error;
mod output;

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use access::AccessRecord;
pub use error::MIN_ERROR_LOG_SIZE;

use access::{AccessLog, SiteAccess};
use error::ErrorLog;
use output::{OutputPipes, WorkerOutput};

const ACCESS_LOG: &str = "access.log";
const ERROR_LOG: &str = "error.log";
/// Where an error log past its size goes (`error.rs`).
const OLD_ERROR_LOG: &str = "error.log.old";
const LOG_FILES: [&str; 3] = [ACCESS_LOG, ERROR_LOG, OLD_ERROR_LOG];

/// The node's side of every site's logs: the access log thread and the output thread.
pub struct NodeLogs {
    root: PathBuf,
    error_log_size: u64,
    access: AccessLog,
    output: WorkerOutput,
}

impl NodeLogs {
    /// `root` holds a folder per site; a site's `error.log` is started anew past
    /// `error_log_size` bytes.
    pub fn start(root: PathBuf, error_log_size: u64) -> std::io::Result<NodeLogs> {
        Ok(NodeLogs {
            root,
            error_log_size,
            access: AccessLog::start()?,
            output: WorkerOutput::start()?,
        })
    }

    /// Creates `root/<site>/` (mode 0750: the site's group may read, other tenants
    /// not) and opens the site's logs.
    pub fn open_site(&self, site: &str) -> std::io::Result<Arc<SiteLogs>> {
        let dir = self.root.join(site);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        let error_log = Arc::new(ErrorLog::open(dir.join(ERROR_LOG), self.error_log_size)?);
        let access_path = dir.join(ACCESS_LOG);
        let access = SiteAccess::new(
            &self.access,
            access_path.clone(),
            append(&access_path)?,
            error_log.clone(),
        );
        Ok(Arc::new(SiteLogs {
            dir,
            access,
            error_log,
            output: self.output.pipes(),
        }))
    }

    /// Writes the last lines of every site: what workers printed before they were
    /// gone, then the access lines queued. Blocks until then (a few seconds at most).
    pub fn stop(self) {
        self.output.stop();
        self.access.stop();
    }
}

pub struct SiteLogs {
    dir: PathBuf,
    access: SiteAccess,
    error_log: Arc<ErrorLog>,
    output: OutputPipes,
}

impl SiteLogs {
    /// Lets the site's group read its logs: the folder and files stay owned by the
    /// node (a tenant cannot swap them for links) with the site's gid as group. Logs
    /// another group was given were the site's previous owner's: set aside first.
    pub fn grant(&self, gid: u32) {
        if let Err(e) = self.set_aside_from_previous_owner(gid) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot set aside the logs of a site's previous owner");
        }
        let give = |path: &Path| -> std::io::Result<()> {
            if path != self.dir {
                return append_with_group(path, gid).map(drop);
            }
            if std::fs::symlink_metadata(path)?.gid() != gid {
                std::os::unix::fs::lchown(path, None, Some(gid))?;
            }
            Ok(())
        };
        // The old error log only if it is there: giving a file a group creates it.
        let files = (LOG_FILES.iter())
            .map(|name| self.dir.join(name))
            .filter(|path| !path.ends_with(OLD_ERROR_LOG) || path.exists());
        for path in std::iter::once(self.dir.clone()).chain(files) {
            if let Err(e) = give(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot give a site's group its logs");
            }
        }
    }

    /// The site changed hands (its group changed, or a removed site's name was reused
    /// by another owner's site): what its logs hold (tracebacks, whatever the app
    /// printed) moves to `previous-gid<G>-<seconds.nanoseconds>/`, which only root can open, and
    /// the site starts new files. Nothing is lost; the operator still has it.
    fn set_aside_from_previous_owner(&self, gid: u32) -> std::io::Result<()> {
        // Workers of a site start together: one looks and sets aside at a time.
        static HANDOVER: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::fs::symlink_metadata(&self.dir)?.gid();
        // Root's group: the folder was made and never given to a site.
        if previous == gid || previous == 0 {
            return Ok(());
        }
        // A site handed back and forth within a second sets aside more than once.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let stamp = format!("{}.{:09}", since.as_secs(), since.subsec_nanos());
        let aside = self.dir.join(format!("previous-gid{previous}-{stamp}"));
        std::fs::DirBuilder::new().mode(0o700).create(&aside)?;
        for name in LOG_FILES {
            match std::fs::rename(self.dir.join(name), aside.join(name)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                moved => moved?,
            }
        }
        std::os::unix::fs::lchown(&self.dir, None, Some(gid))?;
        self.reopen()
    }

    /// Opens both logs anew after log rotation renamed them: later lines go to the
    /// new files, which get the folder's group ([`SiteLogs::grant`] made it the site's).
    pub fn reopen(&self) -> std::io::Result<()> {
        let gid = std::fs::metadata(&self.dir)?.gid();
        self.access
            .reopen(append_with_group(&self.dir.join(ACCESS_LOG), gid)?);
        self.error_log.reopen()
    }

    /// A pipe into the error log, for a new process's stdout and stderr.
    pub fn output(&self) -> std::io::Result<OwnedFd> {
        self.output.open(self.error_log.clone())
    }

    /// One line from the node in the error log, written by the output thread.
    pub fn error(&self, message: &str) {
        self.output.note(self.error_log.clone(), message.to_owned());
    }

    pub fn access(&self, record: AccessRecord) {
        self.access.record(record);
    }
}

/// Says in the node's log when a site's log file stops taking writes (a full disk) and
/// when it takes them again: once each time, not once per write.
fn say_write_outcome(log: &Path, was_failing: bool, written: &std::io::Result<()>) {
    match written {
        Err(e) if !was_failing => {
            tracing::warn!(log = %log.display(), error = %e, "cannot write to a site's log; its lines are lost until it can")
        }
        Ok(()) if was_failing => {
            tracing::info!(log = %log.display(), "a site's log can be written again")
        }
        _ => {}
    }
}

/// Opens a log for append; never follows a symbolic link, new files get mode 0640.
fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// [`append`], then the file's group set to `gid` if it is not already.
fn append_with_group(path: &Path, gid: u32) -> std::io::Result<File> {
    let file = append(path)?;
    if file.metadata()?.gid() != gid {
        std::os::unix::fs::fchown(&file, None, Some(gid))?;
    }
    Ok(file)
}

/// `27/Nov/2026:07:05:09 +0000`, the Common Log Format time, in UTC.
pub fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
impl SiteLogs {
    /// Logs that lead nowhere, for tests of other modules.
    pub fn detached() -> Arc<SiteLogs> {
        let null = Path::new("/dev/null");
        let error_log =
            Arc::new(ErrorLog::open(null.to_owned(), u64::MAX).expect("/dev/null opens"));
        Arc::new(SiteLogs {
            dir: PathBuf::from("/dev"),
            access: SiteAccess::detached(error_log.clone()),
            error_log,
            output: OutputPipes::detached(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clf_time_is_correct() {
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_763_109);
        assert_eq!(clf_time(t), "27/Nov/2026:07:05:09 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    #[ignore = "needs root: gives log files to other groups"]
    fn logs_handed_back_and_forth_are_each_set_aside_whole() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it gives files to other groups); run the suite as root, as CI does"
        );
        let root = tempfile::tempdir().unwrap();
        let node = NodeLogs::start(root.path().to_owned(), 1 << 20).unwrap();
        let logs = node.open_site("shop").unwrap();
        let dir = root.path().join("shop");
        // Within a second, as a site handed back and forth under load is.
        for (n, gid) in [4001, 4002, 4001, 4002].into_iter().enumerate() {
            logs.grant(gid);
            let mut error_log = append(&dir.join(ERROR_LOG)).unwrap();
            std::io::Write::write_all(&mut error_log, format!("owner {n}\n").as_bytes()).unwrap();
        }
        let mut asides: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        // previous-gid<G>-<time>: in the order they were set aside.
        asides.sort_by_key(|p| p.to_string_lossy().rsplit('-').next().map(str::to_owned));
        assert_eq!(asides.len(), 3, "{asides:?}");
        let kept: Vec<String> = (asides.iter())
            .map(|a| std::fs::read_to_string(a.join(ERROR_LOG)).unwrap())
            .collect();
        assert_eq!(kept, ["owner 0\n", "owner 1\n", "owner 2\n"]);
        let current = std::fs::metadata(dir.join(ERROR_LOG)).unwrap();
        assert_eq!(current.gid(), 4002);
        assert_eq!(
            std::fs::read_to_string(dir.join(ERROR_LOG)).unwrap(),
            "owner 3\n"
        );
        node.stop();
    }
}
