//! What the operations endpoint (`ops_http`) serves: `/metrics`
//! (Prometheus text) and `/status` (JSON for `tagflow status`). The agent
//! loop publishes a snapshot every second; scrapes never touch the datapath
//! directly.
use std::{
    fmt::Write as _,
    sync::{atomic::Ordering, Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{
    export::{ExportStats, LATENCY_BUCKETS},
    sources::registry::RegistryStats,
};

/// One interface's attachment, for /status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub ifindex: u32,
    pub name: String,
    pub mode: String,
}

/// Numbers the agent loop publishes (see `Snapshot::render`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub attachments: Vec<Attachment>,
    /// Pod namespaces whose loopback carries tagflow_ingress.
    #[serde(default)]
    pub loopbacks: u64,
    /// Uplinks carrying tagflow_uplink: (ifindex, name).
    #[serde(default)]
    pub uplinks: Vec<(u32, String)>,
    /// The thread hooks the kernel accepted (sock_ops, receive path, fork,
    /// exit).
    #[serde(default)]
    pub thread_hooks: Vec<String>,
    /// The running kernel's release.
    #[serde(default)]
    pub kernel: String,
    /// Kernel features probed at load and what depends on them:
    /// (name, present). See `loader::Feature`.
    #[serde(default)]
    pub features: Vec<(String, bool)>,
    /// The ingress program variant loaded for this kernel.
    #[serde(default)]
    pub ingress: String,
    /// Datapath counters summed over CPUs: (name, value).
    pub datapath: Vec<(String, u64)>,
    /// (map, entries, capacity).
    pub maps: Vec<(String, u64, u64)>,
    /// How long the last round of map walks took (collection and fill
    /// counts, on their own thread), in milliseconds.
    #[serde(default)]
    pub map_walk_ms: u64,
    /// Trace entries refused by the per-namespace quota: (netns cookie, n).
    #[serde(default)]
    pub quota_refused: Vec<(u64, u64)>,
    /// Agent-side counters: (name, help, value).
    pub agent: Vec<(String, String, u64)>,
    pub spans_open: u64,
    /// Finished spans waiting for their trace to go quiet.
    #[serde(default)]
    pub spans_held: u64,
    /// Captured request details waiting for their span.
    #[serde(default)]
    pub capture_cached: u64,
    /// Captured heads sent from this node whose span has not opened.
    #[serde(default)]
    pub capture_awaited: u64,
    pub ready: bool,
    /// Pin directory in use (none: maps not pinned).
    #[serde(default)]
    pub pin_dir: Option<String>,
    /// (map, what happened to its pin at start).
    #[serde(default)]
    pub pinned: Vec<(String, String)>,
}

pub struct Ops {
    pub snapshot: Mutex<Snapshot>,
    pub export: Arc<ExportStats>,
    pub registry: Option<Arc<RegistryStats>>,
}

pub(crate) fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP tagflow_{name} {help}\n# TYPE tagflow_{name} counter\ntagflow_{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP tagflow_{name} {help}\n# TYPE tagflow_{name} gauge\ntagflow_{name} {v}"
    );
}

/// The allocator's view (glibc): bytes in live allocations, and bytes
/// free inside its arenas (held, not returned: fragmentation). Tells a
/// leak (in use grows) from an allocator holding on (free grows).
fn heap(out: &mut String) {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        gauge(
            out,
            "heap_in_use_bytes",
            "Bytes in live heap allocations (glibc mallinfo2 uordblks + hblkhd).",
            (m.uordblks + m.hblkhd) as u64,
        );
        gauge(
            out,
            "heap_free_bytes",
            "Bytes free inside the allocator's arenas, not returned to the system (fordblks).",
            m.fordblks as u64,
        );
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = out;
}

impl Ops {
    pub fn render(&self) -> String {
        let s = self.snapshot.lock().expect("snapshot lock").clone();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tagflow_datapath_packets_total Packets by datapath outcome and event (summed over CPUs).\n# TYPE tagflow_datapath_packets_total counter"
        );
        for (name, v) in &s.datapath {
            let _ = writeln!(
                out,
                "tagflow_datapath_packets_total{{counter=\"{name}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tagflow_map_entries Entries in a BPF map.\n# TYPE tagflow_map_entries gauge"
        );
        for (m, n, _) in &s.maps {
            let _ = writeln!(out, "tagflow_map_entries{{map=\"{m}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP tagflow_map_capacity max_entries of a BPF map.\n# TYPE tagflow_map_capacity gauge");
        for (m, _, c) in &s.maps {
            let _ = writeln!(out, "tagflow_map_capacity{{map=\"{m}\"}} {c}");
        }
        for (name, help, v) in &s.agent {
            counter(&mut out, name, help, *v);
        }
        let _ = writeln!(out, "# HELP tagflow_table_quota_refusals_total Trace entries refused because their pod network namespace held its quota (netns cookie; 0: namespaces beyond the first 256).\n# TYPE tagflow_table_quota_refusals_total counter");
        for (ns, n) in &s.quota_refused {
            let _ = writeln!(
                out,
                "tagflow_table_quota_refusals_total{{netns=\"{ns}\"}} {n}"
            );
        }
        heap(&mut out);
        gauge(
            &mut out,
            "attached_interfaces",
            "Interfaces tagflow_ingress is attached to.",
            s.attachments.len() as u64,
        );
        gauge(
            &mut out,
            "attached_loopbacks",
            "Pod namespaces whose loopback tagflow_ingress is attached to (in-pod proxies).",
            s.loopbacks,
        );
        gauge(
            &mut out,
            "attached_uplinks",
            "Uplinks tagflow_uplink is attached to (requests from other nodes).",
            s.uplinks.len() as u64,
        );
        gauge(
            &mut out,
            "thread_hooks_attached",
            "Thread hooks attached (4: sock_ops, receive path, fork, thread exit; fewer: calls by threads whose request the kernel cannot follow fall back to their process's last request).",
            s.thread_hooks.len() as u64,
        );
        let _ = writeln!(
            out,
            "# HELP tagflow_feature 1 when the kernel offers a feature tagflow probes for (or a hook that needs it is attached), else 0.\n# TYPE tagflow_feature gauge"
        );
        for (name, ok) in &s.features {
            let _ = writeln!(out, "tagflow_feature{{name=\"{name}\"}} {}", *ok as u8);
        }
        gauge(
            &mut out,
            "map_walk_milliseconds",
            "How long the last 10-s round of map walks took (FLOW_STATS and CAPTURE_SKIP collection, fill counts; on their own thread).",
            s.map_walk_ms,
        );
        gauge(
            &mut out,
            "maps_pinned",
            "1 when owner and trace maps are pinned (a restart keeps them), else 0.",
            s.pin_dir.is_some() as u64,
        );
        gauge(
            &mut out,
            "spans_open",
            "Spans being assembled.",
            s.spans_open,
        );
        gauge(
            &mut out,
            "spans_held",
            "Finished spans waiting for their trace to go quiet (for linking).",
            s.spans_held,
        );
        gauge(
            &mut out,
            "capture_heads_cached",
            "Captured request details waiting for their span.",
            s.capture_cached,
        );
        gauge(
            &mut out,
            "capture_spans_awaited",
            "Request heads sent from this node whose connection has opened no span yet (their traces wait for it before linking).",
            s.capture_awaited,
        );
        let e = &self.export;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "spans_enqueued_total",
            "Spans handed to the exporter.",
            l(&e.enqueued),
        );
        counter(
            &mut out,
            "spans_exported_total",
            "Spans the collector accepted.",
            l(&e.exported),
        );
        counter(
            &mut out,
            "spans_dropped_total",
            "Spans dropped because the export queue was full.",
            l(&e.dropped),
        );
        counter(
            &mut out,
            "spans_failed_total",
            "Spans given up after export errors.",
            l(&e.failed),
        );
        counter(
            &mut out,
            "export_retries_total",
            "Export attempts retried.",
            l(&e.retries),
        );
        let _ = writeln!(out, "# HELP tagflow_export_duration_seconds Successful export calls.\n# TYPE tagflow_export_duration_seconds histogram");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tagflow_export_duration_seconds_bucket{{le=\"{b}\"}} {}",
                l(&e.latency_buckets[i])
            );
        }
        let _ = writeln!(
            out,
            "tagflow_export_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            l(&e.latency_count)
        );
        let _ = writeln!(
            out,
            "tagflow_export_duration_seconds_sum {}",
            l(&e.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "tagflow_export_duration_seconds_count {}",
            l(&e.latency_count)
        );
        if let Some(r) = &self.registry {
            counter(
                &mut out,
                "registrations_begin_total",
                "BEGIN registrations accepted.",
                l(&r.begin_ok),
            );
            counter(
                &mut out,
                "registrations_end_total",
                "END registrations accepted.",
                l(&r.end_ok),
            );
            counter(
                &mut out,
                "registrations_refused_total",
                "Registrations refused (bad header/target, other netns, table full).",
                l(&r.refused),
            );
            counter(
                &mut out,
                "registrations_malformed_total",
                "Malformed registration frames.",
                l(&r.malformed),
            );
            counter(
                &mut out,
                "registrations_rate_limited_total",
                "Registrations refused by the rate limit.",
                l(&r.rate_limited),
            );
            counter(
                &mut out,
                "registration_overlaps_total",
                "BEGINs that replaced another trace on a process.",
                l(&r.overlaps),
            );
            counter(
                &mut out,
                "registration_connections_total",
                "Registration connections accepted.",
                l(&r.connections),
            );
            counter(
                &mut out,
                "registration_connections_refused_total",
                "Registration connections refused (limits, unknown peer).",
                l(&r.connections_refused),
            );
            counter(
                &mut out,
                "registrations_dropped_at_close_total",
                "Open registrations ended because their connection closed.",
                l(&r.open_dropped_at_close),
            );
            counter(
                &mut out,
                "registration_proc_walks_total",
                "Registrations resolved by walking /proc (port targets, pids of pod pid namespaces).",
                l(&r.proc_walks),
            );
            counter(
                &mut out,
                "registration_peers_by_pid_total",
                "Peers identified by pidfd_open(pid), not SO_PEERPIDFD (kernels before 6.5).",
                l(&r.peers_by_pid),
            );
        }
        crate::ops_http::render(&mut out);
        out
    }

    pub fn ready(&self) -> bool {
        let s = self.snapshot.lock().expect("snapshot lock");
        s.ready && self.export.healthy()
    }

    pub fn status_json(&self) -> String {
        let s = self.snapshot.lock().expect("snapshot lock").clone();
        serde_json::to_string(&s).unwrap_or_else(|_| "{}".into())
    }
}

pub fn format_status(s: &Snapshot) -> String {
    let mut out = format!("ready: {}\n\nkernel: {}\n", s.ready, s.kernel);
    for (name, ok) in &s.features {
        let _ = writeln!(out, "  {name:<24} {}", if *ok { "yes" } else { "no" });
    }
    let _ = writeln!(out, "ingress program: {}", s.ingress);
    let _ = writeln!(out, "\nattachments ({}):", s.attachments.len());
    for a in &s.attachments {
        let _ = writeln!(out, "  {:<16} ifindex {:<6} {}", a.name, a.ifindex, a.mode);
    }
    out += "\nmaps:\n";
    for (m, n, c) in &s.maps {
        let pct = if *c > 0 {
            *n as f64 * 100.0 / *c as f64
        } else {
            0.0
        };
        let _ = writeln!(out, "  {m:<14} {n:>8} / {c:<8} ({pct:.1}%)");
    }
    out += "\ndatapath counters:\n";
    for (k, v) in &s.datapath {
        let _ = writeln!(out, "  {k:<22} {v}");
    }
    out += "\nagent counters (losses included):\n";
    for (k, _, v) in &s.agent {
        let _ = writeln!(out, "  {k:<36} {v}");
    }
    let _ = writeln!(
        out,
        "\nspans being assembled: {}, held for linking: {}",
        s.spans_open, s.spans_held
    );
    match &s.pin_dir {
        Some(d) => {
            let _ = writeln!(out, "\npinned maps ({d}):");
            for (m, fate) in &s.pinned {
                let _ = writeln!(out, "  {m:<14} {fate}");
            }
        }
        None => out += "\npinned maps: none (a restart starts with empty tables)\n",
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            kernel: "6.1.0-54-amd64".into(),
            ingress: "tagflow_ingress_ifns".into(),
            features: vec![("tcx".into(), false), ("ring_buffer".into(), true)],
            ..Default::default()
        }
    }

    #[test]
    fn each_probed_feature_is_a_labelled_gauge() {
        let ops = Ops {
            snapshot: Mutex::new(snapshot()),
            export: Arc::new(crate::export::ExportStats::default()),
            registry: None,
        };
        let text = ops.render();
        assert!(text.contains("# TYPE tagflow_feature gauge"), "{text}");
        assert!(text.contains("tagflow_feature{name=\"tcx\"} 0"), "{text}");
        assert!(
            text.contains("tagflow_feature{name=\"ring_buffer\"} 1"),
            "{text}"
        );
    }

    #[test]
    #[cfg(target_env = "gnu")]
    fn the_heap_is_reported_as_live_and_free_bytes() {
        // black_box: a release build would drop an allocation never read.
        let held = std::hint::black_box(vec![7u8; 1 << 20]);
        let mut out = String::new();
        heap(&mut out);
        let value = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("tagflow_{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {out}"))
        };
        assert!(value("heap_in_use_bytes") >= held.len() as u64, "{out}");
        value("heap_free_bytes");
        drop(held);
    }

    #[test]
    fn status_names_the_kernel_its_features_and_the_program_chosen() {
        let text = format_status(&snapshot());
        assert!(text.contains("kernel: 6.1.0-54-amd64"), "{text}");
        assert!(text.contains("tcx") && text.contains("no"), "{text}");
        assert!(
            text.contains("ingress program: tagflow_ingress_ifns"),
            "{text}"
        );
    }
}
