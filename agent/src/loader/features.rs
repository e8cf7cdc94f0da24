//! What the running kernel offers, probed before the object loads: the
//! loader picks the program variant that fits, refuses kernels that lack
//! what tagflow cannot do without, and reports the rest (`tagflow status`,
//! `tagflow_feature{name=…}`).
//!
//! Probes ask the kernel, not its version number: distribution kernels
//! backport (a 6.1 with a backported helper gets `tagflow_ingress`).
use aya::{
    maps::MapType,
    programs::{ProgramType, SchedClassifier, TcAttachType},
    sys::{is_helper_supported, is_map_supported, BpfHelper},
};
use tracing::info;

/// One optional or required kernel capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// BPF ring buffers (5.8): the new-flow and head records.
    RingBuffer,
    /// `bpf_get_netns_cookie` in cgroup sock_addr programs (5.7): the
    /// namespace of a bound port.
    NetnsCookieSockAddr,
    /// `bpf_get_netns_cookie` in sock_ops (5.15): an accepted connection's
    /// namespace, which the thread hooks key it by.
    NetnsCookieSockOps,
    /// `bpf_get_netns_cookie` in TC (6.14): without it `tagflow_ingress_ifns`
    /// runs, which takes the namespace from the interface or the socket's
    /// recorded owner.
    NetnsCookieTc,
    /// TCX links (6.6): without them a clsact qdisc and a netlink filter,
    /// which outlive the agent (stale ones are removed at start).
    Tcx,
    /// The kernel's BTF (/sys/kernel/btf/vmlinux): raw BTF tracepoints for
    /// the thread hooks and `task_struct` offsets for the fork hook.
    Btf,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Self::RingBuffer,
        Self::NetnsCookieSockAddr,
        Self::NetnsCookieSockOps,
        Self::NetnsCookieTc,
        Self::Tcx,
        Self::Btf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RingBuffer => "ring_buffer",
            Self::NetnsCookieSockAddr => "netns_cookie_sock_addr",
            Self::NetnsCookieSockOps => "netns_cookie_sock_ops",
            Self::NetnsCookieTc => "netns_cookie_tc",
            Self::Tcx => "tcx",
            Self::Btf => "btf",
        }
    }

    /// The mainline release that brought it.
    pub fn since(self) -> &'static str {
        match self {
            Self::RingBuffer => "5.8",
            Self::NetnsCookieSockAddr => "5.7",
            Self::NetnsCookieSockOps => "5.15",
            Self::NetnsCookieTc => "6.14",
            Self::Tcx => "6.6",
            Self::Btf => "5.4",
        }
    }

    /// Without it tagflow refuses to start: the minimum (5.15) is the
    /// newest of these.
    pub fn required(self) -> bool {
        matches!(
            self,
            Self::RingBuffer | Self::NetnsCookieSockAddr | Self::NetnsCookieSockOps
        )
    }
}

/// The probe results for the running kernel.
#[derive(Clone, Debug)]
pub struct Features {
    kernel: String,
    found: Vec<(Feature, bool)>,
}

impl Features {
    /// Asks the kernel about each feature. A probe that fails for another
    /// reason than "unsupported" counts as absent.
    pub fn probe() -> Self {
        let helper = |t: ProgramType| {
            is_helper_supported(t, BpfHelper::BPF_FUNC_get_netns_cookie).unwrap_or(false)
        };
        let found = Feature::ALL
            .iter()
            .map(|&f| {
                let ok = match f {
                    Feature::RingBuffer => is_map_supported(MapType::RingBuf).unwrap_or(false),
                    Feature::NetnsCookieSockAddr => helper(ProgramType::CgroupSockAddr),
                    Feature::NetnsCookieSockOps => helper(ProgramType::SockOps),
                    Feature::NetnsCookieTc => helper(ProgramType::SchedClassifier),
                    // A TCX query of loopback: EINVAL before 6.6.
                    Feature::Tcx => SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok(),
                    Feature::Btf => std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
                };
                (f, ok)
            })
            .collect();
        Self {
            kernel: kernel_release(),
            found,
        }
    }

    #[cfg(test)]
    fn fixed(kernel: &str, found: &[(Feature, bool)]) -> Self {
        Self {
            kernel: kernel.into(),
            found: found.to_vec(),
        }
    }

    pub fn has(&self, f: Feature) -> bool {
        self.found.iter().any(|&(g, ok)| g == f && ok)
    }

    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// (name, present) of every probed feature.
    pub fn list(&self) -> Vec<(&'static str, bool)> {
        self.found.iter().map(|&(f, ok)| (f.name(), ok)).collect()
    }

    /// The refusal for a kernel without a required feature: names the
    /// kernel and each missing feature with the release that brought it.
    pub fn check(&self) -> Result<(), super::LoaderError> {
        let missing: Vec<String> = self
            .found
            .iter()
            .filter(|&&(f, ok)| f.required() && !ok)
            .map(|&(f, _)| format!("{} (Linux {})", f.name(), f.since()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(super::LoaderError::Kernel {
            release: self.kernel.clone(),
            missing: missing.join(", "),
        })
    }

    /// One line at start-up: what was found and what that chose.
    pub fn log(&self, ingress: &str) {
        let absent: Vec<&str> = self
            .found
            .iter()
            .filter(|&&(_, ok)| !ok)
            .map(|&(f, _)| f.name())
            .collect();
        info!(kernel = %self.kernel, ingress, ?absent, "kernel features probed");
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_a_required_feature_is_refused_by_name() {
        let f = Features::fixed(
            "5.10.0-28-amd64",
            &[
                (Feature::RingBuffer, true),
                (Feature::NetnsCookieSockAddr, true),
                (Feature::NetnsCookieSockOps, false),
                (Feature::NetnsCookieTc, false),
                (Feature::Tcx, false),
            ],
        );
        let msg = f.check().unwrap_err().to_string();
        assert!(msg.contains("5.10.0-28-amd64"), "{msg}");
        assert!(msg.contains("netns_cookie_sock_ops (Linux 5.15)"), "{msg}");
        assert!(
            !msg.contains("tcx"),
            "optional features are not named: {msg}"
        );
    }

    #[test]
    fn optional_features_missing_still_load() {
        let f = Features::fixed(
            "6.1.0-54-amd64",
            &[
                (Feature::RingBuffer, true),
                (Feature::NetnsCookieSockAddr, true),
                (Feature::NetnsCookieSockOps, true),
                (Feature::NetnsCookieTc, false),
                (Feature::Tcx, false),
                (Feature::Btf, true),
            ],
        );
        assert!(f.check().is_ok());
        assert!(!f.has(Feature::NetnsCookieTc));
        assert!(f.has(Feature::Btf));
        assert_eq!(f.list().len(), 6);
    }

    #[test]
    fn the_minimum_is_the_newest_required_feature() {
        let newest = Feature::ALL
            .iter()
            .filter(|f| f.required())
            .map(|f| {
                let (a, b) = f.since().split_once('.').unwrap();
                (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap())
            })
            .max();
        assert_eq!(newest, Some((5, 15)));
    }
}
