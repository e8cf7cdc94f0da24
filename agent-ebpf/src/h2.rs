//! Passive capture of HTTP/2: a connection is followed from its client
//! preface. Its frames are stepped over by their length; the bytes of the
//! frames that carry header blocks (HEADERS, CONTINUATION, PUSH_PROMISE) go
//! to userspace, which holds the connection's HPACK table. A gap in the
//! stream gives the connection up: a table decoded across a gap would be
//! wrong, and so would every id read with it.
//!
//! Bounded work per program run: `MAX_STEPS` frame headers or copied runs
//! (what the verifier takes without blowing up); the walk is its own
//! program, which tail-calls itself for more, up to the kernel's 33 calls.
use crate::{
    maps::{count, EVENTS, H2_FLOWS, H2_NETNS, H2_WALK, POD_ADDRS, WALK_AT},
    resolve,
};
use agent_common::{
    Counter, EventHeader, FlowKey, H2Flow, H2FramesEvent, NetnsSlot, EVENT_H2_FRAMES,
    H2_FRAME_START, H2_LOST, H2_PREFACE, H2_REPLIES, MAX_CAPTURE,
};
use aya_ebpf::{helpers::generated::bpf_skb_load_bytes, programs::TcContext, EbpfContext};
use core::ffi::c_void;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: u32 = 9;
/// Frame headers read plus runs copied per run of the walk program (× 33
/// tail calls per segment: ≈ 130 header frames in one segment). A segment
/// with more gives its connection up, counted.
const MAX_STEPS: u32 = 8;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

/// `a` comes before `b` in sequence space.
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// A segment whose payload starts with "PRI ": the walk program checks the
/// rest of the preface and starts the connection. The ingress programs do
/// as little as they can here: their stack is near the verifier's limit.
#[inline(always)]
pub fn preface(key: &FlowKey, off: usize, seq: u32, ack: u32, local: bool) -> bool {
    schedule(key, off, seq, ack, local, true)
}

/// Any other segment with payload of a followed connection. Segments
/// inside a frame that is not copied (DATA) only move the mark; true when
/// the segment has frame headers or header-frame bytes, or a gap
/// (`walk_on`).
#[inline(always)]
pub fn segment(ctx: &TcContext, key: &FlowKey, off: usize, seq: u32, local: bool) -> bool {
    // Pods that never spoke HTTP/2: one array read, no hash lookup.
    match H2_NETNS.get(NetnsSlot::index(key.netns)) {
        Some(seen) if *seen != 0 => {}
        _ => return false,
    }
    let Some(st) = H2_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a live entry of our own map. Two CPUs on one connection at
    // once is not something TCP's sender does.
    let st = unsafe { &mut *st };
    let total = (ctx.len() as usize).saturating_sub(off) as u32;
    let end = seq.wrapping_add(total);
    if total == 0 || !before(st.seen, end) {
        return false; // nothing new (a retransmission)
    }
    if !before(st.seen, seq) && !before(st.copied, st.copy_to) && !before(st.next, end) {
        st.seen = end;
        return false;
    }
    schedule(key, off, seq, 0, local, false)
}

/// Leaves the packet's place for the walk program in this CPU's slot.
#[inline(always)]
fn schedule(key: &FlowKey, off: usize, seq: u32, ack: u32, local: bool, preface: bool) -> bool {
    let Some(at) = WALK_AT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, read by the tail call that follows; written
    // field by field (no copy on the ingress program's stack).
    unsafe {
        (*at).key = *key;
        (*at).off = off as u32;
        (*at).seq = seq;
        (*at).local = local as u32;
        (*at).preface = preface as u32;
        (*at).ack = ack;
    }
    true
}

/// From an ingress program, after the packet was tagged: tail-calls the
/// walk. It comes back only if the program array is empty (never, once
/// loaded); the connection is then dropped, counted.
#[inline(always)]
pub fn walk_on<const STAMP: bool>(ctx: &TcContext) {
    // SAFETY: a tail call into our own program array.
    unsafe { H2_WALK.tail_call(ctx, STAMP as u32) };
    count(Counter::H2Lost);
    if let Some(at) = WALK_AT.get_ptr(0) {
        // SAFETY: this CPU's slot. By reference: no 48-byte copy on the
        // ingress program's stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = H2_FLOWS.remove(unsafe { &(*at).key });
    }
}

/// The walk program's body: a new connection's start, then `MAX_STEPS`
/// steps, then itself again while the segment has more (the kernel allows
/// 33 calls in a chain; past that the connection is given up).
#[inline(always)]
pub fn resume<const STAMP: bool>(ctx: &TcContext) {
    let Some(at) = WALK_AT.get(0) else {
        return;
    };
    let at = *at;
    let local = at.local != 0;
    let (off, seq) = (at.off as usize, at.seq);
    if at.preface != 0 {
        if !start::<STAMP>(ctx, &at.key, off, seq, local) {
            return;
        }
        replies::<STAMP>(ctx, &at.key, at.ack);
        if let Some(a) = WALK_AT.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; the next run goes on walking.
            unsafe { (*a).preface = 0 };
        }
    }
    let Some(st) = H2_FLOWS.get_ptr_mut(at.key) else {
        return;
    };
    // SAFETY: as in `segment`.
    let st = unsafe { &mut *st };
    if before(st.seen, seq) {
        if st.fresh == 0 {
            return lose::<STAMP>(ctx, &at.key, seq, local); // bytes never seen
        }
        // A server's side, met after what it sent before the preface.
        *st = H2Flow::at(seq);
    }
    st.fresh = 0;
    if walk::<STAMP>(ctx, &at.key, st, off, seq, local) {
        // SAFETY: a tail call into our own program array.
        unsafe { H2_WALK.tail_call(ctx, STAMP as u32) };
        lose::<STAMP>(ctx, &at.key, seq, local);
    }
}

/// The whole preface: the connection is followed from its first frame.
#[inline(always)]
fn start<const STAMP: bool>(
    ctx: &TcContext,
    key: &FlowKey,
    off: usize,
    seq: u32,
    local: bool,
) -> bool {
    // Three words, not a 24-byte compare (which would be a call to bcmp).
    for (i, want) in PREFACE.chunks_exact(8).enumerate() {
        let want = u64::from_ne_bytes([
            want[0], want[1], want[2], want[3], want[4], want[5], want[6], want[7],
        ]);
        match ctx.load::<u64>(off + 8 * i) {
            Ok(w) if w == want => {}
            _ => return false,
        }
    }
    let st = H2Flow {
        next: seq.wrapping_add(PREFACE.len() as u32),
        ..H2Flow::at(seq)
    };
    if H2_FLOWS.insert(key, st, 0).is_err() {
        count(Counter::H2Lost);
        return false;
    }
    if let Some(seen) = H2_NETNS.get_ptr_mut(NetnsSlot::index(key.netns)) {
        // SAFETY: an element of our own array; racing writers store 1.
        unsafe { *seen = 1 };
    }
    count(Counter::H2Started);
    if !notice::<STAMP>(ctx, key, seq, H2_PREFACE, local) {
        let _ = H2_FLOWS.remove(key);
        return false;
    }
    true
}

/// The server's side of the connection is followed too when its replies
/// pass a hook of this node: on a pod's loopback (ifindex 1 in every
/// namespace) under the same namespace, to a pod of this node out of that
/// pod's veth (`POD_ADDRS`). It starts at the preface's acknowledgment
/// number, or at the server's first segment seen if that is later (the
/// bytes in between passed before the preface did: the server had no
/// request yet, so they hold settings, never a header block). Its header
/// blocks are the responses and their trailers. Replies from other nodes
/// or through a Service address are not followed (no key for them here).
#[inline(always)]
fn replies<const STAMP: bool>(ctx: &TcContext, key: &FlowKey, ack: u32) {
    // SAFETY: reading the context's own field.
    let netns = if unsafe { (*ctx.skb.skb).ifindex } == 1 {
        key.netns
    } else {
        // SAFETY: a value of our own map, copied out.
        match unsafe { POD_ADDRS.get(key.remote_addr) } {
            Some(netns) => *netns,
            None => return,
        }
    };
    let rev = key.reversed_in(netns);
    let st = H2Flow {
        fresh: 1,
        ..H2Flow::at(ack)
    };
    if H2_FLOWS.insert(rev, st, 0).is_err() {
        count(Counter::H2Lost);
        return;
    }
    if netns != key.netns {
        if let Some(seen) = H2_NETNS.get_ptr_mut(NetnsSlot::index(netns)) {
            // SAFETY: an element of our own array; racing writers store 1.
            unsafe { *seen = 1 };
        }
    }
    // The notice names the client's side (its namespace in `data`): the
    // two are paired in userspace by it.
    let Some(mut entry) = EVENTS.reserve::<H2FramesEvent>(0) else {
        count(Counter::RingbufFull);
        let _ = H2_FLOWS.remove(rev);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: e points at a reservation of size_of::<H2FramesEvent>().
    unsafe {
        let n = key.netns.to_ne_bytes();
        for (i, b) in n.iter().enumerate() {
            (*e).data[i] = *b;
        }
        fill::<STAMP>(ctx, e, &rev, ack, 8, H2_PREFACE | H2_REPLIES, false);
    }
    entry.submit(0);
}

/// Steps through the segment from where the connection's mark is. True
/// when steps ran out before the segment did.
#[inline(always)]
fn walk<const STAMP: bool>(
    ctx: &TcContext,
    key: &FlowKey,
    st: &mut H2Flow,
    off: usize,
    seq: u32,
    local: bool,
) -> bool {
    let total = (ctx.len() as usize).saturating_sub(off) as u32;
    let end = seq.wrapping_add(total);
    for _ in 0..MAX_STEPS {
        // Owed bytes of a header frame first.
        if before(st.copied, st.copy_to) {
            if !before(st.copied, end) {
                st.seen = end;
                return false;
            }
            let sent = if before(st.copied, seq) {
                // Its header was cut by the previous segment's end: those
                // bytes are in `part`.
                part::<STAMP>(ctx, key, st, seq, local)
            } else {
                let to = if before(st.copy_to, end) {
                    st.copy_to
                } else {
                    end
                };
                run::<STAMP>(ctx, key, st, off, seq, to.wrapping_sub(st.copied), local)
            };
            match sent {
                Some(n) => st.copied = st.copied.wrapping_add(n),
                None => {
                    lose::<STAMP>(ctx, key, seq, local);
                    return false;
                }
            }
            continue;
        }
        // Then the next frame header.
        let p = st.next;
        if !before(p, end) {
            st.seen = end;
            return false;
        }
        let have = if st.part_len > 8 { 0 } else { st.part_len };
        let from = p.wrapping_add(have);
        let rel = from.wrapping_sub(seq);
        if (rel as i32) < 0 || rel >= total {
            lose::<STAMP>(ctx, key, seq, local);
            return false;
        }
        let need = FRAME_HEADER - have;
        let avail = total - rel;
        // The header's bytes go into `part` after the ones kept from the
        // previous segment (bounded offsets into a map value: no
        // variable-offset stack access, which the verifier refuses).
        if avail < need {
            // Cut by this segment's end: keep what is here (< 9 bytes).
            let n = ((avail - 1) & 7) + 1;
            if load(ctx, off as u32 + rel, st, have, n).is_none() {
                lose::<STAMP>(ctx, key, seq, local);
                return false;
            }
            st.part_len = have + n;
            st.seen = end;
            return false;
        }
        if load(ctx, off as u32 + rel, st, have, need).is_none() {
            lose::<STAMP>(ctx, key, seq, local);
            return false;
        }
        let h = &st.part;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let ty = h[3];
        st.part_len = 0;
        let fend = p.wrapping_add(FRAME_HEADER + len);
        st.next = fend;
        if matches!(ty, HEADERS | CONTINUATION | PUSH_PROMISE) {
            st.frame_start = p;
            st.copied = p;
            st.copy_to = fend;
        }
    }
    true
}

/// Reads `n` (1..=9) payload bytes at `off` into `st.part[at..]` (`at` ≤ 8).
#[inline(always)]
fn load(ctx: &TcContext, off: u32, st: &mut H2Flow, at: u32, n: u32) -> Option<()> {
    let dst = st.part.as_mut_ptr().wrapping_add((at & 15) as usize);
    // SAFETY: part has 24 bytes; at ≤ 15 and n ≤ 9.
    let rc = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), off, dst.cast::<c_void>(), n) };
    (rc >= 0).then_some(())
}

/// Sends the start of a header frame whose header the previous segment cut
/// (`seq - st.copied` bytes, kept in `part`).
#[inline(always)]
fn part<const STAMP: bool>(
    ctx: &TcContext,
    key: &FlowKey,
    st: &H2Flow,
    seq: u32,
    local: bool,
) -> Option<u32> {
    let n = seq.wrapping_sub(st.copied);
    if n == 0 || n > 8 {
        return None;
    }
    let mut entry = EVENTS.reserve::<H2FramesEvent>(0)?;
    let e = entry.as_mut_ptr();
    // SAFETY: e points at a reservation of size_of::<H2FramesEvent>().
    unsafe {
        for i in 0..8usize {
            (*e).data[i] = st.part[i];
        }
        fill::<STAMP>(ctx, e, key, st.copied, n, flags(st), local);
    }
    entry.submit(0);
    count(Counter::H2Copied);
    Some(n)
}

/// Sends up to `want` bytes of this segment from `st.copied` on (at most
/// `MAX_CAPTURE`; the walk comes back for the rest).
#[inline(always)]
fn run<const STAMP: bool>(
    ctx: &TcContext,
    key: &FlowKey,
    st: &H2Flow,
    off: usize,
    seq: u32,
    want: u32,
    local: bool,
) -> Option<u32> {
    if want == 0 {
        return None;
    }
    let rel = st.copied.wrapping_sub(seq);
    let mut entry = EVENTS.reserve::<H2FramesEvent>(0)?;
    let e = entry.as_mut_ptr();
    let n = if want as usize > MAX_CAPTURE {
        MAX_CAPTURE as u32
    } else {
        want
    };
    let n = ((n - 1) & (MAX_CAPTURE as u32 - 1)) + 1;
    // SAFETY: data has MAX_CAPTURE bytes; n ≤ MAX_CAPTURE.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            off as u32 + rel,
            (*e).data.as_mut_ptr().cast::<c_void>(),
            n,
        )
    };
    if rc < 0 {
        entry.discard(0);
        return None;
    }
    // SAFETY: as above.
    unsafe { fill::<STAMP>(ctx, e, key, st.copied, n, flags(st), local) };
    entry.submit(0);
    count(Counter::H2Copied);
    Some(n)
}

#[inline(always)]
fn flags(st: &H2Flow) -> u32 {
    if st.copied == st.frame_start {
        H2_FRAME_START
    } else {
        0
    }
}

/// A record without data: the connection starts (`H2_PREFACE`) or is
/// given up (`H2_LOST`).
#[inline(always)]
fn notice<const STAMP: bool>(
    ctx: &TcContext,
    key: &FlowKey,
    seq: u32,
    flags: u32,
    local: bool,
) -> bool {
    let Some(mut entry) = EVENTS.reserve::<H2FramesEvent>(0) else {
        count(Counter::RingbufFull);
        return false;
    };
    // SAFETY: e points at a reservation of size_of::<H2FramesEvent>().
    unsafe { fill::<STAMP>(ctx, entry.as_mut_ptr(), key, seq, 0, flags, local) };
    entry.submit(0);
    true
}

#[inline(always)]
fn lose<const STAMP: bool>(ctx: &TcContext, key: &FlowKey, seq: u32, local: bool) {
    count(Counter::H2Lost);
    let _ = H2_FLOWS.remove(key);
    notice::<STAMP>(ctx, key, seq, H2_LOST, local);
}

/// # Safety
/// `e` points at a reserved `H2FramesEvent`.
#[inline(always)]
unsafe fn fill<const STAMP: bool>(
    ctx: &TcContext,
    e: *mut H2FramesEvent,
    key: &FlowKey,
    seq: u32,
    len: u32,
    flags: u32,
    local: bool,
) {
    let pid = if local {
        resolve::owner(ctx, key).pid
    } else {
        0
    };
    (*e).header = EventHeader {
        kind: EVENT_H2_FRAMES,
        len: core::mem::size_of::<H2FramesEvent>() as u32,
    };
    (*e).key = *key;
    (*e).ts_ns = crate::tag::now::<STAMP>(ctx);
    (*e).pid = pid;
    (*e).len = len;
    (*e).seq = seq;
    (*e).flags = flags;
}
