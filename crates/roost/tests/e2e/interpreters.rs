//! Interpreters and entry points: a virtualenv's python sees its own site-packages,
//! and a gunicorn-style module:callable imports from the site's directory.

use std::process::Command;

use roost_registry::SiteSpec;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{get, parent_of, pid_of, python, Node};

/// A site's interpreter named as the virtualenv's folder or as its `bin/python`: either
/// way its workers see the venv's packages. Until the twelfth session a zygote's
/// worker named by the venv's python got the base interpreter's packages only (the
/// venv is layered in the child, and it was layered only for a folder), and failed to
/// import what the venv had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtualenv_site_with_a_module_entry() {
    let node = Node::start().await;
    let root = node.dir.path().join("venvsite");
    let venv = root.join("venv");
    let made = Command::new(python())
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(
        made.success(),
        "cannot create a virtualenv (is python3-venv installed?)"
    );
    let purelib = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .unwrap();
    let purelib = String::from_utf8(purelib.stdout).unwrap();
    std::fs::write(
        std::path::Path::new(purelib.trim()).join("venvonly.py"),
        "VALUE = 'imported from the venv'\n",
    )
    .unwrap();
    let project = root.join("proj");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("__init__.py"), "").unwrap();
    std::fs::write(
        project.join("wsgi.py"),
        "import sys, venvonly\n\
         def app(environ, start_response):\n\
         \x20   body = ('%s|%s' % (venvonly.VALUE, sys.prefix)).encode()\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [body]\n",
    )
    .unwrap();
    for (name, interpreter) in [
        ("venv", venv.clone()),
        ("venvpython", venv.join("bin/python")),
    ] {
        node.add(SiteSpec {
            name: name.into(),
            hosts: vec![format!("{name}.test")],
            entry: Some("proj.wsgi:app".into()),
            interpreter: Some(interpreter.display().to_string()),
            directory: Some(root.display().to_string()),
            user: node.user.as_ref().map(|u| u.name.clone()),
            ..SiteSpec::default()
        })
        .await;
        let r = get(node.addr, &format!("{name}.test"), "/").await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{name}: {}\n{}",
            r.text(),
            node.log(name, "error.log")
        );
        assert_eq!(
            r.text(),
            format!("imported from the venv|{}", venv.display()),
            "{name}"
        );
    }
    node.stop().await;
}

/// A virtualenv made with `python -m venv --without-pip`, with `modules` (name, source)
/// and their dist-info folders (name, version) in its site-packages.
fn venv_with(
    root: &std::path::Path,
    modules: &[(&str, &str)],
    dists: &[(&str, &str)],
) -> std::path::PathBuf {
    let made = Command::new(python())
        .args(["-m", "venv", "--without-pip"])
        .arg(root)
        .status()
        .unwrap();
    assert!(
        made.success(),
        "cannot create a virtualenv (is python3-venv installed?)"
    );
    let purelib = roost_registry::site_packages(root)
        .pop()
        .expect("site-packages");
    for (name, source) in modules {
        std::fs::write(purelib.join(format!("{name}.py")), source).unwrap();
    }
    for (name, version) in dists {
        std::fs::create_dir_all(purelib.join(format!("{name}-{version}.dist-info"))).unwrap();
    }
    root.to_owned()
}

/// Registers a runtime of the test python with `venv`'s packages, preloading `module`.
fn add_runtime(node: &Node, name: &str, venv: &std::path::Path, module: &str) {
    let runtime = roost_registry::Runtime::validate(
        name,
        &python(),
        Some(venv.to_str().unwrap()),
        &[module.into()],
        roost_registry::FsChecks::Full,
    )
    .unwrap();
    node.store().add_runtime(&runtime).unwrap();
}

/// Registers the site of `spec` on `runtime`, straight into the registry.
fn add_on_runtime(node: &Node, mut spec: SiteSpec, runtime: &str) {
    spec.runtime = Some(runtime.into());
    let mut site = spec.validate(roost_registry::FsChecks::Full).unwrap();
    node.store().attach_runtime(&spec, &mut site).unwrap();
    node.store().add(&site).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_preloads_its_packages_and_a_site_venv_layers_above() {
    let node = Node::start().await;
    let root = node.dir.path().join("rt");
    let runtime_venv = venv_with(
        &root.join("runtime-venv"),
        &[("sharedpkg", "WHERE = 'runtime'\n")],
        &[("sharedpkg", "1.0")],
    );
    let site_venv = venv_with(
        &root.join("site-venv"),
        &[
            ("sharedpkg", "WHERE = 'site'\n"),
            ("siteonly", "WHERE = 'site venv'\n"),
        ],
        &[("sharedpkg", "2.0")],
    );
    add_runtime(&node, "shared", &runtime_venv, "sharedpkg");
    let app_dir = root.join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    let app = app_dir.join("app.py");
    std::fs::write(
        &app,
        "import sys\n\
         PRELOADED = 'sharedpkg' in sys.modules\n\
         import sharedpkg\n\
         try:\n\
         \x20   import siteonly\n\
         \x20   SITEONLY = siteonly.WHERE\n\
         except ImportError:\n\
         \x20   SITEONLY = 'missing'\n\
         def application(environ, start_response):\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
         \x20   return [('%s %s %s' % (PRELOADED, sharedpkg.WHERE, SITEONLY)).encode()]\n",
    )
    .unwrap();
    for (name, venv) in [("plainrt", None), ("layered", Some(&site_venv))] {
        let mut spec = node.spec(name, &[&format!("{name}.test")], &app);
        spec.interpreter = venv.map(|v| v.display().to_string());
        add_on_runtime(&node, spec, "shared");
    }
    let answer = |host: &'static str| async move {
        let mut last = String::new();
        for _ in 0..100 {
            match get(node.addr, host, "/").await {
                Ok(r) if r.status == 200 => return r.text(),
                Ok(r) => last = r.text(),
                Err(e) => last = e,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{host} never answered: {last}");
    };
    // Preloaded by the runtime's zygote, before the app imported it.
    assert_eq!(answer("plainrt.test").await, "True runtime missing");
    // The site's venv is layered above (siteonly found); the preloaded package stays
    // the runtime's, and the error log says so.
    assert_eq!(answer("layered.test").await, "True runtime site venv");
    node.error_log_with(
        "layered",
        "sharedpkg: the runtime shared preloads 1.0, the site's virtualenv has 2.0",
    )
    .await;
    node.stop().await;
}

/// A zygote killed while it preloads (an operator, the OOM killer) is not the runtime
/// failing: the worker waiting for it is spawned plainly, and the next one is forked by
/// a zygote again, where a zygote that cannot start leaves the runtime's workers
/// spawned plainly for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_killed_while_it_preloads_is_started_again_at_the_next_need() {
    let node = Node::start().await;
    let root = node.dir.path().join("rt");
    let starts = node.dir.path().join("zygote-starts");
    // The zygote (root, or the node's user) notes its pid, then preloads for a second.
    let slow = format!(
        "import os, time\n\
         with open({:?}, 'a') as f:\n\
         \x20   f.write('%d\\n' % os.getpid())\n\
         time.sleep(1)\n",
        starts.display().to_string()
    );
    let venv = venv_with(&root.join("venv"), &[("slowpkg", &slow)], &[]);
    add_runtime(&node, "slow", &venv, "slowpkg");
    let app = node.app("tester.py");
    add_on_runtime(&node, node.spec("slow", &["slow.test"], &app), "slow");

    // The first request the node routes to the site starts its zygote.
    let addr = node.addr;
    let request = tokio::spawn(async move {
        loop {
            match get(addr, "slow.test", "/pid").await {
                Ok(r) if r.status == 404 => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => return other,
            }
        }
    });
    let zygote_starts = || std::fs::read_to_string(&starts).unwrap_or_default();
    node.eventually("the zygote to start preloading", || async {
        zygote_starts().ends_with('\n')
    })
    .await;
    let zygote: i32 = zygote_starts().trim().parse().unwrap();
    kill(Pid::from_raw(zygote), Signal::SIGKILL).unwrap();
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let node_pid = std::process::id();
    assert_eq!(parent_of(pid_of(&r)), node_pid, "not spawned plainly");

    // The next worker comes from a zygote again (a new one, which preloads anew).
    let _ = get(node.addr, "slow.test", "/exit").await;
    let r = get(node.addr, "slow.test", "/pid").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let parent = parent_of(pid_of(&r));
    assert_ne!(parent, node_pid, "spawned plainly, not by a zygote");
    assert_eq!(
        zygote_starts().lines().last(),
        Some(parent.to_string().as_str()),
        "the worker's parent is not the new zygote"
    );
    node.stop().await;
}
