//! Follows the node's interfaces: attaches `tagflow_ingress` to the ones
//! configured as they appear, forgets them as they go, records the
//! namespace at each veth's other end, and re-reads every link when
//! notifications were lost.
use std::{collections::HashMap, net::IpAddr};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::AgentStats;
use crate::{
    config::AgentConfig,
    loader::Datapath,
    netlink::{self, Link, LinkEvent},
    netns::PeerResolver,
    podnet::PodNets,
};

/// After lost link notifications: (links to attach — attaching is
/// idempotent, so every wanted one —, attached ifindexes that are gone).
pub fn resync_plan(
    attached: &[u32],
    links: &[Link],
    wants: impl Fn(&str) -> bool,
) -> (Vec<Link>, Vec<u32>) {
    let wanted: Vec<Link> = links.iter().filter(|l| wants(&l.name)).cloned().collect();
    let gone = attached
        .iter()
        .filter(|i| !wanted.iter().any(|l| l.index == **i))
        .copied()
        .collect();
    (wanted, gone)
}

/// Attaches to / forgets interfaces as links come and go, and keeps the
/// pod namespaces behind them.
pub struct Follower<'a> {
    cfg: &'a AgentConfig,
    peers: PeerResolver,
    pods: PodNets,
    /// What `POD_ADDRS` holds (one writer: `sync_addrs`).
    written: HashMap<IpAddr, u64>,
}

impl<'a> Follower<'a> {
    pub fn new(cfg: &'a AgentConfig) -> Self {
        Self {
            cfg,
            peers: PeerResolver::default(),
            pods: PodNets::default(),
            written: HashMap::new(),
        }
    }

    /// Brings `POD_ADDRS` to the pod addresses known now (re-read while a
    /// pod appeared lately): the HTTP/2 walk finds a server's side by it.
    pub fn sync_addrs(&mut self, dp: &mut Datapath, stats: &mut AgentStats) {
        self.pods.refresh_recent();
        let now = self.pods.addrs();
        let gone: Vec<IpAddr> = self
            .written
            .keys()
            .filter(|ip| !now.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            dp.remove_pod_addr(ip);
            self.written.remove(&ip);
        }
        for (ip, netns) in now {
            if self.written.get(ip) == Some(netns) {
                continue;
            }
            match dp.set_pod_addr(*ip, *netns) {
                Ok(()) => {
                    self.written.insert(*ip, *netns);
                }
                Err(e) => {
                    stats.pod_addr_failures += 1;
                    debug!(%ip, "{}", crate::report(&e));
                }
            }
        }
    }

    /// The pod namespaces behind the attached interfaces.
    pub fn pods(&mut self) -> &mut PodNets {
        &mut self.pods
    }

    fn detach(&mut self, dp: &mut Datapath, ifindex: u32) {
        dp.detach(ifindex);
        if let Some((cookie, _ns)) = self.pods.remove(ifindex) {
            dp.detach_loopback(cookie);
        }
    }

    pub fn handle(&mut self, dp: &mut Datapath, ev: LinkEvent, stats: &mut AgentStats) {
        match ev {
            LinkEvent::New(link) if self.cfg.wants_iface(&link.name) => {
                self.attach(dp, &link, stats)
            }
            LinkEvent::New(_) => {}
            LinkEvent::Del(link) => self.detach(dp, link.index),
            LinkEvent::Resync(links) => {
                stats.link_resyncs += 1;
                let attached: Vec<u32> = dp.attached().iter().map(|a| a.0).collect();
                let (attach, detach) = resync_plan(&attached, &links, |n| self.cfg.wants_iface(n));
                for i in detach {
                    self.detach(dp, i);
                }
                for link in attach {
                    self.attach(dp, &link, stats);
                }
            }
        }
    }

    fn attach(&mut self, dp: &mut Datapath, link: &Link, stats: &mut AgentStats) {
        if let Err(e) = dp.attach(&link.name, link.index) {
            // A link can vanish between the notification and the attach.
            stats.attach_failures += 1;
            warn!("{}", crate::report(&e));
            return;
        }
        if let Some(nsid) = link.link_netnsid {
            match self.peers.open_nsid(nsid) {
                Some((ns, cookie)) => {
                    if let Err(e) = dp.set_iface_netns(link.index, cookie) {
                        warn!(iface = link.name, "{}", crate::report(&e));
                    } else {
                        debug!(iface = link.name, nsid, cookie, "peer netns recorded");
                    }
                    if self.cfg.loopback && !self.pods.has(cookie) {
                        if let Err(e) = dp.attach_loopback(&ns, cookie) {
                            stats.attach_failures += 1;
                            warn!(iface = link.name, "pod loopback: {}", crate::report(&e));
                        }
                    }
                    self.pods.add(link.index, cookie, ns);
                }
                None => debug!(iface = link.name, nsid, "peer netns not found"),
            }
        }
    }
}

/// Reads link notifications from `monitor` on a thread of its own and
/// forwards them; lost notifications (ENOBUFS) become one full re-dump.
pub fn monitor_links(monitor: netlink::Socket) -> std::io::Result<mpsc::Receiver<LinkEvent>> {
    let (tx, rx) = mpsc::channel::<LinkEvent>(1024);
    std::thread::Builder::new()
        .name("tagflow-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match netlink::read_events(&monitor, &mut buf) {
                    Ok(evs) => {
                        for ev in evs {
                            if tx.blocking_send(ev).is_err() {
                                return;
                            }
                        }
                    }
                    // ENOBUFS: notifications were lost. A full dump puts the
                    // attachments right (new links attached, gone ones
                    // forgotten).
                    Err(netlink::NetlinkError::Io(e))
                        if e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        warn!("link notifications lost; re-reading every link");
                        let dump = netlink::Socket::open(false).and_then(|mut s| s.dump_links());
                        match dump {
                            Ok(links) => {
                                if tx.blocking_send(LinkEvent::Resync(links)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!("link re-read: {}", crate::report(&e)),
                        }
                    }
                    Err(e) => warn!("link monitor: {}", crate::report(&e)),
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_resync_attaches_what_is_wanted_and_forgets_what_is_gone() {
        // Attached: 3 (still there), 4 (deleted while notifications were lost).
        let links = [link(1, "lo"), link(3, "veth3"), link(5, "veth5")];
        let (attach, detach) = resync_plan(&[3, 4], &links, |n| n.starts_with("veth"));
        let names: Vec<_> = attach.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["veth3", "veth5"], "attach is idempotent for veth3");
        assert_eq!(detach, [4]);
    }
}
