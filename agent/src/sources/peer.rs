//! Who is on the other end of a registration connection, without trusting
//! a pid number: SO_PEERCRED names a pid, but that pid may have exited and
//! been reused by the time /proc is read. A pidfd (SO_PEERPIDFD, Linux 6.5;
//! `pidfd_open` on older kernels) pins the process: the namespace read from
//! /proc counts only if the process is still alive afterwards, so the pid
//! was still its own.
use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
};

use tokio::net::UnixStream;

use super::targets::NsId;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer credentials")]
    Cred(#[source] io::Error),
    #[error("no pidfd for pid {0}")]
    Pidfd(u32, #[source] io::Error),
    #[error("network namespace of pid {0}")]
    Netns(u32, #[source] io::Error),
    #[error("pid {0} exited while being identified")]
    Exited(u32),
}

/// How the peer's process was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// SO_PEERPIDFD: the connecting process itself.
    PeerPidfd,
    /// pidfd_open(pid) after SO_PEERCRED: right unless the peer exited and
    /// its pid was reused in between (kernels before 6.5).
    PidfdOpen,
}

/// An identified peer: its pid, its network namespace, and that
/// namespace's file (held open, the namespace cannot die and have its
/// inode reused while this is held).
#[derive(Debug)]
pub struct Identified {
    pub pid: u32,
    pub ns: NsId,
    pub netns: File,
    pub pinned: Pinned,
}

pub fn identify(stream: &UnixStream) -> Result<Identified, PeerError> {
    let cred = stream.peer_cred().map_err(PeerError::Cred)?;
    let pid = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| PeerError::Cred(io::ErrorKind::NotFound.into()))?;
    let (pidfd, pinned) = match peer_pidfd(stream) {
        Ok(fd) => (fd, Pinned::PeerPidfd),
        Err(_) => (
            pidfd_open(pid).map_err(|e| PeerError::Pidfd(pid, e))?,
            Pinned::PidfdOpen,
        ),
    };
    let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(|e| PeerError::Netns(pid, e))?;
    let meta = netns.metadata().map_err(|e| PeerError::Netns(pid, e))?;
    // Still alive after the read: /proc/<pid> was this process.
    if !alive(&pidfd) {
        return Err(PeerError::Exited(pid));
    }
    Ok(Identified {
        pid,
        ns: (meta.dev(), meta.ino()),
        netns,
        pinned,
    })
}

fn peer_pidfd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int-sized buffer we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel handed us this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_live_peer_is_identified_by_its_own_namespace() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = identify(&a).unwrap();
        assert_eq!(me.pid, std::process::id());
        let m = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert_eq!(me.ns, (m.dev(), m.ino()));
    }

    #[test]
    fn an_exited_process_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!alive(&fd), "reaped: its pid may be anyone's now");
        assert!(alive(&pidfd_open(std::process::id()).unwrap()));
    }
}
