//! The tagflow agent library: loader, trace tables, interface following,
//! trace-context sources, span assembly and export. The lab (test
//! topologies, benchmarks, soak, demo) lives in `tagflow-lab`.
pub mod backfill;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod events;
pub mod export;
pub mod ids;
pub mod k8s;
pub mod loader;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod pin;
pub mod ratelimit;
pub mod sidecar;
pub mod sources;
pub mod spans;
pub mod tables;
