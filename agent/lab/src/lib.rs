//! tagflow's lab: throw-away nodes of network namespaces (`topo`), crafted
//! frames for `BPF_PROG_TEST_RUN` (`frames`), the processes a lab runs
//! (`procs`), an in-process OTLP receiver (`collector`), and what is built
//! on them: benchmarks, the soak and the demo. Never shipped in the agent.
pub mod bench;
pub mod collector;
pub mod demo;
pub mod frames;
pub mod grpc;
pub mod node;
pub mod procs;
pub mod service;
pub mod soak;
pub mod topo;

/// Test-only eBPF programs (tagflow-lab-ebpf): `tagflow_empty`, the
/// benchmark baseline, and `tf_cb_reader`, which counts packets whose cb
/// carries an expected trace id. Never attached by the agent.
pub static TESTPROGS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tagflow-testprogs"));

/// The datapath benchmark's reference programs (`ref_*`, see
/// `bench::floor`), with an empty program of their own.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tagflow-floor"));
