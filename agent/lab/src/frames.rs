//! Crafted frames and `__sk_buff` contexts for `BPF_PROG_TEST_RUN` (tests and
//! the datapath benchmark).
use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IPv6 extension header kinds the builder can insert.
#[derive(Clone, Copy, Debug)]
pub enum Ext6 {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with this offset (in 8-byte units); 0 = first fragment.
    Fragment(u16),
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
    /// Another IP protocol number with an opaque 8-byte header.
    Other(u8),
}

/// A frame description; `build()` renders it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<(u16, u16)>, // (TPID, VLAN id)
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    /// IPv4 options bytes (padded to 4).
    pub ip4_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units (non-zero = non-first fragment).
    pub ip4_frag_offset: u16,
    pub ext6: Vec<Ext6>,
    /// TCP sequence number of the payload's first byte.
    pub seq: u32,
    /// TCP acknowledgment number.
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            sport,
            dport,
            l4: L4::Tcp { flags: 0x18 },
            ip4_options: Vec::new(),
            ip4_frag_offset: 0,
            ext6: Vec::new(),
            seq: 1,
            ack: 0,
            payload: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            l4: L4::Udp,
            payload: b"hello".to_vec(),
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// The `FlowKey` the datapath computes for this frame in `netns`.
    pub fn flow_key(&self, netns: u64) -> agent_common::FlowKey {
        let proto = match self.l4 {
            L4::Tcp { .. } => agent_common::PROTO_TCP,
            L4::Udp => agent_common::PROTO_UDP,
            L4::Other(p) => p,
        };
        agent_common::FlowKey::new(
            netns,
            proto,
            (self.src, self.sport).into(),
            (self.dst, self.dport).into(),
        )
    }

    /// Length of everything up to the end of the L4 header: any shorter
    /// truncation must be reported as a parse failure.
    pub fn headers_len(&self) -> usize {
        self.build().len() - self.payload.len()
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        let proto = match self.l4 {
            L4::Tcp { flags } => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&self.ack.to_be_bytes());
                l4.push(5 << 4); // data offset
                l4.push(flags);
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
                6
            }
            L4::Udp => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                17
            }
            L4::Other(p) => {
                l4.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
                p
            }
        };
        l4.extend_from_slice(&self.payload);

        let (ethertype, l3) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (ETH_P_IP, self.ipv4(s.octets(), d.octets(), proto, &l4))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                (ETH_P_IPV6, self.ipv6(s.octets(), d.octets(), proto, &l4))
            }
            _ => panic!("mixed address families"),
        };
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&l3);
        f
    }

    fn ipv4(&self, s: [u8; 4], d: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut opts = self.ip4_options.clone();
        opts.resize(opts.len().div_ceil(4) * 4, 0);
        let ihl = 5 + opts.len() / 4;
        let total = ihl * 4 + l4.len();
        let mut h = vec![(4 << 4) | ihl as u8, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&(self.ip4_frag_offset & 0x1fff).to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        h.extend_from_slice(&opts);
        let csum = checksum(&h);
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(&self, s: [u8; 16], d: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
        // Extension headers, each pointing at the next.
        let mut exts = Vec::new();
        for (i, e) in self.ext6.iter().enumerate() {
            let next = match self.ext6.get(i + 1) {
                Some(n) => ext6_number(*n),
                None => proto,
            };
            match e {
                Ext6::Fragment(off) => {
                    exts.push(next);
                    exts.push(0);
                    exts.extend_from_slice(&(off << 3).to_be_bytes());
                    exts.extend_from_slice(&[0, 0, 0, 1]);
                }
                _ => {
                    // 8 bytes: next, len=0, PadN option of 4 bytes of padding.
                    exts.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
        }
        let first = self.ext6.first().map(|e| ext6_number(*e)).unwrap_or(proto);
        let mut h = vec![6 << 4, 0, 0, 0];
        h.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
        h.push(first);
        h.push(64);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        h.extend_from_slice(&exts);
        h.extend_from_slice(l4);
        h
    }
}

fn ext6_number(e: Ext6) -> u8 {
    match e {
        Ext6::HopByHop => 0,
        Ext6::Routing => 43,
        Ext6::DestOpts => 60,
        Ext6::Fragment(_) => 44,
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame (non-IP).
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f
}

/// Size of `struct __sk_buff` as BPF_PROG_TEST_RUN takes it.
pub const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;
const SKB_CB: usize = 48;

/// A `__sk_buff` for `ctx_in`: only fields the kernel accepts are set.
/// `ifindex` must name an existing device (1 = lo) or be 0.
pub fn skb_ctx(ifindex: u32, mark: u32, cb: [u32; 5]) -> [u8; SKB_CTX_LEN] {
    let mut c = [0u8; SKB_CTX_LEN];
    c[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
    c[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    for (i, w) in cb.iter().enumerate() {
        c[SKB_CB + i * 4..SKB_CB + i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    c
}

const SKB_TSTAMP: usize = 152;
const SKB_TSTAMP_TYPE: usize = 180;

/// Like [`skb_ctx`], with a delivery timestamp on the monotonic clock, as
/// TCP leaves on every segment it sends (`tstamp_type` needs Linux 6.11).
pub fn skb_ctx_tstamp(ifindex: u32, tstamp_ns: u64) -> [u8; SKB_CTX_LEN] {
    let mut c = skb_ctx(ifindex, 0, [0; 5]);
    c[SKB_TSTAMP..SKB_TSTAMP + 8].copy_from_slice(&tstamp_ns.to_ne_bytes());
    c[SKB_TSTAMP_TYPE] = 1; // BPF_SKB_CLOCK_MONOTONIC
    c
}

/// (mark, cb) from a `ctx_out` buffer.
pub fn skb_ctx_out(c: &[u8]) -> (u32, [u32; 5]) {
    let word = |o: usize| u32::from_ne_bytes(c[o..o + 4].try_into().unwrap());
    (
        word(SKB_MARK),
        std::array::from_fn(|i| word(SKB_CB + i * 4)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_tcp_layout() {
        let f = Frame::tcp(
            "10.0.0.1".parse().unwrap(),
            1234,
            "10.0.0.2".parse().unwrap(),
            80,
        )
        .build();
        assert_eq!(&f[12..14], &ETH_P_IP.to_be_bytes());
        assert_eq!(f[14], 0x45);
        assert_eq!(&f[26..30], &[10, 0, 0, 1]);
        assert_eq!(&f[34..36], &1234u16.to_be_bytes());
        assert_eq!(checksum(&f[14..34]), 0, "header checksum verifies");
    }

    #[test]
    fn ipv4_options_and_vlans() {
        let mut fr = Frame::udp(
            "10.0.0.1".parse().unwrap(),
            5,
            "10.0.0.2".parse().unwrap(),
            53,
        );
        fr.vlans = vec![(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)];
        fr.ip4_options = vec![1, 1, 1];
        let f = fr.build();
        assert_eq!(&f[12..14], &ETH_P_8021AD.to_be_bytes());
        assert_eq!(&f[20..22], &ETH_P_IP.to_be_bytes());
        assert_eq!(f[22], 0x46, "IHL 6 with 4 bytes of options");
    }

    #[test]
    fn ipv6_ext_chain() {
        let mut fr = Frame::tcp("fd00::1".parse().unwrap(), 1, "fd00::2".parse().unwrap(), 2);
        fr.ext6 = vec![Ext6::HopByHop, Ext6::DestOpts];
        let f = fr.build();
        assert_eq!(f[14 + 6], 0, "first next-header is hop-by-hop");
        assert_eq!(f[54], 60, "hop-by-hop points at dest-opts");
        assert_eq!(f[62], 6, "dest-opts points at TCP");
    }

    #[test]
    fn ctx_round_trip() {
        let c = skb_ctx(1, 0x55, [1, 2, 3, 4, 5]);
        assert_eq!(skb_ctx_out(&c), (0x55, [1, 2, 3, 4, 5]));
    }
}
