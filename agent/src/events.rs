//! Reading the `EVENTS` ring buffer.
use agent_common::{
    EventHeader, FlowEvent, H2FramesEvent, HttpHeadEvent, EVENT_FLOW_END, EVENT_FLOW_NEW,
    EVENT_H2_FRAMES, EVENT_HTTP_HEAD,
};

/// A decoded ring-buffer record.
#[derive(Clone)]
pub enum Event {
    /// A (flow, trace) pair's first packet.
    FlowNew(FlowEvent),
    /// A (flow, trace) pair was superseded; carries its final stats.
    FlowEnd(FlowEvent),
    /// The start of an HTTP request head (passive capture).
    HttpHead(Box<HttpHeadEvent>),
    /// Header-frame bytes of an HTTP/2 connection (passive capture).
    H2Frames(Box<H2FramesEvent>),
    /// A kind this agent does not know (a newer datapath); skipped, counted.
    Unknown(u32),
    /// Shorter than its header says: dropped, counted.
    Truncated,
}

/// Decodes one record. Never panics on short or unknown input.
pub fn decode(buf: &[u8]) -> Event {
    if buf.len() < size_of::<EventHeader>() {
        return Event::Truncated;
    }
    // SAFETY: length checked; read_unaligned copes with any alignment.
    let header: EventHeader = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    match header.kind {
        EVENT_FLOW_NEW | EVENT_FLOW_END if buf.len() < size_of::<FlowEvent>() => Event::Truncated,
        // SAFETY: length checked above.
        EVENT_FLOW_NEW => Event::FlowNew(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) }),
        EVENT_FLOW_END => Event::FlowEnd(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) }),
        EVENT_HTTP_HEAD if buf.len() < size_of::<HttpHeadEvent>() => Event::Truncated,
        // SAFETY: length checked above.
        EVENT_HTTP_HEAD => Event::HttpHead(Box::new(unsafe {
            std::ptr::read_unaligned(buf.as_ptr().cast())
        })),
        EVENT_H2_FRAMES if buf.len() < size_of::<H2FramesEvent>() => Event::Truncated,
        // SAFETY: length checked above.
        EVENT_H2_FRAMES => Event::H2Frames(Box::new(unsafe {
            std::ptr::read_unaligned(buf.as_ptr().cast())
        })),
        k => Event::Unknown(k),
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FlowNew(e) => f.debug_tuple("FlowNew").field(e).finish(),
            Self::FlowEnd(e) => f.debug_tuple("FlowEnd").field(e).finish(),
            Self::HttpHead(h) => write!(f, "HttpHead({:?}, pid {}, {} bytes)", h.key, h.pid, h.len),
            Self::H2Frames(h) => write!(
                f,
                "H2Frames({:?}, seq {}, flags {}, {} bytes)",
                h.key, h.seq, h.flags, h.len
            ),
            Self::Unknown(k) => write!(f, "Unknown({k})"),
            Self::Truncated => write!(f, "Truncated"),
        }
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::FlowNew(a), Self::FlowNew(b)) | (Self::FlowEnd(a), Self::FlowEnd(b)) => a == b,
            (Self::HttpHead(a), Self::HttpHead(b)) => {
                a.key == b.key && a.pid == b.pid && a.len == b.len && a.data[..] == b.data[..]
            }
            (Self::Unknown(a), Self::Unknown(b)) => a == b,
            (Self::Truncated, Self::Truncated) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_rejects_short_records() {
        let mut ev = FlowEvent::default();
        ev.header.kind = EVENT_FLOW_NEW;
        ev.stats.pid = 77;
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts((&ev as *const FlowEvent).cast(), size_of::<FlowEvent>())
        };
        assert_eq!(decode(bytes), Event::FlowNew(ev));
        let mut end = ev;
        end.header.kind = EVENT_FLOW_END;
        let bytes_end: &[u8] = unsafe {
            std::slice::from_raw_parts((&end as *const FlowEvent).cast(), size_of::<FlowEvent>())
        };
        assert_eq!(decode(bytes_end), Event::FlowEnd(end));
        assert_eq!(decode(&bytes[..20]), Event::Truncated);
        assert_eq!(decode(&[1, 0]), Event::Truncated);
        assert_eq!(decode(&[9, 0, 0, 0, 8, 0, 0, 0]), Event::Unknown(9));
    }
}
