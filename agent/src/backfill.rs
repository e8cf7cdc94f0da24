//! Start-up backfill of socket owners that existed before the agent: every
//! listening TCP socket and bound UDP socket, from /proc, into BOUND_PORTS.
//! (Connected client sockets from before start are not recoverable from
//! /proc: their cookies are only known to sock_diag.)
use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::Path};

use agent_common::{PortKey, PROTO_TCP, PROTO_UDP};

/// A bound local port read from /proc/<pid>/net/{tcp,udp}{,6}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundSocket {
    pub proto: u8,
    pub port: u16,
    pub inode: u64,
}

/// Parses a /proc/net/{tcp,tcp6,udp,udp6} table; keeps TCP LISTEN sockets and
/// UDP sockets with a local port.
pub fn parse_proc_net(text: &str, proto: u8) -> Vec<BoundSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let keep = match proto {
                PROTO_TCP => state == 0x0a, // TCP_LISTEN
                _ => port != 0,
            };
            (keep && inode != 0).then_some(BoundSocket { proto, port, inode })
        })
        .collect()
}

/// socket inode → pid, from /proc/<pid>/fd links `socket:[N]`.
fn socket_inodes() -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(ino) = n.parse() {
                        out.entry(ino).or_insert(pid);
                    }
                }
            }
        }
    }
    out
}

/// Every (netns cookie, proto, port) → pid for bound sockets on the host.
pub fn scan() -> Vec<(PortKey, u32)> {
    let owners = socket_inodes();
    // One pid per namespace is enough to read its tables.
    let mut namespaces: HashMap<u64, u32> = HashMap::new();
    for pid in owners.values() {
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            namespaces.entry(m.ino()).or_insert(*pid);
        }
    }
    let mut out = Vec::new();
    for pid in namespaces.values() {
        let ns_path = format!("/proc/{pid}/ns/net");
        let Ok(cookie) = crate::netns::cookie_of(Path::new(&ns_path)) else {
            continue;
        };
        for (file, proto) in [
            ("tcp", PROTO_TCP),
            ("tcp6", PROTO_TCP),
            ("udp", PROTO_UDP),
            ("udp6", PROTO_UDP),
        ] {
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
                continue;
            };
            for s in parse_proc_net(&text, proto) {
                if let Some(owner) = owners.get(&s.inode) {
                    out.push((PortKey::new(cookie, s.proto, s.port), *owner));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2B4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 4242 2 0000000000000000 0
";

    #[test]
    fn keeps_listeners_and_bound_udp() {
        assert_eq!(
            parse_proc_net(TCP, PROTO_TCP),
            vec![BoundSocket {
                proto: PROTO_TCP,
                port: 8080,
                inode: 12345
            }]
        );
        assert_eq!(
            parse_proc_net(TCP6, PROTO_TCP),
            vec![BoundSocket {
                proto: PROTO_TCP,
                port: 80,
                inode: 999
            }]
        );
        assert_eq!(
            parse_proc_net(UDP, PROTO_UDP),
            vec![BoundSocket {
                proto: PROTO_UDP,
                port: 53,
                inode: 4242
            }]
        );
        assert!(parse_proc_net("header only\n garbage line\n", PROTO_TCP).is_empty());
    }
}
