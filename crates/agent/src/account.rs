//! Guest accounts read straight from `/etc/passwd` and `/etc/group`.
//!
//! glibc's `getpwnam` needs NSS modules that a static binary cannot load, so the agent
//! parses the files itself. Only the fields the agent needs are kept.

use std::fs;
use std::io;
use std::path::Path;

/// Name of the unprivileged account every bunker has.
pub const USER_NAME: &str = "user";
/// Its uid and gid, fixed so that files keep their owner across images.
pub const USER_ID: u32 = 1000;
/// Its home directory.
pub const USER_HOME: &str = "/home/user";

/// The `user` account as `/etc/passwd` has it, or uid/gid 1000 with the usual home when the
/// file has no such line (the init step failed to create it): uid 1000 is still the
/// unprivileged user every bunker promises.
pub fn guest_user() -> PasswdEntry {
    let found = match lookup(Path::new("/etc/passwd"), USER_NAME) {
        Ok(entry) => entry,
        Err(e) => {
            crate::log!("read /etc/passwd: {e}; using uid {USER_ID}");
            None
        }
    };
    found.unwrap_or_else(|| PasswdEntry {
        name: USER_NAME.to_owned(),
        uid: USER_ID,
        gid: USER_ID,
        home: USER_HOME.to_owned(),
    })
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Parses `/etc/passwd` content; malformed lines are skipped.
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 || fields[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
            })
        })
        .collect()
}

/// `(name, gid)` of every well-formed line of `/etc/group`.
pub fn parse_group(content: &str) -> Vec<(String, u32)> {
    content
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0].is_empty() {
                return None;
            }
            Some((fields[0].to_owned(), fields[2].parse().ok()?))
        })
        .collect()
}

/// Looks `name` up in the passwd file at `path`; a missing file means no entry.
pub fn lookup(path: &Path, name: &str) -> io::Result<Option<PasswdEntry>> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(parse_passwd(&content).into_iter().find(|e| e.name == name)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_skips_malformed_lines() {
        let content = "root:x:0:0:root:/root:/bin/bash\n\
                       # comment\n\
                       broken:x:notanumber:0::/:/bin/sh\n\
                       user:x:1000:1000:ScaiBunker user:/home/user:/bin/sh\n\
                       short:x:1\n";
        let entries = parse_passwd(content);
        assert_eq!(
            entries,
            vec![
                PasswdEntry {
                    name: "root".into(),
                    uid: 0,
                    gid: 0,
                    home: "/root".into()
                },
                PasswdEntry {
                    name: "user".into(),
                    uid: 1000,
                    gid: 1000,
                    home: "/home/user".into()
                },
            ]
        );
    }

    #[test]
    fn parses_group() {
        let groups = parse_group("root:x:0:\nusers:x:100:alice,bob\nbad\n");
        assert_eq!(groups, vec![("root".into(), 0), ("users".into(), 100)]);
    }
}
