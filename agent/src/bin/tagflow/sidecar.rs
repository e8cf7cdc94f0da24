//! `tagflow sidecar`: the in-pod proxy.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tagflow::sidecar::{self, SidecarConfig, SidecarStats};

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
    /// Register every request with the agent too: for agents that do not
    /// capture on the pod's loopback (`tagflow run --no-loopback`, or a
    /// kernel that refused the hook). Costs a round trip per request.
    #[arg(long, env = "TAGFLOW_SIDECAR_REGISTER")]
    register: bool,
    /// Threads serving requests. One event loop serves like an nginx
    /// worker and leaves the pod's other cores to the app (measured on 2
    /// cores: 1 thread does more requests/s than 2); raise it for a pod
    /// whose proxy is the bottleneck.
    #[arg(long, env = "TAGFLOW_SIDECAR_THREADS", default_value_t = 1)]
    threads: usize,
    /// Serve the sidecar's counters (`tagflow_sidecar_*`) for Prometheus at
    /// http://ADDR/metrics.
    #[arg(long, env = "TAGFLOW_SIDECAR_METRICS", default_value = "0.0.0.0:15091")]
    metrics: SocketAddr,
    /// Serve no metrics (the port is the app's, or nothing scrapes it).
    #[arg(long, env = "TAGFLOW_SIDECAR_NO_METRICS")]
    no_metrics: bool,
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
    let mut cfg = SidecarConfig::new(a.listen, a.upstream, a.agent_socket);
    cfg.register = a.register;
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()?
    };
    let stats = Arc::new(SidecarStats::default());
    rt.block_on(async {
        if !a.no_metrics {
            // Bound before serving: a taken port is an error at start, not
            // counters silently missing.
            let listener = std::net::TcpListener::bind(a.metrics)?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::spawn(sidecar::serve_metrics(listener, stats.clone()));
        }
        sidecar::run(cfg, stats, None, crate::shutdown_signal()).await
    })?;
    Ok(())
}
