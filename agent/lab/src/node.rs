//! Other "machines" for tests: a node is a network namespace with its own
//! pods (a `Lab` built inside it, `Lab::on_node`) and its own agent, reached
//! from the host over a management veth (the agent's metrics and OTLP
//! export), and joined to other nodes by veths standing for the wire.
//! Everything goes when the node drops (pods first: drop labs before nodes).
use std::{net::Ipv4Addr, path::PathBuf};

use crate::topo::{run, unique, TopoError};

pub struct Node {
    pub name: String,
    /// The node's end of the management link.
    pub mgmt: Ipv4Addr,
    /// The host's end (where the node reaches a collector on the host).
    pub host_mgmt: Ipv4Addr,
    host_if: String,
}

impl Node {
    /// A node with forwarding on (inside its namespace only) and a
    /// management link to the host.
    pub fn new() -> Result<Self, TopoError> {
        let u = unique();
        let name = format!("tfn{u:06x}");
        run(&["ip", "netns", "add", &name])?;
        let (a, b) = (((u >> 6) % 250) as u8 + 1, ((u % 64) * 4) as u8);
        let mut node = Self {
            host_if: format!("tfm{u:06x}"),
            host_mgmt: Ipv4Addr::new(10, 250, a, b + 1),
            mgmt: Ipv4Addr::new(10, 250, a, b + 2),
            name,
        };
        node.setup().inspect_err(|_| node.teardown())?;
        Ok(node)
    }

    fn setup(&mut self) -> Result<(), TopoError> {
        let n = self.name.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ])?;
        let h = self.host_if.as_str();
        run(&[
            "ip", "link", "add", h, "type", "veth", "peer", "name", "mgmt0", "netns", n,
        ])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", self.host_mgmt),
            "dev",
            h,
        ])?;
        run(&["ip", "link", "set", h, "up"])?;
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/30", self.mgmt),
            "dev",
            "mgmt0",
        ])?;
        run(&["ip", "-n", n, "link", "set", "mgmt0", "up"])?;
        Ok(())
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip route add DST via VIA` in the node.
    pub fn route(&self, dst: &str, via: Ipv4Addr) -> Result<(), TopoError> {
        run(&[
            "ip",
            "-n",
            &self.name,
            "route",
            "add",
            dst,
            "via",
            &via.to_string(),
        ])?;
        Ok(())
    }

    fn teardown(&self) {
        if let Ok(o) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .status();
            }
        }
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Joins two nodes by a veth named `wire0` at each end (the wire); returns
/// the addresses of `a`'s end and `b`'s end.
pub fn wire(a: &Node, b: &Node) -> Result<(Ipv4Addr, Ipv4Addr), TopoError> {
    let u = unique();
    let (x, y) = (((u >> 6) % 250) as u8 + 1, ((u % 64) * 4) as u8);
    let (ea, eb) = (
        Ipv4Addr::new(10, 251, x, y + 1),
        Ipv4Addr::new(10, 251, x, y + 2),
    );
    run(&[
        "ip", "-n", &a.name, "link", "add", "wire0", "type", "veth", "peer", "name", "wire0",
        "netns", &b.name,
    ])?;
    for (n, addr) in [(&a.name, ea), (&b.name, eb)] {
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "wire0",
        ])?;
        run(&["ip", "-n", n, "link", "set", "wire0", "up"])?;
    }
    Ok((ea, eb))
}
