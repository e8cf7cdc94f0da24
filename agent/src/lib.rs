//! The tagflow agent library: loader, trace tables, interface following,
//! trace-context sources, span assembly and export. The lab (test
//! topologies, benchmarks, soak, demo) lives in `tagflow-lab`.
pub mod backfill;
pub mod btf;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod events;
pub mod export;
pub mod ids;
pub mod k8s;
pub mod loader;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod ops_http;
pub mod pin;
pub mod podnet;
pub mod protowire;
pub mod ratelimit;
pub mod sidecar;
pub mod sources;
pub mod spans;
pub mod tables;
pub mod trim;
pub mod uplink;

/// An error with its chain of causes, "outer: inner: …", for logs (each
/// error's own message never repeats its source).
pub fn report(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}
