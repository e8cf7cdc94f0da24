//! The owner hooks: cgroup `sock_addr` programs on the cgroup v2 root that
//! record, in the owning process's context, who connected or bound a
//! socket (TC runs in softirq and cannot tell).
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::programs as prog;
use aya::{
    programs::{links::CgroupAttachMode, BtfTracePoint, CgroupSock, CgroupSockAddr, SockOps},
    Btf,
};
use tracing::{info, warn};

use super::{program, Datapath, LoaderError};

impl Datapath {
    pub(super) fn attach_owner_hooks(&mut self, root: &Path) -> Result<(), LoaderError> {
        let cgroup = File::open(root).map_err(|source| LoaderError::Cgroup {
            path: root.into(),
            source,
        })?;
        for name in [
            prog::CONNECT4,
            prog::CONNECT6,
            prog::SENDMSG4,
            prog::SENDMSG6,
            prog::BIND4,
            prog::BIND6,
        ] {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            p.load()
                .map_err(|source| LoaderError::Program { name, source })?;
            // On ≥ 5.7 aya attaches with a cgroup *link*: always multi-attach
            // (coexists with Cilium's socket LB and others), detached when
            // our fd closes. BPF_LINK_CREATE takes no ALLOW_MULTI flag.
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| LoaderError::Program { name, source })?;
            self.owner_hooks.push(name);
        }
        // Housekeeping only: the LRU map copes without it.
        let release = program::<CgroupSock>(&mut self.ebpf, prog::SOCK_RELEASE).and_then(|p| {
            p.load().map_err(|source| LoaderError::Program {
                name: prog::SOCK_RELEASE,
                source,
            })?;
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| LoaderError::Program {
                    name: prog::SOCK_RELEASE,
                    source,
                })
        });
        match release {
            Ok(_) => self.owner_hooks.push(prog::SOCK_RELEASE),
            Err(e) => warn!("sock_release hook unavailable (owners expire by LRU only): {e:?}"),
        }
        info!(cgroup = %root.display(), hooks = ?self.owner_hooks, "owner hooks attached");
        Ok(())
    }
}

impl Datapath {
    /// The hooks that carry a request from the connection a thread reads to
    /// the connections it opens (threads.rs in the eBPF crate): sock_ops on
    /// the cgroup root, tp_btf on the receive path and on thread exit
    /// (fentry on `tcp_recvmsg` was refused here: EPERM on this
    /// lockdown=integrity kernel; raw BTF tracepoints load).
    /// A kernel without them (no BTF) still tags by
    /// process: warned once, and `thread_hooks` stays short (a metric).
    pub(super) fn attach_thread_hooks(&mut self, root: &Path) {
        match self.try_thread_hooks(root) {
            Ok(()) => info!(hooks = ?self.thread_hooks, "thread hooks attached"),
            Err(e) => warn!(
                "thread hooks unavailable, calls are attributed per process: {}",
                crate::report(&e)
            ),
        }
    }

    fn try_thread_hooks(&mut self, root: &Path) -> Result<(), LoaderError> {
        let cgroup = File::open(root).map_err(|source| LoaderError::Cgroup {
            path: root.into(),
            source,
        })?;
        let name = prog::SOCKOPS;
        let p: &mut SockOps = program(&mut self.ebpf, name)?;
        p.load()
            .map_err(|source| LoaderError::Program { name, source })?;
        p.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| LoaderError::Program { name, source })?;
        self.thread_hooks.push(name);
        let btf = Btf::from_sys_fs()?;
        self.tp_btf(prog::RECV, "tcp_rcv_space_adjust", &btf)?;
        // Processes forked while serving: without it they fall back to
        // their own process's entry.
        if let Err(e) = self.tp_btf(prog::FORK, "sched_process_fork", &btf) {
            warn!(
                "fork hook unavailable (forked processes do not inherit): {}",
                crate::report(&e)
            );
        }
        // Housekeeping: without it thread entries go by LRU only.
        if let Err(e) = self.tp_btf(prog::THREAD_EXIT, "sched_process_exit", &btf) {
            warn!(
                "thread exit hook unavailable (thread entries expire by LRU): {}",
                crate::report(&e)
            );
        }
        Ok(())
    }
}

impl Datapath {
    /// Loads and attaches the raw BTF tracepoint program `name` at `point`.
    fn tp_btf(&mut self, name: &'static str, point: &str, btf: &Btf) -> Result<(), LoaderError> {
        let p: &mut BtfTracePoint = program(&mut self.ebpf, name)?;
        p.load(point, btf)
            .map_err(|source| LoaderError::Program { name, source })?;
        p.attach()
            .map_err(|source| LoaderError::Program { name, source })?;
        self.thread_hooks.push(name);
        Ok(())
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf, LoaderError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| LoaderError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    parse_cgroup2_mount(&text).ok_or(LoaderError::NoCgroup2)
}

/// Finds the first cgroup2 mount point in mountinfo text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let mi = "25 30 0:23 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(mi), Some("/sys/fs/cgroup".into()));
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
