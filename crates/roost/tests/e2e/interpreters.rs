//! Interpreters and entry points: a virtualenv's python sees its own site-packages,
//! and a gunicorn-style module:callable imports from the site's directory.

use std::process::Command;

use roost_registry::SiteSpec;

use crate::harness::{get, python, Node};

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
    node.add(SiteSpec {
        name: "venv".into(),
        hosts: vec!["venv.test".into()],
        entry: Some("proj.wsgi:app".into()),
        interpreter: Some(venv.display().to_string()),
        directory: Some(root.display().to_string()),
        user: node.user.as_ref().map(|u| u.name.clone()),
        ..SiteSpec::default()
    })
    .await;
    let r = get(node.addr, "venv.test", "/").await.unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        r.text(),
        node.log("venv", "error.log")
    );
    assert_eq!(
        r.text(),
        format!("imported from the venv|{}", venv.display())
    );
    node.stop().await;
}
