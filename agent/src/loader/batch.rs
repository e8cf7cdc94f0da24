//! Whole-map reads and deletes in a few syscalls: `BPF_MAP_LOOKUP_BATCH`
//! and `BPF_MAP_DELETE_BATCH` (Linux 5.6), which aya 0.14 does not offer.
//!
//! Why: walking a map entry by entry costs two syscalls an entry
//! (`get_next_key`, then the lookup). The flow GC walked 17 000 FLOW_STATS
//! entries that way in 130–220 ms under the soak, on the thread that drains
//! the ring buffer, and the ring (≈ 240 ms of events at that load)
//! overflowed at every such walk.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Pod,
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries asked for per syscall. A hash bucket must fit in one call
/// (`ENOSPC` otherwise), and no bucket of ours comes near this.
const CHUNK: usize = 1024;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the
    // kernel writes only `count` and the buffers `attr` points at, which
    // the callers size for `count` entries.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every (key, value) of a hash map (aya checked at its creation that `K`
/// and `V` are the map's sizes, which the buffers below rely on). Entries
/// added or removed during the walk may or may not be seen.
pub fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> io::Result<Vec<(K, V)>> {
    let fd = raw_fd(map.map());
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    // The walk's position: a bucket index (u32) for hash maps, a key for
    // the generic implementation; room for either.
    let token_len = size_of::<K>().max(8);
    let (mut at, mut next) = (vec![0u8; token_len], vec![0u8; token_len]);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { at.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // Set on success and on the end of the walk (ENOENT) alike.
        let n = (attr.count as usize).min(CHUNK);
        if res.is_ok() || matches!(&res, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            // SAFETY: the kernel filled the first `n` keys and values.
            out.extend((0..n).map(|i| unsafe {
                (
                    keys.as_ptr().add(i).read().assume_init(),
                    values.as_ptr().add(i).read().assume_init(),
                )
            }));
        }
        match res {
            Ok(()) if n > 0 => {
                std::mem::swap(&mut at, &mut next);
                first = false;
            }
            Ok(()) => return Ok(out),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Deletes `keys` from a hash map keyed by `K`; returns how many were
/// there. A key already gone (deleted or evicted meanwhile) is skipped.
pub fn delete<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, keys: &[K]) -> io::Result<u64> {
    let fd = raw_fd(map.map());
    let mut deleted = 0u64;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let res = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel stops at the first key it cannot delete and says how
        // many it did before it.
        let done = (attr.count as usize).min(chunk.len());
        deleted += done as u64;
        match res {
            Ok(()) => rest = &rest[chunk.len()..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

fn raw_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}
