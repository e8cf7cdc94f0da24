//! Passive capture of HTTP/2, userspace half. The datapath follows each
//! connection from its client preface and sends the bytes of its header
//! frames (agent-ebpf `h2.rs`); here they become frames again and their
//! header blocks are decoded with one HPACK table per connection. Each
//! request's headers then make a head like an HTTP/1.x one. Where the
//! server's side passes the same hook (a pod's loopback), its header
//! blocks are decoded with their own table: each response's `:status` and
//! `grpc-status` goes to the request of the same stream.
//!
//! A connection is decoded only from its preface on and only while its
//! bytes arrive without a gap: a table that missed one header block would
//! read every later id wrong. Anything else is counted and the connection
//! left alone.
use std::collections::{BTreeMap, HashMap, VecDeque};

use agent_common::{FlowKey, H2FramesEvent, H2_FRAME_START, H2_LOST, H2_PREFACE, H2_REPLIES};
use loona_hpack::Decoder;

use super::capture::{HeadInfo, HeadOutcome};
use crate::trim::Trim;

mod decode;
mod frames;

use decode::{decode, StreamReply};
use frames::feed;

/// A header block (all its frames) larger than this is not decoded: the
/// connection is given up (HTTP/2 lets a peer cap it; 16 KiB is what most
/// servers accept by default).
pub const MAX_BLOCK: usize = 16 * 1024;
/// The largest HPACK table a sender may ask for (4 KiB is the default).
pub const MAX_TABLE: usize = 16 * 1024;
/// Requests per connection whose trace waits for their response (a
/// server's concurrent streams, 100 by default; the oldest go first).
pub const MAX_PENDING: usize = 1024;

/// Why a connection stopped being decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The datapath lost its place (gap, full ring, a crowded segment).
    Lost,
    /// Bytes did not continue where the last ones ended.
    Gap,
    /// A header block over `MAX_BLOCK`, or frames out of order.
    Malformed,
    /// HPACK said no (bad encoding, a table over `MAX_TABLE`).
    Hpack,
}

/// One connection's decoding state.
struct Conn {
    hpack: Decoder<'static>,
    /// Bytes not yet made into frames, starting at `seq`.
    buf: Vec<u8>,
    seq: u32,
    /// The header block being gathered (HEADERS then CONTINUATIONs).
    block: Vec<u8>,
    /// Its stream, 0 when no block is open; whether it opened with a
    /// PUSH_PROMISE (a response-side block: decoded, not a request).
    stream: u32,
    promise: bool,
    /// The open block's HEADERS frame ended its stream.
    end_stream: bool,
    /// The server's side: its blocks are responses, not requests, to the
    /// client side keyed so.
    replies: Option<FlowKey>,
    /// Client side: the trace each stream's request applied, until its
    /// response ends the stream.
    pending: BTreeMap<u32, [u8; 16]>,
    serial: u64,
}

impl Conn {
    fn new(serial: u64, replies: Option<FlowKey>) -> Self {
        let mut hpack = Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        Self {
            hpack,
            buf: Vec::new(),
            seq: 0,
            block: Vec::new(),
            stream: 0,
            promise: false,
            end_stream: false,
            replies,
            pending: BTreeMap::new(),
            serial,
        }
    }
}

/// A request's headers, with its stream.
#[derive(Debug)]
pub struct StreamHead {
    pub stream: u32,
    pub head: Result<(HeadInfo, bool), HeadOutcome>,
}

/// A response's status, or its trailers', on the server's side of a
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's connection, as its client's side is keyed.
    pub request: FlowKey,
    pub stream: u32,
    /// The trace the stream's request applied, when it had one.
    pub trace: Option<[u8; 16]>,
    /// `:status` (absent in trailers).
    pub status: Option<u16>,
    /// `grpc-status` (in trailers, or in a trailers-only response).
    pub grpc_status: Option<u32>,
}

/// What one record completed.
#[derive(Debug, Default)]
pub struct Decoded {
    pub requests: Vec<StreamHead>,
    pub replies: Vec<Reply>,
}

/// Every followed connection, bounded (the oldest go first).
pub struct H2Conns {
    conns: HashMap<FlowKey, Option<Conn>>,
    order: VecDeque<(FlowKey, u64)>,
    serial: u64,
    cap: usize,
    pub stats: H2Stats,
}

/// Counters, exported as `tagflow_capture_h2_*`.
#[derive(Debug, Default, Clone, Copy)]
pub struct H2Stats {
    pub connections: u64,
    /// Server sides followed (servers in a pod of this node).
    pub reply_connections: u64,
    pub requests: u64,
    /// Response and trailer blocks decoded on a server's side.
    pub replies: u64,
    /// Requests whose response was not waited for any longer: the
    /// connection had `MAX_PENDING` open.
    pub pending_dropped: u64,
    /// Header blocks that were not a request (trailers, pushes).
    pub other_blocks: u64,
    pub lost: u64,
    pub gaps: u64,
    pub malformed: u64,
    pub hpack_errors: u64,
    /// Records for a connection whose start this agent did not see.
    pub unknown: u64,
    /// Records for a connection already given up.
    pub ignored: u64,
    pub evicted: u64,
}

impl H2Stats {
    /// As metrics: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "capture_h2_connections_total",
                "HTTP/2 connections followed from their client preface.",
                self.connections,
            ),
            (
                "capture_h2_reply_connections_total",
                "HTTP/2 server sides followed from the client preface (servers in a pod of this node). Connections minus these: replies not read (another node, a Service address, a pod address not yet known).",
                self.reply_connections,
            ),
            (
                "capture_h2_replies_total",
                "HTTP/2 response and trailer blocks decoded on a server's side.",
                self.replies,
            ),
            (
                "capture_h2_pending_dropped_total",
                "HTTP/2 requests whose response status was no longer waited for (too many open on one connection).",
                self.pending_dropped,
            ),
            (
                "capture_h2_requests_total",
                "HTTP/2 request header blocks decoded (with or without an id).",
                self.requests,
            ),
            (
                "capture_h2_other_blocks_total",
                "HTTP/2 header blocks that were no request (trailers, pushes).",
                self.other_blocks,
            ),
            (
                "capture_h2_lost_total",
                "HTTP/2 connections the datapath gave up (gap, full ring, crowded segment).",
                self.lost,
            ),
            (
                "capture_h2_gaps_total",
                "HTTP/2 connections given up: their bytes did not continue where they ended.",
                self.gaps,
            ),
            (
                "capture_h2_malformed_total",
                "HTTP/2 connections given up: a header block too large or frames out of order.",
                self.malformed,
            ),
            (
                "capture_h2_hpack_errors_total",
                "HTTP/2 connections given up: HPACK refused a block (bad encoding, missing table entries, table too large).",
                self.hpack_errors,
            ),
            (
                "capture_h2_unknown_total",
                "HTTP/2 records of a connection whose start this agent did not see (skipped).",
                self.unknown,
            ),
            (
                "capture_h2_ignored_total",
                "HTTP/2 records of a connection already given up.",
                self.ignored,
            ),
            (
                "capture_h2_evicted_total",
                "HTTP/2 connections dropped to stay within the bound (oldest first).",
                self.evicted,
            ),
        ]
    }
}

impl H2Conns {
    /// Gives back table memory a burst of connections left unused.
    pub fn trim(&mut self) {
        self.conns.trim();
        self.order.trim();
    }

    pub fn new(cap: usize) -> Self {
        Self {
            conns: HashMap::new(),
            order: VecDeque::new(),
            serial: 0,
            cap,
            stats: H2Stats::default(),
        }
    }

    /// Connections followed (given up ones included until evicted).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Takes one datapath record; returns the request heads and replies
    /// it completed.
    pub fn event(&mut self, ev: &H2FramesEvent, id_headers: &[String]) -> Decoded {
        let mut out = Decoded::default();
        if ev.flags & H2_PREFACE != 0 {
            // A server's side names its client's namespace.
            let client = (ev.flags & H2_REPLIES != 0).then(|| {
                let mut ns = [0u8; 8];
                ns.copy_from_slice(&ev.data[..8]);
                ev.key.reversed_in(u64::from_ne_bytes(ns))
            });
            self.start(ev.key, client);
            return out;
        }
        if ev.flags & H2_LOST != 0 {
            if let Some(slot) = self.conns.get_mut(&ev.key) {
                if slot.take().is_some() {
                    self.stats.lost += 1;
                }
            }
            return out;
        }
        let Some(slot) = self.conns.get_mut(&ev.key) else {
            self.stats.unknown += 1;
            return out;
        };
        let Some(conn) = slot.as_mut() else {
            self.stats.ignored += 1;
            return out;
        };
        let data = &ev.data[..(ev.len as usize).min(ev.data.len())];
        let client = conn.replies;
        let mut answers = Vec::new();
        let r = feed(
            conn,
            ev.seq,
            ev.flags & H2_FRAME_START != 0,
            data,
            |b, hpack| {
                decode(
                    b,
                    hpack,
                    client.is_some(),
                    id_headers,
                    &mut out.requests,
                    &mut answers,
                )
            },
        );
        if let Err(why) = r {
            *slot = None;
            match why {
                GiveUp::Lost => self.stats.lost += 1,
                GiveUp::Gap => self.stats.gaps += 1,
                GiveUp::Malformed => self.stats.malformed += 1,
                GiveUp::Hpack => self.stats.hpack_errors += 1,
            }
        }
        for h in &out.requests {
            match h.head {
                Err(HeadOutcome::NotHttp) => self.stats.other_blocks += 1,
                _ => self.stats.requests += 1,
            }
        }
        if let Some(client) = client {
            for r in answers {
                self.stats.replies += 1;
                let reply = self.answer(client, r);
                out.replies.push(reply);
            }
        }
        out
    }

    /// The request on `key`'s `stream` applied `trace`: its response's
    /// status goes to that trace's spans.
    pub fn traced(&mut self, key: &FlowKey, stream: u32, trace: [u8; 16]) {
        let Some(Some(c)) = self.conns.get_mut(key) else {
            return;
        };
        c.pending.insert(stream, trace);
        if c.pending.len() > MAX_PENDING {
            c.pending.pop_first();
            self.stats.pending_dropped += 1;
        }
    }

    /// A server side's reply, with the trace of the request it answers on
    /// the client side `request`.
    fn answer(&mut self, request: FlowKey, r: StreamReply) -> Reply {
        let trace = match self.conns.get_mut(&request) {
            Some(Some(c)) if r.end_stream => c.pending.remove(&r.stream),
            Some(Some(c)) => c.pending.get(&r.stream).copied(),
            _ => None,
        };
        Reply {
            request,
            stream: r.stream,
            trace,
            status: r.status,
            grpc_status: r.grpc_status,
        }
    }

    fn start(&mut self, key: FlowKey, replies: Option<FlowKey>) {
        self.serial += 1;
        if replies.is_some() {
            self.stats.reply_connections += 1;
        } else {
            self.stats.connections += 1;
        }
        self.conns
            .insert(key, Some(Conn::new(self.serial, replies)));
        self.order.push_back((key, self.serial));
        while self.conns.len() > self.cap {
            let Some((old, serial)) = self.order.pop_front() else {
                break;
            };
            // A key started again has a newer serial: not this entry's.
            if let Some(Some(c)) = self.conns.get(&old) {
                if c.serial != serial {
                    continue;
                }
            }
            self.conns.remove(&old);
            self.stats.evicted += 1;
        }
        // Entries of restarted keys pile up in `order` only up to its
        // bound: drop the stale ones once it is twice the map.
        if self.order.len() > 2 * self.cap.max(1) {
            let conns = &self.conns;
            self.order.retain(|(k, s)| match conns.get(k) {
                Some(Some(c)) => c.serial == *s,
                Some(None) => true,
                None => false,
            });
        }
    }
}

/// One complete header block with where it came from.
#[cfg(test)]
mod tests {
    use super::{
        frames::{CONTINUATION, END_HEADERS, END_STREAM, HEADERS, PADDED, PRIORITY},
        *,
    };
    use crate::sources::capture::Protocol;
    use agent_common::MAX_CAPTURE;

    fn ids() -> Vec<String> {
        vec!["x-request-id".into(), "custom-key".into()]
    }

    fn key() -> FlowKey {
        FlowKey {
            local_port: 40000,
            remote_port: 50051,
            netns: 7,
            ..Default::default()
        }
    }

    fn record(seq: u32, flags: u32, data: &[u8]) -> H2FramesEvent {
        let mut ev = H2FramesEvent {
            header: Default::default(),
            key: key(),
            ts_ns: 1,
            pid: 42,
            len: data.len() as u32,
            seq,
            flags,
            data: [0; MAX_CAPTURE],
        };
        ev.data[..data.len()].copy_from_slice(data);
        ev
    }

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len() as u32;
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    // RFC 7541 C.4: three requests, Huffman-coded, the later ones naming
    // entries the earlier ones put in the dynamic table.
    const C41: &str = "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff";
    const C42: &str = "8286 84be 5886 a8eb 1064 9cbf";
    const C43: &str = "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf";

    fn started() -> H2Conns {
        let mut c = H2Conns::new(16);
        assert!(c
            .event(&record(100, H2_PREFACE, &[]), &ids())
            .requests
            .is_empty());
        c
    }

    #[test]
    fn huffman_coded_requests_are_read_with_the_connections_table() {
        let mut c = started();
        let mut seq = 124;
        let mut heads = Vec::new();
        for (stream, block) in [(1, C41), (3, C42), (5, C43)] {
            let f = frame(HEADERS, END_HEADERS, stream, &hex(block));
            heads.extend(c.event(&record(seq, H2_FRAME_START, &f), &ids()).requests);
            // DATA frames in between are stepped over by the datapath.
            seq += f.len() as u32 + 100;
        }
        assert_eq!(heads.len(), 3);
        assert_eq!(heads[0].head, Err(HeadOutcome::NoId { truncated: false }));
        assert_eq!(heads[1].head, Err(HeadOutcome::NoId { truncated: false }));
        let (info, _) = heads[2].head.as_ref().expect("third request has an id");
        assert_eq!(heads[2].stream, 5);
        assert_eq!(info.method, "GET");
        assert_eq!(info.target, "/index.html");
        // From the dynamic table, put there by the first request.
        assert_eq!(info.host.as_deref(), Some("www.example.com"));
        assert_eq!(info.request_id.as_deref(), Some("custom-value"));
        assert_eq!(info.protocol, Protocol::Http2);
        assert_eq!(c.stats.requests, 3);
    }

    #[test]
    fn a_connection_met_after_its_start_is_never_decoded() {
        // The agent started late: no preface, so no table.
        let mut c = H2Conns::new(16);
        let f = frame(HEADERS, END_HEADERS, 5, &hex(C43));
        assert!(c
            .event(&record(1, H2_FRAME_START, &f), &ids())
            .requests
            .is_empty());
        assert_eq!(c.stats.unknown, 1);
        // Started, but the first block went missing: the table lacks its
        // entries and the block that names them is refused, not misread.
        let mut c = started();
        let f = frame(HEADERS, END_HEADERS, 3, &hex(C42));
        assert!(c
            .event(&record(500, H2_FRAME_START, &f), &ids())
            .requests
            .is_empty());
        assert_eq!(c.stats.hpack_errors, 1);
        let f = frame(HEADERS, END_HEADERS, 5, &hex(C43));
        assert!(c
            .event(&record(600, H2_FRAME_START, &f), &ids())
            .requests
            .is_empty());
        assert_eq!(c.stats.ignored, 1);
    }

    #[test]
    fn a_block_split_over_frames_and_records_is_put_back_together() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/shop.Cart/Add"),
            (b":authority", b"[::1]:50051"),
            (b"content-type", b"application/grpc"),
            (b"x-request-id", b"9f1c2d3e-0000-4000-8000-00000000abcd"),
            (b"te", b"trailers"),
        ]);
        // HEADERS (padded, with priority) + CONTINUATION.
        let (a, b) = block.split_at(block.len() / 2);
        let mut p = vec![3u8];
        p.extend_from_slice(&[0, 0, 0, 1, 16]);
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        let mut bytes = frame(HEADERS, PADDED | PRIORITY, 1, &p);
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let mut c = started();
        let cut = 20;
        let first = c
            .event(&record(124, H2_FRAME_START, &bytes[..cut]), &ids())
            .requests;
        assert!(first.is_empty(), "block not complete yet");
        let heads = c
            .event(&record(124 + cut as u32, 0, &bytes[cut..]), &ids())
            .requests;
        assert_eq!(heads.len(), 1);
        let (info, sampled) = heads[0].head.as_ref().expect("a request with an id");
        assert!(sampled);
        assert_eq!(info.protocol, Protocol::Grpc);
        assert_eq!(info.target, "/shop.Cart/Add");
        assert_eq!(info.host.as_deref(), Some("[::1]:50051"));
        assert_eq!(
            info.request_id.as_deref(),
            Some("9f1c2d3e-0000-4000-8000-00000000abcd")
        );
    }

    #[test]
    fn a_gap_or_a_datapath_loss_gives_the_connection_up() {
        let mut c = started();
        let f = frame(HEADERS, END_HEADERS, 1, &hex(C41));
        // A continuation that does not start where the last bytes ended.
        assert!(c
            .event(&record(124, H2_FRAME_START, &f[..5]), &ids())
            .requests
            .is_empty());
        assert!(c
            .event(&record(124 + 6, 0, &f[6..]), &ids())
            .requests
            .is_empty());
        assert_eq!(c.stats.gaps, 1);
        let mut c = started();
        assert!(c
            .event(&record(124, H2_LOST, &[]), &ids())
            .requests
            .is_empty());
        assert!(c
            .event(&record(124, H2_FRAME_START, &f), &ids())
            .requests
            .is_empty());
        assert_eq!((c.stats.lost, c.stats.ignored), (1, 1));
    }

    #[test]
    fn trailers_are_no_request_and_frames_out_of_order_are_malformed() {
        let mut enc = loona_hpack::Encoder::new();
        let trailers = enc.encode([(&b"grpc-status"[..], &b"0"[..])]);
        let mut c = started();
        let f = frame(HEADERS, END_HEADERS | 0x1, 1, &trailers);
        let heads = c.event(&record(124, H2_FRAME_START, &f), &ids()).requests;
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].head, Err(HeadOutcome::NotHttp));
        assert_eq!((c.stats.other_blocks, c.stats.requests), (1, 0));
        // A CONTINUATION with no HEADERS before it.
        let f = frame(CONTINUATION, END_HEADERS, 3, &trailers);
        let seq = 124 + 9 + trailers.len() as u32;
        assert!(c
            .event(&record(seq, H2_FRAME_START, &f), &ids())
            .requests
            .is_empty());
        assert_eq!(c.stats.malformed, 1);
    }

    #[test]
    fn a_servers_replies_carry_the_status_to_the_request_of_their_stream() {
        let mut c = started();
        // The server's side is in another pod; its notice names the
        // client's namespace.
        let server_key = key().reversed_in(9);
        let mut server = record(7000, H2_PREFACE | H2_REPLIES, &key().netns.to_ne_bytes());
        server.key = server_key;
        let reply = |seq: u32, f: &[u8]| {
            let mut r = record(seq, H2_FRAME_START, f);
            r.key = server_key;
            r
        };
        c.event(&server, &ids());
        assert_eq!((c.stats.connections, c.stats.reply_connections), (1, 1));
        // The client's request on stream 1 applied a trace.
        let mut enc = loona_hpack::Encoder::new();
        let req = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/shop.Cart/Add"),
            (b"content-type", b"application/grpc"),
            (b"x-request-id", b"r-1"),
        ]);
        let heads = c
            .event(
                &record(124, H2_FRAME_START, &frame(HEADERS, END_HEADERS, 1, &req)),
                &ids(),
            )
            .requests;
        assert_eq!(heads.len(), 1);
        c.traced(&key(), 1, [9; 16]);
        // The server's own table: a response, then its trailers.
        let mut enc = loona_hpack::Encoder::new();
        let head = enc.encode([
            (&b":status"[..], &b"200"[..]),
            (b"content-type", b"application/grpc"),
        ]);
        let trailers = enc.encode([(&b"grpc-status"[..], &b"5"[..])]);
        let f = frame(HEADERS, END_HEADERS, 1, &head);
        let got = c.event(&reply(7000, &f), &ids());
        assert!(got.requests.is_empty());
        let want = Reply {
            request: key(),
            stream: 1,
            trace: Some([9; 16]),
            status: Some(200),
            grpc_status: None,
        };
        assert_eq!(got.replies, vec![want.clone()]);
        let seq = 7000 + f.len() as u32 + 30; // a DATA frame between
        let f = frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers);
        let got = c.event(&reply(seq, &f), &ids());
        let end = Reply {
            status: None,
            grpc_status: Some(5),
            ..want
        };
        assert_eq!(got.replies, vec![end]);
        // The stream ended: nothing waits for it any more.
        let got = c.event(&reply(seq + f.len() as u32, &f), &ids());
        assert_eq!(got.replies[0].trace, None);
        assert_eq!(c.stats.replies, 3);
        // Requests waiting for a reply are bounded.
        for s in 0..MAX_PENDING as u32 + 5 {
            c.traced(&key(), 2 * s + 3, [1; 16]);
        }
        assert_eq!(c.stats.pending_dropped, 5);
    }

    #[test]
    fn connections_are_bounded_oldest_first() {
        let mut c = H2Conns::new(2);
        for port in 1..=5u16 {
            let mut ev = record(0, H2_PREFACE, &[]);
            ev.key.local_port = port;
            c.event(&ev, &ids());
        }
        // The same connection started again replaces itself.
        c.event(&record(0, H2_PREFACE, &[]), &ids());
        c.event(&record(0, H2_PREFACE, &[]), &ids());
        assert_eq!(c.len(), 2);
        assert_eq!(c.stats.evicted, 4);
    }

    #[test]
    fn any_bytes_are_an_answer_never_a_panic() {
        let mut c = started();
        let mut x: u32 = 12345;
        for i in 0..2000u32 {
            let mut buf = [0u8; 64];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let n = (x % 64) as usize;
            c.event(&record(i * 64, x & H2_FRAME_START, &buf[..n]), &ids());
            if i % 50 == 0 {
                c.event(&record(0, H2_PREFACE, &[]), &ids());
            }
        }
    }
}
