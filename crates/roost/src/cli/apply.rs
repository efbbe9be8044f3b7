//! `roost apply FILE`: makes the registry hold the sites of a site file (TOML), in one
//! transaction, after every site validated: all of it or nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use roost_registry::{parse_site_file, Applied, FsChecks, SqliteStore};

use super::site::{fill_defaults, resolve_paths, warn_about};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The site file: one `[site.NAME]` table per site, with the keys of `site add`
    /// (docs/configure.md). Relative paths in it are relative to its folder; `-` reads
    /// standard input (relative paths then from the current folder).
    pub file: PathBuf,
    /// Also remove the sites of the registry that the file does not name.
    #[arg(long)]
    pub prune: bool,
    /// Say what would change, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(registry: &Path, min_uid: u32, args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let stdin = args.file.as_os_str() == "-";
    let text = if stdin {
        std::io::read_to_string(std::io::stdin())
            .context("cannot read the site file from standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read the site file {}", args.file.display()))?
    };
    let specs = parse_site_file(&text).with_context(|| format!("in {}", args.file.display()))?;
    if specs.is_empty() && args.prune {
        // Almost surely the wrong file; emptying a registry is `site rm`'s job.
        bail!(
            "{} names no site, and --prune would remove every site of the registry; nothing was changed",
            args.file.display()
        );
    }
    let base = if stdin {
        super::current_dir()?
    } else {
        super::absolute(args.file.clone())?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"))
    };
    let mut store = SqliteStore::open(registry)?;
    // Every site is checked before anything is written; every problem is reported.
    let mut sites = Vec::with_capacity(specs.len());
    let mut problems = Vec::new();
    for mut spec in specs {
        let site = resolve_paths(&mut spec, &base)
            .and_then(|()| fill_defaults(&mut spec, &base))
            .and_then(|()| Ok(spec.validate_for(FsChecks::Full, min_uid)?))
            .and_then(|mut site| {
                store.attach_runtime(&spec, &mut site)?;
                Ok(site)
            });
        match site {
            Ok(site) => sites.push(site),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of the site file's sites cannot be accepted; nothing was changed:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    for site in &sites {
        warn_about(site);
    }
    let applied = store
        .apply(&sites, args.prune, args.dry_run)
        .context("nothing was changed")?;
    if args.json {
        let mut value = serde_json::to_value(&applied)?;
        value["dry_run"] = args.dry_run.into();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", summary(&applied, args.dry_run));
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(applied: &Applied, dry_run: bool) -> String {
    let mut out = String::new();
    let lines = [
        ("added", &applied.added),
        ("changed", &applied.changed),
        ("removed", &applied.removed),
    ];
    for (what, names) in lines {
        if !names.is_empty() {
            let verb = if dry_run {
                format!("would be {what}")
            } else {
                what.to_owned()
            };
            out.push_str(&format!("{verb}: {}\n", some_names(names)));
        }
    }
    // The unchanged ones by count: a fleet's file names thousands (--json lists them).
    match applied.unchanged.len() {
        0 => {}
        1 => out.push_str(&format!("unchanged: {}\n", applied.unchanged[0])),
        n => out.push_str(&format!("unchanged: {n} sites\n")),
    }
    if out.is_empty() {
        out.push_str("the site file names no site, and nothing was pruned\n");
    } else if !dry_run && (applied.added.len() + applied.changed.len() + applied.removed.len()) > 0
    {
        out.push_str("running nodes pick the changes up within a second\n");
    }
    out
}

/// Names listed in a summary line before the rest are counted.
const NAMES_LISTED: usize = 10;

/// `a, b, c`; past [`NAMES_LISTED`], the first of them and how many more (a fleet's
/// file adds thousands at once; `--json` lists them all).
fn some_names(names: &[String]) -> String {
    if names.len() <= NAMES_LISTED {
        return names.join(", ");
    }
    format!(
        "{} sites: {} and {} more (--json lists them)",
        names.len(),
        names[..NAMES_LISTED].join(", "),
        names.len() - NAMES_LISTED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_lists_a_few_names_and_counts_the_rest() {
        let named = |n: usize| -> Vec<String> { (0..n).map(|i| format!("s{i}")).collect() };
        let applied = Applied {
            added: named(5_000),
            changed: named(2),
            unchanged: named(3),
            removed: Vec::new(),
        };
        assert_eq!(
            summary(&applied, false),
            "added: 5000 sites: s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 and 4990 more (--json lists them)\n\
             changed: s0, s1\n\
             unchanged: 3 sites\n\
             running nodes pick the changes up within a second\n"
        );
    }
}
