//! Checks on the registration socket's file system permissions at start.
//! Whoever can replace the socket file (or the directory holding it) can
//! impersonate the agent to every sidecar, and whoever can connect can
//! register traces: both must be the agent's and its group's only.
use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

/// The directory holding the socket: owned by us or root, and writable by
/// nobody else unless sticky (as /tmp is: others cannot remove our file).
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let md = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = unsafe { libc::geteuid() };
    if md.uid() != me && md.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not by the agent (uid {me}) or root",
            dir.display(),
            md.uid()
        ));
    }
    let mode = md.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "{} is writable by others (mode {:o}): anyone could replace the socket",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// The bound socket: ours, read/write for owner and group only.
pub fn check_socket(path: &Path) -> Result<(), String> {
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let me = unsafe { libc::geteuid() };
    let mode = md.permissions().mode() & 0o777;
    if md.uid() != me || mode & 0o007 != 0 {
        return Err(format!(
            "{}: owner uid {} mode {mode:o}; want uid {me} and no access for others",
            path.display(),
            md.uid()
        ));
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
        assert_eq!(check_dir(&dir), Ok(()));
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        let err = check_dir(&dir).unwrap_err();
        assert!(err.contains("writable by others"), "{err}");
        // Sticky, like /tmp: others cannot remove what is ours.
        std::fs::set_permissions(&dir, Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(check_dir(&dir), Ok(()));

        let sock = dir.join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, Permissions::from_mode(0o660)).unwrap();
        assert_eq!(check_socket(&sock), Ok(()));
        std::fs::set_permissions(&sock, Permissions::from_mode(0o666)).unwrap();
        assert!(check_socket(&sock).unwrap_err().contains("mode 666"));
        assert!(check_dir(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
