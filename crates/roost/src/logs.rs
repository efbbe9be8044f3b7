//! Per-site log files: `access.log` (Apache combined plus duration) and `error.log`
//! (the app's stdout/stderr, wsgi.errors, tracebacks, and the node's spawn failures).
//!
//! Access lines go through a bounded channel to one writer task per site, so the request
//! path never waits on the disk; the writer takes them in batches (at most 20 ms
//! behind); if the disk cannot keep up, lines are dropped and counted rather than
//! slowing requests down.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Access lines buffered per site before new ones are dropped.
const ACCESS_QUEUE: usize = 4096;
/// The writer sleeps this long after each batch: lines reach the file at most this late,
/// and a busy site costs one write (and one wake-up of the writer) per batch instead of
/// one per request. 4,096 lines per 20 ms is 200,000 requests a second per site.
const ACCESS_BATCH_EVERY: Duration = Duration::from_millis(20);

pub struct SiteLogs {
    dir: PathBuf,
    access: mpsc::Sender<String>,
    /// Lines lost because the writer fell behind; reported in the error log.
    dropped: Arc<AtomicU64>,
}

impl SiteLogs {
    /// Creates `root/<site>/` (mode 0750: the site's group may read, other tenants
    /// not) and starts the access log writer.
    pub fn open(root: &Path, site: &str) -> std::io::Result<Arc<SiteLogs>> {
        let dir = root.join(site);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        let file = append(&dir.join("access.log"))?;
        let (tx, rx) = mpsc::channel(ACCESS_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_access(
            file,
            rx,
            dropped.clone(),
            dir.join("error.log"),
        ));
        Ok(Arc::new(SiteLogs {
            dir,
            access: tx,
            dropped,
        }))
    }

    /// Lets the site's group read its logs: the folder and files stay owned by the
    /// node (a tenant cannot swap them for links) with the site's gid as group.
    pub fn grant(&self, gid: u32) {
        let paths = [
            self.dir.clone(),
            self.dir.join("access.log"),
            self.dir.join("error.log"),
        ];
        for path in paths {
            let same = std::fs::symlink_metadata(&path).is_ok_and(|m| m.gid() == gid);
            if !same {
                if let Err(e) = std::os::unix::fs::lchown(&path, None, Some(gid)) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot give a site's group its logs");
                }
            }
        }
    }

    /// The error log for a worker's stdout and stderr.
    pub fn error_log_file(&self) -> std::io::Result<File> {
        append(&self.dir.join("error.log"))
    }

    /// One line from the node in the error log.
    pub fn error(&self, message: &str) {
        let line = format!("[{}] [roost] {message}\n", clf_time(SystemTime::now()));
        if let Err(e) = self
            .error_log_file()
            .and_then(|mut f| f.write_all(line.as_bytes()))
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write to a site's error log");
        }
    }

    pub fn access(&self, line: String) {
        if self.access.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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

async fn write_access(
    file: File,
    mut rx: mpsc::Receiver<String>,
    dropped: Arc<AtomicU64>,
    error_log: PathBuf,
) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, file);
    while let Some(line) = rx.recv().await {
        let _ = out.write_all(line.as_bytes());
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let note = format!(
                "[{}] [roost] {lost} access log lines were dropped: the disk did not keep up\n",
                clf_time(SystemTime::now())
            );
            let _ = append(&error_log).and_then(|mut f| f.write_all(note.as_bytes()));
        }
        tokio::time::sleep(ACCESS_BATCH_EVERY).await;
    }
}

/// One access log line: Apache combined format, then the duration in microseconds and
/// the pid of the worker that served it (`-` when none did).
pub struct AccessRecord<'a> {
    pub peer: &'a str,
    pub start: SystemTime,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub duration: Duration,
    pub worker_pid: Option<u32>,
}

impl AccessRecord<'_> {
    pub fn line(&self) -> String {
        let bytes = if self.bytes == 0 {
            "-".to_owned()
        } else {
            self.bytes.to_string()
        };
        let pid = self.worker_pid.map_or("-".to_owned(), |p| p.to_string());
        format!(
            "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {pid}\n",
            self.peer,
            clf_time(self.start),
            self.method,
            escape(self.target),
            self.version,
            self.status,
            bytes,
            escape(self.referer.unwrap_or("-")),
            escape(self.user_agent.unwrap_or("-")),
            self.duration.as_micros()
        )
    }
}

/// Keeps a log line one line: quotes, backslashes and control bytes are escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
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
    /// Logs that write nothing, for tests of other modules.
    pub fn detached(dir: &Path) -> Arc<SiteLogs> {
        let (tx, _) = mpsc::channel(1);
        Arc::new(SiteLogs {
            dir: dir.to_owned(),
            access: tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_is_correct() {
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_763_109);
        assert_eq!(clf_time(t), "27/Nov/2026:07:05:09 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn access_lines_stay_one_line() {
        let record = AccessRecord {
            peer: "127.0.0.1",
            start: UNIX_EPOCH,
            method: "GET",
            target: "/a\"b\nc",
            version: "HTTP/1.1",
            status: 200,
            bytes: 5,
            referer: None,
            user_agent: Some("curl/8"),
            duration: Duration::from_micros(1234),
            worker_pid: Some(77),
        };
        assert_eq!(
            record.line(),
            "127.0.0.1 - - [01/Jan/1970:00:00:00 +0000] \"GET /a\\\"b\\x0ac HTTP/1.1\" 200 5 \"-\" \"curl/8\" 1234 77\n"
        );
    }
}
