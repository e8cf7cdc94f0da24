//! `tagflow sidecar`: the in-pod proxy.
use std::{net::SocketAddr, path::PathBuf};

use tagflow::sidecar::{self, SidecarConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve on.
    #[arg(long, env = "TAGFLOW_SIDECAR_LISTEN", default_value = "0.0.0.0:15080")]
    listen: SocketAddr,
    /// The app (usually 127.0.0.1:PORT).
    #[arg(long, env = "TAGFLOW_SIDECAR_UPSTREAM")]
    upstream: SocketAddr,
    #[arg(long, env = "TAGFLOW_AGENT_SOCKET", default_value = tagflow::config::DEFAULT_SOCKET)]
    agent_socket: PathBuf,
}

/// The name spans' resources use for this process (15 bytes at most).
fn set_process_name(name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME with a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    set_process_name("tf-sidecar");
    let cfg = SidecarConfig::new(a.listen, a.upstream, a.agent_socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(sidecar::run(
        cfg,
        Default::default(),
        None,
        crate::shutdown_signal(),
    ))?;
    Ok(())
}
