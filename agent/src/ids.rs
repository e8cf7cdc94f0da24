//! The one place that turns request headers into a 128-bit trace id.
//!
//! Rules, in order:
//! 1. A valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
//!    ids not all zero) wins: trace id, parent span id and sampled flag.
//! 2. Otherwise `x-request-id` (case-insensitive, surrounding whitespace
//!    ignored):
//!    - a UUID maps to its 16 bytes, after normalising the version nibble
//!      (13th hex digit) from Envoy's 9/a/b back to 4, so one request keeps
//!      one id across Envoy hops;
//!    - 32 hex digits (nginx `$request_id`) map to their 16 bytes;
//!    - an AWS X-Ray id `1-<8 hex>-<24 hex>` maps to the two parts joined;
//!    - anything else is hashed: the first 16 bytes of SHA-256 over the
//!      trimmed value's bytes. Every node computes the same id.
//! 3. The result is never all zero (such ids fall through to hashing).
//!
//! Values longer than [`MAX_ID_LEN`], empty, or with bytes outside printable
//! ASCII are refused with an error: they are not request ids.
use sha2::{Digest, Sha256};

/// Longest accepted `x-request-id` value.
pub const MAX_ID_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("no x-request-id or traceparent")]
    Missing,
    #[error("request id is empty")]
    Empty,
    #[error("request id longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("request id has a byte outside printable ASCII")]
    NotAscii,
}

/// How the trace id was derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Traceparent,
    Uuid,
    Hex32,
    XRay,
    Hashed,
}

/// A request's trace identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceIdentity {
    pub trace_id: [u8; 16],
    /// From `traceparent`: the caller's span.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    pub kind: IdKind,
    /// The original `x-request-id`, kept for span attributes.
    pub request_id: Option<String>,
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(out)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a W3C traceparent; None when invalid (the spec says: ignore it).
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let v = v.trim();
    let mut parts = v.split('-');
    let (ver, tid, pid, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ver.len() != 2 || !is_lower_hex(ver) || ver == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if ver == "00" && parts.next().is_some() {
        return None;
    }
    if !(is_lower_hex(tid) && is_lower_hex(pid) && is_lower_hex(flags)) {
        return None;
    }
    let t: [u8; 16] = hex_bytes(tid.as_bytes())?;
    let p: [u8; 8] = hex_bytes(pid.as_bytes())?;
    let f: [u8; 1] = hex_bytes(flags.as_bytes())?;
    if t == [0; 16] || p == [0; 8] {
        return None;
    }
    Some((t, p, f[0]))
}

/// Checks an x-request-id value and returns it trimmed.
pub fn validate_request_id(v: &str) -> Result<&str, IdError> {
    let t = v.trim();
    if t.is_empty() {
        return Err(IdError::Empty);
    }
    if t.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if !t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(IdError::NotAscii);
    }
    Ok(t)
}

/// Maps a request id to a trace id (rule 2 above).
pub fn map_request_id(v: &str) -> Result<([u8; 16], IdKind), IdError> {
    let t = validate_request_id(v)?;
    let b = t.as_bytes();
    // A UUID has exactly its four dashes (8-4-4-4-12); anything else with
    // 36 bytes is not one (and would leave fewer than 32 hex digits).
    let is_uuid = b.len() == 36
        && b.iter()
            .enumerate()
            .all(|(i, &c)| (c == b'-') == matches!(i, 8 | 13 | 18 | 23));
    let direct = if is_uuid {
        let mut hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
        // Envoy's trace-reason nibble back to the UUIDv4 version.
        if matches!(hex[12].to_ascii_lowercase(), b'9' | b'a' | b'b') {
            hex[12] = b'4';
        }
        hex_bytes::<16>(&hex).map(|id| (id, IdKind::Uuid))
    } else if b.len() == 32 {
        hex_bytes::<16>(b).map(|id| (id, IdKind::Hex32))
    } else if b.len() == 35 && b.starts_with(b"1-") && b[10] == b'-' {
        let joined: Vec<u8> = [&b[2..10], &b[11..]].concat();
        hex_bytes::<16>(&joined).map(|id| (id, IdKind::XRay))
    } else {
        None
    };
    match direct {
        Some((id, kind)) if id != [0; 16] => Ok((id, kind)),
        _ => Ok((hash_id(t), IdKind::Hashed)),
    }
}

/// SHA-256 of the value, first 16 bytes; never all zero.
pub fn hash_id(v: &str) -> [u8; 16] {
    let d = Sha256::digest(v.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

/// The trace identity of a request from its headers.
pub fn identify(
    request_id: Option<&str>,
    traceparent: Option<&str>,
) -> Result<TraceIdentity, IdError> {
    let rid = request_id.map(|v| validate_request_id(v).map(str::to_string));
    if let Some((trace_id, parent, flags)) = traceparent.and_then(parse_traceparent) {
        // A valid traceparent stands on its own: an unusable request id
        // beside it is left out, not a reason to lose the trace.
        return Ok(TraceIdentity {
            trace_id,
            parent_span_id: Some(parent),
            sampled: flags & 1 == 1,
            kind: IdKind::Traceparent,
            request_id: rid.and_then(Result::ok),
        });
    }
    let rid = rid.ok_or(IdError::Missing)??;
    let (trace_id, kind) = map_request_id(&rid)?;
    Ok(TraceIdentity {
        trace_id,
        parent_span_id: None,
        sampled: true,
        kind,
        request_id: Some(rid),
    })
}

pub fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

fn push_hex(s: &mut String, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 0xf) as usize] as char);
    }
}

/// A fresh UUIDv4 string.
pub fn new_uuid() -> String {
    let mut b = random::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, part) in [&b[..4], &b[4..6], &b[6..8], &b[8..10], &b[10..]]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            s.push('-');
        }
        push_hex(&mut s, part);
    }
    s
}

/// A `traceparent` for a trace id with a new span id, sampled.
pub fn new_traceparent(trace_id: &[u8; 16]) -> String {
    let mut span = random::<8>();
    span[0] |= 1; // never all zero
    format!("00-{}-{}-01", to_hex(trace_id), to_hex(&span))
}

/// The span id of a call (a CLIENT span) that both ends can compute without
/// talking to each other: from the trace and the connection as the callee
/// sees it, written from the caller's side (`local` = caller, `remote` =
/// callee; the namespace is not part of it). Never all zero.
pub fn call_span_id(trace_id: &[u8; 16], conn: &agent_common::FlowKey) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"tagflow call");
    h.update(trace_id);
    h.update([conn.family, conn.proto]);
    h.update(conn.local_addr);
    h.update(conn.local_port.to_be_bytes());
    h.update(conn.remote_addr);
    h.update(conn.remote_port.to_be_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// `N` bytes from the OS RNG, drawn from a per-thread buffer: one
/// `getrandom` per 512 bytes instead of one per id (the sidecar makes ids
/// per request).
pub fn random<const N: usize>() -> [u8; N] {
    const POOL: usize = 512;
    const { assert!(N <= POOL) };
    thread_local! {
        static BUF: std::cell::RefCell<([u8; POOL], usize)> =
            const { std::cell::RefCell::new(([0; POOL], POOL)) };
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let (buf, used) = &mut *b;
        if *used + N > POOL {
            // The OS RNG only fails when the kernel has none; there is no
            // sane fallback for ids, so that is fatal.
            getrandom::fill(buf).expect("OS random number generator");
            *used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&buf[*used..*used + N]);
        *used += N;
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_calls_span_id_is_the_same_from_either_end_and_differs_per_trace_and_connection() {
        use agent_common::{FlowKey, PROTO_TCP};
        let caller = FlowKey::new(
            3,
            PROTO_TCP,
            ([10, 1, 0, 2], 40000).into(),
            ([10, 2, 0, 3], 80).into(),
        );
        // The callee's node sees the same connection in no pod namespace.
        let seen_there = FlowKey::new(
            0,
            PROTO_TCP,
            ([10, 2, 0, 3], 80).into(),
            ([10, 1, 0, 2], 40000).into(),
        );
        let t = [7; 16];
        assert_eq!(
            call_span_id(&t, &caller),
            call_span_id(&t, &seen_there.reversed_in(9))
        );
        assert_ne!(call_span_id(&t, &caller), call_span_id(&[8; 16], &caller));
        let other = FlowKey::new(
            3,
            PROTO_TCP,
            ([10, 1, 0, 2], 40001).into(),
            ([10, 2, 0, 3], 80).into(),
        );
        assert_ne!(call_span_id(&t, &caller), call_span_id(&t, &other));
    }

    #[test]
    fn fresh_uuids_are_v4_and_differ() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(map_request_id(&a).unwrap().1, IdKind::Uuid);
        assert_eq!(&a[14..15], "4");
        // Many more than one buffer's worth stay distinct.
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| random::<8>()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn uuid_maps_to_its_bytes_and_envoy_nibble_is_normalised() {
        let (id, k) = map_request_id("3f2b6a1e-8c4d-4e5f-9a0b-1c2d3e4f5a6b").unwrap();
        assert_eq!(k, IdKind::Uuid);
        assert_eq!(to_hex(&id), "3f2b6a1e8c4d4e5f9a0b1c2d3e4f5a6b");
        for envoy in ['9', 'a', 'b', 'A', 'B'] {
            let v = format!("3f2b6a1e-8c4d-{envoy}e5f-9a0b-1c2d3e4f5a6b");
            assert_eq!(map_request_id(&v).unwrap().0, id, "{v}");
        }
        // Case and surrounding whitespace do not matter.
        assert_eq!(
            map_request_id("  3F2B6A1E-8C4D-4E5F-9A0B-1C2D3E4F5A6B\t")
                .unwrap()
                .0,
            id
        );
    }

    #[test]
    fn hex32_xray_and_hash() {
        let (id, k) = map_request_id("0123456789abcdef0123456789ABCDEF").unwrap();
        assert_eq!(
            (to_hex(&id).as_str(), k),
            ("0123456789abcdef0123456789abcdef", IdKind::Hex32)
        );
        let (id, k) = map_request_id("1-5759e988-bd862e3fe1be46a994272793").unwrap();
        assert_eq!(
            (to_hex(&id).as_str(), k),
            ("5759e988bd862e3fe1be46a994272793", IdKind::XRay)
        );
        let (id, k) = map_request_id("req-42").unwrap();
        assert_eq!(k, IdKind::Hashed);
        // SHA-256("req-42"), first 16 bytes: the documented algorithm.
        assert_eq!(to_hex(&id), to_hex(&Sha256::digest(b"req-42")[..16]));
        // All-zero ids are never emitted.
        let (z, k) = map_request_id("00000000-0000-0000-0000-000000000000").unwrap();
        assert_eq!(k, IdKind::Hashed);
        assert_ne!(z, [0; 16]);
    }

    #[test]
    fn fuzz_regression_dashes_beyond_the_uuid_positions() {
        // Found by `cargo xtask fuzz ids`: 36 bytes, dashes at the UUID
        // positions and elsewhere; once panicked indexing the version nibble.
        let v = "00------------------2d2---d- ;;;; --";
        assert_eq!(v.len(), 36);
        let (id, kind) = map_request_id(v).unwrap();
        assert_eq!(kind, IdKind::Hashed);
        assert_ne!(id, [0; 16]);
    }

    #[test]
    fn bad_values_are_refused() {
        assert_eq!(map_request_id("   "), Err(IdError::Empty));
        assert_eq!(
            map_request_id(&"x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong)
        );
        assert_eq!(map_request_id("caf\u{e9}"), Err(IdError::NotAscii));
        assert_eq!(map_request_id("a\u{7}b"), Err(IdError::NotAscii));
        assert_eq!(identify(None, None), Err(IdError::Missing));
        assert_eq!(identify(None, Some("garbage")), Err(IdError::Missing));
    }

    #[test]
    fn traceparent_wins_and_invalid_ones_are_ignored() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = identify(Some("3f2b6a1e-8c4d-4e5f-9a0b-1c2d3e4f5a6b"), Some(tp)).unwrap();
        assert_eq!(t.kind, IdKind::Traceparent);
        assert_eq!(to_hex(&t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&t.parent_span_id.unwrap()), "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(
            t.request_id.as_deref(),
            Some("3f2b6a1e-8c4d-4e5f-9a0b-1c2d3e4f5a6b")
        );
        // An unusable request id beside a valid traceparent: the trace
        // stands, the id is left out. Alone, it is an error.
        let t = identify(Some("caf\u{e9}"), Some(tp)).unwrap();
        assert_eq!(to_hex(&t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.request_id, None);
        assert_eq!(identify(Some("caf\u{e9}"), None), Err(IdError::NotAscii));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz")
                .is_some()
        );
        let unsampled = identify(
            None,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        )
        .unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn generated_ids_round_trip() {
        for _ in 0..100 {
            let u = new_uuid();
            let (id, k) = map_request_id(&u).unwrap();
            assert_eq!(k, IdKind::Uuid);
            assert_eq!(to_hex(&id), u.replace('-', ""));
            let tp = new_traceparent(&id);
            assert_eq!(parse_traceparent(&tp).unwrap().0, id);
        }
    }

    proptest! {
        #[test]
        fn any_input_maps_or_is_refused_without_panicking(s in ".{0,300}") {
            if let Ok((id, _)) = map_request_id(&s) {
                prop_assert_ne!(id, [0; 16]);
            }
            let _ = parse_traceparent(&s);
        }

        #[test]
        fn uuids_round_trip_in_any_case(b in any::<[u8; 16]>(), upper in any::<bool>()) {
            let h = to_hex(&b);
            let mut u = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
            if upper { u = u.to_uppercase(); }
            let (id, kind) = map_request_id(&u).unwrap();
            if b == [0; 16] {
                prop_assert_eq!(kind, IdKind::Hashed);
            } else {
                let mut want = b;
                if matches!(want[6] >> 4, 9..=0xb) { want[6] = (want[6] & 0x0f) | 0x40; }
                if want != [0; 16] { prop_assert_eq!(id, want); }
            }
        }

        #[test]
        fn printable_ids_are_stable_and_trim_insensitive(s in "[!-~]{1,64}") {
            let a = map_request_id(&s).unwrap();
            let b = map_request_id(&format!("  {s} ")).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
