//! Container and pod ids from `/proc/<pid>/cgroup`.
//!
//! Shapes handled (cgroup v2 `0::/path`, or any v1 hierarchy line):
//! - systemd driver: `…/kubepods-burstable-pod<uid with _>.slice/<rt>-<id>.scope`
//!   where `<rt>` is `cri-containerd`, `crio` or `docker`;
//!   Guaranteed pods have no QoS level: `kubepods-pod<uid>.slice`;
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (containerd, CRI-O,
//!   Docker), `/kubepods/pod<uid>/<id>`;
//! - CRI-O's `crio-conmon-<id>.scope` is the monitor, not the container.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub pod_uid: String,
    /// 64 hex digits; empty when the process sits in the pod's cgroup itself.
    pub container_id: String,
    pub runtime: &'static str,
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn pod_uid(segment: &str) -> Option<String> {
    // systemd: kubepods[-<qos>]-pod<uid_with_underscores>.slice
    if let Some(rest) = segment.strip_suffix(".slice") {
        let uid = rest.rsplit_once("-pod")?.1.replace('_', "-");
        return is_uid(&uid).then_some(uid);
    }
    // cgroupfs: pod<uid>
    let uid = segment.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_string())
}

fn container(segment: &str) -> Option<(String, &'static str)> {
    if let Some(scope) = segment.strip_suffix(".scope") {
        if scope.starts_with("crio-conmon-") {
            return None;
        }
        for (prefix, rt) in [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
        ] {
            if let Some(id) = scope.strip_prefix(prefix) {
                return is_id(id).then(|| (id.to_string(), rt));
            }
        }
        return None;
    }
    is_id(segment).then(|| (segment.to_string(), "unknown"))
}

/// Parses the content of `/proc/<pid>/cgroup`.
pub fn parse(text: &str) -> Option<ContainerRef> {
    text.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let i = segs.iter().position(|s| pod_uid(s).is_some())?;
        let uid = pod_uid(segs[i])?;
        let (container_id, runtime) = segs
            .get(i + 1)
            .and_then(|s| container(s))
            .unwrap_or((String::new(), "unknown"));
        Some(ContainerRef {
            pod_uid: uid,
            container_id,
            runtime,
        })
    })
}

/// For a process: `/proc/<pid>/cgroup`, parsed.
pub fn of_pid(pid: u32) -> Option<ContainerRef> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9f2d5b6e7a8c4f1b3d2e6a7c8b9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f7a8b9";
    const UID: &str = "7d9b4c1e-2a3f-4b5c-8d6e-0f1a2b3c4d5e";

    fn want(rt: &'static str) -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: UID.into(),
            container_id: ID.into(),
            runtime: rt,
        })
    }

    #[test]
    fn systemd_driver_shapes() {
        let u = UID.replace('-', "_");
        for (text, rt) in [
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"), "containerd"),
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope\n"), "cri-o"),
            (format!("0::/kubepods.slice/kubepods-pod{u}.slice/docker-{ID}.scope\n"), "docker"),
            // cgroup v1 hybrid: the v2 line is empty, a v1 controller has the path.
            (format!("12:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n0::/\n"), "containerd"),
        ] {
            assert_eq!(parse(&text), want(rt), "{text}");
        }
    }

    #[test]
    fn cgroupfs_driver_shapes() {
        for text in [
            format!("0::/kubepods/burstable/pod{UID}/{ID}\n"),
            format!("0::/kubepods/pod{UID}/{ID}\n"),
            format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"),
        ] {
            assert_eq!(parse(&text), want("unknown"), "{text}");
        }
    }

    #[test]
    fn non_pod_processes_and_monitors() {
        assert_eq!(parse("0::/system.slice/containerd.service\n"), None);
        assert_eq!(parse("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(parse("0::/\n"), None);
        // CRI-O's conmon is in the pod but is not a container.
        let u = UID.replace('-', "_");
        let conmon = parse(&format!(
            "0::/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope\n"
        ))
        .unwrap();
        assert_eq!(
            (conmon.pod_uid.as_str(), conmon.container_id.as_str()),
            (UID, "")
        );
        // Malformed ids are not ids.
        assert_eq!(parse("0::/kubepods/podnot-a-uid/abc\n"), None);
    }
}
