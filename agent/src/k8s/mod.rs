//! Kubernetes metadata for spans: which container and pod a process
//! belongs to (from its cgroup), and that pod's name, namespace and labels
//! (from the API server, pods of this node only).
pub mod cgroup;
pub mod pods;
