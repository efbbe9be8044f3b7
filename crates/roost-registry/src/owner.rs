//! Who a site's workers run as, and the suEXEC-style file checks that go with it.
//!
//! A site names a Unix user (and optionally a group). Before anything runs as that
//! user, and again before every spawn (files change), roost checks:
//! - the user exists, is not root, and its uid is at least the node's `min_uid`;
//! - the entry file and its folder are owned by that user or by root, and are not
//!   writable by group or others (so no other tenant can change the code that runs).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

/// The default lowest uid a site may run as (as suEXEC's AP_UID_MIN).
pub const DEFAULT_MIN_UID: u32 = 1000;

/// A resolved site owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("group {0:?} does not exist")]
    NoSuchGroup(String),
    #[error("sites never run as root")]
    Root,
    #[error("user {name:?} has uid {uid}, below the minimum of {min_uid}")]
    BelowMinUid {
        name: String,
        uid: u32,
        min_uid: u32,
    },
    #[error("{path} is owned by uid {owner}, not by the site user (uid {uid}) or root")]
    WrongOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error("{path} is writable by {who}; make it writable by its owner only (chmod go-w)")]
    Writable { path: PathBuf, who: &'static str },
    #[error("cannot inspect {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

/// Looks up a user by name or number, and its group (by name or number, or the
/// user's primary group), then applies the uid rules.
pub fn resolve(user: &str, group: Option<&str>, min_uid: u32) -> Result<Identity, OwnerError> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .ok()
    .flatten()
    .ok_or_else(|| OwnerError::NoSuchUser(user.to_owned()))?;
    let uid = found.uid.as_raw();
    if uid == 0 {
        return Err(OwnerError::Root);
    }
    if uid < min_uid {
        return Err(OwnerError::BelowMinUid {
            name: found.name,
            uid,
            min_uid,
        });
    }
    let gid = match group {
        None => found.gid.as_raw(),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
            Err(_) => Group::from_name(g),
        }
        .ok()
        .flatten()
        .ok_or_else(|| OwnerError::NoSuchGroup(g.to_owned()))?
        .gid
        .as_raw(),
    };
    if gid == 0 {
        return Err(OwnerError::Root);
    }
    Ok(Identity {
        uid,
        gid,
        name: found.name,
        home: found.dir,
    })
}

/// Why someone but `uid` and root could write in `folder`, or rename it (or a folder
/// above it) and put their own in its place; None when nobody could. Each folder on
/// the way must be theirs, and none writable by others, but a sticky one (`/tmp`),
/// where nobody renames what is not theirs. For the folders the node works in as root.
pub fn open_to_others(folder: &Path, uid: u32) -> Option<String> {
    for folder in folder.ancestors() {
        let meta = match std::fs::metadata(folder) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("cannot inspect {}: {e}", folder.display())),
        };
        if meta.uid() != uid && meta.uid() != 0 {
            return Some(format!(
                "{} belongs to uid {}",
                folder.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Some(format!("others can write in {}", folder.display()));
        }
    }
    None
}

/// Whether any user of the host can read `file`: others may read it, and pass through
/// every folder above it. A site's code usually has its secrets beside it (settings,
/// `.env`); on a shared host, its workers run as its user, so nobody else needs to.
pub fn readable_by_anyone(file: &Path) -> bool {
    others_have(file, 0o004) && (file.ancestors().skip(1)).all(|folder| others_have(folder, 0o001))
}

/// Whether users other than the owner and group of `path` have any of `bits` on it
/// (0o004 read or list, 0o002 write, 0o001 pass through); false when it cannot be
/// looked at.
pub fn others_have(path: &Path, bits: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.mode() & bits != 0)
}

/// The suEXEC checks on the code a site runs: each path must be owned by `uid` or
/// root and writable by neither group nor others.
pub fn check_code_files(paths: &[&Path], uid: u32) -> Result<(), OwnerError> {
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| OwnerError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if meta.uid() != uid && meta.uid() != 0 {
            return Err(OwnerError::WrongOwner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                uid,
            });
        }
        let mode = meta.mode();
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (_, true) => "others",
            (true, false) => "its group",
            (false, false) => continue,
        };
        return Err(OwnerError::Writable {
            path: path.to_path_buf(),
            who,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_and_low_uids_are_refused() {
        assert_eq!(
            resolve("root", None, DEFAULT_MIN_UID),
            Err(OwnerError::Root)
        );
        assert_eq!(resolve("0", None, 0), Err(OwnerError::Root));
        assert!(matches!(
            resolve("nobody", Some("root"), 0),
            Err(OwnerError::Root)
        ));
        assert!(matches!(
            resolve("daemon", None, DEFAULT_MIN_UID),
            Err(OwnerError::BelowMinUid { .. })
        ));
        assert!(matches!(
            resolve("no-such-user-xyz", None, 0),
            Err(OwnerError::NoSuchUser(_))
        ));
        let nobody = resolve("nobody", None, 0).unwrap();
        assert_eq!(nobody.uid, 65534);
        assert!(matches!(
            resolve("nobody", Some("no-such-group-xyz"), 0),
            Err(OwnerError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn writable_code_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.py");
        std::fs::write(&file, "").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_code_files(&[&file], me).unwrap();
        for (mode, who) in [(0o666, "others"), (0o664, "its group")] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                check_code_files(&[&file], me),
                Err(OwnerError::Writable {
                    path: file.clone(),
                    who
                })
            );
        }
        if me == 0 {
            // Root-owned files are accepted for any site user.
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            check_code_files(&[&file], 4242).unwrap();
        } else {
            assert!(matches!(
                check_code_files(&[&file], me + 1),
                Err(OwnerError::WrongOwner { .. })
            ));
        }
    }
}
