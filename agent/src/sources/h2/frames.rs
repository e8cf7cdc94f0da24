//! HTTP/2 frames put back together from the datapath's runs of bytes, and
//! the header block fragments taken out of them.
use loona_hpack::Decoder;

use super::{Conn, GiveUp, MAX_BLOCK};

pub(super) const FRAME_HEADER: usize = 9;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const CONTINUATION: u8 = 0x9;
pub(super) const END_STREAM: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY: u8 = 0x20;

pub(super) struct RawBlock<'a> {
    pub stream: u32,
    pub promise: bool,
    pub end_stream: bool,
    pub bytes: &'a [u8],
}

/// Puts a run of bytes into frames; calls `block` with each complete
/// header block.
pub(super) fn feed(
    c: &mut Conn,
    seq: u32,
    frame_start: bool,
    data: &[u8],
    mut block: impl FnMut(RawBlock<'_>, &mut Decoder<'static>) -> Result<(), GiveUp>,
) -> Result<(), GiveUp> {
    if frame_start {
        // What was left over is the start of a frame the datapath stepped
        // over (it sends every byte of header frames): drop it.
        c.buf.clear();
        c.seq = seq;
    } else if seq != c.seq.wrapping_add(c.buf.len() as u32) {
        return Err(GiveUp::Gap);
    }
    c.buf.extend_from_slice(data);
    let mut at = 0;
    while c.buf.len() - at >= FRAME_HEADER {
        let h = &c.buf[at..at + FRAME_HEADER];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let header_frame = matches!(ty, HEADERS | CONTINUATION | PUSH_PROMISE);
        if !header_frame {
            // Not ours (the datapath sends only header frames, so this is
            // the fuzzer or a bug): step over what of it is here; the next
            // record starts a frame.
            at = c.buf.len().min(at + FRAME_HEADER + len);
            continue;
        }
        if len > MAX_BLOCK {
            return Err(GiveUp::Malformed);
        }
        if c.buf.len() - at < FRAME_HEADER + len {
            break; // the rest follows
        }
        let payload = &c.buf[at + FRAME_HEADER..at + FRAME_HEADER + len];
        let fragment = fragment(ty, flags, payload).ok_or(GiveUp::Malformed)?;
        match ty {
            HEADERS | PUSH_PROMISE if c.stream == 0 => {
                c.stream = stream;
                c.promise = ty == PUSH_PROMISE;
                c.end_stream = ty == HEADERS && flags & END_STREAM != 0;
                c.block.clear();
            }
            CONTINUATION if c.stream == stream && stream != 0 => {}
            _ => return Err(GiveUp::Malformed),
        }
        if c.block.len() + fragment.len() > MAX_BLOCK {
            return Err(GiveUp::Malformed);
        }
        c.block.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            let blk = std::mem::take(&mut c.block);
            let raw = RawBlock {
                stream: c.stream,
                promise: c.promise,
                end_stream: c.end_stream,
                bytes: &blk,
            };
            block(raw, &mut c.hpack)?;
            c.block = blk;
            c.block.clear();
            c.stream = 0;
        }
        at += FRAME_HEADER + len;
    }
    c.buf.drain(..at.min(c.buf.len()));
    c.seq = c.seq.wrapping_add(at as u32);
    Ok(())
}

/// The header block fragment of a HEADERS, PUSH_PROMISE or CONTINUATION
/// payload (padding, priority and the promised stream taken off).
fn fragment(ty: u8, flags: u8, p: &[u8]) -> Option<&[u8]> {
    if ty == CONTINUATION {
        return Some(p);
    }
    let (pad, mut start) = if flags & PADDED != 0 {
        (*p.first()? as usize, 1)
    } else {
        (0, 0)
    };
    if ty == HEADERS && flags & PRIORITY != 0 {
        start += 5;
    }
    if ty == PUSH_PROMISE {
        start += 4;
    }
    let end = p.len().checked_sub(pad)?;
    p.get(start..end)
}
