//! Network-namespace identities: netns cookies (the id the datapath sees) for
//! namespace files, and the cookie behind a veth's peer netns id (nsid).
use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::netlink;

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening namespace {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("setns into {path}")]
    Setns { path: PathBuf, source: io::Error },
    #[error("reading SO_NETNS_COOKIE (needs Linux 5.14)")]
    Cookie(#[source] io::Error),
    #[error("netns worker thread panicked")]
    Thread,
}

/// The netns cookie of the calling thread's namespace.
pub fn current_cookie() -> Result<u64, NetnsError> {
    // SAFETY: plain socket/getsockopt calls with valid buffers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(NetnsError::Cookie(io::Error::last_os_error()));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(NetnsError::Cookie(io::Error::last_os_error()));
        }
        Ok(cookie)
    }
}

/// Runs `f` on a short-lived thread that has joined the namespace at `path`
/// (`/run/netns/NAME`, `/proc/PID/ns/net`). Only that thread moves.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.into(),
        source,
    })?;
    in_netns_file(&file, f)
}

/// Like [`in_netns`], for an open namespace file.
pub fn in_netns_file<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an fd we own.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Setns {
                    path: format!("fd {}", ns.as_raw_fd()).into(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Thread)?
    })
}

/// A new, empty network namespace, kept alive by the returned file (no
/// name, nothing to clean up).
pub fn anonymous() -> Result<File, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare affects this short-lived thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Setns {
                    path: "unshare".into(),
                    source: io::Error::last_os_error(),
                });
            }
            File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
                path: "/proc/thread-self/ns/net".into(),
                source,
            })
        })
        .join()
        .map_err(|_| NetnsError::Thread)?
    })
}

/// The netns cookie of the namespace file at `path`.
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    in_netns(path, current_cookie)?
}

/// The netns cookie of an open namespace file.
pub fn cookie_of_file(ns: &File) -> Result<u64, NetnsError> {
    in_netns_file(ns, current_cookie)?
}

/// Namespace files worth looking at: named namespaces (`ip netns`, CNI) and
/// every process's namespace, one path per distinct namespace (dev, inode).
pub fn candidates() -> Vec<PathBuf> {
    let mut seen = HashMap::new();
    let mut push = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p) {
            seen.entry((m.dev(), m.ino())).or_insert(p);
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            rd.flatten().for_each(|e| push(e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                push(e.path().join("ns/net"));
            }
        }
    }
    seen.into_values().collect()
}

/// Resolves a veth's `IFLA_LINK_NETNSID` (an id local to our namespace) to
/// the peer namespace's cookie. Results are cached by nsid and re-verified on
/// use, since nsids are recycled when namespaces die.
#[derive(Default)]
pub struct PeerResolver {
    cache: HashMap<i32, (PathBuf, u64)>,
}

impl PeerResolver {
    /// The namespace behind `nsid`, open (so it can be entered later, and
    /// cannot be confused with a namespace that reuses the path), and its
    /// cookie.
    pub fn open_nsid(&mut self, nsid: i32) -> Option<(File, u64)> {
        let cookie = self.cookie_for_nsid(nsid)?;
        let (path, _) = self.cache.get(&nsid)?;
        let file = File::open(path).ok()?;
        // The path may name another namespace by now (a process exited and
        // its pid was reused): the handle must be the one we looked up.
        (in_netns_file(&file, current_cookie).ok()?.ok()? == cookie).then_some((file, cookie))
    }

    pub fn cookie_for_nsid(&mut self, nsid: i32) -> Option<u64> {
        if let Some((path, cookie)) = self.cache.get(&nsid) {
            if nsid_of(path) == Some(nsid) {
                return Some(*cookie);
            }
        }
        self.cache.remove(&nsid);
        for path in candidates() {
            let Some(id) = nsid_of(&path) else { continue };
            if let Ok(cookie) = cookie_of(&path) {
                self.cache.insert(id, (path, cookie));
            }
        }
        self.cache.get(&nsid).map(|(_, c)| *c)
    }
}

fn nsid_of(path: &Path) -> Option<i32> {
    let f = File::open(path).ok()?;
    netlink::nsid_of_fd(f.as_raw_fd()).ok().flatten()
}
