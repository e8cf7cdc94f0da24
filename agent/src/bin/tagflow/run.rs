//! `tagflow run`: the daemon.
use anyhow::Context as _;
use tagflow::config::RunFlags;

/// glibc gives each thread that allocates its own arena (up to 8 per core)
/// and keeps freed memory in it: under registration bursts the agent's RSS
/// was mostly idle arenas (the soak measured it). Two are plenty here.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub fn run(flags: RunFlags) -> anyhow::Result<()> {
    let cfg = flags.into_config(|k| std::env::var(k).ok())?;
    limit_malloc_arenas();
    // Registrations that walk /proc run as blocking sections: a bounded
    // pool keeps a flood of them from growing threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()?;
    rt.block_on(tagflow::daemon::run(cfg, crate::shutdown_signal()))
        .context("agent failed")
}
