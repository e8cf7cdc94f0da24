//! A small rtnetlink client: link dumps, link change notifications and nsid
//! queries. Hand-rolled on purpose: three message types, no async runtime
//! coupling, and the parsers are pure functions tested on captured bytes.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTMGRP_LINK: u32 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Io(#[from] io::Error),
    #[error("netlink error reply")]
    Errno(#[source] io::Error),
    #[error("malformed netlink message")]
    Malformed,
    #[error("no netlink socket (opening one failed)")]
    Closed,
}

/// One interface as rtnetlink describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("veth", "bridge", ...), when given.
    pub kind: Option<String>,
    /// Peer ifindex (veth), in the peer's namespace.
    pub link: Option<u32>,
    /// nsid of the peer's namespace, relative to ours.
    pub link_netnsid: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    New(Link),
    Del(Link),
    /// Notifications were lost (ENOBUFS): every link there is now.
    Resync(Vec<Link>),
}

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// A NETLINK_ROUTE socket; with `monitor`, subscribed to link changes.
    pub fn open(monitor: bool) -> Result<Self, NetlinkError> {
        Self::open_protocol(libc::NETLINK_ROUTE, monitor)
    }

    /// A socket of netlink family `protocol` (`monitor`: route only).
    pub(crate) fn open_protocol(protocol: i32, monitor: bool) -> Result<Self, NetlinkError> {
        // SAFETY: socket/bind with a zeroed sockaddr_nl of the right size.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error().into());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            sa.nl_groups = if monitor { RTMGRP_LINK } else { 0 };
            if monitor {
                // Pod churn comes in bursts: a larger queue makes lost
                // notifications (ENOBUFS, then a full resync) rarer.
                let size: libc::c_int = 4 << 20;
                let set = |opt| {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&size as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as u32,
                    )
                };
                if set(libc::SO_RCVBUFFORCE) != 0 {
                    set(libc::SO_RCVBUF);
                }
            }
            if libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error().into());
            }
            Ok(Self { fd, seq: 1 })
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn send(
        &mut self,
        ty: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<u32, NetlinkError> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: sending an initialised buffer on our own socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(self.seq)
    }

    /// Blocking receive of one datagram (may hold several messages).
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, NetlinkError> {
        loop {
            // SAFETY: receiving into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }

    /// All links of this namespace.
    pub fn dump_links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        self.send(RTM_GETLINK, NLM_F_DUMP, &[0u8; 16])?;
        let mut links = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for m in messages(&buf[..n]) {
                let (ty, body) = m?;
                match ty {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => check_error(body)?,
                    RTM_NEWLINK => links.push(parse_link(body)?),
                    _ => {}
                }
            }
        }
    }
}

/// Reads link notifications from a monitor socket (blocking).
pub fn read_events(sock: &Socket, buf: &mut [u8]) -> Result<Vec<LinkEvent>, NetlinkError> {
    let n = sock.recv(buf)?;
    let mut out = Vec::new();
    for m in messages(&buf[..n]) {
        let (ty, body) = m?;
        match ty {
            RTM_NEWLINK => out.push(LinkEvent::New(parse_link(body)?)),
            RTM_DELLINK => out.push(LinkEvent::Del(parse_link(body)?)),
            _ => {}
        }
    }
    Ok(out)
}

/// The nsid our namespace uses for the namespace behind `ns_fd`; `None`
/// when none is assigned (no veth or similar links the two).
pub fn nsid_of_fd(ns_fd: RawFd) -> Result<Option<i32>, NetlinkError> {
    let mut sock = Socket::open(false)?;
    let mut payload = vec![0u8; 4]; // rtgenmsg, padded
    push_attr(&mut payload, NETNSA_FD, &(ns_fd as u32).to_ne_bytes());
    sock.send(RTM_GETNSID, 0, &payload)?;
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut buf)?;
    for m in messages(&buf[..n]) {
        let (ty, body) = m?;
        match ty {
            NLMSG_ERROR => check_error(body)?,
            RTM_NEWNSID => {
                let attrs = body.get(4..).ok_or(NetlinkError::Malformed)?;
                for a in attributes(attrs) {
                    let (t, v) = a?;
                    if t == NETNSA_NSID {
                        let id = i32::from_ne_bytes(
                            v.get(..4)
                                .ok_or(NetlinkError::Malformed)?
                                .try_into()
                                .unwrap(),
                        );
                        return Ok((id >= 0).then_some(id));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

pub(crate) fn push_attr(buf: &mut Vec<u8>, ty: u16, val: &[u8]) {
    let len = 4 + val.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(val);
    buf.resize(buf.len() + (align4(len) - len), 0);
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub(crate) fn check_error(body: &[u8]) -> Result<(), NetlinkError> {
    let code = i32::from_ne_bytes(
        body.get(..4)
            .ok_or(NetlinkError::Malformed)?
            .try_into()
            .unwrap(),
    );
    if code == 0 {
        Ok(())
    } else {
        Err(NetlinkError::Errno(io::Error::from_raw_os_error(-code)))
    }
}

/// Splits a datagram into (type, body) messages.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetlinkError>> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        if len < 16 || len > buf.len() {
            buf = &[];
            return Some(Err(NetlinkError::Malformed));
        }
        let body = &buf[16..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((ty, body)))
    })
}

/// Splits a run of rtattrs into (type, value).
pub fn attributes(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetlinkError>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(buf[..2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[2..4].try_into().unwrap()) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(NetlinkError::Malformed));
        }
        let val = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((ty, val)))
    })
}

/// Parses an `ifinfomsg` + attributes body.
pub fn parse_link(body: &[u8]) -> Result<Link, NetlinkError> {
    if body.len() < 16 {
        return Err(NetlinkError::Malformed);
    }
    let index = i32::from_ne_bytes(body[4..8].try_into().unwrap()) as u32;
    let mut link = Link {
        index,
        ..Default::default()
    };
    for a in attributes(&body[16..]) {
        let (t, v) = a?;
        match t {
            IFLA_IFNAME => link.name = cstr(v),
            IFLA_LINK if v.len() >= 4 => {
                link.link = Some(u32::from_ne_bytes(v[..4].try_into().unwrap()))
            }
            IFLA_LINK_NETNSID if v.len() >= 4 => {
                link.link_netnsid = Some(i32::from_ne_bytes(v[..4].try_into().unwrap()))
            }
            IFLA_LINKINFO => {
                for inner in attributes(v) {
                    let (it, iv) = inner?;
                    if it == IFLA_INFO_KIND {
                        link.kind = Some(cstr(iv));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_msg(index: i32, name: &str, kind: Option<&str>, nsid: Option<i32>) -> Vec<u8> {
        let mut body = vec![0u8; 16];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        push_attr(&mut body, IFLA_IFNAME, &n);
        if let Some(k) = kind {
            let mut inner = Vec::new();
            let mut kb = k.as_bytes().to_vec();
            kb.push(0);
            push_attr(&mut inner, IFLA_INFO_KIND, &kb);
            push_attr(&mut body, IFLA_LINKINFO, &inner);
        }
        if let Some(id) = nsid {
            push_attr(&mut body, IFLA_LINK, &7u32.to_ne_bytes());
            push_attr(&mut body, IFLA_LINK_NETNSID, &id.to_ne_bytes());
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn parses_veth_with_peer_nsid() {
        let mut dgram = link_msg(12, "vethabc", Some("veth"), Some(3));
        dgram.extend(link_msg(1, "lo", None, None));
        let links: Vec<_> = messages(&dgram)
            .map(|m| {
                let (ty, body) = m.unwrap();
                assert_eq!(ty, RTM_NEWLINK);
                parse_link(body).unwrap()
            })
            .collect();
        assert_eq!(
            links[0],
            Link {
                index: 12,
                name: "vethabc".into(),
                kind: Some("veth".into()),
                link: Some(7),
                link_netnsid: Some(3),
            }
        );
        assert_eq!(links[1].name, "lo");
        assert_eq!(links[1].link_netnsid, None);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let msg = link_msg(5, "eth0", Some("veth"), Some(1));
        for cut in 0..msg.len() {
            for (_, body) in messages(&msg[..cut]).flatten() {
                let _ = parse_link(body);
            }
        }
        // A length field larger than the datagram is reported.
        let mut bad = msg.clone();
        bad[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(
            messages(&bad).next(),
            Some(Err(NetlinkError::Malformed))
        ));
    }
}
