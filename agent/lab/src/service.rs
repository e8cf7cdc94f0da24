//! A Service address as kube-proxy (iptables mode) writes it: DNAT from a
//! ClusterIP to a pod in the host namespace's `nat` table, plus masquerade
//! because lab pods share one bridge (the pod would otherwise answer its
//! caller directly, around the host, and the caller would drop the reply).
//! The rules go when the guard drops.
use std::net::Ipv4Addr;

use crate::topo::{run, TopoError};

pub struct Service {
    rules: Vec<(&'static str, Vec<String>)>,
}

impl Service {
    /// `vip:port` (TCP) → `pod:target_port`, for callers in `subnet`.
    pub fn new(
        vip: Ipv4Addr,
        port: u16,
        pod: Ipv4Addr,
        target_port: u16,
        subnet: &str,
    ) -> Result<Self, TopoError> {
        let (port, target_port) = (port.to_string(), target_port.to_string());
        let to = format!("{pod}:{target_port}");
        let pod = format!("{pod}/32");
        let vip = format!("{vip}/32");
        let mut me = Self { rules: Vec::new() };
        let dnat = [
            "-d",
            &vip,
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ];
        let masq = [
            "-s",
            subnet,
            "-d",
            &pod,
            "-p",
            "tcp",
            "--dport",
            &target_port,
            "-j",
            "MASQUERADE",
        ];
        for (chain, spec) in [("PREROUTING", &dnat[..]), ("POSTROUTING", &masq[..])] {
            let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
            let mut args = vec!["iptables", "-w", "-t", "nat", "-A", chain];
            args.extend(spec.iter().map(String::as_str));
            run(&args)?;
            me.rules.push((chain, spec));
        }
        Ok(me)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for (chain, spec) in self.rules.drain(..).rev() {
            let mut args = vec!["iptables", "-w", "-t", "nat", "-D", chain];
            args.extend(spec.iter().map(String::as_str));
            let _ = run(&args);
        }
    }
}
