//! Trace-context sources: registrations over a Unix socket (sidecars, the
//! CLI) and HTTP request heads captured in the datapath.
pub mod capture;
pub mod client;
pub mod h2;
pub mod peer;
pub mod permissions;
mod promised;
pub mod protocol;
pub mod registry;
pub mod targets;
