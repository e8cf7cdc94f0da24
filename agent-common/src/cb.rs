//! The skb->cb ABI: how a tagged packet carries its trace id to programs that
//! run after tagflow on the same hook.
//!
//! After `tagflow_ingress` tags a packet (`__sk_buff.cb`, 5 × u32):
//!
//! | word      | content                                                      |
//! |-----------|--------------------------------------------------------------|
//! | `cb[0..4]`| the 16-byte W3C trace id, in order: the memory of `cb[0..4]` |
//! |           | is the trace id's bytes (`cb[i] = u32::from_ne_bytes(id[4i..4i+4])`) |
//! | `cb[4]`   | `CB_MAGIC` in the upper 16 bits, `CB_FLAG_*` in the lower 16  |
//!
//! A reader checks `cb[4] & CB_MAGIC_MASK == CB_MAGIC` before trusting
//! `cb[0..4]`. Untagged packets keep whatever cb held (tagflow never clears
//! it), so the magic check is what distinguishes them. cb lives only while the
//! packet is on this hook (TCX chain or clsact filter list): it is not carried
//! across interfaces or namespaces.

/// Upper 16 bits of `cb[4]` on a tagged packet: ASCII "tf".
pub const CB_MAGIC: u32 = 0x7466_0000;
pub const CB_MAGIC_MASK: u32 = 0xffff_0000;
/// `cb[4]` flag: the trace is sampled.
pub const CB_FLAG_SAMPLED: u32 = 1 << 0;
/// `cb[4]` flag: the context came from `FLOW_TRACES` (exact connection), not
/// from the owner's `TRACES` entry.
pub const CB_FLAG_FLOW_MATCH: u32 = 1 << 1;
/// `cb[4]` flag: a parent span id is known (not carried in cb).
pub const CB_FLAG_HAS_PARENT: u32 = 1 << 2;
/// Bits 8..12 of `cb[4]`: the `TraceSource`.
pub const CB_SOURCE_SHIFT: u32 = 8;

/// Index of the magic/flags word.
pub const CB_WORD_META: usize = 4;

/// Decodes a cb array; `None` when the packet was not tagged by tagflow.
pub fn decode_cb(cb: &[u32; 5]) -> Option<([u8; 16], u32)> {
    if cb[CB_WORD_META] & CB_MAGIC_MASK != CB_MAGIC {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, w) in cb[..4].iter().enumerate() {
        id[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Some((id, cb[CB_WORD_META] & !CB_MAGIC_MASK))
}

/// Encodes a trace id and flags into cb words (what the datapath writes).
pub fn encode_cb(trace_id: &[u8; 16], flags: u32) -> [u32; 5] {
    let mut cb = [0u32; 5];
    for (i, w) in cb[..4].iter_mut().enumerate() {
        *w = u32::from_ne_bytes([
            trace_id[i * 4],
            trace_id[i * 4 + 1],
            trace_id[i * 4 + 2],
            trace_id[i * 4 + 3],
        ]);
    }
    cb[CB_WORD_META] = CB_MAGIC | (flags & !CB_MAGIC_MASK);
    cb
}
