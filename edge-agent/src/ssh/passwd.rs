//! Local accounts, read straight from `/etc/passwd` and `/etc/group`.
//!
//! The agent ships as a static binary, and static binaries have no NSS: `getpwnam` would
//! find nothing (or crash) on a device. Parsing the files ourselves works the same on glibc,
//! musl and BusyBox systems, which is where the agent runs.

use std::path::{Path, PathBuf};

/// One local account, with everything needed to run a process as it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Primary group first, then every group listing the user as a member.
    pub groups: Vec<u32>,
}

/// Where the account files live (a test can point them elsewhere).
#[derive(Clone, Debug)]
pub struct AccountFiles {
    pub passwd: PathBuf,
    pub group: PathBuf,
}

impl Default for AccountFiles {
    fn default() -> Self {
        Self {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: String },
    #[error("there is no local user {0:?} on this device")]
    NoSuchUser(String),
}

impl AccountFiles {
    /// Looks `name` up. An empty or missing shell becomes `/bin/sh`.
    pub fn lookup(&self, name: &str) -> Result<LocalUser, AccountError> {
        let passwd = read(&self.passwd)?;
        let mut user = parse_passwd(&passwd, |u| u.name == name)
            .ok_or_else(|| AccountError::NoSuchUser(name.to_string()))?;
        // A missing /etc/group only costs the supplementary groups.
        let group = std::fs::read_to_string(&self.group).unwrap_or_default();
        user.groups = groups_of(&group, name, user.gid);
        Ok(user)
    }

    /// The account of `uid` (the agent's own user when it does not run as root).
    pub fn lookup_uid(&self, uid: u32) -> Option<LocalUser> {
        let passwd = read(&self.passwd).ok()?;
        let mut user = parse_passwd(&passwd, |u| u.uid == uid)?;
        let group = std::fs::read_to_string(&self.group).unwrap_or_default();
        user.groups = groups_of(&group, &user.name, user.gid);
        Some(user)
    }
}

fn read(path: &Path) -> Result<String, AccountError> {
    std::fs::read_to_string(path).map_err(|e| AccountError::Read {
        path: path.display().to_string(),
        err: e.to_string(),
    })
}

/// The first `name:pw:uid:gid:gecos:home:shell` line accepted by `want`.
fn parse_passwd(text: &str, want: impl Fn(&LocalUser) -> bool) -> Option<LocalUser> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_passwd_line)
        .find(|u| want(u))
}

fn parse_passwd_line(line: &str) -> Option<LocalUser> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    let shell = if f[6].trim().is_empty() {
        "/bin/sh"
    } else {
        f[6].trim()
    };
    let home = if f[5].is_empty() { "/" } else { f[5] };
    Some(LocalUser {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: PathBuf::from(home),
        shell: PathBuf::from(shell),
        groups: Vec::new(),
    })
}

/// The primary group plus every `name:pw:gid:members` line whose members include `user`.
fn groups_of(text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut out = vec![primary];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(gid) = f[2].parse::<u32>() else {
            continue;
        };
        if f[3].split(',').any(|m| m.trim() == user) && !out.contains(&gid) {
            out.push(gid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "# comment\nroot:x:0:0:root:/root:/bin/bash\n\
        pi:x:1000:1000:,,,:/home/pi:\nbroken:x:zz:1::/:/bin/sh\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nadm:x:4:pi,other\nvideo:x:44:pi\npi:x:1000:\nwheel:x:10:root\n";

    fn files(dir: &Path) -> AccountFiles {
        std::fs::write(dir.join("passwd"), PASSWD).unwrap();
        std::fs::write(dir.join("group"), GROUP).unwrap();
        AccountFiles {
            passwd: dir.join("passwd"),
            group: dir.join("group"),
        }
    }

    #[test]
    fn lookups() {
        let dir = std::env::temp_dir().join(format!("edgeport-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = files(&dir);
        let pi = f.lookup("pi").unwrap();
        assert_eq!((pi.uid, pi.gid), (1000, 1000));
        assert_eq!(pi.shell, PathBuf::from("/bin/sh"));
        assert_eq!(pi.home, PathBuf::from("/home/pi"));
        assert_eq!(pi.groups, vec![1000, 4, 44]);
        let root = f.lookup("root").unwrap();
        assert_eq!(root.groups, vec![0, 10]);
        assert!(matches!(
            f.lookup("broken"),
            Err(AccountError::NoSuchUser(_))
        ));
        assert!(matches!(
            f.lookup("ghost"),
            Err(AccountError::NoSuchUser(_))
        ));
        assert_eq!(f.lookup_uid(65534).unwrap().name, "nobody");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
