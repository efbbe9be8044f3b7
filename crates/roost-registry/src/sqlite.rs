//! The embedded registry: one SQLite file, versioned migrations run on open.
//!
//! Writers (the CLI, `roost apply`) and the node may be different processes; WAL mode
//! lets the node read while a writer commits, and `PRAGMA data_version` tells the node's
//! watcher cheaply that another connection committed something.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use std::sync::Arc;

use crate::{FsChecks, Registry, Runtime, Site, SiteSpec, ValidationError};

/// Schema steps, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: a released step is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: sites and their host names.
    "CREATE TABLE sites (
        name TEXT PRIMARY KEY NOT NULL,
        entry TEXT NOT NULL,
        interpreter TEXT NOT NULL,
        directory TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        processes_max INTEGER NOT NULL,
        processes_min INTEGER NOT NULL,
        threads INTEGER NOT NULL,
        idle_timeout_ms INTEGER NOT NULL,
        queue_max INTEGER NOT NULL,
        queue_timeout_ms INTEGER NOT NULL,
        request_timeout_ms INTEGER NOT NULL,
        max_requests INTEGER NOT NULL,
        body_max INTEGER NOT NULL,
        memory_max INTEGER NOT NULL,
        memory_worker_soft INTEGER,
        pids_max INTEGER NOT NULL,
        cpu_weight INTEGER NOT NULL,
        updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    );
    CREATE TABLE hosts (
        host TEXT PRIMARY KEY NOT NULL,
        site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
        position INTEGER NOT NULL
    );
    CREATE INDEX hosts_by_site ON hosts(site);",
    // 2: the Unix user and group a site runs as.
    "ALTER TABLE sites ADD COLUMN run_user TEXT;
     ALTER TABLE sites ADD COLUMN run_group TEXT;",
    // 3: runtimes, and the runtime a site names.
    "CREATE TABLE runtimes (
        name TEXT PRIMARY KEY NOT NULL,
        python TEXT NOT NULL,
        venv TEXT,
        preload TEXT NOT NULL DEFAULT '[]'
     );
     ALTER TABLE sites ADD COLUMN runtime TEXT;",
    // 4: per-site preloading (a template process per site).
    "ALTER TABLE sites ADD COLUMN preload INTEGER NOT NULL DEFAULT 0;",
    // 5: a revision per site, moved by every write of its row or its hosts, whoever
    // writes (triggers, so a hand-written UPDATE counts too), never given twice: a
    // reader that knows what it read last reads again only the sites that changed.
    "ALTER TABLE sites ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE revisions (last INTEGER NOT NULL);
     INSERT INTO revisions VALUES (0);
     CREATE TRIGGER site_added AFTER INSERT ON sites BEGIN
        UPDATE revisions SET last = last + 1;
        UPDATE sites SET revision = (SELECT last FROM revisions) WHERE rowid = NEW.rowid;
     END;
     CREATE TRIGGER site_changed AFTER UPDATE ON sites WHEN NEW.revision IS OLD.revision BEGIN
        UPDATE revisions SET last = last + 1;
        UPDATE sites SET revision = (SELECT last FROM revisions) WHERE rowid = NEW.rowid;
     END;
     CREATE TRIGGER host_added AFTER INSERT ON hosts BEGIN
        UPDATE revisions SET last = last + 1;
        UPDATE sites SET revision = (SELECT last FROM revisions) WHERE name = NEW.site;
     END;
     CREATE TRIGGER host_changed AFTER UPDATE ON hosts BEGIN
        UPDATE revisions SET last = last + 1;
        UPDATE sites SET revision = (SELECT last FROM revisions)
            WHERE name IN (OLD.site, NEW.site);
     END;
     CREATE TRIGGER host_removed AFTER DELETE ON hosts BEGIN
        UPDATE revisions SET last = last + 1;
        UPDATE sites SET revision = (SELECT last FROM revisions) WHERE name = OLD.site;
     END;",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the registry {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the registry {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the registry folder {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry schema version {found} is newer than this roost supports ({supported}); upgrade roost")]
    NewerSchema { found: i64, supported: usize },
    #[error("migrating the registry to schema version {version} failed")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("registry query failed")]
    Query(#[from] rusqlite::Error),
    #[error("a site named {0:?} already exists")]
    SiteExists(String),
    #[error("no site named {0:?}")]
    SiteNotFound(String),
    #[error("host {host} already belongs to site {owner:?}")]
    HostTaken { host: String, owner: String },
    /// A site file's hosts that other sites hold: every one of them, so that one
    /// round of edits can mend the file.
    #[error("{}", taken_hosts(.0))]
    HostsTaken(Vec<TakenHost>),
    #[error("no runtime named {0:?}; see `roost runtime list`")]
    NoSuchRuntime(String),
    #[error("a runtime named {0:?} already exists")]
    RuntimeExists(String),
    #[error("runtime {name:?} is used by sites {sites:?}; move them first")]
    RuntimeInUse { name: String, sites: Vec<String> },
}

// Writes use BEGIN IMMEDIATE: they read before they write, and a deferred transaction
// that must upgrade its read lock fails at once (SQLITE_BUSY) when another process
// committed meanwhile, instead of waiting out the busy timeout.

/// Sites read from the database; rows that no longer validate are reported, not fatal.
#[derive(Debug, Default)]
pub struct Loaded {
    pub registry: Registry,
    /// The rows read that do not validate: all of them on a whole read; on a read of
    /// what changed ([`SqliteStore::load_since`]), those among the changes.
    pub rejected: Vec<ValidationError>,
}

/// What a reader read last, for [`SqliteStore::load_since`] to read again only the
/// sites whose revision moved. A watcher that read every site at each change spent
/// 71 ms of CPU a change at 8,000 sites.
#[derive(Debug, Default)]
pub struct LastRead {
    /// The runtimes as read; `None` before the first read. Sites hold their runtime:
    /// when one changes, every site is read again.
    runtimes: Option<Vec<Result<Runtime, ValidationError>>>,
    /// Each site's revision as read, valid or not.
    revisions: HashMap<String, i64>,
    registry: Registry,
}

impl LastRead {
    /// The next read reads every site (revisions of another file mean nothing), and
    /// still shares the sites that are the same with the last one's.
    pub fn forget_revisions(&mut self) {
        self.runtimes = None;
    }
}

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the registry file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        create_private(path)?;
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(open_err)?;
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the connection after moving everything in the write-ahead log into the
    /// database and emptying the log: a file that replaces this one (renamed over it)
    /// finds no frames of this one in the log SQLite pairs with it by name.
    pub fn close(self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        self.conn.close().map_err(|(_, e)| StoreError::from(e))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current as usize > MIGRATIONS.len() {
            return Err(StoreError::NewerSchema {
                found: current,
                supported: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i + 1;
            let step = |conn: &mut Connection| -> rusqlite::Result<()> {
                let tx = conn.transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", version as i64)?;
                tx.commit()
            };
            step(&mut self.conn).map_err(|source| StoreError::Migrate { version, source })?;
        }
        Ok(())
    }

    /// A number that changes whenever another connection commits to the file.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// Every site, validated without file system checks, with its runtime attached.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        self.load_since(&mut LastRead::default())
    }

    /// Every site, as [`SqliteStore::load`], reading only the sites that changed since
    /// `last` (all of them the first time, or when a runtime changed); `last` becomes
    /// this read. A site that is the same as in `last` is `last`'s `Arc`: the node
    /// compares snapshots by pointer.
    pub fn load_since(&self, last: &mut LastRead) -> Result<Loaded, StoreError> {
        // One read transaction: the sites, their hosts and the runtimes of one commit.
        let tx = self.conn.unchecked_transaction()?;
        let runtimes = read_runtimes(&tx)?;
        let revisions = read_revisions(&tx)?;
        let mut loaded = Loaded::default();
        let changed: Vec<&str> = (revisions.iter())
            .filter(|(name, revision)| last.revisions.get(*name) != Some(revision))
            .map(|(name, _)| name.as_str())
            .collect();
        // Site by site costs about twice a whole read's share of each (17 µs against 10
        // at 8,000 sites): past half of them changed (a bulk `roost apply`), read all.
        let whole =
            last.runtimes.as_ref() != Some(&runtimes) || changed.len() * 2 > revisions.len();
        let specs = if whole {
            read_specs(&tx, None)?
        } else {
            let mut specs = Vec::new();
            for name in changed {
                specs.extend(read_specs(&tx, Some(name))?);
            }
            specs
        };
        drop(tx);
        // Nothing fails from here: `last` becomes this read.
        let attachable: BTreeMap<&str, Arc<Runtime>> = (runtimes.iter())
            .filter_map(|r| match r {
                Ok(r) => Some((r.name.as_str(), Arc::new(r.clone()))),
                Err(e) => {
                    if whole {
                        loaded.rejected.push(e.clone());
                    }
                    None
                }
            })
            .collect();
        let mut sites = std::mem::take(&mut last.registry.sites);
        let before = if whole {
            std::mem::take(&mut sites)
        } else {
            sites.retain(|name, _| revisions.contains_key(name));
            BTreeMap::new()
        };
        for spec in specs {
            let previous = sites
                .remove(&spec.name)
                .or_else(|| before.get(&spec.name).cloned());
            match validate_with_runtime(&spec, &attachable) {
                Ok(site) => {
                    let site = match previous {
                        Some(same) if *same == site => same,
                        _ => Arc::new(site),
                    };
                    sites.insert(spec.name, site);
                }
                Err(e) => loaded.rejected.push(e),
            }
        }
        last.registry.sites = sites;
        last.runtimes = Some(runtimes);
        last.revisions = revisions;
        loaded.registry = last.registry.clone();
        Ok(loaded)
    }

    /// One site as stored, before validation (so `site show` works on a broken row).
    pub fn get(&self, name: &str) -> Result<Option<SiteSpec>, StoreError> {
        Ok(self.read_specs(Some(name))?.pop())
    }

    /// Adds a new site; its name and hosts must be free.
    pub fn add(&mut self, site: &Site) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if exists(&tx, &site.name)? {
            return Err(StoreError::SiteExists(site.name.clone()));
        }
        write_site(&tx, site)?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces a stored site with `site` (same name), hosts included.
    pub fn replace(&mut self, site: &Site) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !exists(&tx, &site.name)? {
            return Err(StoreError::SiteNotFound(site.name.clone()));
        }
        tx.execute("DELETE FROM hosts WHERE site = ?1", [&site.name])?;
        tx.execute("DELETE FROM sites WHERE name = ?1", [&site.name])?;
        write_site(&tx, site)?;
        tx.commit()?;
        Ok(())
    }

    /// Every runtime, each validated without file system checks.
    pub fn runtimes(&self) -> Result<Vec<Result<Runtime, ValidationError>>, StoreError> {
        read_runtimes(&self.conn)
    }

    /// Attaches the runtime a spec names to its validated site (writes need it).
    pub fn attach_runtime(&self, spec: &SiteSpec, site: &mut Site) -> Result<(), StoreError> {
        site.runtime = match &spec.runtime {
            None => None,
            Some(name) => {
                let found = self
                    .runtimes()?
                    .into_iter()
                    .flatten()
                    .find(|r| &r.name == name)
                    .ok_or_else(|| StoreError::NoSuchRuntime(name.clone()))?;
                Some(Arc::new(found))
            }
        };
        Ok(())
    }

    pub fn add_runtime(&mut self, runtime: &Runtime) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM runtimes WHERE name = ?1",
                [&runtime.name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::RuntimeExists(runtime.name.clone()));
        }
        tx.execute(
            "INSERT INTO runtimes (name, python, venv, preload) VALUES (?1, ?2, ?3, ?4)",
            params![
                runtime.name,
                runtime.python.display().to_string(),
                runtime.venv.as_ref().map(|v| v.display().to_string()),
                serde_json::to_string(&runtime.preload).expect("strings serialise"),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a runtime no site uses.
    pub fn remove_runtime(&mut self, name: &str) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let users: Vec<String> = {
            let mut stmt = tx.prepare("SELECT name FROM sites WHERE runtime = ?1 ORDER BY name")?;
            let rows = stmt.query_map([name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Err(StoreError::RuntimeInUse {
                name: name.to_owned(),
                sites: users,
            });
        }
        if tx.execute("DELETE FROM runtimes WHERE name = ?1", [name])? == 0 {
            return Err(StoreError::NoSuchRuntime(name.to_owned()));
        }
        tx.commit()?;
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM hosts WHERE site = ?1", [name])?;
        if tx.execute("DELETE FROM sites WHERE name = ?1", [name])? == 0 {
            return Err(StoreError::SiteNotFound(name.to_owned()));
        }
        tx.commit()?;
        Ok(())
    }

    fn read_specs(&self, only: Option<&str>) -> Result<Vec<SiteSpec>, StoreError> {
        read_specs(&self.conn, only)
    }

    /// Makes the registry hold `sites` (a site file's), in one transaction: new names
    /// are added, stored sites that differ are replaced, and with `prune` the sites not
    /// among them are removed. A host may move between sites of the same apply. Any
    /// failure (a host still held by a site that stays, say) writes nothing; with
    /// `dry_run` nothing is written either, and the outcome says what would be.
    pub fn apply(
        &mut self,
        sites: &[Site],
        prune: bool,
        dry_run: bool,
    ) -> Result<Applied, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before: BTreeMap<String, SiteSpec> = read_specs(&tx, None)?
            .into_iter()
            .map(|spec| (spec.name.clone(), spec))
            .collect();
        let wanted: BTreeSet<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        // A site stored as the file has it is not written again: the write would move
        // its revision, and each node would read it again (a file of 10,000 sites with
        // a few changes had them read all 10,000). One that differs only in what the
        // store rounds (a duration's microseconds) is written and compared below.
        let as_stored: BTreeSet<&str> = (sites.iter())
            .filter(|site| before.get(&site.name) == Some(&SiteSpec::from_site(site)))
            .map(|site| site.name.as_str())
            .collect();
        let taken = taken_by_others(&tx, sites, &wanted, prune)?;
        if !taken.is_empty() {
            return Err(StoreError::HostsTaken(taken));
        }
        let mut applied = Applied::default();
        // Every row to replace or remove goes first, so hosts can change hands.
        for name in before.keys() {
            let keep = wanted.contains(name.as_str());
            if (keep && !as_stored.contains(name.as_str())) || (!keep && prune) {
                tx.execute("DELETE FROM hosts WHERE site = ?1", [name])?;
                tx.execute("DELETE FROM sites WHERE name = ?1", [name])?;
            }
            if !keep && prune {
                applied.removed.push(name.clone());
            }
        }
        for site in sites {
            if as_stored.contains(site.name.as_str()) {
                applied.unchanged.push(site.name.clone());
                continue;
            }
            write_site(&tx, site)?;
            let Some(old) = before.get(&site.name) else {
                applied.added.push(site.name.clone());
                continue;
            };
            let now = read_specs(&tx, Some(&site.name))?.pop();
            if now.as_ref() == Some(old) {
                applied.unchanged.push(site.name.clone());
            } else {
                applied.changed.push(site.name.clone());
            }
        }
        // Rows rewritten as they were are not a change: no commit, so no node reloads.
        let changes = applied.added.len() + applied.changed.len() + applied.removed.len();
        if !dry_run && changes > 0 {
            tx.commit()?;
        }
        for names in [
            &mut applied.added,
            &mut applied.changed,
            &mut applied.unchanged,
        ] {
            names.sort();
        }
        Ok(applied)
    }
}

/// A host a site file gives a site while another holds it: a site of the registry
/// the file does not replace, or another site of the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenHost {
    pub host: String,
    /// The site the file gives it to.
    pub site: String,
    /// The site that holds it.
    pub owner: String,
    /// The owner is a site of the same file, named before.
    pub in_file: bool,
}

impl std::fmt::Display for TakenHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let TakenHost {
            host, site, owner, ..
        } = self;
        if self.in_file {
            write!(
                f,
                "host {host} is named by site {owner:?} and by site {site:?}"
            )
        } else {
            write!(
                f,
                "host {host} of site {site:?} already belongs to site {owner:?}"
            )
        }
    }
}

fn taken_hosts(taken: &[TakenHost]) -> String {
    match taken {
        [one] => one.to_string(),
        many => {
            let lines: Vec<String> = many.iter().map(|t| format!("\n  {t}")).collect();
            format!("{} hosts are taken:{}", many.len(), lines.concat())
        }
    }
}

/// The hosts `sites` (a site file's) give that are held by another site: one of the
/// registry that stays (not among `wanted`, not pruned), or one of the file before.
fn taken_by_others(
    tx: &Transaction<'_>,
    sites: &[Site],
    wanted: &BTreeSet<&str>,
    prune: bool,
) -> Result<Vec<TakenHost>, StoreError> {
    let mut stmt = tx.prepare("SELECT host, site FROM hosts")?;
    let owners = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<HashMap<String, String>, _>>()?;
    let mut named: HashMap<String, &str> = HashMap::new();
    let mut taken = Vec::new();
    for site in sites {
        for host in site.hosts.iter().map(|h| h.to_string()) {
            let owner = match named.get(&host) {
                Some(first) => Some((first.to_string(), true)),
                None => (owners.get(&host))
                    .filter(|owner| !prune && !wanted.contains(owner.as_str()))
                    .map(|owner| (owner.clone(), false)),
            };
            named.entry(host.clone()).or_insert(&site.name);
            if let Some((owner, in_file)) = owner {
                let site = site.name.clone();
                taken.push(TakenHost {
                    host,
                    site,
                    owner,
                    in_file,
                });
            }
        }
    }
    Ok(taken)
}

/// What [`SqliteStore::apply`] did (or would do): site names, each list sorted.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
}

/// The queries [`read_specs`] runs: of the sites' rows, then of their hosts; of one
/// site by its name when `one`. Two texts, not `?1 IS NULL OR name = ?1`: SQLite uses
/// no index for that, so each read of one site scanned the table, and `apply`, which
/// reads each site it writes, took time in the square of the sites (10 s for 10,000).
fn specs_queries(one: bool) -> (String, String) {
    let (sites, hosts) = if one {
        ("WHERE name = ?1", "WHERE site = ?1")
    } else {
        ("", "")
    };
    (
        format!(
            "SELECT name, entry, interpreter, directory, env, processes_max, processes_min,
                threads, idle_timeout_ms, queue_max, queue_timeout_ms, request_timeout_ms,
                max_requests, body_max, memory_max, memory_worker_soft, pids_max, cpu_weight,
                run_user, run_group, runtime, preload
             FROM sites {sites} ORDER BY name"
        ),
        format!("SELECT site, host FROM hosts {hosts} ORDER BY site, position"),
    )
}

fn read_runtimes(conn: &Connection) -> Result<Vec<Result<Runtime, ValidationError>>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT name, python, venv, preload FROM runtimes ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, python, venv, preload) = row?;
        let preload: Vec<String> = serde_json::from_str(&preload)
            .unwrap_or_else(|_| vec!["<unreadable preload list>".into()]);
        out.push(Runtime::validate(
            &name,
            &python,
            venv.as_deref(),
            &preload,
            FsChecks::Skip,
        ));
    }
    Ok(out)
}

/// Each site's revision, by name.
fn read_revisions(conn: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT name, revision FROM sites")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// `spec` validated without file system checks, with the runtime it names attached.
fn validate_with_runtime(
    spec: &SiteSpec,
    runtimes: &BTreeMap<&str, Arc<Runtime>>,
) -> Result<Site, ValidationError> {
    let mut site = spec.validate(FsChecks::Skip)?;
    if let Some(name) = &spec.runtime {
        let runtime = runtimes.get(name.as_str()).ok_or_else(|| ValidationError {
            site: spec.name.clone(),
            field: "runtime",
            problem: format!("runtime {name:?} does not exist (or is invalid)"),
        })?;
        site.runtime = Some(runtime.clone());
    }
    Ok(site)
}

fn read_specs(conn: &Connection, only: Option<&str>) -> Result<Vec<SiteSpec>, StoreError> {
    let (sites_query, hosts_query) = specs_queries(only.is_some());
    let mut stmt = conn.prepare_cached(&sites_query)?;
    let ms = |v: i64| Some(Duration::from_millis(v.max(0) as u64));
    let rows = stmt.query_map(rusqlite::params_from_iter(only), |r| {
        let env_text: String = r.get(4)?;
        Ok(SiteSpec {
            name: r.get(0)?,
            hosts: Vec::new(),
            entry: Some(r.get(1)?),
            interpreter: Some(r.get(2)?),
            directory: Some(r.get(3)?),
            // A corrupt env column becomes an env entry that fails validation
            // with the reason, instead of an error for the whole registry.
            env: serde_json::from_str(&env_text)
                .unwrap_or_else(|e| [(format!("<unreadable env: {e}>"), String::new())].into()),
            processes_max: Some(r.get(5)?),
            processes_min: Some(r.get(6)?),
            threads: Some(r.get(7)?),
            idle_timeout: ms(r.get(8)?),
            queue_max: Some(r.get(9)?),
            queue_timeout: ms(r.get(10)?),
            request_timeout: ms(r.get(11)?),
            max_requests: Some(r.get::<_, i64>(12)?.max(0) as u64),
            body_max: Some(r.get::<_, i64>(13)?.max(0) as u64),
            memory_max: Some(r.get::<_, i64>(14)?.max(0) as u64),
            memory_worker_soft: Some(r.get::<_, Option<i64>>(15)?.unwrap_or(0).max(0) as u64),
            pids_max: Some(r.get(16)?),
            cpu_weight: Some(r.get(17)?),
            user: r.get(18)?,
            group: r.get(19)?,
            runtime: r.get(20)?,
            preload: Some(r.get(21)?),
        })
    })?;
    let mut specs = rows.collect::<Result<Vec<_>, _>>()?;
    let mut hosts = conn.prepare_cached(&hosts_query)?;
    let mut rows = hosts.query(rusqlite::params_from_iter(only))?;
    while let Some(row) = rows.next()? {
        let (site, host): (String, String) = (row.get(0)?, row.get(1)?);
        if let Ok(i) = specs.binary_search_by(|s| s.name.as_str().cmp(&site)) {
            specs[i].hosts.push(host);
        }
    }
    Ok(specs)
}

fn exists(tx: &Transaction<'_>, name: &str) -> Result<bool, StoreError> {
    Ok(tx
        .query_row("SELECT 1 FROM sites WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some())
}

fn write_site(tx: &Transaction<'_>, site: &Site) -> Result<(), StoreError> {
    if let Some(rt) = &site.runtime {
        let known = tx
            .query_row("SELECT 1 FROM runtimes WHERE name = ?1", [&rt.name], |_| {
                Ok(())
            })
            .optional()?
            .is_some();
        if !known {
            return Err(StoreError::NoSuchRuntime(rt.name.clone()));
        }
    }
    let p = &site.pool;
    let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let env = serde_json::to_string(&site.env).expect("a map of strings always serialises");
    tx.execute(
        "INSERT INTO sites (name, entry, interpreter, directory, env, processes_max,
            processes_min, threads, idle_timeout_ms, queue_max, queue_timeout_ms,
            request_timeout_ms, max_requests, body_max, memory_max, memory_worker_soft,
            pids_max, cpu_weight, run_user, run_group, runtime, preload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22)",
        params![
            site.name,
            site.entry.to_text(),
            site.interpreter.display().to_string(),
            site.directory.display().to_string(),
            env,
            p.processes_max,
            p.processes_min,
            p.threads,
            ms(p.idle_timeout),
            p.queue_max,
            ms(p.queue_timeout),
            ms(p.request_timeout),
            p.max_requests as i64,
            p.body_max as i64,
            p.memory_max as i64,
            p.memory_worker_soft.map(|v| v as i64),
            p.pids_max,
            p.cpu_weight,
            site.user,
            site.group,
            site.runtime.as_ref().map(|r| r.name.clone()),
            p.preload,
        ],
    )?;
    for (position, host) in site.hosts.iter().enumerate() {
        let host = host.to_string();
        let owner: Option<String> = tx
            .query_row("SELECT site FROM hosts WHERE host = ?1", [&host], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(owner) = owner {
            return Err(StoreError::HostTaken { host, owner });
        }
        tx.execute(
            "INSERT INTO hosts (host, site, position) VALUES (?1, ?2, ?3)",
            params![host, site.name, position as i64],
        )?;
    }
    Ok(())
}

/// A new registry is made readable by its owner alone: it holds every site's
/// environment, their secrets (database passwords, signing keys), and on a shared host
/// the tenants are other users. SQLite gives its write-ahead log and shared-memory
/// index the database file's mode. An existing registry keeps its mode (the node warns
/// at start when others can read it).
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The registry's files (the database, its write-ahead log and shared-memory index)
/// that users other than its owner and group can read.
pub fn readable_by_others(path: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            PathBuf::from(file)
        })
        .filter(|file| crate::owner::others_have(file, 0o004))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_site_is_read_by_its_index_not_a_scan_of_every_site() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("registry.db")).unwrap();
        let (sites, hosts) = specs_queries(true);
        for query in [sites, hosts] {
            let mut plan = store
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
                .unwrap();
            let steps: Vec<String> = plan
                .query_map(["a"], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                steps.iter().all(|s| !s.starts_with("SCAN"))
                    && steps.iter().any(|s| s.starts_with("SEARCH")),
                "{query}: {steps:?}"
            );
        }
    }

    #[test]
    fn a_new_registry_and_its_log_are_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let mut store = SqliteStore::open(&path).unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("registry.db{suffix}"));
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        assert!(readable_by_others(&path).is_empty());
        drop(store);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(readable_by_others(&path), vec![path]);
    }

    fn site(dir: &Path, name: &str, hosts: &[&str]) -> Site {
        let entry = dir.join(format!("{name}.py"));
        std::fs::write(&entry, "").unwrap();
        SiteSpec {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            entry: Some(entry.display().to_string()),
            interpreter: Some("/bin/sh".into()),
            env: [("GREETING".into(), "hi".into())].into(),
            memory_worker_soft: Some(100 << 20),
            ..SiteSpec::default()
        }
        .validate(FsChecks::Full)
        .unwrap()
    }

    #[test]
    fn a_closed_store_leaves_nothing_in_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        // Another connection keeps the log from going with the close.
        let other = SqliteStore::open(&path).unwrap();
        let mut store = SqliteStore::open(&path).unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        let wal = dir.path().join("registry.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        store.close().unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        assert!(other.load().unwrap().registry.sites.contains_key("a"));
    }

    #[test]
    fn sites_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/registry.db");
        let a = site(dir.path(), "a", &["a.test", "*.a.test"]);
        SqliteStore::open(&path).unwrap().add(&a).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.rejected.is_empty());
        assert_eq!(*loaded.registry.sites["a"], a);
    }

    #[test]
    fn apply_adds_changes_keeps_prunes_and_moves_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        store
            .add(&site(dir.path(), "keep", &["keep.test"]))
            .unwrap();
        store
            .add(&site(dir.path(), "change", &["moving.test"]))
            .unwrap();
        store
            .add(&site(dir.path(), "gone", &["gone.test"]))
            .unwrap();
        // moving.test changes hands within one apply; "gone" is not in the file.
        let file = [
            site(dir.path(), "keep", &["keep.test"]),
            site(dir.path(), "change", &["change.test"]),
            site(dir.path(), "new", &["moving.test"]),
        ];
        let before = store.load().unwrap().registry;
        let dry = store.apply(&file, true, true).unwrap();
        assert_eq!(store.load().unwrap().registry, before, "a dry run wrote");
        let revisions = read_revisions(&store.conn).unwrap();
        let applied = store.apply(&file, false, false).unwrap();
        // A site as stored is not written: its revision stays, and nodes do not read it.
        let moved = read_revisions(&store.conn).unwrap();
        assert_eq!(
            moved["keep"], revisions["keep"],
            "an unchanged site was written"
        );
        assert_ne!(moved["change"], revisions["change"]);
        assert_eq!(
            applied,
            Applied {
                added: vec!["new".into()],
                changed: vec!["change".into()],
                unchanged: vec!["keep".into()],
                removed: vec![],
            }
        );
        assert_eq!(
            dry,
            Applied {
                removed: vec!["gone".into()],
                ..applied
            }
        );
        let loaded = store.load().unwrap().registry;
        assert_eq!(loaded.sites.len(), 4, "without prune, gone stays");
        assert_eq!(loaded.sites["new"].hosts[0].to_string(), "moving.test");
        // data_version moves with other connections' commits: what a node watches.
        let watcher = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let version = watcher.data_version().unwrap();
        let same = store.apply(&file, false, false).unwrap();
        assert_eq!(same.unchanged.len(), 3);
        assert_eq!(
            watcher.data_version().unwrap(),
            version,
            "an apply that changes nothing committed"
        );
        let pruned = store.apply(&file, true, false).unwrap();
        assert_eq!(pruned.removed, ["gone"]);
        assert_eq!(pruned.unchanged, ["change", "keep", "new"]);
        assert_eq!(store.load().unwrap().registry.sites.len(), 3);
    }

    /// A site that differs from its row only in what the store rounds (a duration's
    /// microseconds) is written and read back to compare: unchanged, nothing committed.
    #[test]
    fn apply_compares_what_the_store_rounds_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let mut spec = SiteSpec::from_site(&site(dir.path(), "a", &["a.test"]));
        spec.idle_timeout = Some(Duration::from_micros(2_500_500));
        let file = [spec.validate(FsChecks::Full).unwrap()];
        assert_eq!(store.apply(&file, false, false).unwrap().added, ["a"]);
        let stored = store.get("a").unwrap().unwrap();
        assert_ne!(stored, SiteSpec::from_site(&file[0]), "the store rounds");
        let watcher = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let version = watcher.data_version().unwrap();
        let again = store.apply(&file, false, false).unwrap();
        assert_eq!(again.unchanged, ["a"]);
        assert_eq!(watcher.data_version().unwrap(), version, "it committed");
    }

    #[test]
    fn a_failing_apply_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        store
            .add(&site(dir.path(), "other", &["taken.test"]))
            .unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        let before = store.load().unwrap().registry;
        // "other" stays (no prune) and keeps its host: the whole apply is refused.
        let file = [
            site(dir.path(), "a", &["a2.test"]),
            site(dir.path(), "b", &["taken.test"]),
        ];
        let err = store.apply(&file, false, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host taken.test of site \"b\" already belongs to site \"other\""
        );
        assert_eq!(store.load().unwrap().registry, before);
    }

    /// Every host taken is reported at once, whoever holds it: a site of the registry
    /// that stays, or a site named before in the file. A host of a site the file
    /// replaces, or that --prune removes, is free to move.
    #[test]
    fn an_apply_reports_every_taken_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        for (name, host) in [("x", "x.test"), ("y", "y.test"), ("moving", "moves.test")] {
            store.add(&site(dir.path(), name, &[host])).unwrap();
        }
        let before = store.load().unwrap().registry;
        let file = [
            site(dir.path(), "a", &["x.test", "both.test", "moves.test"]),
            site(dir.path(), "b", &["both.test", "y.test"]),
            site(dir.path(), "moving", &["moved.test"]),
        ];
        let taken = |err: StoreError| match err {
            StoreError::HostsTaken(taken) => (taken.into_iter())
                .map(|t| (t.host, t.site, t.owner, t.in_file))
                .collect::<Vec<_>>(),
            other => panic!("{other}"),
        };
        let owned = |host: &str, site: &str, owner: &str, in_file| {
            (host.to_owned(), site.to_owned(), owner.to_owned(), in_file)
        };
        let err = store.apply(&file, false, true).unwrap_err();
        assert!(
            err.to_string().starts_with("3 hosts are taken:\n  host "),
            "{err}"
        );
        assert_eq!(
            taken(err),
            [
                owned("x.test", "a", "x", false),
                owned("both.test", "b", "a", true),
                owned("y.test", "b", "y", false),
            ]
        );
        // With --prune, x and y go: only the file's own double remains.
        let err = store.apply(&file, true, false).unwrap_err();
        assert_eq!(taken(err), [owned("both.test", "b", "a", true)]);
        assert_eq!(store.load().unwrap().registry, before);
    }

    #[test]
    fn conflicting_writes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        let before = store.load().unwrap().registry;

        let err = store
            .add(&site(dir.path(), "b", &["b.test", "a.test"]))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::HostTaken { ref owner, .. } if owner == "a"),
            "{err}"
        );
        let err = store
            .add(&site(dir.path(), "a", &["other.test"]))
            .unwrap_err();
        assert!(matches!(err, StoreError::SiteExists(_)), "{err}");
        let err = store
            .replace(&site(dir.path(), "zzz", &["z.test"]))
            .unwrap_err();
        assert!(matches!(err, StoreError::SiteNotFound(_)), "{err}");
        assert!(matches!(
            store.remove("zzz"),
            Err(StoreError::SiteNotFound(_))
        ));

        assert_eq!(store.load().unwrap().registry, before);
    }

    #[test]
    fn replace_moves_hosts_and_data_version_sees_other_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let watcher = SqliteStore::open(&path).unwrap();
        let mut writer = SqliteStore::open(&path).unwrap();
        let v0 = watcher.data_version().unwrap();
        writer.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        let v1 = watcher.data_version().unwrap();
        assert_ne!(v0, v1);
        writer
            .replace(&site(dir.path(), "a", &["new.test"]))
            .unwrap();
        writer.add(&site(dir.path(), "b", &["a.test"])).unwrap();
        let loaded = watcher.load().unwrap().registry;
        assert_eq!(loaded.sites["a"].hosts[0].to_string(), "new.test");
        writer.remove("a").unwrap();
        assert_eq!(watcher.load().unwrap().registry.sites.len(), 1);
    }

    #[test]
    fn runtimes_attach_to_sites_and_cannot_vanish_under_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let rt =
            Runtime::validate("web", "/bin/sh", None, &["json".into()], FsChecks::Full).unwrap();
        store.add_runtime(&rt).unwrap();
        assert!(matches!(
            store.add_runtime(&rt),
            Err(StoreError::RuntimeExists(_))
        ));
        let mut site = site(dir.path(), "a", &["a.test"]);
        let mut spec = SiteSpec::from_site(&site);
        spec.runtime = Some("nope".into());
        assert!(matches!(
            store.attach_runtime(&spec, &mut site),
            Err(StoreError::NoSuchRuntime(_))
        ));
        spec.runtime = Some("web".into());
        store.attach_runtime(&spec, &mut site).unwrap();
        store.add(&site).unwrap();
        let loaded = store.load().unwrap().registry;
        assert_eq!(loaded.sites["a"].runtime.as_deref(), Some(&rt));
        assert!(matches!(
            store.remove_runtime("web"),
            Err(StoreError::RuntimeInUse { .. })
        ));
        store.remove("a").unwrap();
        store.remove_runtime("web").unwrap();
        assert!(store.runtimes().unwrap().is_empty());
    }

    /// Whatever a writer does to the rows (another process's SQL, with no care for
    /// revisions), a read of what changed since the last read finds what a whole read
    /// finds, and shares every site that stayed the same.
    #[test]
    fn a_read_of_what_changed_finds_what_a_whole_read_finds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut store = SqliteStore::open(&path).unwrap();
        for i in 0..30 {
            let (name, host) = (format!("s{i}"), format!("s{i}.test"));
            store.add(&site(dir.path(), &name, &[&host])).unwrap();
        }
        // As the sqlite3 shell writes: without foreign keys, so hosts may outlive their
        // site, name one that is not there, and find it again when the name comes back.
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "foreign_keys", "off").unwrap();
        let columns = "entry, interpreter, directory, env, processes_max, processes_min,
            threads, idle_timeout_ms, queue_max, queue_timeout_ms, request_timeout_ms,
            max_requests, body_max, memory_max, memory_worker_soft, pids_max, cpu_weight,
            run_user, run_group, runtime, preload";
        let mut last = LastRead::default();
        let mut before = store.load_since(&mut last).unwrap().registry;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..300 {
            let (a, b) = (format!("s{}", random(8)), format!("s{}", random(8)));
            let host = format!("h{}.test", random(12));
            let write = match random(10) {
                0 => format!(
                    "UPDATE sites SET threads = {} WHERE name = '{a}'",
                    random(3)
                ),
                1 => format!("UPDATE sites SET env = '{{\"K\": \"{step}\"}}' WHERE name = '{a}'"),
                2 => format!("INSERT OR IGNORE INTO hosts VALUES ('{host}', '{a}', {step})"),
                3 => format!("DELETE FROM hosts WHERE host = '{host}'"),
                4 => format!("UPDATE OR IGNORE hosts SET site = '{a}' WHERE host = '{host}'"),
                5 => format!("UPDATE hosts SET position = {step} WHERE host = '{host}'"),
                6 => format!("DELETE FROM sites WHERE name = '{a}'"),
                // A name removed comes back with the row of another site.
                7 => format!(
                    "INSERT OR IGNORE INTO sites (name, {columns})
                     SELECT '{a}', {columns} FROM sites WHERE name = '{b}'"
                ),
                8 => format!(
                    "INSERT OR REPLACE INTO runtimes VALUES ('rt', '/bin/sh', NULL, '[\"m{}\"]')",
                    random(2)
                ),
                _ => format!("UPDATE sites SET runtime = 'rt' WHERE name = '{a}'"),
            };
            writer.execute_batch(&write).unwrap();
            let read = store.load_since(&mut last).unwrap();
            let whole = store.load().unwrap();
            assert_eq!(read.registry, whole.registry, "after {write}");
            for rejected in &read.rejected {
                assert!(
                    whole.rejected.contains(rejected),
                    "after {write}: {rejected}"
                );
            }
            for (name, site) in &read.registry.sites {
                if before.sites.get(name) == Some(site) {
                    assert!(
                        Arc::ptr_eq(site, &before.sites[name]),
                        "after {write}: {name} is the same but not shared"
                    );
                }
            }
            before = read.registry;
        }
    }

    /// The read of what changed reads only the sites whose revision moved: a write
    /// that no trigger sees (none can, short of dropping them) is not read.
    #[test]
    fn a_read_of_what_changed_reads_only_sites_whose_revision_moved() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        store.add(&site(dir.path(), "b", &["b.test"])).unwrap();
        let mut last = LastRead::default();
        store.load_since(&mut last).unwrap();
        store
            .conn
            .execute_batch(
                "DROP TRIGGER site_changed;
                 UPDATE sites SET threads = 3 WHERE name = 'a';
                 UPDATE sites SET threads = 4, revision = revision + 1 WHERE name = 'b';",
            )
            .unwrap();
        let read = store.load_since(&mut last).unwrap().registry;
        assert_eq!(read.sites["a"].pool.threads, 1, "a's revision did not move");
        assert_eq!(read.sites["b"].pool.threads, 4);
        assert_eq!(store.load().unwrap().registry.sites["a"].pool.threads, 3);
        // Revisions of another file mean nothing: everything is read.
        last.forget_revisions();
        let read = store.load_since(&mut last).unwrap().registry;
        assert_eq!(read.sites["a"].pool.threads, 3);
    }

    /// A registry written by schema version 1 opens, migrates and keeps its sites.
    #[test]
    fn an_old_registry_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let entry = dir.path().join("app.py");
        std::fs::write(&entry, "").unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO sites (name, entry, interpreter, directory, env, processes_max,
                    processes_min, threads, idle_timeout_ms, queue_max, queue_timeout_ms,
                    request_timeout_ms, max_requests, body_max, memory_max, memory_worker_soft,
                    pids_max, cpu_weight)
                 VALUES ('old', ?1, '/bin/sh', ?2, '{}', 4, 0, 1, 60000, 100, 30000, 60000, 0,
                    10485760, 536870912, NULL, 64, 100)",
                params![
                    entry.display().to_string(),
                    dir.path().display().to_string()
                ],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO hosts (host, site, position) VALUES ('old.test', 'old', 0)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
        let old = &loaded.registry.sites["old"];
        assert_eq!(old.hosts[0].to_string(), "old.test");
        assert_eq!((old.user.as_deref(), old.runtime.as_deref()), (None, None));
    }

    #[test]
    fn a_corrupt_row_is_rejected_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        store.add(&site(dir.path(), "a", &["a.test"])).unwrap();
        store.add(&site(dir.path(), "b", &["b.test"])).unwrap();
        store
            .conn
            .execute("UPDATE sites SET threads = 0 WHERE name = 'b'", [])
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.registry.sites.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(loaded.rejected[0].field, "threads");
    }
}
