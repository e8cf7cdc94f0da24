//! Attaching `tagflow_ingress` to interfaces, by mechanism: a TCX link
//! (Linux ≥ 6.6; closes with the agent) or a clsact qdisc + netlink filter
//! (older kernels; outlives the agent, so stale ones are removed first).
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
        let order = self.order;
        let mode = self.mode;
        let p: &mut SchedClassifier = program(&mut self.ebpf, prog::INGRESS)?;
        let tcx = || match order {
            TcxOrder::First => LinkOrder::first(),
            TcxOrder::Last => LinkOrder::last(),
        };
        let (kind, link) = match mode {
            AttachMode::Tcx => (
                AttachKind::Tcx,
                p.attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(tcx()),
                )
                .map_err(err)?,
            ),
            AttachMode::Netlink => (AttachKind::Netlink, attach_netlink(p, name).map_err(err)?),
            AttachMode::Auto => {
                match p.attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(tcx()),
                ) {
                    Ok(l) => (AttachKind::Tcx, l),
                    Err(e) => {
                        debug!(iface = name, "TCX attach failed ({e}); using clsact");
                        (AttachKind::Netlink, attach_netlink(p, name).map_err(err)?)
                    }
                }
            }
        };
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
            if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, prog::INGRESS) {
                if let Err(e) = p.detach(a.link) {
                    debug!(iface = a.name, "detach: {e}");
                }
            }
            let _ = self.iface_netns.remove(&ifindex);
            info!(iface = a.name, ifindex, "detached");
        }
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

fn attach_netlink(
    p: &mut SchedClassifier,
    name: &str,
) -> Result<SchedClassifierLinkId, ProgramError> {
    // Fails when the interface already has a clsact qdisc (ours from a
    // previous run, or another agent's): that one serves as well.
    if let Err(e) = tc::qdisc_add_clsact(name) {
        debug!(iface = name, "adding clsact: {e} (an existing one serves)");
    }
    p.attach_with_options(
        name,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
}

/// Removes netlink filters named like our program: an agent killed without
/// cleanup (SIGKILL, OOM) leaves them behind, unlike TCX links.
pub fn remove_stale_filters(iface: &str) -> bool {
    match tc::qdisc_detach_program(iface, TcAttachType::Ingress, prog::INGRESS) {
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
