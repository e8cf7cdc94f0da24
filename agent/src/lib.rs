//! The tagflow agent library: loader, trace tables, interface following,
//! and the helpers its tests, benchmarks and demo share.
pub mod agent;
pub mod backfill;
pub mod bench;
pub mod config;
pub mod demo;
pub mod events;
pub mod export;
pub mod frames;
pub mod ids;
pub mod k8s;
pub mod loader;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod pin;
pub mod ratelimit;
pub mod sidecar;
pub mod soak;
pub mod sources;
pub mod spans;
pub mod tables;
pub mod topo;
