//! The access log. The request path only records an access: the facts of the request,
//! as cheap clones, go through one bounded channel to the node's access log thread,
//! which formats the lines and appends them to each site's file in batches (at most
//! 20 ms behind). So neither formatting nor the disk is on a runtime thread, and the
//! request path never waits: if the thread cannot keep up, records are dropped and
//! counted, and the count lands in the site's error log. Each site may fill only a
//! share of the queue, so the one that floods it loses its own lines, not its
//! neighbours'.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method};

use arc_swap::ArcSwap;

use super::clf_time;
use super::error::ErrorLog;
use super::file::{HeldLogFile, LogFile};

/// Access records queued for the access log thread, for all sites, before new ones are
/// dropped.
const ACCESS_QUEUE: usize = 16_384;
/// Records one site may have in that queue: when the thread falls behind (a slow disk)
/// or one site floods the node, the busiest site drops its own lines first and the
/// others keep theirs.
const ACCESS_SITE_SHARE: usize = ACCESS_QUEUE / 4;
/// The thread sleeps this long after each batch: lines reach the files at most this
/// late, and a busy node costs one write per site (and no wake-up of the thread) per
/// batch instead of one per request. 16,384 records per 20 ms is 800,000 a second.
const ACCESS_BATCH_EVERY: Duration = Duration::from_millis(20);

/// What the access log thread is sent.
// Stop is sent once in a node's life; boxing records would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum AccessMessage {
    Record(Arc<AccessFile>, AccessRecord),
    /// Write what came before, then end.
    Stop,
}

/// The node's access log thread.
pub struct AccessLog {
    tx: SyncSender<AccessMessage>,
    thread: JoinHandle<()>,
}

impl AccessLog {
    pub fn start() -> std::io::Result<AccessLog> {
        let (tx, rx) = mpsc::sync_channel(ACCESS_QUEUE);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_access(rx))?;
        Ok(AccessLog { tx, thread })
    }

    /// Writes what is queued, then ends the thread (records sent after are dropped).
    /// Blocks until then: at most one batch interval and one write per site.
    pub fn stop(self) {
        if self.tx.send(AccessMessage::Stop).is_ok() {
            let _ = self.thread.join();
        }
    }
}

/// One site's `access.log`, shared by its [`SiteAccess`] and the records in flight.
/// When the site changes hands, the file is set aside and a new one started: requests
/// that arrived before keep the old one ([`AccessTarget`]), which follows its file.
pub(super) struct AccessFile {
    file: LogFile,
    /// Records of this site in the queue (at most [`ACCESS_SITE_SHARE`]).
    queued: AtomicUsize,
    /// Records lost because the thread fell behind; reported in the error log.
    dropped: AtomicU64,
    error_log: Arc<ErrorLog>,
}

impl AccessFile {
    fn new(path: PathBuf, error_log: Arc<ErrorLog>) -> Arc<AccessFile> {
        Arc::new(AccessFile {
            file: LogFile::new(path),
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            error_log,
        })
    }

    /// Holds the file still while it is set aside for the site's previous owner
    /// ([`LogFile::hold`]): the lines of the requests that owner's site received
    /// follow it where it goes.
    pub fn hold(&self) -> HeldLogFile<'_> {
        self.file.hold()
    }
}

/// What a site records its accesses with.
pub struct SiteAccess {
    tx: SyncSender<AccessMessage>,
    current: ArcSwap<AccessFile>,
}

/// Where a request's access line goes: the site's access log when the request came.
pub struct AccessTarget {
    tx: SyncSender<AccessMessage>,
    file: Arc<AccessFile>,
}

impl AccessTarget {
    /// Queues the request's line, or counts it as dropped.
    pub fn record(&self, record: AccessRecord) {
        queue(&self.tx, &self.file, record);
    }
}

impl SiteAccess {
    /// `path` is the site's `access.log`, opened by its first line; dropped lines are
    /// counted in `error_log`.
    pub fn new(access_log: &AccessLog, path: PathBuf, error_log: Arc<ErrorLog>) -> SiteAccess {
        SiteAccess::sending_to(access_log.tx.clone(), path, error_log)
    }

    /// Records that go nowhere, for tests of other modules.
    #[cfg(test)]
    pub fn detached(error_log: Arc<ErrorLog>) -> SiteAccess {
        let tx = mpsc::sync_channel(1).0;
        SiteAccess::sending_to(tx, PathBuf::from("/dev/null"), error_log)
    }

    fn sending_to(
        tx: SyncSender<AccessMessage>,
        path: PathBuf,
        error_log: Arc<ErrorLog>,
    ) -> SiteAccess {
        SiteAccess {
            tx,
            current: ArcSwap::new(AccessFile::new(path, error_log)),
        }
    }

    /// Where the line of a request that comes now goes, whenever it ends.
    pub fn target(&self) -> AccessTarget {
        AccessTarget {
            tx: self.tx.clone(),
            file: self.current.load_full(),
        }
    }

    /// Later requests' lines go to a new file, whose dropped lines are counted in
    /// `error_log`; returns the one the requests until now write to, to follow its
    /// file where it is set aside.
    pub fn start_anew(&self, error_log: Arc<ErrorLog>) -> Arc<AccessFile> {
        // The current file is never moved: its path is the site's access.log.
        let path = self.current.load().file.path();
        self.current.swap(AccessFile::new(path, error_log))
    }

    /// Later lines go to a new file (after rotation renamed the old one).
    pub fn reopen(&self) {
        self.current.load().file.close();
    }

    /// Closes the file if it is idle ([`LogFile::close_if_idle`]).
    pub fn close_if_idle(&self, now: std::time::Instant) {
        self.current.load().file.close_if_idle(now)
    }

    /// Queues one line into the current file, or counts it as dropped.
    pub fn record(&self, record: AccessRecord) {
        queue(&self.tx, &self.current.load(), record);
    }
}

/// Queues one line for `file`, or counts it as dropped: past the site's share of the
/// queue, or with the queue full.
fn queue(tx: &SyncSender<AccessMessage>, file: &Arc<AccessFile>, record: AccessRecord) {
    if file.queued.fetch_add(1, Ordering::Relaxed) >= ACCESS_SITE_SHARE {
        file.queued.fetch_sub(1, Ordering::Relaxed);
        file.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let message = AccessMessage::Record(file.clone(), record);
    match tx.try_send(message) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            file.queued.fetch_sub(1, Ordering::Relaxed);
            file.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // The node is stopping.
        Err(TrySendError::Disconnected(_)) => {
            file.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The access log thread: waits for a record, takes every record queued, appends each
/// site's lines with one write, then sleeps for the next batch to gather.
fn write_access(rx: Receiver<AccessMessage>) {
    let mut clock = ClfClock::default();
    let mut stopping = false;
    while !stopping {
        let Ok(first) = rx.recv() else { break };
        // Keyed by the file's address: each site's lines together, in arrival order.
        let mut batch: HashMap<*const AccessFile, (Arc<AccessFile>, Vec<u8>, usize)> =
            HashMap::new();
        for message in std::iter::once(first).chain(rx.try_iter()) {
            let (file, record) = match message {
                AccessMessage::Record(file, record) => (file, record),
                AccessMessage::Stop => {
                    stopping = true;
                    break;
                }
            };
            let (_, lines, taken) = batch
                .entry(Arc::as_ptr(&file))
                .or_insert_with(|| (file, Vec::with_capacity(16 << 10), 0));
            record.write_line(lines, &mut clock);
            *taken += 1;
        }
        // Out of the queue now: each site's share is free for what comes next.
        for (file, _, taken) in batch.values() {
            file.queued.fetch_sub(*taken, Ordering::Relaxed);
        }
        for (file, lines, _) in batch.into_values() {
            file.file.append(&lines);
            let lost = file.dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                file.error_log.note(&format!(
                    "{lost} access log lines were dropped: the access log fell behind (a slow disk?)"
                ));
            }
        }
        if !stopping {
            std::thread::sleep(ACCESS_BATCH_EVERY);
        }
    }
}

/// One access log line's facts, taken on the request path without formatting anything:
/// Apache combined format, then the duration in microseconds and the pid of the worker
/// that served it (`-` when none did).
pub struct AccessRecord {
    pub peer: IpAddr,
    pub start: SystemTime,
    pub method: Method,
    pub target: Option<PathAndQuery>,
    pub version: &'static str,
    pub status: u16,
    pub bytes: u64,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub duration: Duration,
    pub worker_pid: Option<u32>,
}

impl AccessRecord {
    fn write_line(&self, out: &mut Vec<u8>, clock: &mut ClfClock) {
        let _ = write!(
            out,
            "{} - - [{}] \"{} {} {}\" {} ",
            self.peer,
            clock.format(self.start),
            self.method,
            escape(self.target.as_ref().map_or("/", |t| t.as_str())),
            self.version,
            self.status,
        );
        let _ = match self.bytes {
            0 => write!(out, "-"),
            n => write!(out, "{n}"),
        };
        let _ = write!(
            out,
            " \"{}\" \"{}\" {} ",
            escape(&header_text(&self.referer)),
            escape(&header_text(&self.user_agent)),
            self.duration.as_micros()
        );
        let _ = match self.worker_pid {
            Some(pid) => writeln!(out, "{pid}"),
            None => writeln!(out, "-"),
        };
    }

    #[cfg(test)]
    fn line(&self) -> String {
        let mut out = Vec::new();
        self.write_line(&mut out, &mut ClfClock::default());
        String::from_utf8(out).expect("lines are UTF-8")
    }
}

fn header_text(value: &Option<HeaderValue>) -> std::borrow::Cow<'_, str> {
    value
        .as_ref()
        .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()))
}

/// [`clf_time`] formatted once per second, not once per line.
#[derive(Default)]
struct ClfClock {
    last: Option<(u64, String)>,
}

impl ClfClock {
    fn format(&mut self, t: SystemTime) -> &str {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.last.as_ref().is_none_or(|(s, _)| *s != secs) {
            self.last = Some((secs, clf_time(t)));
        }
        &self.last.as_ref().expect("set above").1
    }
}

/// Keeps a log line one line: quotes, backslashes and control bytes are escaped.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    let clean = |c: char| c != '"' && c != '\\' && !c.is_control();
    if s.chars().all(clean) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::logs::NodeLogs;

    #[test]
    fn access_lines_stay_one_line() {
        let record = AccessRecord {
            peer: [127, 0, 0, 1].into(),
            start: UNIX_EPOCH,
            method: Method::GET,
            target: Some(PathAndQuery::from_static("/a?b=c")),
            version: "HTTP/1.1",
            status: 200,
            bytes: 5,
            referer: None,
            user_agent: Some(HeaderValue::from_bytes(b"curl \"8\"\t\xff").unwrap()),
            duration: Duration::from_micros(1234),
            worker_pid: Some(77),
        };
        assert_eq!(
            record.line(),
            "127.0.0.1 - - [01/Jan/1970:00:00:00 +0000] \"GET /a?b=c HTTP/1.1\" 200 5 \"-\" \"curl \\\"8\\\"\\x09\u{fffd}\" 1234 77\n"
        );
        let unserved = AccessRecord {
            bytes: 0,
            worker_pid: None,
            status: 503,
            ..record
        };
        assert!(unserved
            .line()
            .ends_with("\" 503 - \"-\" \"curl \\\"8\\\"\\x09\u{fffd}\" 1234 -\n"));
    }

    pub(in crate::logs) fn record(status: u16) -> AccessRecord {
        AccessRecord {
            peer: [10, 0, 0, 1].into(),
            start: UNIX_EPOCH,
            method: Method::POST,
            target: Some(PathAndQuery::from_static("/x")),
            version: "HTTP/1.1",
            status,
            bytes: 1,
            referer: None,
            user_agent: None,
            duration: Duration::ZERO,
            worker_pid: Some(1),
        }
    }

    #[test]
    fn a_flood_loses_no_line_without_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeLogs::start(dir.path().to_owned(), 1 << 30).unwrap();
        let logs = node.open_site("s");
        // Far more than the queue holds, faster than one batch interval.
        let sent = 10 * ACCESS_QUEUE;
        for _ in 0..sent {
            logs.access(record(200));
        }
        node.stop();
        let read = |name| std::fs::read_to_string(dir.path().join("s").join(name)).unwrap();
        let written = read("access.log").lines().count();
        let dropped = dropped_lines(&read("error.log"));
        assert!(
            dropped > 0 && written >= ACCESS_SITE_SHARE,
            "{written} written, {dropped} dropped"
        );
        assert_eq!(written + dropped, sent);
    }

    /// The lines a site's error log says were dropped, from its one note per batch
    /// that had drops: "[time] [roost] N access log lines were dropped…".
    fn dropped_lines(errors: &str) -> usize {
        errors
            .lines()
            .filter_map(|l| l.split("] [roost] ").nth(1))
            .filter_map(|rest| rest.split(' ').next())
            .map(|n| n.parse::<usize>().expect("a count"))
            .sum()
    }

    #[test]
    fn a_flooding_site_leaves_room_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeLogs::start(dir.path().to_owned(), 1 << 30).unwrap();
        let flood = node.open_site("flood");
        let calm = node.open_site("calm");
        // Hold the flooding site's file, as a stalled disk would: the thread blocks on
        // its first batch and everything after piles up in the queue.
        let flood_file = flood.access.current.load_full();
        let stalled = flood_file.file.stall();
        flood.access(record(200));
        std::thread::sleep(Duration::from_millis(100));
        let sent = 2 * ACCESS_QUEUE;
        for _ in 0..sent {
            flood.access(record(200));
        }
        for _ in 0..100 {
            calm.access(record(201));
        }
        drop(stalled);
        node.stop();
        let read = |site: &str, name: &str| {
            std::fs::read_to_string(dir.path().join(site).join(name)).unwrap_or_default()
        };
        assert_eq!(read("calm", "access.log").lines().count(), 100);
        assert_eq!(dropped_lines(&read("calm", "error.log")), 0);
        let written = read("flood", "access.log").lines().count();
        let dropped = dropped_lines(&read("flood", "error.log"));
        assert!(written <= 1 + ACCESS_SITE_SHARE, "{written} written");
        assert_eq!(written + dropped, 1 + sent);
    }

    #[test]
    fn lines_reach_each_sites_file() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeLogs::start(dir.path().to_owned(), 1 << 30).unwrap();
        let sites: Vec<_> = ["a", "b"].iter().map(|name| node.open_site(name)).collect();
        for (i, logs) in sites.iter().chain(sites.iter()).enumerate() {
            logs.access(record(200 + i as u16));
        }
        drop(sites);
        node.stop();
        let read =
            |name: &str| std::fs::read_to_string(dir.path().join(name).join("access.log")).unwrap();
        let statuses = |text: String| -> Vec<String> {
            text.lines()
                .map(|l| l.split(' ').nth(8).unwrap().to_owned())
                .collect()
        };
        assert_eq!(statuses(read("a")), ["200", "202"]);
        assert_eq!(statuses(read("b")), ["201", "203"]);
    }
}
