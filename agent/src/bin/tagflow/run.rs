//! `tagflow run`: the daemon.
use anyhow::Context as _;
use tagflow::config::RunFlags;

/// glibc gives each thread that allocates its own arena (up to 8 per core)
/// and keeps freed memory in it: under registration bursts the agent's RSS
/// was mostly idle arenas (the soak measured it). Two are plenty here.
/// glibc also raises its mmap threshold (up to 32 MiB) each time a large
/// block is freed, after which export buffers (a batch's protobuf and gzip
/// output, hundreds of KiB) come from the heap and leave holes in it when
/// freed: a fixed threshold keeps them mmapped and returned whole.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

pub fn run(flags: RunFlags) -> anyhow::Result<()> {
    let cfg = flags.into_config(|k| std::env::var(k).ok())?;
    tune_malloc();
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
