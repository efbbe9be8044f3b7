//! The `roost` binary: site commands, refused writes that change nothing, and the demo.

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::{fixture, get, need_root, python};

fn roost(registry: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("--registry")
        .arg(format!("sqlite:{}", registry.display()))
        .args(args)
        .output()
        .expect("run roost")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "roost failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn site_commands_and_every_kind_of_bad_write() {
    let dir = crate::harness::test_dir();
    let registry = dir.path().join("r.db");
    let app = fixture("tester.py");
    let app = app.to_str().unwrap();
    let py = python();

    let out = ok(&roost(
        &registry,
        &[
            "site",
            "add",
            "blog",
            "--host",
            "blog.test",
            "--host",
            "*.blog.test",
            "--entry",
            app,
            "--env",
            "A=1",
            "--user",
            "nobody",
        ],
    ));
    assert!(out.contains("added site blog"), "{out}");
    ok(&roost(
        &registry,
        &[
            "site",
            "add",
            "shop",
            "--host",
            "shop.test",
            "--entry",
            app,
            "--interpreter",
            &py,
            "--threads",
            "2",
            "--idle-timeout",
            "5m",
            "--body-max",
            "20MiB",
            "--user",
            "nobody",
        ],
    ));
    let before = ok(&roost(&registry, &["site", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[1]["threads"], 2);
    assert_eq!(listed[1]["idle_timeout_ms"], 300_000);
    assert_eq!(listed[1]["body_max"], 20 << 20);
    let text = ok(&roost(&registry, &["site", "show", "blog"]));
    assert!(
        text.contains("*.blog.test") && text.contains("A=1"),
        "{text}"
    );

    let missing_dir = dir.path().join("nope");
    let writable = dir.path().join("writable.py");
    std::fs::copy(fixture("tester.py"), &writable).unwrap();
    std::fs::set_permissions(
        &writable,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let writable = writable.to_str().unwrap();
    let mut bad: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "site", "add", "asroot", "--host", "n.test", "--entry", app, "--user", "root",
            ],
            "never run as root",
        ),
        (
            vec![
                "site", "add", "lowuid", "--host", "n.test", "--entry", app, "--user", "daemon",
            ],
            "below the minimum",
        ),
        (
            vec![
                "site",
                "add",
                "nouser",
                "--host",
                "n.test",
                "--entry",
                app,
                "--user",
                "no-such-user-xyz",
            ],
            "does not exist",
        ),
        (
            vec![
                "site",
                "add",
                "nogroup",
                "--host",
                "n.test",
                "--entry",
                app,
                "--user",
                "nobody",
                "--group",
                "no-such-group-xyz",
            ],
            "does not exist",
        ),
        (
            vec![
                "site", "add", "ww", "--host", "n.test", "--entry", writable, "--user", "nobody",
            ],
            "writable by others",
        ),
        (
            vec!["site", "add", "blog", "--host", "x.test", "--entry", app],
            "already exists",
        ),
        (
            vec!["site", "add", "dup", "--host", "blog.test", "--entry", app],
            "already belongs to site \"blog\"",
        ),
        (
            vec![
                "site",
                "add",
                "dup",
                "--host",
                "*.blog.test",
                "--entry",
                app,
            ],
            "already belongs",
        ),
        (
            vec![
                "site",
                "add",
                "nofile",
                "--host",
                "n.test",
                "--entry",
                "/nope/app.py",
            ],
            "does not exist",
        ),
        (
            vec![
                "site",
                "add",
                "nopy",
                "--host",
                "n.test",
                "--entry",
                app,
                "--interpreter",
                "/nope/python3",
            ],
            "interpreter",
        ),
        (
            vec![
                "site",
                "add",
                "venv",
                "--host",
                "n.test",
                "--entry",
                app,
                "--interpreter",
                missing_dir.to_str().unwrap(),
            ],
            "interpreter",
        ),
        (
            vec![
                "site", "add", "Bad Name", "--host", "n.test", "--entry", app,
            ],
            "not a site name",
        ),
        (
            vec![
                "site", "add", "badhost", "--host", "a b.test", "--entry", app,
            ],
            "invalid label",
        ),
        (
            vec!["site", "add", "port", "--host", "a.test:80", "--entry", app],
            "port",
        ),
        (
            vec!["site", "add", "nohost", "--entry", app],
            "at least one host",
        ),
        (vec!["site", "add", "noentry", "--host", "n.test"], "entry"),
        (
            vec![
                "site",
                "add",
                "zero",
                "--host",
                "n.test",
                "--entry",
                app,
                "--threads",
                "0",
            ],
            "threads",
        ),
        (
            vec![
                "site",
                "add",
                "min",
                "--host",
                "n.test",
                "--entry",
                app,
                "--processes-min",
                "9",
            ],
            "processes.min",
        ),
        (
            vec![
                "site",
                "add",
                "dur",
                "--host",
                "n.test",
                "--entry",
                app,
                "--idle-timeout",
                "soon",
            ],
            "not a duration",
        ),
        (
            vec![
                "site",
                "add",
                "size",
                "--host",
                "n.test",
                "--entry",
                app,
                "--body-max",
                "lots",
            ],
            "not a size",
        ),
        (
            vec![
                "site", "add", "env", "--host", "n.test", "--entry", app, "--env", "NOEQUALS",
            ],
            "KEY=VALUE",
        ),
        (
            vec!["site", "set", "blog", "--host", "shop.test"],
            "already belongs to site \"shop\"",
        ),
        (
            vec!["site", "set", "blog", "--cpu-weight", "0"],
            "cpu.weight",
        ),
        (
            vec!["site", "set", "ghost", "--threads", "2"],
            "no site named",
        ),
        (vec!["site", "rm", "ghost"], "no site named"),
    ];
    if crate::harness::is_root() {
        bad.push((
            vec![
                "site", "add", "rootless", "--host", "n.test", "--entry", app,
            ],
            "required when adding sites as root",
        ));
    }
    for (mut args, reason) in bad {
        // Every add names a user (as root one is required) unless that is the point.
        if args[1] == "add" && !args.contains(&"--user") && args[2] != "rootless" {
            args.extend(["--user", "nobody"]);
        }
        let out = roost(&registry, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(reason),
            "{args:?}: {stderr:?} does not say {reason:?}"
        );
    }
    assert_eq!(
        ok(&roost(&registry, &["site", "list", "--json"])),
        before,
        "a refused write changed the registry"
    );

    ok(&roost(
        &registry,
        &[
            "site",
            "set",
            "blog",
            "--threads",
            "3",
            "--unset-env",
            "A",
            "--preload",
            "true",
        ],
    ));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&roost(&registry, &["site", "show", "blog", "--json"]))).unwrap();
    assert_eq!(shown["threads"], 3);
    assert_eq!(shown["preload"], true);
    assert_eq!(shown["env"], serde_json::json!({}));
    assert_eq!(
        shown["hosts"],
        serde_json::json!(["blog.test", "*.blog.test"])
    );
    // Runtimes: added, named by a site, not removable while used.
    ok(&roost(
        &registry,
        &[
            "runtime",
            "add",
            "web",
            "--python",
            &py,
            "--preload",
            "json,email.utils",
        ],
    ));
    let runtimes: serde_json::Value =
        serde_json::from_str(&ok(&roost(&registry, &["runtime", "list", "--json"]))).unwrap();
    assert_eq!(
        runtimes[0]["preload"],
        serde_json::json!(["json", "email.utils"])
    );
    let refused = roost(&registry, &["site", "set", "blog", "--runtime", "nope"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no runtime named \"nope\""));
    ok(&roost(
        &registry,
        &["site", "set", "blog", "--runtime", "web"],
    ));
    assert!(ok(&roost(&registry, &["site", "show", "blog"])).contains("web"));
    let refused = roost(&registry, &["runtime", "rm", "web"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is used by sites [\"blog\"]"));
    ok(&roost(&registry, &["site", "rm", "shop"]));
    assert!(!ok(&roost(&registry, &["site", "list"])).contains("shop"));

    // Relative paths are from the current folder, stored absolute and without `.`;
    // an interpreter named without a '/' is looked up on PATH.
    let apps = fixture("");
    let added = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("--registry")
        .arg(format!("sqlite:{}", registry.display()))
        .args([
            "site", "add", "rel", "--host", "rel.test", "--user", "nobody",
        ])
        .args(["--entry", "./tester.py", "--directory", "."])
        .args(["--interpreter", "python3"])
        .current_dir(&apps)
        .output()
        .unwrap();
    ok(&added);
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&roost(&registry, &["site", "show", "rel", "--json"]))).unwrap();
    let apps = apps.components().collect::<std::path::PathBuf>();
    assert_eq!(shown["entry"], apps.join("tester.py").to_str().unwrap());
    assert_eq!(shown["directory"], apps.to_str().unwrap());
    let interpreter = shown["interpreter"].as_str().unwrap();
    assert!(
        interpreter.starts_with('/') && interpreter.ends_with("/python3"),
        "{interpreter}"
    );
}

/// `roost apply`: a site file (relative paths from its folder) becomes the registry's
/// sites, all or nothing, and a running node serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_syncs_the_registry_with_a_site_file() {
    let node = crate::harness::Node::start().await;
    node.app("tester.py");
    let user = node
        .user
        .as_ref()
        .map_or(String::new(), |u| format!("user = \"{}\"\n", u.name));
    let site = |name: &str, extra: &str| {
        format!(
            "[site.{name}]\nhosts = [\"{name}.test\"]\nentry = \"apps/tester.py\"\n\
             interpreter = \"{}\"\n{user}{extra}\n",
            python()
        )
    };
    let file = node.dir.path().join("sites.toml");
    let apply = |text: String, flags: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let mut args = vec!["apply", file.to_str().unwrap(), "--json"];
        args.extend_from_slice(flags);
        roost(&node.registry, &args)
    };
    let outcome = |out: &Output| -> serde_json::Value { serde_json::from_str(&ok(out)).unwrap() };
    let names = |v: &serde_json::Value, key: &str| -> Vec<String> {
        serde_json::from_value(v[key].clone()).unwrap()
    };
    let listed = || ok(&roost(&node.registry, &["site", "list", "--json"]));

    let both = site("a", "idle_timeout = \"30s\"") + &site("b", "memory_max = \"128MiB\"");
    let dry = outcome(&apply(both.clone(), &["--dry-run"]));
    assert_eq!(names(&dry, "added"), ["a", "b"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(listed().trim(), "[]", "a dry run wrote");
    assert_eq!(
        names(&outcome(&apply(both.clone(), &[])), "added"),
        ["a", "b"]
    );
    for host in ["a.test", "b.test"] {
        node.eventually("the node to serve an applied site", || async {
            get(node.addr, host, "/pid")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
    }
    let shown = ok(&roost(&node.registry, &["site", "show", "a", "--json"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["entry"],
        node.dir.path().join("apps/tester.py").display().to_string(),
        "the entry is relative to the site file's folder"
    );
    let again = outcome(&apply(both, &[]));
    assert_eq!(names(&again, "unchanged"), ["a", "b"]);
    let text = ok(&roost(&node.registry, &["apply", file.to_str().unwrap()]));
    assert_eq!(text, "unchanged: 2 sites\n");

    // b changes, a leaves the file: kept without --prune, removed with it.
    let only_b = site("b", "memory_max = \"256MiB\"");
    let kept = outcome(&apply(only_b.clone(), &[]));
    assert_eq!(names(&kept, "changed"), ["b"]);
    assert!(names(&kept, "removed").is_empty());
    let pruned = outcome(&apply(only_b.clone(), &["--prune"]));
    assert_eq!(names(&pruned, "removed"), ["a"]);
    node.eventually("the pruned site to go", || async {
        get(node.addr, "a.test", "/pid")
            .await
            .is_ok_and(|r| r.status == 404)
    })
    .await;

    // From standard input, relative paths from the current folder.
    let mut child = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("--registry")
        .arg(format!("sqlite:{}", node.registry.display()))
        .args(["apply", "-", "--json"])
        .current_dir(node.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), only_b.as_bytes()).unwrap();
    let piped = outcome(&child.wait_with_output().unwrap());
    assert_eq!(names(&piped, "unchanged"), ["b"]);

    // Refused writes change nothing: one bad site among good ones, a typo, bad TOML.
    let before = listed();
    let bad = [
        (
            only_b.clone() + &site("c", "") + &site("d", "threads = 0"),
            "site \"d\": threads",
        ),
        (
            site("e", "proceses_max = 2"),
            "unknown field `proceses_max`",
        ),
        (
            site("f", "idle_timeout = \"soon\""),
            "site \"f\": idle_timeout",
        ),
        (
            only_b.clone() + &site("g", "").replace("g.test", "b.test"),
            "host b.test is named by site \"b\" and by site \"g\"",
        ),
        ("[site.h\n".into(), "TOML parse error"),
        ("# no site\n".into(), "--prune would remove every site"),
    ];
    for (text, complaint) in bad {
        let out = apply(text, &["--prune"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {complaint}");
        assert!(err.contains(complaint), "{complaint:?} not in: {err}");
        assert_eq!(listed(), before, "a refused apply changed the registry");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_its_three_sites() {
    let dir = crate::harness::test_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_roost"))
        .args([
            "demo",
            "--listen",
            &addr.to_string(),
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::harness::eventually(
        "the demo to answer",
        std::time::Duration::from_secs(20),
        &mut || async {
            get(addr, "hello.localhost", "/")
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(get(addr, "hello.localhost", "/")
        .await
        .unwrap()
        .text()
        .starts_with("Hello from roost!"));
    let echo = crate::harness::http::post(addr, "echo.localhost", "/", "message=hi%20there")
        .await
        .unwrap();
    assert!(
        echo.text().contains("<b>message</b>: hi there"),
        "{}",
        echo.text()
    );
    let stream = get(addr, "stream.localhost", "/?chunks=3").await.unwrap();
    assert_eq!(stream.body.len(), 3 * 64 * 1024);
    assert_eq!(
        get(addr, "nothing.localhost", "/").await.unwrap().status,
        404
    );
    // SIGTERM stops it cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stdout.as_mut().unwrap(), &mut out)
        .await
        .unwrap();
    assert!(out.contains("curl -H 'Host: hello.localhost'"), "{out}");
}

/// A spool folder that cannot take files is refused at start, with the reason, not
/// found out at the first slow client.
#[test]
fn serve_refuses_a_spool_folder_it_cannot_use() {
    let dir = crate::harness::test_dir();
    let mut args = serve_args(dir.path());
    args.extend([
        "--spool-dir".into(),
        dir.path().join("no such folder").into(),
    ]);
    let node = serve(args);
    let (status, stderr) = refused_start(node, "a spool folder that does not exist");
    assert!(!status.success());
    assert!(
        stderr.contains("cannot make temporary files in the spool folder"),
        "{stderr}"
    );
}

/// A node that must refuse to start: its exit status and what it said, once it has
/// exited (within 20 s; one still running then is killed and the test fails).
fn refused_start(
    mut node: std::process::Child,
    refused_for: &str,
) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = node.kill();
            let _ = node.wait();
            panic!("the node started with {refused_for}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Two nodes on one folder of TMPDIRs: the second is refused, and the first's TMPDIRs
/// stay (the second's start would have emptied the folder under the first's sites).
#[test]
fn a_second_node_on_the_same_tmp_dir_is_refused() {
    let dir = crate::harness::test_dir();
    let mut first = serve(serve_args(dir.path()));
    let heard = stderr_lines(&mut first);
    let ready = heard
        .iter()
        .any(|line| line.contains("accepting client connections"));
    let tmpdir = dir.path().join("tmp/a-site");
    std::fs::create_dir(&tmpdir).unwrap();

    let other = crate::harness::test_dir();
    let mut args = serve_args(other.path());
    *args.last_mut().unwrap() = dir.path().join("tmp").into();
    let second = serve(args);
    let (status, stderr) = refused_start(second, "a --tmp-dir another node uses");
    let _ = first.kill();
    let _ = first.wait();
    assert!(ready, "the first node did not start");
    assert!(!status.success());
    assert!(
        stderr.contains("cannot make the folder of the sites' TMPDIRs")
            && stderr.contains("another node uses it"),
        "{stderr}"
    );
    assert!(
        tmpdir.is_dir(),
        "the refused start emptied the first node's TMPDIRs"
    );
}

/// The node takes the hard limit on open files (a connection is a file descriptor;
/// the usual soft limit of 1024 is less than a thousand clients need), and accepts
/// connections up to half of it by default.
#[test]
fn serve_raises_its_open_file_limit_to_the_hard_limit() {
    let dir = crate::harness::test_dir();
    let mut node = Command::new("prlimit")
        .arg("--nofile=256:4096")
        .arg(env!("CARGO_BIN_EXE_roost"))
        .args(serve_args(dir.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs the node");
    let heard = stderr_lines(&mut node);
    let limits = format!("/proc/{}/limits", node.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let raised = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let open_files = text.lines().find(|l| l.starts_with("Max open files"));
        if open_files.is_some_and(|l| l.split_whitespace().nth(3) == Some("4096")) {
            break true;
        }
        if std::time::Instant::now() > deadline || node.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let limit_line = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match heard.recv_timeout(left) {
            Ok(line) if line.contains("accepting client connections") => break Some(line),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let _ = node.kill();
    let _ = node.wait();
    assert!(raised, "the node kept its soft limit of 256 open files");
    let limit_line = limit_line.expect("the node says how many connections it accepts");
    assert!(limit_line.contains("max_connections=2048"), "{limit_line}");
}

/// Whether the node came to accept connections (before it exited); it is stopped.
fn started(mut node: std::process::Child) -> bool {
    let ready = stderr_lines(&mut node)
        .iter()
        .any(|line| line.contains("accepting client connections"));
    let _ = node.kill();
    let _ = node.wait();
    ready
}

/// A node's worker budget defaults to one worker per 64 MiB of the host's memory (a
/// crawler visiting every site cannot fork a worker per site); `--max-workers 0` lifts it.
#[test]
fn serve_bounds_its_workers_by_the_hosts_memory_unless_told() {
    let dir = crate::harness::test_dir();
    let mem_total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .expect("MemTotal in /proc/meminfo");
    let expected = ((mem_total_kib << 10) / (64 << 20)).max(8);
    for (extra, max_workers) in [(None, expected), (Some("0"), 0), (Some("12"), 12)] {
        let mut args = serve_args(dir.path());
        if let Some(value) = extra {
            args.extend(["--max-workers".into(), value.into()]);
        }
        let mut node = serve(args);
        let budget = stderr_lines(&mut node)
            .iter()
            .take_while(|line| !line.contains("accepting client connections"))
            .find(|line| line.contains("worker budget"));
        let _ = node.kill();
        let _ = node.wait();
        let budget = budget.expect("the node says its worker budget at start");
        assert!(
            budget.contains(&format!("max_workers={max_workers} ")),
            "{extra:?}: {budget}"
        );
    }
}

/// A node says each site it loads, unless it loads many at once (its start, a bulk
/// `roost apply`): then one line with the counts, and each site at debug level.
#[test]
fn serve_sums_up_the_sites_it_loads_at_once() {
    let dir = crate::harness::test_dir();
    let app = dir.path().join("app.py");
    std::fs::copy(fixture("tester.py"), &app).unwrap();
    let user = if crate::harness::is_root() {
        "user = \"nobody\"\n"
    } else {
        ""
    };
    let node_lines = |sites: usize| -> Vec<String> {
        let file: String = (0..sites)
            .map(|k| {
                format!(
                    "[site.s{k}]\nhosts = [\"s{k}.test\"]\nentry = \"app.py\"\ninterpreter = \"{}\"\n{user}",
                    python()
                )
            })
            .collect();
        let sites_file = dir.path().join("sites.toml");
        std::fs::write(&sites_file, file).unwrap();
        let registry = dir.path().join("r.db");
        let _ = std::fs::remove_file(&registry);
        ok(&roost(&registry, &["apply", sites_file.to_str().unwrap()]));
        let mut node = serve(serve_args(dir.path()));
        let lines: Vec<String> = stderr_lines(&mut node)
            .iter()
            .take_while(|line| !line.contains("accepting client connections"))
            .collect();
        let _ = node.kill();
        let _ = node.wait();
        lines
    };
    let said = |lines: &[String], what: &str| lines.iter().filter(|l| l.contains(what)).count();

    let few = node_lines(3);
    assert_eq!(said(&few, "site added"), 3, "{few:#?}");
    assert_eq!(said(&few, "sites loaded"), 0, "{few:#?}");
    let many = node_lines(25);
    assert_eq!(said(&many, "site added"), 0, "{many:#?}");
    let summary: Vec<&String> = many.iter().filter(|l| l.contains("sites loaded")).collect();
    assert!(
        summary.len() == 1 && summary[0].contains("added=25 changed=0 removed=0"),
        "{many:#?}"
    );
}

/// The lines a child writes to its (piped) stderr, as they come.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;

    let (said, heard) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = said.send(line);
        }
    });
    heard
}

/// Descriptors the node's parent left open reach no worker: the node marks them
/// close-on-exec before it starts anything.
#[test]
fn serve_keeps_what_it_inherited_from_its_workers() {
    use std::os::fd::AsRawFd;

    let dir = crate::harness::test_dir();
    // Not close-on-exec: the node inherits both ends, as from a careless parent.
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut node = serve(serve_args(dir.path()));
    let heard = stderr_lines(&mut node);
    let ready = heard
        .iter()
        .find(|line| line.contains("accepting client connections"));
    let flags = |fd: i32| {
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", node.id()))
            .expect("the node holds what it inherited");
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"));
        u32::from_str_radix(flags.expect("fdinfo has flags").trim(), 8).unwrap()
    };
    let sealed = [read.as_raw_fd(), write.as_raw_fd()].map(|fd| flags(fd) & 0o2000000 != 0);
    let _ = node.kill();
    let _ = node.wait();
    assert!(ready.is_some(), "the node did not start");
    assert_eq!(
        sealed,
        [true, true],
        "inherited descriptors left open to exec"
    );
}

/// `roost ARGS`, its stderr piped (`stderr_lines`, `refused_start`).
fn serve<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The arguments of `roost serve` on port 0, without cgroups, its files in `dir`.
fn serve_args(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let registry = format!("sqlite:{}", dir.join("r.db").display());
    vec![
        "--registry".into(),
        registry.into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--no-cgroups".into(),
        "--log-dir".into(),
        dir.join("logs").into(),
        "--run-dir".into(),
        dir.join("run").into(),
        "--tmp-dir".into(),
        dir.join("tmp").into(),
    ]
}

/// Head limits out of range, and client timeouts of zero, are refused with the reason,
/// before anything starts.
#[test]
fn serve_refuses_limits_out_of_range_and_zero_timeouts() {
    for (flag, value) in [
        ("--keepalive-timeout", "0s"),
        ("--header-timeout", "0s"),
        ("--max-header-size", "5GiB"),
        ("--max-header-size", "1KiB"),
        ("--max-headers", "0"),
        ("--max-headers", "1000000"),
        ("--error-log-size", "1KiB"),
        ("--max-connections", "0"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_roost"))
            .args(["serve", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was taken");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{stderr}"
        );
    }
}

/// As root, a run folder below /tmp is refused at start: each worker sees its own
/// TMPDIR there, so a plainly spawned worker would not find the loader. With
/// `--shared-tmp` the workers see the host's /tmp, and the node starts.
#[test]
#[ignore = "needs root: only a root node gives workers a /tmp of their own"]
fn serve_refuses_a_run_folder_below_tmp_unless_tmp_is_shared() {
    need_root("workers get a private /tmp only from a root node");
    let below_tmp = tempfile::tempdir().unwrap();
    let start = |extra: &[&str]| {
        let mut args = serve_args(below_tmp.path());
        args.extend(extra.iter().map(Into::into));
        serve(args)
    };
    let (status, stderr) = refused_start(start(&[]), "a run folder below /tmp");
    assert!(!status.success());
    assert!(
        stderr.contains("(--run-dir) is below /tmp, which each worker sees as its own"),
        "{stderr}"
    );
    assert!(
        started(start(&["--shared-tmp"])),
        "the node did not start with --shared-tmp"
    );
}

/// The registry holds every site's environment (their secrets): one made by roost is
/// its owner's alone, and a root node warns at start of one that others can read.
#[test]
#[ignore = "needs root: only a root node hosts other users"]
fn serve_warns_of_a_registry_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    need_root("the warning is a root node's");
    let dir = crate::harness::test_dir();
    let registry = dir.path().join("r.db");
    ok(&roost(&registry, &["site", "list"]));
    let mode = std::fs::metadata(&registry).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a new registry");
    let warnings = || {
        let mut node = serve(serve_args(dir.path()));
        let mut said = Vec::new();
        for line in stderr_lines(&mut node).iter() {
            if line.contains("accepting client connections") {
                break;
            }
            said.push(line);
        }
        let _ = node.kill();
        let _ = node.wait();
        said.into_iter()
            .filter(|line| line.contains("any user can read the registry"))
            .collect::<Vec<_>>()
    };
    assert_eq!(warnings(), Vec::<String>::new(), "its owner's alone");
    std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warned = warnings();
    assert!(
        warned.len() == 1 && warned[0].contains(&registry.display().to_string()),
        "{warned:?}"
    );
}

/// The run folder holds the loader, which zygotes run as root: a run folder in a folder
/// others can write in (and so rename it, and put their own in its place) is refused
/// at start; the same folder made the node's alone is taken.
#[test]
#[ignore = "needs root: the loader runs as root only under a root node"]
fn serve_refuses_a_run_folder_others_could_swap() {
    use std::os::unix::fs::PermissionsExt;
    need_root("only a root node runs the loader as root");
    let dir = crate::harness::test_dir();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let start = || {
        let mut args = serve_args(dir.path());
        let run_dir = args.iter().position(|a| a == "--run-dir").unwrap() + 1;
        args[run_dir] = open.join("run").into();
        serve(args)
    };
    let (status, stderr) = refused_start(start(), "a run folder in a folder anyone can write in");
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("others can write in {}", open.display())),
        "{stderr}"
    );
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        started(start()),
        "the node did not start with a run folder of its own"
    );
}

/// A tenant's code that any user of the host can read (and so the settings and secrets
/// beside it) is accepted with a warning that says how to close it; once its folder is
/// private to its user, no warning.
#[test]
#[ignore = "needs root: creates a Unix user for the site"]
fn site_add_warns_of_code_any_user_can_read() {
    use std::os::unix::fs::PermissionsExt;
    need_root("it creates a Unix user");
    let user = crate::harness::TestUser::create();
    let dir = crate::harness::test_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::set_permissions(&site, std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = site.join("app.py");
    std::fs::copy(fixture("tester.py"), &app).unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&site, Some(user.uid), Some(user.uid)).unwrap();
    std::os::unix::fs::chown(&app, Some(user.uid), Some(user.uid)).unwrap();
    let registry = dir.path().join("r.db");
    let entry = app.display().to_string();
    let add = roost(
        &registry,
        &[
            "site",
            "add",
            "open",
            "--host",
            "open.test",
            "--entry",
            &entry,
            "--user",
            &user.name,
        ],
    );
    ok(&add);
    let said = String::from_utf8_lossy(&add.stderr);
    assert!(
        said.contains(&format!("any user of this host can read {entry}"))
            && said.contains(&format!("chmod o-rwx {}", site.display())),
        "{said}"
    );
    std::fs::set_permissions(&site, std::fs::Permissions::from_mode(0o750)).unwrap();
    let set = roost(&registry, &["site", "set", "open", "--host", "open.test"]);
    ok(&set);
    let said = String::from_utf8_lossy(&set.stderr);
    assert!(!said.contains("any user of this host can read"), "{said}");
}
