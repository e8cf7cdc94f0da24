//! Test-only programs, never loaded by the agent:
//! - `tagflow_empty`: the baseline of the datapath benchmark (does nothing).
//! - `tagflow_empty_recv`: the baseline of the receive-path hook's
//!   benchmark, a raw BTF tracepoint on the same point as `tagflow_recv`.
//! - `tf_cb_reader`: attached after tagflow on the same hook, counts
//!   packets whose cb carries the expected trace id — proves tagflow hands
//!   packets on and that the cb ABI is readable by later programs.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use agent_common::{CB_MAGIC, CB_MAGIC_MASK, TCX_NEXT};
use aya_ebpf::{
    macros::{btf_tracepoint, classifier, map},
    maps::Array,
    programs::{BtfTracePointContext, TcContext},
};

/// [0] = the trace id expected in cb (as 4 cb words).
#[map(name = "CB_EXPECT")]
static CB_EXPECT: Array<[u32; 4]> = Array::with_max_entries(1, 0);

/// [0] packets seen, [1] packets with tagflow's magic, [2] with the expected id.
#[map(name = "CB_COUNT")]
static CB_COUNT: Array<u64> = Array::with_max_entries(3, 0);

#[classifier]
pub fn tagflow_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn tagflow_empty_recv(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[inline(always)]
fn bump(i: u32) {
    if let Some(v) = CB_COUNT.get_ptr_mut(i) {
        // SAFETY: v points into the array's value; xadd is the BPF atomic add.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                v, 1,
            )
        };
    }
}

#[classifier]
pub fn tf_cb_reader(ctx: TcContext) -> i32 {
    bump(0);
    let cb = ctx.cb();
    if cb.len() < 5 || cb[4] & CB_MAGIC_MASK != CB_MAGIC {
        return TCX_NEXT;
    }
    bump(1);
    if let Some(want) = CB_EXPECT.get(0) {
        if cb[0] == want[0] && cb[1] == want[1] && cb[2] == want[2] && cb[3] == want[3] {
            bump(2);
        }
    }
    TCX_NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
