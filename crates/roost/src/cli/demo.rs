//! `roost demo`: a node with three bundled, stdlib-only example sites on a registry
//! of its own, so a newcomer sees roost work with one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use roost_registry::{FsChecks, SiteSpec, SqliteStore};

use super::{absolute, data_dir, is_root, run_node};
use crate::server::NodeConfig;

const APPS: [(&str, &str, &str); 3] = [
    ("hello", "hello.py", include_str!("../../demo/hello.py")),
    ("echo", "echo.py", include_str!("../../demo/echo.py")),
    ("stream", "stream.py", include_str!("../../demo/stream.py")),
];

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for the demo's apps, registry and logs. Default: the data folder's demo/.
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.dir {
        Some(d) => absolute(d)?,
        None if is_root() => PathBuf::from("/var/lib/roost/demo"),
        None => data_dir()?.join("demo"),
    };
    let apps = dir.join("apps");
    std::fs::create_dir_all(&apps).with_context(|| format!("cannot create {}", apps.display()))?;
    // As root the demo sites run as `nobody`, who must reach the apps and the loader.
    for d in [&dir, &apps] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot open up {}", d.display()))?;
    }
    let user = is_root().then(|| "nobody".to_owned());
    let registry = dir.join("registry.db");
    let mut store = SqliteStore::open(&registry)?;
    let python = super::site::default_interpreter()?;
    for (name, file, source) in APPS {
        let path = apps.join(file);
        std::fs::write(&path, source)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let site = SiteSpec {
            name: name.to_owned(),
            hosts: vec![format!("{name}.localhost")],
            entry: Some(path.display().to_string()),
            interpreter: Some(python.clone()),
            user: user.clone(),
            idle_timeout: Some(std::time::Duration::from_secs(30)),
            // One site shows per-site preloading: its workers fork from a template.
            preload: Some(name == "echo"),
            ..SiteSpec::default()
        }
        .validate(FsChecks::Full)?;
        match store.get(name)? {
            Some(_) => store.replace(&site)?,
            None => store.add(&site)?,
        }
    }
    drop(store);

    let url = format!("http://{}", args.listen);
    println!("roost demo: three sites in {}", registry.display());
    println!();
    println!("  curl -H 'Host: hello.localhost' {url}/");
    println!("  curl -H 'Host: echo.localhost' --data 'message=hi' {url}/");
    println!("  curl -N -H 'Host: stream.localhost' '{url}/?chunks=20'");
    println!("  curl -i -H 'Host: nothing.localhost' {url}/     # unknown host: 404");
    println!();
    println!("Workers start on the first request and exit after 30 s idle. echo preloads:");
    println!("its app is imported once in a template (ps shows roost-template), its workers");
    println!("fork from it.");
    if is_root() {
        println!("Running as root: the demo sites run as the user nobody.");
    }
    println!(
        "Logs: {}/<site>/. Change sites live from another terminal, e.g.:",
        dir.join("logs").display()
    );
    println!(
        "  roost --registry sqlite:{} site set hello --threads 4",
        registry.display()
    );
    println!("Stop with Ctrl-C.");
    println!();
    let mut config = NodeConfig::new(registry, dir.join("logs"), dir.join("run"));
    config.cgroup_name = "roost-demo".to_owned();
    run_node(config, &[args.listen], None)?;
    Ok(ExitCode::SUCCESS)
}
