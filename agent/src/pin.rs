//! Maps that outlive the agent. The owner maps (`SOCK_OWNER`,
//! `BOUND_PORTS`), the thread maps (`SOCK_FLOW`, `THREAD_VIA`: filled when a
//! connection is accepted or read, not again) and the trace maps (`TRACES`,
//! `FLOW_TRACES`) are pinned in
//! bpffs under `<root>/abi-<ABI_VERSION>/`, so an agent that restarts (crash,
//! upgrade, OOM kill) keeps tagging with what its predecessor knew: sockets
//! opened while it was down keep their owner, and registered traces keep
//! their context.
//!
//! A pinned map is reused only when it is what this build expects (type,
//! key and value size, capacity); otherwise it is unpinned and created anew.
//! Directories of other ABI versions are removed: their layouts are not ours.
//! The directory is `flock`ed, so two agents never share one set of tables.
//!
//! Needs bpffs (Linux ≥ 4.4); mounted on /sys/fs/bpf when missing.
use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use tracing::{info, warn};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin path {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    #[error("{0} is in use by another tagflow agent")]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.into(),
        source,
    }
}

/// What a pinned map must be to be reused.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// What happened to one pinned map at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Created (nothing was pinned).
    Created,
    /// A compatible map was pinned: its contents carry over.
    Reused,
    /// An incompatible map was pinned; it was removed (the reason says why).
    Replaced(String),
}

impl std::fmt::Display for Fate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fate::Created => f.write_str("created"),
            Fate::Reused => f.write_str("reused"),
            Fate::Replaced(why) => write!(f, "replaced: {why}"),
        }
    }
}

/// A prepared, locked pin directory for one ABI version.
pub struct PinDir {
    dir: PathBuf,
    // Held for the agent's life: the flock is the ownership.
    _lock: File,
    pub fates: Vec<(&'static str, Fate)>,
    /// Directories of other ABI versions that were removed.
    pub removed: Vec<String>,
}

impl PinDir {
    /// Prepares `<root>/abi-<abi>/` for the maps in `expect`.
    pub fn prepare(root: &Path, abi: u32, expect: &[Expect]) -> Result<Self, PinError> {
        ensure_bpffs(root)?;
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        if !is_bpffs(root) {
            return Err(PinError::NotBpffs(root.into()));
        }
        let lock = File::open(root).map_err(io_err(root))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PinError::Locked(root.into()));
        }
        let ours = format!("abi-{abi}");
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io_err(root))? {
            let entry = entry.map_err(io_err(root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("abi-") && name != ours {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
                warn!(dir = %p.display(), "removed maps pinned by another ABI version");
                removed.push(name);
            }
        }
        let dir = root.join(ours);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut fates = Vec::new();
        for e in expect {
            let path = dir.join(e.name);
            let fate = match MapInfo::from_pin(&path) {
                Err(_) if !path.exists() => Fate::Created,
                Err(err) => Fate::Replaced(format!("unreadable: {err}")),
                Ok(info) => match mismatch(e, &info) {
                    None => Fate::Reused,
                    Some(why) => Fate::Replaced(why),
                },
            };
            if let Fate::Replaced(why) = &fate {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                warn!(map = e.name, "pinned map not reused: {why}");
            }
            fates.push((e.name, fate));
        }
        info!(dir = %dir.display(), ?fates, "pinned maps");
        Ok(Self {
            dir,
            _lock: lock,
            fates,
            removed,
        })
    }

    /// Where map `name` is pinned.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why `info` is not what `e` expects, if it is not.
fn mismatch(e: &Expect, info: &MapInfo) -> Option<String> {
    let ty = info.map_type().ok();
    if ty != Some(e.map_type) {
        return Some(format!("type {ty:?}, want {:?}", e.map_type));
    }
    let got = (info.key_size(), info.value_size(), info.max_entries());
    let want = (e.key_size, e.value_size, e.max_entries);
    (got != want)
        .then(|| format!("(key, value, max_entries) = {got:?}, want {want:?} (ABI or size change)"))
}

fn is_bpffs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and statfs buffer.
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts bpffs on /sys/fs/bpf when `root` lies under it and nothing is
/// mounted there (as Cilium does): a node without it would otherwise lose
/// every table on restart.
fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let base = Path::new("/sys/fs/bpf");
    if !root.starts_with(base) || is_bpffs(base) {
        return Ok(());
    }
    std::fs::create_dir_all(base).map_err(io_err(base))?;
    // SAFETY: constant C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io_err(base)(io::Error::last_os_error()));
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// The maps pinned across restarts, with what they must be to be reused.
pub fn pinned_maps(sizes: &crate::config::MapSizes) -> Vec<Expect> {
    use agent_common::{maps as m, FlowKey, PortKey, TraceContext, TraceKey};
    use std::mem::size_of;
    let e = |name, map_type, key: usize, value: usize, max_entries| Expect {
        name,
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    vec![
        e(
            m::TRACES,
            MapType::Hash,
            size_of::<TraceKey>(),
            size_of::<TraceContext>(),
            sizes.traces,
        ),
        e(
            m::FLOW_TRACES,
            MapType::Hash,
            size_of::<FlowKey>(),
            size_of::<TraceContext>(),
            sizes.flow_traces,
        ),
        e(
            m::SOCK_OWNER,
            MapType::LruHash,
            8,
            size_of::<agent_common::SockOwner>(),
            sizes.sock_owner,
        ),
        e(
            m::SOCK_FLOW,
            MapType::LruHash,
            8,
            size_of::<FlowKey>(),
            sizes.sock_flow,
        ),
        e(
            m::THREAD_VIA,
            MapType::LruHash,
            4,
            size_of::<FlowKey>(),
            sizes.thread_via,
        ),
        e(
            m::BOUND_PORTS,
            MapType::LruHash,
            size_of::<PortKey>(),
            4,
            sizes.bound_ports,
        ),
    ]
}

/// What pinning did at start (for logs and /status).
#[derive(Clone, Debug, Default)]
pub struct PinReport {
    /// The pin directory in use; none when maps are not pinned.
    pub dir: Option<PathBuf>,
    /// (map, "created" | "reused" | "replaced: why").
    pub maps: Vec<(String, String)>,
    /// Trace entries taken over from the previous agent.
    pub adopted: usize,
    /// Trace entries the previous agent left that were already idle.
    pub expired: usize,
}
