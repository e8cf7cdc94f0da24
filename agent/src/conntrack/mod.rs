//! Calls through Services: kube-proxy rewrites a ClusterIP into a pod
//! address (DNAT, sometimes also the source: SNAT/masquerade) after the
//! caller's veth, where the datapath saw the request. The host's conntrack
//! table knows what the connection became; this asks it over ctnetlink,
//! once per connection (cached): for traced calls, and for request heads
//! addressed to no local pod.
mod answers;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use agent_common::{FlowKey, PROTO_TCP, PROTO_UDP};

use crate::netlink::{self, attributes, check_error, messages, push_attr, NetlinkError};
use answers::Answers;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// A lookup is answered at once by the kernel; this only bounds a stuck
/// socket.
const REPLY_TIMEOUT: Duration = Duration::from_millis(100);
/// Answers are kept this long: a connection's tuple may be reused later
/// for another destination.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// "Unknown" is kept only this long: asked at a connection's first packet,
/// conntrack may not have confirmed its entry yet (see `recheck`).
const NOT_FOUND_TTL: Duration = Duration::from_secs(1);
/// Failed lookups, none ever answered, after which the kernel is taken as
/// unable to answer (ctnetlink missing): lookups stop instead of costing a
/// new socket per call.
const GIVE_UP_AFTER: u64 = 16;
/// "No entry" answers, and no connection ever known, after which conntrack
/// is taken as following none on this node (no rule needs it, as under a
/// kube-proxy-free Service datapath): such calls are not asked again.
const QUIET_AFTER: u64 = 64;
/// A socket that failed is opened again at most this often.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// The ctnetlink request for the connection `key` (seen from its sender):
/// `nfgenmsg` and the original tuple.
pub fn request(key: &FlowKey) -> Vec<u8> {
    let (family, src, dst) = match (key.local_ip(), key.remote_ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (
            libc::AF_INET as u8,
            (CTA_IP_V4_SRC, s.octets().to_vec()),
            (CTA_IP_V4_DST, d.octets().to_vec()),
        ),
        (s, d) => (
            libc::AF_INET6 as u8,
            (CTA_IP_V6_SRC, v6(s).to_vec()),
            (CTA_IP_V6_DST, v6(d).to_vec()),
        ),
    };
    let mut ip = Vec::new();
    push_attr(&mut ip, src.0, &src.1);
    push_attr(&mut ip, dst.0, &dst.1);
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[key.proto]);
    push_attr(
        &mut proto,
        CTA_PROTO_SRC_PORT,
        &key.local_port.to_be_bytes(),
    );
    push_attr(
        &mut proto,
        CTA_PROTO_DST_PORT,
        &key.remote_port.to_be_bytes(),
    );
    let mut tuple = Vec::new();
    push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    // nfgenmsg: family, version 0, resource id 0.
    let mut msg = vec![family, 0, 0, 0];
    push_attr(&mut msg, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
    msg
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// (source, destination) of a `CTA_TUPLE_*` attribute.
fn parse_tuple(v: &[u8]) -> Result<(SocketAddr, SocketAddr), NetlinkError> {
    let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
    for a in attributes(v) {
        let (t, v) = a?;
        match t {
            CTA_TUPLE_IP => {
                for a in attributes(v) {
                    let (t, v) = a?;
                    let ip = match v.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(v).unwrap()),
                        16 => IpAddr::from(<[u8; 16]>::try_from(v).unwrap()),
                        _ => return Err(NetlinkError::Malformed),
                    };
                    match t {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attributes(v) {
                    let (t, v) = a?;
                    let port = || -> Result<u16, NetlinkError> {
                        Ok(u16::from_be_bytes(
                            v.get(..2)
                                .ok_or(NetlinkError::Malformed)?
                                .try_into()
                                .unwrap(),
                        ))
                    };
                    match t {
                        CTA_PROTO_SRC_PORT => sport = Some(port()?),
                        CTA_PROTO_DST_PORT => dport = Some(port()?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, dst, sport, dport) {
        (Some(s), Some(d), Some(sp), Some(dp)) => {
            Ok((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
        }
        _ => Err(NetlinkError::Malformed),
    }
}

/// The connection as its receiver sees it, seen from the sender (local:
/// the sender as the receiver knows it, remote: the receiver), from a
/// ctnetlink `IPCTNL_MSG_CT_NEW` body; `None` when the host translated
/// nothing.
pub fn parse_reply(body: &[u8], key: &FlowKey) -> Result<Option<FlowKey>, NetlinkError> {
    let attrs = body.get(4..).ok_or(NetlinkError::Malformed)?;
    for a in attributes(attrs) {
        let (t, v) = a?;
        if t == CTA_TUPLE_REPLY {
            // The reply goes from the real receiver to the sender's address
            // as the receiver knows it.
            let (from, to) = parse_tuple(v)?;
            let seen = FlowKey::new(key.netns, key.proto, to, from);
            return Ok((seen != *key).then_some(seen));
        }
    }
    Err(NetlinkError::Malformed)
}

/// What conntrack said of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// The host translated it (a Service address): the callee's side.
    Via(FlowKey),
    /// Not translated, or not a connection conntrack follows.
    Direct,
    /// No entry (not confirmed yet, or no conntrack on its path), or the
    /// lookup failed.
    Unknown,
}

/// What happened to the lookups.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServiceStats {
    /// Connections the host had translated (a Service address).
    pub translated: u64,
    /// Connections conntrack knew, untranslated (another node's pod, the
    /// outside world).
    pub untranslated: u64,
    /// Connections conntrack did not know (no NAT on this node, or the
    /// entry was gone).
    pub not_found: u64,
    /// Failed lookups (socket errors, malformed answers, no ctnetlink).
    pub errors: u64,
    /// Connections first found `Unknown` (no entry, or a failed lookup)
    /// that were translated when asked again: at their request head, their
    /// end or the next sweep (the entry was not confirmed at the first
    /// packet).
    pub confirmed_late: u64,
    /// Traced connections not asked about: lookups had failed
    /// `GIVE_UP_AFTER` times without one answer.
    pub skipped: u64,
}

impl ServiceStats {
    /// Whether an `Unknown` is worth asking about again: not where conntrack
    /// has answered "no entry" `QUIET_AFTER` times and known nothing, which
    /// would only double the lookups of every call.
    pub fn worth_rechecking(&self) -> bool {
        self.translated + self.untranslated > 0 || self.not_found < QUIET_AFTER
    }

    /// Whether lookups have only ever failed, often enough to stop.
    fn never_answered(&self) -> bool {
        self.translated + self.untranslated + self.not_found == 0 && self.errors >= GIVE_UP_AFTER
    }

    /// As metrics: (name, help, value).
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 6] {
        [
            (
                "linking_services_translated_total",
                "Traced connections the host translated (a Service address: the callee's side found through conntrack).",
                self.translated,
            ),
            (
                "linking_services_untranslated_total",
                "Traced connections conntrack knew untranslated.",
                self.untranslated,
            ),
            (
                "linking_services_not_found_total",
                "Traced connections conntrack did not know (no NAT on their path, or not yet confirmed).",
                self.not_found,
            ),
            (
                "linking_services_errors_total",
                "Conntrack lookups that failed (calls through Services stay unlinked).",
                self.errors,
            ),
            (
                "linking_services_confirmed_late_total",
                "Connections conntrack did not know at their first packet and had translated when asked again.",
                self.confirmed_late,
            ),
            (
                "linking_services_skipped_total",
                "Traced connections not looked up in conntrack: every lookup had failed (no ctnetlink), so calls through Services stay unlinked.",
                self.skipped,
            ),
        ]
    }
}

/// Cached conntrack lookups. Without ctnetlink (the kernel refused the
/// socket) every lookup is an error, counted, and calls through Services
/// are not linked; after `GIVE_UP_AFTER` such errors and no answer,
/// lookups stop (`skipped`).
pub struct Services {
    /// Lookups are made at all (`open`, and not given up).
    on: bool,
    /// `None` after a failure, until it is opened again (`REOPEN_EVERY`).
    sock: Option<netlink::Socket>,
    reopen_at: Instant,
    /// Bound 0: no lookups by configuration (`disabled`).
    answers: Answers,
    pub stats: ServiceStats,
}

impl Services {
    /// No lookups: every connection is taken as addressed.
    pub fn disabled() -> Self {
        Self {
            on: false,
            sock: None,
            reopen_at: Instant::now(),
            answers: Answers::new(0),
            stats: ServiceStats::default(),
        }
    }

    /// Lookups in this network namespace's conntrack table, at most `cap`
    /// answers cached.
    pub fn open(cap: usize) -> Result<Self, NetlinkError> {
        let sock = open_socket()?;
        Ok(Self {
            on: true,
            sock: Some(sock),
            answers: Answers::new(cap),
            ..Self::disabled()
        })
    }

    /// Forgets answers past their time, oldest first, and gives back the
    /// table memory they held (the cache would otherwise stay as large as
    /// its busiest moment made it).
    pub fn trim(&mut self) {
        self.answers.trim(Instant::now());
    }

    /// `key` (a connection seen from its sender) as its receiver sees it,
    /// when the host translated it.
    pub fn translate(&mut self, key: &FlowKey) -> Option<FlowKey> {
        match self.find(key) {
            Translation::Via(via) => Some(via),
            Translation::Direct | Translation::Unknown => None,
        }
    }

    /// [`Services::translate`], telling "conntrack had no entry" apart: a
    /// connection's first packet is read before netfilter confirms its
    /// entry, now and then (the agent can be that quick).
    pub fn find(&mut self, key: &FlowKey) -> Translation {
        if !matches!(key.proto, PROTO_TCP | PROTO_UDP) || self.answers.cap() == 0 {
            return Translation::Direct;
        }
        if !self.on {
            self.stats.skipped += 1;
            return Translation::Direct;
        }
        let now = Instant::now();
        if let Some(seen) = self.answers.get(key, now) {
            return seen;
        }
        // After a failed lookup at once; after a failed open, once a while.
        if self.sock.is_none() && now >= self.reopen_at {
            self.sock = open_socket().ok();
            if self.sock.is_none() {
                self.reopen_at = now + REOPEN_EVERY;
            }
        }
        let (seen, ttl) = match self.lookup(key) {
            Ok(Some(seen)) => {
                self.stats.translated += 1;
                (Translation::Via(seen), CACHE_TTL)
            }
            Ok(None) => {
                self.stats.untranslated += 1;
                (Translation::Direct, CACHE_TTL)
            }
            Err(NetlinkError::Errno(e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.stats.not_found += 1;
                (Translation::Unknown, NOT_FOUND_TTL)
            }
            Err(e) => {
                self.stats.errors += 1;
                // A timed-out answer may still arrive: start afresh.
                self.sock = None;
                if self.stats.never_answered() {
                    self.on = false;
                    tracing::warn!(
                        "conntrack lookups stopped after {} failures and no answer (calls through Services will not link): {}",
                        self.stats.errors,
                        crate::report(&e)
                    );
                }
                // Kept like "no entry": asked again at the call's head, end
                // or next sweep.
                (Translation::Unknown, NOT_FOUND_TTL)
            }
        };
        self.answers.insert(*key, seen, now, ttl);
        seen
    }

    /// [`Services::translate`], except that a cached `Unknown` is asked
    /// again (where that is worth it: `ServiceStats::worth_rechecking`):
    /// for a connection past its first packet (its request head, its end,
    /// a sweep later), netfilter has long confirmed the entry.
    pub fn recheck(&mut self, key: &FlowKey) -> Option<FlowKey> {
        let worth = self.stats.worth_rechecking();
        // Past its time, so `translate` asks conntrack again.
        let again = worth && self.answers.expire_unknown(key, Instant::now());
        let via = self.translate(key);
        if via.is_some() && again {
            self.stats.confirmed_late += 1;
        }
        via
    }

    fn lookup(&mut self, key: &FlowKey) -> Result<Option<FlowKey>, NetlinkError> {
        let sock = self.sock.as_mut().ok_or(NetlinkError::Closed)?;
        sock.send(
            NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
            0,
            &request(key),
        )?;
        let mut buf = [0u8; 1024];
        let n = sock.recv(&mut buf)?;
        for m in messages(&buf[..n]) {
            let (ty, body) = m?;
            match ty {
                NLMSG_ERROR => check_error(body)?,
                t if t == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW => {
                    return parse_reply(body, key)
                }
                _ => {}
            }
        }
        Err(NetlinkError::Malformed)
    }
}

fn open_socket() -> Result<netlink::Socket, NetlinkError> {
    let sock = netlink::Socket::open_protocol(libc::NETLINK_NETFILTER, false)?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: REPLY_TIMEOUT.as_micros() as libc::suseconds_t,
    };
    // SAFETY: setting a timeval option of its own size on our socket.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FlowKey {
        FlowKey::new(
            7,
            PROTO_TCP,
            ([10, 1, 0, 2], 41000).into(),
            ([10, 96, 0, 10], 80).into(),
        )
    }

    /// A `CT_NEW` body as the kernel writes it: nfgenmsg, orig and reply
    /// tuples (plus attributes we skip).
    fn answer(reply_from: SocketAddr, reply_to: SocketAddr) -> Vec<u8> {
        let tuple = |s: SocketAddr, d: SocketAddr| {
            let mut ip = Vec::new();
            let oct = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v) => v.octets().to_vec(),
                IpAddr::V6(v) => v.octets().to_vec(),
            };
            push_attr(&mut ip, CTA_IP_V4_SRC, &oct(s));
            push_attr(&mut ip, CTA_IP_V4_DST, &oct(d));
            let mut p = Vec::new();
            push_attr(&mut p, CTA_PROTO_NUM, &[6]);
            push_attr(&mut p, CTA_PROTO_SRC_PORT, &s.port().to_be_bytes());
            push_attr(&mut p, CTA_PROTO_DST_PORT, &d.port().to_be_bytes());
            let mut t = Vec::new();
            push_attr(&mut t, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
            push_attr(&mut t, CTA_TUPLE_PROTO | NLA_F_NESTED, &p);
            t
        };
        let mut b = vec![2, 0, 0, 0];
        push_attr(
            &mut b,
            CTA_TUPLE_ORIG | NLA_F_NESTED,
            &tuple(
                "10.1.0.2:41000".parse().unwrap(),
                "10.96.0.10:80".parse().unwrap(),
            ),
        );
        push_attr(&mut b, 3, &[0, 0, 0, 2]); // CTA_STATUS
        push_attr(
            &mut b,
            CTA_TUPLE_REPLY | NLA_F_NESTED,
            &tuple(reply_from, reply_to),
        );
        b
    }

    #[test]
    fn dnat_and_masquerade_give_the_connection_as_its_receiver_sees_it() {
        let k = key();
        // DNAT only (kube-proxy's usual rule).
        let b = answer(
            "10.1.0.9:9100".parse().unwrap(),
            "10.1.0.2:41000".parse().unwrap(),
        );
        let seen = parse_reply(&b, &k).unwrap().unwrap();
        assert_eq!(seen.remote_ip().to_string(), "10.1.0.9");
        assert_eq!((seen.local_port, seen.remote_port), (41000, 9100));
        assert_eq!(seen.local_ip(), k.local_ip());
        assert_eq!(seen.netns, k.netns);
        // DNAT and masquerade: the receiver sees the node's address.
        let b = answer(
            "10.1.0.9:9100".parse().unwrap(),
            "10.1.0.1:52000".parse().unwrap(),
        );
        let seen = parse_reply(&b, &k).unwrap().unwrap();
        assert_eq!(seen.local_ip().to_string(), "10.1.0.1");
        assert_eq!(seen.local_port, 52000);
        // Nothing translated.
        let b = answer(
            "10.96.0.10:80".parse().unwrap(),
            "10.1.0.2:41000".parse().unwrap(),
        );
        assert_eq!(parse_reply(&b, &k).unwrap(), None);
    }

    #[test]
    fn the_request_names_the_original_tuple_and_bad_answers_are_errors() {
        let k = key();
        let r = request(&k);
        assert_eq!(r[0], libc::AF_INET as u8);
        let (t, v) = attributes(&r[4..]).next().unwrap().unwrap();
        assert_eq!(t, CTA_TUPLE_ORIG);
        let (s, d) = parse_tuple(v).unwrap();
        assert_eq!(
            (s.to_string().as_str(), d.to_string().as_str()),
            ("10.1.0.2:41000", "10.96.0.10:80")
        );
        let b = answer(
            "10.1.0.9:9100".parse().unwrap(),
            "10.1.0.2:41000".parse().unwrap(),
        );
        for cut in 0..b.len() {
            // Never a panic; cut answers are errors or (cut before the
            // reply tuple) missing.
            let _ = parse_reply(&b[..cut], &k);
        }
        assert!(parse_reply(&[2, 0, 0, 0], &k).is_err());
    }

    #[test]
    fn no_entry_is_asked_again_only_where_conntrack_follows_connections() {
        let mut s = ServiceStats::default();
        assert!(s.worth_rechecking(), "a fresh agent cannot tell yet");
        s.not_found = QUIET_AFTER - 1;
        assert!(s.worth_rechecking());
        s.not_found = QUIET_AFTER;
        assert!(!s.worth_rechecking(), "nothing known, only misses");
        s.untranslated = 1;
        assert!(
            s.worth_rechecking(),
            "one known connection: misses are races"
        );
    }

    #[test]
    fn lookups_that_never_answer_stop_and_what_they_miss_is_counted() {
        // Opened, but the socket is gone and not reopened within the test:
        // every lookup fails as one would without ctnetlink.
        let mut s = Services {
            on: true,
            reopen_at: Instant::now() + Duration::from_secs(3600),
            answers: Answers::new(16),
            ..Services::disabled()
        };
        let call = |port: u16| {
            FlowKey::new(
                7,
                PROTO_TCP,
                ([10, 1, 0, 2], port).into(),
                ([10, 96, 0, 10], 80).into(),
            )
        };
        for port in 0..GIVE_UP_AFTER as u16 {
            assert_eq!(s.find(&call(port)), Translation::Unknown);
            if port + 1 < GIVE_UP_AFTER as u16 {
                // Kept a moment like "no entry": not asked twice at once.
                assert_eq!(s.find(&call(port)), Translation::Unknown);
            }
        }
        assert_eq!(s.stats.errors, GIVE_UP_AFTER);
        assert_eq!(s.find(&call(100)), Translation::Direct);
        assert_eq!(s.find(&call(101)), Translation::Direct);
        assert_eq!((s.stats.errors, s.stats.skipped), (GIVE_UP_AFTER, 2));
        // An agent with lookups off by configuration counts nothing.
        let mut off = Services::disabled();
        assert_eq!(off.find(&key()), Translation::Direct);
        assert_eq!((off.stats.errors, off.stats.skipped), (0, 0));
    }

    #[test]
    fn a_kernel_that_answered_once_is_never_given_up_on() {
        let s = ServiceStats {
            not_found: 1,
            errors: 10 * GIVE_UP_AFTER,
            ..Default::default()
        };
        assert!(!s.never_answered());
        let s = ServiceStats {
            errors: GIVE_UP_AFTER - 1,
            ..Default::default()
        };
        assert!(!s.never_answered());
    }
}
