//! Checks on the registration socket's file system permissions at start.
//! Whoever can replace the socket file (or the directory holding it) can
//! impersonate the agent to every sidecar, and whoever can connect can
//! register traces: both must be the agent's and its group's only.
use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PermissionError {
    #[error("reading {0}")]
    Stat(PathBuf, #[source] std::io::Error),
    #[error("{path} is owned by uid {owner}, not by the agent (uid {me}) or root")]
    DirOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is writable by others (mode {mode:o}): anyone could replace the socket")]
    DirWritable { path: PathBuf, mode: u32 },
    #[error("{path}: owner uid {owner} mode {mode:o}; want uid {me} and no access for others")]
    Socket {
        path: PathBuf,
        owner: u32,
        mode: u32,
        me: u32,
    },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The directory holding the socket: owned by us or root, and writable by
/// nobody else unless sticky (as /tmp is: others cannot remove our file).
pub fn check_dir(dir: &Path) -> Result<(), PermissionError> {
    let md = std::fs::metadata(dir).map_err(|e| PermissionError::Stat(dir.into(), e))?;
    let me = euid();
    if md.uid() != me && md.uid() != 0 {
        return Err(PermissionError::DirOwner {
            path: dir.into(),
            owner: md.uid(),
            me,
        });
    }
    let mode = md.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(PermissionError::DirWritable {
            path: dir.into(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// The bound socket: ours, read/write for owner and group only.
pub fn check_socket(path: &Path) -> Result<(), PermissionError> {
    let md = std::fs::symlink_metadata(path).map_err(|e| PermissionError::Stat(path.into(), e))?;
    let me = euid();
    let mode = md.permissions().mode() & 0o777;
    if md.uid() != me || mode & 0o007 != 0 {
        return Err(PermissionError::Socket {
            path: path.into(),
            owner: md.uid(),
            mode,
            me,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    #[test]
    fn open_directories_and_sockets_are_refused() {
        let dir = std::env::temp_dir().join(format!("tagflow-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        assert!(check_dir(&dir).is_ok());
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        let err = check_dir(&dir).unwrap_err();
        assert!(
            matches!(err, PermissionError::DirWritable { mode: 0o777, .. }),
            "{err}"
        );
        // Sticky, like /tmp: others cannot remove what is ours.
        std::fs::set_permissions(&dir, Permissions::from_mode(0o1777)).unwrap();
        assert!(check_dir(&dir).is_ok());

        let sock = dir.join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, Permissions::from_mode(0o660)).unwrap();
        assert!(check_socket(&sock).is_ok());
        std::fs::set_permissions(&sock, Permissions::from_mode(0o666)).unwrap();
        let err = check_socket(&sock).unwrap_err();
        assert!(err.to_string().contains("mode 666"), "{err}");
        assert!(check_dir(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
