//! The front's overhead, the worker half: one loader worker driven directly over its
//! slot socket (no HTTP, no front, no pool), one request at a time, for a fixed time.
//! `bench/front_overhead.py` runs it beside the same app behind roost's front (wrk with
//! one connection) and reports the difference per request. With DEPTH, that many
//! requests are kept outstanding on the socket instead of one: what a worker's sleep
//! and wake-up between two requests cost it (docs/benchmarks.md, "Eighth session").
//!
//! ```text
//! cargo build --release --example direct_worker
//! target/release/examples/direct_worker LOADER APP_FILE SECONDS [DEPTH]
//! ```
//! Prints one JSON line: requests, seconds, mean round trip in microseconds, and the
//! worker's user and system CPU per request in microseconds.

// Placing the slot on the worker's fd 3 between fork and exec, as spawn/ does.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roost_wire::{decode_from_worker, encode_header, EnvironWriter, Frame, Kind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (loader, app, seconds, depth) = match args.as_slice() {
        [_, loader, app, seconds] => (loader, app, seconds, "1"),
        [_, loader, app, seconds, depth] => (loader, app, seconds, depth.as_str()),
        _ => return Err("usage: direct_worker LOADER APP_FILE SECONDS [DEPTH]".into()),
    };
    let seconds: f64 = seconds.parse()?;
    let depth: usize = depth.parse()?;
    let directory = Path::new(app)
        .parent()
        .ok_or("the app file has no folder")?;
    let (mut ours, theirs) = UnixStream::pair()?;
    let slot = theirs.as_raw_fd();
    let mut cmd = Command::new("python3");
    cmd.arg(loader)
        .args(["worker", "1", "file", app])
        .arg(directory);
    // SAFETY: dup2 is async-signal-safe; `theirs` stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || nix::unistd::dup2(slot, 3).map(drop).map_err(Into::into));
    }
    let mut child = cmd.spawn()?;
    drop(theirs);

    let mut buf = BytesMut::with_capacity(64 << 10);
    match next_frame(&mut ours, &mut buf)? {
        Frame::Ready(_) => {}
        other => return Err(format!("expected READY, got {:?}", other.kind()).into()),
    }
    let request = request_frames()?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut requests = 0u64;
    let cpu_before = process_cpu_micros(child.id())?;
    for _ in 1..depth {
        ours.write_all(&request)?;
    }
    while Instant::now() < deadline {
        ours.write_all(&request)?;
        loop {
            match next_frame(&mut ours, &mut buf)? {
                Frame::ResponseEnd => break,
                Frame::ResponseHead(_) | Frame::ResponseBody(_) => {}
                other => return Err(format!("unexpected {:?}", other.kind()).into()),
            }
        }
        requests += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = process_cpu_micros(child.id())?;
    drop(ours);
    child.wait()?;
    let per_request = |before: f64, after: f64| (after - before) / requests as f64;
    println!(
        "{{\"requests\": {requests}, \"seconds\": {elapsed:.3}, \"mean_us\": {:.2}, \
         \"worker_user_us\": {:.2}, \"worker_system_us\": {:.2}}}",
        elapsed * 1e6 / requests as f64,
        per_request(cpu_before.0, cpu_after.0),
        per_request(cpu_before.1, cpu_after.1),
    );
    Ok(())
}

/// A process's user and system CPU time so far, in microseconds (`/proc/PID/stat`).
fn process_cpu_micros(pid: u32) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit(')').next().ok_or("no ) in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let micros = |i: usize| -> Result<f64, Box<dyn std::error::Error>> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/PID/stat")?
            .parse::<f64>()?
            * 1e6
            / ticks)
    };
    // utime and stime are the 14th and 15th fields; these start at the 3rd.
    Ok((micros(11)?, micros(12)?))
}

/// GET / as the front sends it: the same environ keys, then REQUEST_END.
fn request_frames() -> Result<BytesMut, roost_wire::EnvironError> {
    let mut environ = EnvironWriter::with_capacity(512);
    for (k, v) in [
        ("REQUEST_METHOD", "GET"),
        ("SCRIPT_NAME", ""),
        ("PATH_INFO", "/"),
        ("QUERY_STRING", ""),
        ("REQUEST_URI", "/"),
        ("SERVER_NAME", "hello.bench"),
        ("SERVER_PORT", "80"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "40000"),
        ("wsgi.url_scheme", "http"),
        ("HTTP_HOST", "hello.bench"),
    ] {
        environ.push(k, v.as_bytes())?;
    }
    let head = environ.finish();
    let mut out = BytesMut::with_capacity(head.len() + 16);
    encode_header(&mut out, Kind::RequestHead, head.len());
    out.extend_from_slice(&head);
    encode_header(&mut out, Kind::RequestEnd, 0);
    Ok(out)
}

fn next_frame(
    sock: &mut UnixStream,
    buf: &mut BytesMut,
) -> Result<Frame, Box<dyn std::error::Error>> {
    loop {
        if let Some(frame) = decode_from_worker(buf)? {
            return Ok(frame);
        }
        let mut chunk = [0u8; 16 << 10];
        let n = sock.read(&mut chunk)?;
        if n == 0 {
            return Err("the worker closed its slot".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
