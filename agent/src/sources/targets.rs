//! Who handles a registered request: resolves a registration target to the
//! processes whose traffic must carry the trace, from /proc.
//!
//! - a pid: itself, if it lives in the caller's namespace;
//! - a port: every process holding the listening socket (a prefork server's
//!   workers share it);
//! - an exact connection: the process holding the *accepted* socket of that
//!   connection (the worker or forked child that serves it), which beats the
//!   listeners when found.
use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use crate::backfill::parse_proc_net;

/// Identity of a network namespace as /proc shows it (device, inode).
pub type NsId = (u64, u64);

pub fn netns_id_of(pid: u32) -> Option<NsId> {
    let m = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((m.dev(), m.ino()))
}

/// The pid namespace of `pid` (its nsfs inode).
pub fn pidns_of(pid: &str) -> Option<u64> {
    Some(fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?.ino())
}

/// The process that `caller`'s pid namespace calls `pid`, by its pid here:
/// the one whose innermost `NSpid` is `pid` and whose pid namespace is the
/// caller's. Walks /proc.
pub fn host_pid(caller: u32, pid: u32) -> Option<u32> {
    let ns = pidns_of(&caller.to_string())?;
    let want = pid.to_string();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let here: u32 = name.parse().ok()?;
        let status = fs::read_to_string(format!("/proc/{name}/status")).ok()?;
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?;
        (inner == want && pidns_of(&name) == Some(ns)).then_some(here)
    })
}

/// One line of /proc/net/tcp{,6}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

/// Parses an address as /proc/net/tcp prints it: the address in host
/// (little-endian on x86) 32-bit words, then the port in hex.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(a, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One line of /proc/net/tcp{,6} (not the header).
fn parse_tcp_line(l: &str) -> Option<TcpEntry> {
    let mut f = l.split_whitespace().skip(1);
    let local = proc_addr(f.next()?)?;
    let remote = proc_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    let inode = f.nth(5)?.parse().ok()?;
    Some(TcpEntry {
        local,
        remote,
        state,
        inode,
    })
}

#[cfg(test)]
fn parse_tcp_table(text: &str) -> Vec<TcpEntry> {
    text.lines().skip(1).filter_map(parse_tcp_line).collect()
}

/// The first entry of a /proc/net/tcp{,6} file that `wanted` picks, read
/// line by line: a busy pod's table runs to megabytes, and a registration
/// looks one connection up in it.
fn find_tcp_entry(path: &str, wanted: impl Fn(&TcpEntry) -> bool) -> Option<TcpEntry> {
    let mut r = BufReader::new(fs::File::open(path).ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(e) = parse_tcp_line(&line).filter(&wanted) {
            return Some(e);
        }
    }
}

/// Same address, treating IPv4-mapped IPv6 as IPv4 (dual-stack sockets).
fn same(a: &SocketAddr, b: &SocketAddr) -> bool {
    let canon = |s: &SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    a.port() == b.port() && canon(a) == canon(b)
}

/// Inode of the server-side socket of a connection, seen from the client
/// (`client_local` → `client_remote`), in the namespace of `ns_pid`.
pub fn accepted_inode(
    ns_pid: u32,
    client_local: SocketAddr,
    client_remote: SocketAddr,
) -> Option<u64> {
    ["tcp", "tcp6"].iter().find_map(|f| {
        find_tcp_entry(&format!("/proc/{ns_pid}/net/{f}"), |e| {
            e.state == 0x01
                && same(&e.local, &client_remote)
                && same(&e.remote, &client_local)
                && e.inode != 0
        })
        .map(|e| e.inode)
    })
}

/// Inodes of sockets listening (TCP) or bound (UDP) on `port`.
pub fn listener_inodes(ns_pid: u32, port: u16, proto: u8) -> Vec<u64> {
    let files: &[&str] = if proto == agent_common::PROTO_UDP {
        &["udp", "udp6"]
    } else {
        &["tcp", "tcp6"]
    };
    files
        .iter()
        .filter_map(|f| fs::read_to_string(format!("/proc/{ns_pid}/net/{f}")).ok())
        .flat_map(|t| parse_proc_net(&t, proto))
        .filter(|s| s.port == port)
        .map(|s| s.inode)
        .collect()
}

/// Processes in namespace `ns` holding any of `inodes`.
pub fn holders(ns: NsId, inodes: &[u64]) -> Vec<u32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let want: HashSet<u64> = inodes.iter().copied().collect();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if netns_id_of(pid) != Some(ns) {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).ok().is_some_and(|t| {
                let t = t.to_string_lossy();
                t.strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|ino| want.contains(&ino))
            })
        });
        if holds {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Listener holders per (namespace, port, proto), cached briefly: a /proc
/// walk per registration would cost milliseconds.
pub struct ListenerCache {
    ttl: Duration,
    entries: HashMap<(NsId, u16, u8), (Instant, Vec<u32>)>,
}

impl ListenerCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: HashMap::new(),
        }
    }

    pub fn get(&mut self, ns: NsId, ns_pid: u32, port: u16, proto: u8) -> Vec<u32> {
        let now = Instant::now();
        if let Some((t, pids)) = self.entries.get(&(ns, port, proto)) {
            if now.duration_since(*t) < self.ttl && !pids.is_empty() {
                return pids.clone();
            }
        }
        let pids = holders(ns, &listener_inodes(ns_pid, port, proto));
        if self.entries.len() > 4096 {
            self.entries
                .retain(|_, (t, _)| now.duration_since(*t) < self.ttl);
        }
        self.entries.insert((ns, port, proto), (now, pids.clone()));
        pids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:A2B4 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000A01020A:1F90 0000000000000000FFFF00000B01020A:C350 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1
";

    #[test]
    fn finds_a_connection_in_a_table_read_line_by_line() {
        let path = std::env::temp_dir().join(format!("tagflow-tcp-{}", std::process::id()));
        fs::write(&path, TCP).unwrap();
        let p = path.to_str().unwrap();
        let accepted = find_tcp_entry(p, |e| e.state == 0x01).map(|e| e.inode);
        let missing = find_tcp_entry(p, |e| e.inode == 999);
        let header_only = {
            fs::write(&path, TCP.lines().next().unwrap()).unwrap();
            find_tcp_entry(p, |_| true)
        };
        let _ = fs::remove_file(&path);
        assert_eq!(accepted, Some(222));
        assert!(missing.is_none());
        assert!(header_only.is_none(), "the header is no entry");
        assert!(find_tcp_entry("/nonexistent/tcp", |_| true).is_none());
    }

    #[test]
    fn parses_proc_tcp_addresses() {
        let e = parse_tcp_table(TCP);
        assert_eq!(e[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(e[0].state, 0x0a);
        assert_eq!(e[1].remote, "127.0.0.1:41652".parse().unwrap());
        assert_eq!(e[1].inode, 222);
        let e6 = parse_tcp_table(TCP6);
        assert_eq!(e6[0].local, "[::ffff:10.2.1.10]:8080".parse().unwrap());
        assert!(
            same(&e6[0].local, &"10.2.1.10:8080".parse().unwrap()),
            "v4-mapped matches v4"
        );
        assert!(same(&e6[0].remote, &"10.2.1.11:50000".parse().unwrap()));
    }
}
