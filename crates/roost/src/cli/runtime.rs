//! `roost runtime add|rm|list`: interpreters with shared, preloaded packages.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use roost_registry::{FsChecks, Runtime, SqliteStore};

#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// Register a runtime: sites naming it fork from a zygote that preloaded its modules.
    Add {
        name: String,
        /// The base python3 (a path, or a name on PATH).
        #[arg(long, default_value = "python3")]
        python: String,
        /// A virtualenv of shared packages, owned by root and writable by nobody else.
        #[arg(long)]
        venv: Option<String>,
        /// Modules its zygote imports once for all workers, e.g. flask,django.
        #[arg(long, value_delimiter = ',')]
        preload: Vec<String>,
    },
    /// Remove a runtime no site uses.
    Rm { name: String },
    /// List the runtimes.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(registry: &Path, command: RuntimeCommand) -> anyhow::Result<ExitCode> {
    let mut store = SqliteStore::open(registry)?;
    match command {
        RuntimeCommand::Add {
            name,
            python,
            venv,
            preload,
        } => {
            let python = super::site::find_interpreter(&python)?;
            let venv = venv
                .map(|v| super::absolute(v.into()).map(|p| p.display().to_string()))
                .transpose()?;
            let runtime =
                Runtime::validate(&name, &python, venv.as_deref(), &preload, FsChecks::Full)?;
            store.add_runtime(&runtime)?;
            println!("added runtime {name} ({})", runtime.executable().display());
        }
        RuntimeCommand::Rm { name } => {
            store.remove_runtime(&name)?;
            println!("removed runtime {name}");
        }
        RuntimeCommand::List { json } => {
            let runtimes = store.runtimes()?;
            if json {
                let ok: Vec<&Runtime> = runtimes.iter().flatten().collect();
                println!("{}", serde_json::to_string_pretty(&ok)?);
            } else if runtimes.is_empty() {
                println!("no runtimes; sites use their own interpreter with the standard preloads");
            } else {
                for runtime in &runtimes {
                    match runtime {
                        Ok(r) => println!(
                            "{:16} {}  preload: {}",
                            r.name,
                            r.executable().display(),
                            if r.preload.is_empty() {
                                "-".into()
                            } else {
                                r.preload.join(",")
                            }
                        ),
                        Err(e) => eprintln!("warning: {e}"),
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
