//! L2–L4 parsing with direct packet access. Bounded work: at most two VLAN
//! tags and `MAX_IPV6_EXT` IPv6 extension headers.
use agent_common::{FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};
use aya_ebpf::programs::TcContext;
use core::mem::{size_of, MaybeUninit};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// IPv6 extension headers skipped before giving up (counted as parse failure).
pub const MAX_IPV6_EXT: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Upper bound on any header offset we compute: keeps the verifier's view of
/// packet-pointer arithmetic bounded.
const MAX_L4_OFF: usize = 1024;

/// Why a frame is not tagged before any map is consulted.
pub enum Skip {
    NonIp,
    Fragment,
    OtherL4,
    Malformed,
}

pub struct Parsed {
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 payload (TCP only; 0 for UDP).
    pub payload_off: usize,
    /// TCP sequence number of the payload's first byte (0 for UDP).
    pub seq: u32,
    /// TCP acknowledgment number (0 for UDP): where the peer's stream is.
    pub ack: u32,
}

/// `k` zeroed, as a key for `parse` to fill. Not `FlowKey::default()`: the
/// key's address goes to map helpers, so it lives on the stack, and LLVM
/// zeroes such a key with a call to a byte-by-byte `memset` subprogram
/// (17 % of test_run's time in a profile). Volatile word stores are not
/// merged into that call.
#[inline(always)]
pub fn zeroed_key(k: &mut MaybeUninit<FlowKey>) -> &mut FlowKey {
    const WORDS: usize = size_of::<FlowKey>() / 8;
    const _: () = assert!(size_of::<FlowKey>() == WORDS * 8);
    const _: () = assert!(core::mem::align_of::<FlowKey>() == 8);
    let w = k.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: in bounds and aligned (asserted above); all-zero is a
        // valid FlowKey (integers and byte arrays).
        unsafe { w.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written just above.
    unsafe { k.assume_init_mut() }
}

/// Whether the TCP payload at `off` starts with an HTTP/1.x method token
/// and a space, or the HTTP/2 client preface (the first 4 bytes decide;
/// userspace parses the rest).
///
/// Payload sent from a socket usually sits in page fragments, outside the
/// linear area direct packet access can see: read it with the helper, and
/// only when there are payload bytes at all (pure ACKs skip the call).
#[inline(always)]
pub fn payload_kind(ctx: &TcContext, off: usize) -> Payload {
    if off == 0 || off > MAX_L4_OFF || (ctx.len() as usize) < off + 4 {
        return if off != 0 && (ctx.len() as usize) > off {
            Payload::Other
        } else {
            Payload::None
        };
    }
    let Ok(p) = ctx.load::<[u8; 4]>(off) else {
        return Payload::Other;
    };
    match &p {
        b"GET " | b"PUT " | b"POST" | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"CONN" | b"TRAC" => {
            Payload::Http1
        }
        // The HTTP/2 client preface (the rest is checked by the walk).
        b"PRI " => Payload::H2Preface,
        _ => Payload::Other,
    }
}

/// What a TCP segment's payload starts with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    None,
    Http1,
    H2Preface,
    Other,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, Skip> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Skip::Malformed);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
fn u8_at(ctx: &TcContext, off: usize) -> Result<u8, Skip> {
    Ok(unsafe { *ptr_at::<u8>(ctx, off)? })
}

#[inline(always)]
fn be16_at(ctx: &TcContext, off: usize) -> Result<u16, Skip> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    Ok(u16::from_be_bytes(unsafe { *p }))
}

/// Parses Ethernet (+ up to two VLAN tags), IPv4/IPv6 and the TCP/UDP ports
/// into `key` (from `zeroed_key`; its `netns` is left alone). "local" is
/// the packet's source (see `FlowKey`).
///
/// The key is written in place, not returned: a returned key is a value
/// LLVM splits into its 48 bytes, which on BPF's ten registers meant a
/// spill and a reload for every byte (~100 instructions a packet, the
/// program's hottest lines in a cpu-clock profile).
#[inline(always)]
pub fn parse(ctx: &TcContext, key: &mut FlowKey) -> Result<Parsed, Skip> {
    // Ethernet: a frame shorter than its header is not IP as far as we know.
    let mut proto = be16_at(ctx, 12).map_err(|_| Skip::NonIp)?;
    let mut off = ETH_HLEN;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = be16_at(ctx, off + 2)?;
            off += VLAN_HLEN;
        }
    }
    let l4_proto;
    match proto {
        ETH_P_IP => {
            let vihl = u8_at(ctx, off)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(Skip::Malformed);
            }
            // Whole fixed header must be present before we read from it.
            let hdr = ptr_at::<[u8; 20]>(ctx, off)?;
            let hdr = unsafe { &*hdr };
            let frag = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
            if frag != 0 {
                return Err(Skip::Fragment);
            }
            l4_proto = hdr[9];
            key.family = FAMILY_IPV4;
            key.local_addr[..4].copy_from_slice(&hdr[12..16]);
            key.remote_addr[..4].copy_from_slice(&hdr[16..20]);
            off += ihl;
        }
        ETH_P_IPV6 => {
            let hdr = ptr_at::<[u8; 40]>(ctx, off)?;
            let hdr = unsafe { &*hdr };
            if hdr[0] >> 4 != 6 {
                return Err(Skip::Malformed);
            }
            key.family = FAMILY_IPV6;
            key.local_addr.copy_from_slice(&hdr[8..24]);
            key.remote_addr.copy_from_slice(&hdr[24..40]);
            let mut next = hdr[6];
            off += 40;
            let mut done = false;
            for _ in 0..MAX_IPV6_EXT {
                match next {
                    NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                        let ext = ptr_at::<[u8; 2]>(ctx, off)?;
                        let ext = unsafe { *ext };
                        next = ext[0];
                        off += (ext[1] as usize + 1) * 8;
                    }
                    NEXTHDR_FRAGMENT => {
                        let ext = ptr_at::<[u8; 8]>(ctx, off)?;
                        let ext = unsafe { *ext };
                        if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                            return Err(Skip::Fragment);
                        }
                        next = ext[0];
                        off += 8;
                    }
                    _ => {
                        done = true;
                        break;
                    }
                }
                if off > MAX_L4_OFF {
                    return Err(Skip::Malformed);
                }
            }
            if !done {
                return Err(Skip::Malformed);
            }
            l4_proto = next;
        }
        _ => return Err(Skip::NonIp),
    }
    if off > MAX_L4_OFF {
        return Err(Skip::Malformed);
    }
    key.proto = l4_proto;
    let (tcp_flags, payload_off, seq, ack) = match l4_proto {
        PROTO_TCP => {
            let th = ptr_at::<[u8; 20]>(ctx, off)?;
            let th = unsafe { &*th };
            let doff = (th[12] >> 4) as usize;
            if doff < 5 {
                return Err(Skip::Malformed);
            }
            key.local_port = u16::from_be_bytes([th[0], th[1]]);
            key.remote_port = u16::from_be_bytes([th[2], th[3]]);
            (
                th[13],
                off + doff * 4,
                u32::from_be_bytes([th[4], th[5], th[6], th[7]]),
                u32::from_be_bytes([th[8], th[9], th[10], th[11]]),
            )
        }
        PROTO_UDP => {
            let uh = ptr_at::<[u8; 8]>(ctx, off)?;
            let uh = unsafe { &*uh };
            key.local_port = u16::from_be_bytes([uh[0], uh[1]]);
            key.remote_port = u16::from_be_bytes([uh[2], uh[3]]);
            (0, 0, 0, 0)
        }
        _ => return Err(Skip::OtherL4),
    };
    Ok(Parsed {
        tcp_flags,
        payload_off,
        seq,
        ack,
    })
}
