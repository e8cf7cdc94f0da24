//! Shared helpers for the kernel-level tests. They run for real as root;
//! they skip (and say why) only when the kernel refuses: EPERM or ENOSYS.
#![allow(dead_code)]

use std::sync::Mutex;

use agent::{config::AgentConfig, loader::Datapath};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

/// Kernel tests share the host's cgroup root and TCX hooks: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an error means "the kernel refuses" (EPERM/ENOSYS) rather than a bug.
pub fn kernel_refuses(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    let text = format!("{e:?}");
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS)) {
                return true;
            }
        }
        cur = err.source();
    }
    text.contains("code: 1,") || text.contains("code: 38,")
}

/// Loads the datapath or returns None after printing why the kernel refused.
pub fn load(cfg: &AgentConfig, owner_hooks: bool) -> Option<Datapath> {
    match Datapath::load(cfg, owner_hooks) {
        Ok(dp) => Some(dp),
        Err(e) if kernel_refuses(&e) => {
            eprintln!("SKIP: the kernel refused to load tagflow's programs: {e}");
            None
        }
        Err(e) => panic!("loading the datapath failed: {e:?}"),
    }
}

pub struct Run {
    pub verdict: i32,
    pub data: Vec<u8>,
    pub mark: u32,
    pub cb: [u32; 5],
}

/// One BPF_PROG_TEST_RUN of `prog` on `frame` (ifindex 1 = lo).
pub fn run(prog: &SchedClassifier, frame: &[u8]) -> Result<Run, aya::programs::ProgramError> {
    run_ctx(prog, frame, &agent::frames::skb_ctx(1, 0, [0; 5]))
}

pub fn run_ctx(
    prog: &SchedClassifier,
    frame: &[u8],
    ctx: &[u8],
) -> Result<Run, aya::programs::ProgramError> {
    let mut data = vec![0u8; frame.len() + 256];
    let mut ctx_out = [0u8; agent::frames::SKB_CTX_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data),
        ctx_in: Some(ctx),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    })?;
    data.truncate(r.data_size_out as usize);
    let (mark, cb) = agent::frames::skb_ctx_out(&ctx_out);
    Ok(Run {
        verdict: r.return_value as i32,
        data,
        mark,
        cb,
    })
}
