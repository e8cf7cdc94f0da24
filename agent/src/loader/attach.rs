//! Attaching `tagflow_ingress` to pod interfaces (and `tagflow_uplink` to
//! the node's uplinks), by mechanism: a TCX link
//! (Linux ≥ 6.6; closes with the agent) or a clsact qdisc + netlink filter
//! (older kernels; outlives the agent, so stale ones are removed first).
use std::fs::File;

use agent_common::programs as prog;
use aya::programs::{
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    LinkOrder, ProgramError, SchedClassifier, TcAttachType,
};
use tracing::{debug, info};

use super::{program, Datapath, LoaderError};
use crate::config::{AttachMode, TcxOrder};

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachKind {
    Tcx,
    Netlink,
}

pub(super) struct Attachment {
    name: String,
    kind: AttachKind,
    link: SchedClassifierLinkId,
}

impl Datapath {
    /// Attaches `tagflow_ingress` to the ingress of `name`. Idempotent per
    /// ifindex. Stale netlink filters named `tagflow_ingress` (left by a
    /// killed agent) are removed first, so a hook never carries two.
    pub fn attach(&mut self, name: &str, ifindex: u32) -> Result<AttachKind, LoaderError> {
        if let Some(a) = self.attachments.get(&ifindex) {
            if a.name == name {
                return Ok(a.kind);
            }
        }
        let err = |source: ProgramError| LoaderError::Attach {
            iface: name.into(),
            source,
        };
        remove_stale_filters(name);
        let (mode, order) = (self.mode, self.order);
        let p: &mut SchedClassifier = program(&mut self.ebpf, self.ingress)?;
        let (kind, link) = hook(p, name, TcAttachType::Ingress, mode, order, None).map_err(err)?;
        self.attachments.insert(
            ifindex,
            Attachment {
                name: name.into(),
                kind,
                link,
            },
        );
        info!(iface = name, ifindex, ?kind, "attached");
        Ok(kind)
    }

    /// Detaches from an interface (also used when it disappeared: then the
    /// kernel already dropped the hook and errors are ignored).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(a) = self.attachments.remove(&ifindex) {
            if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, self.ingress) {
                if let Err(e) = p.detach(a.link) {
                    debug!(iface = a.name, "detach: {e}");
                }
            }
            let _ = self.iface_netns.remove(&ifindex);
            info!(iface = a.name, ifindex, "detached");
        }
    }

    /// Attaches `tagflow_uplink` (capture only) to the ingress of the
    /// node's uplink `name`, where requests from other nodes come in.
    /// Idempotent per ifindex.
    pub fn attach_uplink(&mut self, name: &str, ifindex: u32) -> Result<AttachKind, LoaderError> {
        if let Some(a) = self.uplinks.get(&ifindex) {
            return Ok(a.kind);
        }
        remove_stale(name, TcAttachType::Ingress, prog::UPLINK);
        let (mode, order) = (self.mode, self.order);
        let p: &mut SchedClassifier = program(&mut self.ebpf, prog::UPLINK)?;
        let (kind, link) =
            hook(p, name, TcAttachType::Ingress, mode, order, None).map_err(|source| {
                LoaderError::Attach {
                    iface: name.into(),
                    source,
                }
            })?;
        self.uplinks.insert(
            ifindex,
            Attachment {
                name: name.into(),
                kind,
                link,
            },
        );
        info!(iface = name, ifindex, ?kind, "attached to the uplink");
        Ok(kind)
    }

    /// Uplinks attached: (ifindex, name).
    pub fn uplinks(&self) -> Vec<(u32, String)> {
        let mut v: Vec<_> = self
            .uplinks
            .iter()
            .map(|(i, a)| (*i, a.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// Attaches `tagflow_ingress` to `lo` inside the pod namespace `ns`
    /// (cookie `cookie`): in-pod proxies (Envoy, Istio, nginx, our sidecar)
    /// talk to their app over loopback, and that hop never crosses the
    /// veth. On lo's *egress*: loopback orphans a packet before it comes
    /// back in, so only egress still knows the sending socket (its
    /// namespace and owner). Idempotent per namespace.
    pub fn attach_loopback(&mut self, ns: &File, cookie: u64) -> Result<AttachKind, LoaderError> {
        if let Some((a, _)) = self.loopbacks.get(&cookie) {
            return Ok(a.kind);
        }
        let handle = ns.try_clone().map_err(|source| {
            LoaderError::Netns(crate::netns::NetnsError::Open {
                path: "pod namespace handle".into(),
                source,
            })
        })?;
        let (mode, order) = (self.mode, self.order);
        // Every pod's lo is ifindex 1: as clsact filters they need handles
        // of their own, or aya takes the second for the first.
        self.lo_handles = self.lo_handles.wrapping_add(1).max(1);
        let lo_handle = self.lo_handles;
        let p: &mut SchedClassifier = program(&mut self.ebpf, self.ingress)?;
        let (kind, link) = crate::netns::in_netns_file(ns, || {
            remove_stale_filters_at("lo", TcAttachType::Egress);
            hook(p, "lo", TcAttachType::Egress, mode, order, Some(lo_handle))
        })?
        .map_err(|source| LoaderError::Attach {
            iface: format!("lo in netns {cookie}"),
            source,
        })?;
        self.loopbacks.insert(
            cookie,
            (
                Attachment {
                    name: "lo".into(),
                    kind,
                    link,
                },
                handle,
            ),
        );
        debug!(netns = cookie, ?kind, "attached to the pod's loopback");
        Ok(kind)
    }

    /// Detaches from `lo` in the pod namespace `cookie`. A clsact filter is
    /// removed over netlink inside that namespace (by ifindex: outside it,
    /// ifindex 1 is the host's own loopback).
    pub fn detach_loopback(&mut self, cookie: u64) {
        let Some((a, ns)) = self.loopbacks.remove(&cookie) else {
            return;
        };
        let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, self.ingress) else {
            return;
        };
        let done = match a.kind {
            AttachKind::Tcx => p.detach(a.link),
            AttachKind::Netlink => {
                let r = crate::netns::in_netns_file(&ns, || p.detach(a.link));
                r.unwrap_or(Ok(()))
            }
        };
        if let Err(e) = done {
            debug!(netns = cookie, "loopback detach: {e}");
        }
    }

    /// Pod loopbacks attached.
    pub fn loopbacks(&self) -> usize {
        self.loopbacks.len()
    }

    pub fn attached(&self) -> Vec<(u32, String, AttachKind)> {
        let mut v: Vec<_> = self
            .attachments
            .iter()
            .map(|(i, a)| (*i, a.name.clone(), a.kind))
            .collect();
        v.sort();
        v
    }
}

/// Hooks `p` on `name`'s ingress or egress (`at`) in the calling thread's
/// namespace, by the configured mechanism (TCX, clsact, or TCX falling
/// back to clsact). `handle`: the clsact filter's, else the kernel's pick.
fn hook(
    p: &mut SchedClassifier,
    name: &str,
    at: TcAttachType,
    mode: AttachMode,
    order: TcxOrder,
    handle: Option<u32>,
) -> Result<(AttachKind, SchedClassifierLinkId), ProgramError> {
    let netlink = |p: &mut SchedClassifier| attach_netlink(p, name, at, handle);
    match mode {
        AttachMode::Tcx => Ok((AttachKind::Tcx, attach_tcx(p, name, at, order)?)),
        AttachMode::Netlink => Ok((AttachKind::Netlink, netlink(p)?)),
        AttachMode::Auto => match attach_tcx(p, name, at, order) {
            Ok(l) => Ok((AttachKind::Tcx, l)),
            Err(e) => {
                debug!(iface = name, "TCX attach failed ({e}); using clsact");
                Ok((AttachKind::Netlink, netlink(p)?))
            }
        },
    }
}

fn attach_tcx(
    p: &mut SchedClassifier,
    name: &str,
    at: TcAttachType,
    order: TcxOrder,
) -> Result<SchedClassifierLinkId, ProgramError> {
    let order = match order {
        TcxOrder::First => LinkOrder::first(),
        TcxOrder::Last => LinkOrder::last(),
    };
    p.attach_with_options(name, at, TcAttachOptions::TcxOrder(order))
}

fn attach_netlink(
    p: &mut SchedClassifier,
    name: &str,
    at: TcAttachType,
    handle: Option<u32>,
) -> Result<SchedClassifierLinkId, ProgramError> {
    // Fails when the interface already has a clsact qdisc (ours from a
    // previous run, or another agent's): that one serves as well.
    if let Err(e) = tc::qdisc_add_clsact(name) {
        debug!(iface = name, "adding clsact: {e} (an existing one serves)");
    }
    let opts = NlOptions {
        handle: handle.map(Into::into).unwrap_or_default(),
        ..Default::default()
    };
    p.attach_with_options(name, at, TcAttachOptions::Netlink(opts))
}

/// Removes netlink filters named like our programs: an agent killed without
/// cleanup (SIGKILL, OOM) leaves them behind, unlike TCX links.
pub fn remove_stale_filters(iface: &str) -> bool {
    remove_stale_filters_at(iface, TcAttachType::Ingress)
}

fn remove_stale_filters_at(iface: &str, at: TcAttachType) -> bool {
    // Either variant: the previous agent may have run on another kernel.
    let a = remove_stale(iface, at, prog::INGRESS);
    remove_stale(iface, at, prog::INGRESS_IFNS) || a
}

fn remove_stale(iface: &str, at: TcAttachType, program: &str) -> bool {
    match tc::qdisc_detach_program(iface, at, program) {
        Ok(()) => {
            info!(iface, "removed stale tagflow filter");
            true
        }
        Err(_) => false,
    }
}

/// (name, program id) of the programs on an interface's TCX ingress, in
/// chain order. Names are truncated by the kernel to 15 bytes.
pub fn tcx_programs(iface: &str) -> Result<Vec<(String, u32)>, ProgramError> {
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)?;
    Ok(progs
        .iter()
        .map(|p| (p.name_as_str().unwrap_or("?").to_string(), p.id()))
        .collect())
}
