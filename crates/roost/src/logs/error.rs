//! One site's `error.log`, which only the node writes: what the site's processes print
//! reaches it through a pipe (`output.rs`), so the node decides what lands on disk. A
//! file that reaches its size limit is renamed `error.log.old` (replacing the one
//! before) and a new one started: an app that prints without end costs its site at
//! most twice the limit on disk, and the log folder's disk stays free for the others.

use std::borrow::Cow;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::clf_time;
use super::file::{HeldLogFile, LogFile, OpenLog};

/// Bytes a second of one site's output the node copies to its error log, on average:
/// the node's work (and disk writes) for one site's printing stay bounded. Beyond it,
/// the node reads the site's pipes more slowly and the printing processes wait. (The
/// reader counts each read as at least a full one, `output.rs`.)
const OUTPUT_RATE: u64 = 4 << 20;
/// Bytes the site may print at once before [`OUTPUT_RATE`] applies: a burst of
/// tracebacks goes through without waiting.
const OUTPUT_BURST: u64 = 4 << 20;

/// A site whose output is being slowed is told so in its error log, at most this often.
const SLOWED_NOTE_EVERY: Duration = Duration::from_secs(60);

/// Smallest `--error-log-size`: many times what the node copies in one write (64 KiB,
/// a pipe's worth), so that a file stays within the limit after the line that begins it.
pub const MIN_ERROR_LOG_SIZE: u64 = 1 << 20;

pub struct ErrorLog {
    file: LogFile,
    /// Past this many bytes the file is renamed `error.log.old` and a new one begun.
    max_size: u64,
    pace: Mutex<Pace>,
}

impl ErrorLog {
    /// The log at `path`, opened (or created, with the group of its folder) by its
    /// first line.
    pub fn new(path: PathBuf, max_size: u64) -> ErrorLog {
        ErrorLog {
            file: LogFile::new(path),
            max_size,
            pace: Mutex::new(Pace::new()),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.file.path()
    }

    /// Holds the log still while its file is set aside for the site's previous owner,
    /// whose processes still print into it: their lines follow it where it goes
    /// ([`HeldLogFile::moved_to`]).
    pub fn hold(&self) -> HeldLogFile<'_> {
        self.file.hold()
    }

    /// Appends what a site's process printed, as one write, its control characters
    /// escaped ([`escape_controls`]). While the file is full and cannot be started
    /// anew, or cannot be written, lines are dropped: the disk comes first.
    pub fn write(&self, bytes: &[u8]) {
        let bytes = &*escape_controls(bytes);
        self.file.write_with(|path, open| {
            if open.size > 0 && open.size + bytes.len() as u64 > self.max_size {
                self.start_anew(path, open)?;
            }
            open.append(bytes)
        });
    }

    /// One line from the node: `[time] [roost] message`.
    pub fn note(&self, message: &str) {
        let line = format!("[{}] [roost] {message}\n", clf_time(SystemTime::now()));
        self.write(line.as_bytes());
    }

    /// After log rotation renamed the file: later lines go to a new one.
    pub fn reopen(&self) {
        self.file.close();
    }

    /// Holds the file as a stalled disk would ([`LogFile::stall`]).
    #[cfg(test)]
    pub fn stall(&self) -> impl Drop + '_ {
        self.file.stall()
    }

    /// Closes the file if it is idle ([`LogFile::close_if_idle`]).
    pub fn close_if_idle(&self, now: Instant) {
        self.file.close_if_idle(now)
    }

    /// How long the reader of a pipe waits before reading again, having just copied
    /// `bytes` of this site's output.
    pub fn pace(&self, bytes: usize) -> Duration {
        let now = Instant::now();
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = pace.take(bytes as u64, now);
        if wait.is_zero() || pace.noted.is_some_and(|at| now - at < SLOWED_NOTE_EVERY) {
            return wait;
        }
        pace.noted = Some(now);
        drop(pace);
        self.note(&format!(
            "the site prints more than the node copies (a burst, then {} MiB a second, each read of a pipe counted as 64 KiB): its processes now wait for the node to take what they print",
            OUTPUT_RATE >> 20
        ));
        wait
    }

    /// The file reached `max_size`: it becomes `error.log.old` and a new one begins.
    /// If rotation renamed it already, the file now at `path` is simply opened.
    fn start_anew(&self, path: &Path, open: &mut OpenLog) -> std::io::Result<()> {
        let old = path.with_extension("log.old");
        let ours = match (std::fs::symlink_metadata(path), open.file().metadata()) {
            (Ok(here), Ok(mine)) => (here.dev(), here.ino()) == (mine.dev(), mine.ino()),
            _ => false,
        };
        if ours {
            std::fs::rename(path, &old)?;
        }
        *open = OpenLog::new(path)?;
        if ours {
            let line = format!(
                "[{}] [roost] the error log reached its limit of {} bytes (--error-log-size); the lines before are in {}\n",
                clf_time(SystemTime::now()),
                self.max_size,
                old.file_name().unwrap_or_default().to_string_lossy(),
            );
            open.append(line.as_bytes())?;
        }
        Ok(())
    }
}

/// Keeps what a tenant prints from driving the terminal of whoever reads the log: the
/// control characters but tab and newline (C0, DEL and C1, which some terminals obey as
/// escape sequences) and bytes that are not UTF-8 (a lone C1 byte is a control to an
/// 8-bit terminal) are written as `\xNN`, as Apache writes them in its error log.
fn escape_controls(bytes: &[u8]) -> Cow<'_, [u8]> {
    let plain = |c: char| !c.is_control() || c == '\t' || c == '\n';
    let clean = bytes
        .utf8_chunks()
        .all(|chunk| chunk.invalid().is_empty() && chunk.valid().chars().all(plain));
    if clean {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let escape = |out: &mut Vec<u8>, raw: &[u8]| {
        for b in raw {
            let _ = write!(out, "\\x{b:02x}");
        }
    };
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let mut utf8 = [0; 4];
            let encoded = c.encode_utf8(&mut utf8).as_bytes();
            if plain(c) {
                out.extend_from_slice(encoded);
            } else {
                escape(&mut out, encoded);
            }
        }
        escape(&mut out, chunk.invalid());
    }
    Cow::Owned(out)
}

/// A token bucket of bytes: [`OUTPUT_BURST`] at once, [`OUTPUT_RATE`] a second after.
struct Pace {
    /// Bytes that may still be copied without waiting; below zero, a debt.
    allowance: i64,
    refilled: Instant,
    /// When the site was last told its output is slowed.
    noted: Option<Instant>,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            allowance: OUTPUT_BURST as i64,
            refilled: Instant::now(),
            noted: None,
        }
    }

    fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        let earned =
            now.saturating_duration_since(self.refilled).as_secs_f64() * OUTPUT_RATE as f64;
        self.allowance = (self.allowance + earned as i64).min(OUTPUT_BURST as i64) - bytes as i64;
        self.refilled = now;
        if self.allowance >= 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.allowance as f64 / OUTPUT_RATE as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_becomes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        std::fs::write(&path, "from before\n").unwrap();
        let log = ErrorLog::new(path.clone(), 1000);
        let line = [b'x'; 99];
        for _ in 0..25 {
            log.write(&line);
            log.write(b"\n");
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("error.log.old")).unwrap();
        assert!(
            now.len() <= 1000 && old.len() <= 1000,
            "{} and {}",
            now.len(),
            old.len()
        );
        assert!(
            now.contains("[roost] the error log reached its limit of 1000 bytes"),
            "{now}"
        );
        // All 2,500 bytes were written; the oldest are gone with the first old file.
        assert!(!old.contains("from before"), "{old}");
        let lines = |text: &str| text.lines().filter(|l| l.len() == 99).count();
        assert!(lines(&old) >= 8, "{old}");
        assert!(lines(&now) >= 1, "{now}");
    }

    #[test]
    fn a_full_log_that_cannot_be_started_anew_drops_lines_rather_than_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        let log = ErrorLog::new(path.clone(), 100);
        log.write(&[b'a'; 60]);
        // A folder where the old file goes: the rename fails (EISDIR).
        let blocker = dir.path().join("error.log.old");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("x"), "").unwrap();
        log.write(&[b'b'; 60]);
        assert_eq!(std::fs::read(&path).unwrap(), [b'a'; 60]);
        // Once it can, it does.
        std::fs::remove_dir_all(&blocker).unwrap();
        log.write(&[b'c'; 60]);
        assert_eq!(std::fs::read(&blocker).unwrap(), [b'a'; 60]);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with(&"c".repeat(60)));
    }

    #[test]
    fn control_characters_are_escaped() {
        let printed = "a\x1b[31mred\x07\r\n\tok \u{9b}2J é\n".as_bytes();
        assert_eq!(
            &*escape_controls(printed),
            b"a\\x1b[31mred\\x07\\x0d\n\tok \\xc2\\x9b2J \xc3\xa9\n"
        );
        // A lone C1 byte, as an 8-bit terminal reads it.
        assert_eq!(&*escape_controls(b"x\x9b2Jy"), b"x\\x9b2Jy");
        assert!(matches!(
            escape_controls(b"Traceback:\n\tline\n"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn rotation_by_rename_is_followed_not_undone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        let log = ErrorLog::new(path.clone(), 100);
        log.write(b"first\n");
        std::fs::rename(&path, dir.path().join("error.log.1")).unwrap();
        // Full before the node was told: the renamed file is left alone.
        log.write(&[b'y'; 100]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("error.log.1")).unwrap(),
            "first\n"
        );
        assert!(!dir.path().join("error.log.old").exists());
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with(&"y".repeat(100)));
        // Told: a new file, as after SIGUSR1.
        std::fs::rename(&path, dir.path().join("error.log.2")).unwrap();
        log.reopen();
        log.write(b"later\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "later\n");
    }

    #[test]
    fn output_is_paced_past_its_burst() {
        let start = Instant::now();
        let mut pace = Pace {
            allowance: OUTPUT_BURST as i64,
            refilled: start,
            noted: None,
        };
        assert_eq!(pace.take(OUTPUT_BURST, start), Duration::ZERO);
        assert_eq!(pace.take(OUTPUT_RATE, start), Duration::from_secs(1));
        // A second later the debt is paid, and the bucket refills no further than
        // the burst however long the site was quiet.
        let later = start + Duration::from_secs(1);
        assert_eq!(pace.take(0, later), Duration::ZERO);
        let much_later = start + Duration::from_secs(3600);
        assert_eq!(pace.take(OUTPUT_BURST, much_later), Duration::ZERO);
        assert!(pace.take(1, much_later) > Duration::ZERO);
    }

    #[test]
    fn a_slowed_site_is_told_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        let log = ErrorLog::new(path.clone(), 1 << 20);
        assert!(log.pace(OUTPUT_BURST as usize).is_zero());
        assert!(!path.exists(), "a note before the burst was spent");
        assert!(!log.pace(1 << 20).is_zero());
        assert!(!log.pace(1 << 20).is_zero());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("the site prints more than the node copies")
                .count(),
            1,
            "{text}"
        );
    }
}
