//! One site log file, held open only while the site writes to it: the first line
//! opens it (and makes the site's log folder if it is missing), and the node's log
//! closer ([`super::NodeLogs`]) closes it once no line came for [`IDLE`]. So a
//! registered site that nobody visits costs no descriptor and no disk work, and a
//! node with thousands of sites starts without opening thousands of files.
//!
//! A file that cannot be opened or written (a full disk, a file where the folder
//! should be) loses its lines, said once in the node's log; the next line tries again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{append_with_group, say_write_outcome};

/// A file with no line for this long is closed; the next line opens it again.
pub(super) const IDLE: Duration = Duration::from_secs(30);

pub(super) struct LogFile {
    state: Mutex<State>,
}

struct State {
    /// Where lines go: the file's path, until it is set aside ([`LogFile::moved_to`]).
    path: PathBuf,
    open: Option<OpenLog>,
    /// When a line was last written (or tried).
    used: Instant,
    /// The last write failed: said once in the node's log, not per line.
    failing: bool,
}

/// The file while it is open.
pub(super) struct OpenLog {
    file: File,
    /// Bytes in the file: its size when opened, plus what the node appended since
    /// (nobody else writes to it).
    pub size: u64,
}

impl LogFile {
    /// Opens nothing yet.
    pub fn new(path: PathBuf) -> LogFile {
        LogFile {
            state: Mutex::new(State {
                path,
                open: None,
                used: Instant::now(),
                failing: false,
            }),
        }
    }

    pub fn path(&self) -> PathBuf {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.path.clone()
    }

    /// Holds the file still: no line is written (nor a file opened) until the
    /// [`HeldLogFile`] is dropped or told where the file was moved.
    pub fn hold(&self) -> HeldLogFile<'_> {
        HeldLogFile(self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `write` on the open file, opening it first if it is closed.
    pub fn write_with(&self, write: impl FnOnce(&Path, &mut OpenLog) -> std::io::Result<()>) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *guard;
        state.used = Instant::now();
        let written = match &mut state.open {
            Some(open) => write(&state.path, open),
            None => OpenLog::new(&state.path).and_then(|mut open| {
                let written = write(&state.path, &mut open);
                state.open = Some(open);
                written
            }),
        };
        say_write_outcome(&state.path, state.failing, &written);
        state.failing = written.is_err();
    }

    /// Appends `bytes` in one write.
    pub fn append(&self, bytes: &[u8]) {
        self.write_with(|_, open| open.append(bytes));
    }

    /// Closes the file: the next line opens whatever is at the path then (after
    /// rotation renamed the old file, a new one).
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open = None;
    }

    /// Closes the file if no line came for [`IDLE`] before `now`.
    pub fn close_if_idle(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(state.used) >= IDLE {
            state.open = None;
        }
    }

    /// Holds the file as a stalled disk would: the writer waits until this is dropped.
    #[cfg(test)]
    pub fn stall(&self) -> impl Drop + '_ {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.open.is_some()
    }
}

/// A [`LogFile`] held still while its file is renamed.
pub(super) struct HeldLogFile<'a>(MutexGuard<'a, State>);

impl HeldLogFile<'_> {
    /// The file was renamed to `path` (set aside for a site's previous owner): later
    /// lines go there, through the open file if it is open, else by opening `path`.
    pub fn moved_to(mut self, path: PathBuf) {
        self.0.path = path;
    }
}

impl OpenLog {
    /// Opens (or creates) `path` for append, new files with the group of their folder,
    /// which is made if it is not there ([`folder_gid`]).
    pub fn new(path: &Path) -> std::io::Result<OpenLog> {
        let gid = folder_gid(path.parent().unwrap_or(Path::new(".")))?;
        let file = append_with_group(path, gid)?;
        let size = file.metadata()?.len();
        Ok(OpenLog { file, size })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

/// The group of a site's log folder, which is made first (mode 0750: the site's group
/// may read, other tenants not) if it is not there. Anything else in its place (a
/// file, a link) is an error, and left as it is.
pub(super) fn folder_gid(folder: &Path) -> std::io::Result<u32> {
    match std::fs::symlink_metadata(folder) {
        Ok(meta) if meta.is_dir() => Ok(meta.gid()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a folder", folder.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(folder)?;
            Ok(std::fs::metadata(folder)?.gid())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_first_line_makes_the_folder_and_an_idle_file_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site").join("access.log");
        let log = LogFile::new(path.clone());
        assert!(!path.parent().unwrap().exists(), "made before any line");
        log.append(b"one\n");
        let folder = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(folder.permissions().mode() & 0o777, 0o750);
        assert!(log.is_open());
        log.close_if_idle(Instant::now());
        assert!(log.is_open(), "closed while in use");
        log.close_if_idle(Instant::now() + IDLE);
        assert!(!log.is_open());
        // Opened again by the next line, at the end of what is there.
        log.append(b"two\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    }

    #[test]
    fn a_line_that_cannot_be_written_is_lost_and_the_next_tries_again() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("site");
        std::fs::write(&blocker, b"a file where the folder goes").unwrap();
        let log = LogFile::new(blocker.join("error.log"));
        log.append(b"lost\n");
        assert!(!log.is_open());
        assert!(folder_gid(&blocker).is_err(), "a file taken for a folder");
        std::fs::remove_file(&blocker).unwrap();
        log.append(b"kept\n");
        assert_eq!(
            std::fs::read_to_string(blocker.join("error.log")).unwrap(),
            "kept\n"
        );
    }
}
