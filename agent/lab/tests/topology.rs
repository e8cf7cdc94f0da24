//! Pods as network namespaces with veths to the host, real processes and
//! real traffic: owners come from the cgroup hooks, traces from the tables,
//! tags are read back by a second program after tagflow on the same hook.
mod common;

use common::tcx_ids;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_common::*;
use aya::{
    maps::Array,
    programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType},
    Ebpf,
};
use tagflow::{
    backfill,
    config::AgentConfig,
    loader::{self, Datapath, Feature, Features},
    netns,
};
use tagflow_lab::{
    procs::AgentProc,
    topo::{Lab, Proc, CLIENT, ECHO_SERVER},
    TESTPROGS_OBJECT,
};

fn ctx(b: u8) -> TraceContext {
    TraceContext {
        trace_id: [b; 16],
        flags: TRACE_FLAG_SAMPLED | TraceSource::Api.to_flags(),
        ..Default::default()
    }
}

/// A lab with the datapath loaded (owner hooks on) and attached to every pod.
struct Node {
    lab: Lab,
    dp: Datapath,
    ns: Vec<u64>,
}

fn node(pods: usize) -> Node {
    let lab = Lab::new(pods).expect("creating the lab (needs root and iproute2)");
    let mut dp = common::load(&AgentConfig::default(), true);
    let mut ns = Vec::new();
    for p in &lab.pods {
        dp.attach(&p.host_if, p.host_ifindex).expect("attach");
        let cookie = netns::cookie_of(&p.netns_path()).unwrap();
        dp.set_iface_netns(p.host_ifindex, cookie).unwrap();
        ns.push(cookie);
    }
    Node { lab, dp, ns }
}

/// The test-only cb reader, attached after tagflow on an interface.
struct CbReader {
    ebpf: Ebpf,
}

impl CbReader {
    /// After tagflow: last in the TCX chain, or (kernels before TCX, where
    /// tagflow is a clsact filter too) a filter of lower priority.
    fn attach(iface: &str, expect: [u8; 16]) -> Self {
        if Features::probe().has(Feature::Tcx) {
            Self::attach_at(iface, expect, LinkOrder::last())
        } else {
            Self::attach_clsact(iface, expect)
        }
    }

    fn attach_at(iface: &str, expect: [u8; 16], order: LinkOrder) -> Self {
        Self::attach_with(iface, expect, TcAttachOptions::TcxOrder(order))
    }

    /// As a legacy clsact filter (netlink), which runs after the TCX chain,
    /// and with the lowest priority, after any other filter.
    fn attach_clsact(iface: &str, expect: [u8; 16]) -> Self {
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        Self::attach_with(
            iface,
            expect,
            TcAttachOptions::Netlink(aya::programs::tc::NlOptions {
                priority: u16::MAX,
                ..Default::default()
            }),
        )
    }

    fn attach_with(iface: &str, expect: [u8; 16], opts: TcAttachOptions) -> Self {
        let mut ebpf = Ebpf::load(TESTPROGS_OBJECT).unwrap();
        let p: &mut SchedClassifier = ebpf
            .program_mut("tf_cb_reader")
            .unwrap()
            .try_into()
            .unwrap();
        p.load().unwrap();
        p.attach_with_options(iface, TcAttachType::Ingress, opts)
            .unwrap();
        let mut want: Array<_, [u32; 4]> =
            Array::try_from(ebpf.map_mut("CB_EXPECT").unwrap()).unwrap();
        let words = encode_cb(&expect, 0);
        want.set(0, [words[0], words[1], words[2], words[3]], 0)
            .unwrap();
        Self { ebpf }
    }

    /// (packets seen, with tagflow's magic, with the expected trace id)
    fn counts(&self) -> (u64, u64, u64) {
        let c: Array<_, u64> = Array::try_from(self.ebpf.map("CB_COUNT").unwrap()).unwrap();
        (
            c.get(&0, 0).unwrap(),
            c.get(&1, 0).unwrap(),
            c.get(&2, 0).unwrap(),
        )
    }
}

fn stats_for(dp: &Datapath, f: impl Fn(&FlowKey) -> bool) -> Vec<(FlowKey, FlowStats)> {
    dp.flow_stats()
        .into_iter()
        .filter(|(k, s)| f(k) && !s.is_negative())
        .collect()
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn clients_and_servers_are_tagged_by_owner_and_others_are_not() {
    let _g = common::lock();
    let mut n = node(3);
    let (a, b, c) = (&n.lab.pods[0], &n.lab.pods[1], &n.lab.pods[2]);
    let (ns_a, ns_b, ns_c) = (n.ns[0], n.ns[1], n.ns[2]);
    let mut table = n.dp.take_trace_table().unwrap();

    let server = Proc::python(b, ECHO_SERVER, &["8080"]).unwrap();
    // The bind hook ran in the server's process context.
    assert_eq!(
        n.dp.bound_port(&PortKey::new(ns_b, PROTO_TCP, 8080)),
        Some(server.pid)
    );

    let reader = CbReader::attach(&a.host_if, [0xa1; 16]);
    assert_eq!(
        chain(&a.host_if),
        ["tagflow_ingress", "tf_cb_reader"],
        "tagflow first, the reader after it"
    );

    let b_ip = b.ip.to_string();
    let mut client = Proc::python(a, CLIENT, &[&b_ip, "8080", "0", "5"]).unwrap();
    table
        .set_process(TraceKey::new(client.pid, ns_a), &ctx(0xa1))
        .unwrap();
    table
        .set_process(TraceKey::new(server.pid, ns_b), &ctx(0xb2))
        .unwrap();
    assert_eq!(client.step().unwrap(), "done");

    // A client in C that nobody registered talks to the same server.
    let mut stranger = Proc::python(c, CLIENT, &[&b_ip, "8080", "0", "5"]).unwrap();
    assert_eq!(stranger.step().unwrap(), "done");

    let from_a = stats_for(&n.dp, |k| k.netns == ns_a && k.remote_port == 8080);
    assert_eq!(from_a.len(), 1, "one tagged flow out of A: {from_a:?}");
    let (ka, sa) = from_a[0];
    assert_eq!(sa.trace_id, [0xa1; 16]);
    assert_eq!(
        (sa.pid, sa.owner, sa.matched),
        (client.pid, OWNER_CONNECTED, MATCH_PID)
    );
    assert_eq!(&ka.remote_addr[..4], &b.ip.octets());
    assert!(sa.packets >= 7, "SYN, 5 requests, ACKs: {}", sa.packets);
    assert_ne!(sa.tcp_flags & 0x02, 0, "SYN seen");

    // The server answers from accepted sockets: resolved through its port.
    let from_b = stats_for(&n.dp, |k| k.netns == ns_b && k.local_port == 8080);
    let to_a: Vec<_> = from_b
        .iter()
        .filter(|(k, _)| k.remote_addr[..4] == a.ip.octets())
        .collect();
    assert_eq!(to_a.len(), 1, "server's flow back to A: {from_b:?}");
    assert_eq!(to_a[0].1.trace_id, [0xb2; 16]);
    assert_eq!((to_a[0].1.pid, to_a[0].1.owner), (server.pid, OWNER_BOUND));

    // C's packets carry no tag.
    assert!(
        stats_for(&n.dp, |k| k.netns == ns_c).is_empty(),
        "C was tagged"
    );

    // The reader behind tagflow saw exactly the packets tagflow tagged.
    let (seen, magic, matching) = reader.counts();
    assert_eq!(
        matching, sa.packets,
        "cb carried the trace id on every tagged packet"
    );
    assert_eq!(magic, matching, "no other tag on A's veth");
    assert!(seen >= matching);
    // Timestamps are on the monotonic clock, within this test's lifetime.
    let now = tagflow::clock::monotonic_ns();
    assert!(sa.first_ns <= sa.last_ns && sa.last_ns <= now && now - sa.first_ns < 60_000_000_000);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn per_connection_entries_beat_the_process_entry() {
    let _g = common::lock();
    let mut n = node(2);
    let (a, b) = (&n.lab.pods[0], &n.lab.pods[1]);
    let ns_a = n.ns[0];
    let mut table = n.dp.take_trace_table().unwrap();
    let _server = Proc::python(b, ECHO_SERVER, &["9090"]).unwrap();
    let b_ip = b.ip.to_string();
    let mut c1 = Proc::python(a, CLIENT, &[&b_ip, "9090", "41001", "3"]).unwrap();
    let mut c2 = Proc::python(a, CLIENT, &[&b_ip, "9090", "41002", "3"]).unwrap();
    let key = |sport: u16| FlowKey::new(ns_a, PROTO_TCP, (a.ip, sport).into(), (b.ip, 9090).into());
    table.set_flow(key(41001), &ctx(0x01)).unwrap();
    table.set_flow(key(41002), &ctx(0x02)).unwrap();
    // c1's process also has its own context: the connection entry wins.
    table
        .set_process(TraceKey::new(c1.pid, ns_a), &ctx(0x0f))
        .unwrap();
    assert_eq!(c1.step().unwrap(), "done");
    assert_eq!(c2.step().unwrap(), "done");
    for (sport, want, pid) in [(41001, 0x01, c1.pid), (41002, 0x02, c2.pid)] {
        let s = stats_for(&n.dp, |k| *k == key(sport));
        assert_eq!(s.len(), 1, "flow from port {sport}");
        assert_eq!(s[0].1.trace_id, [want; 16]);
        assert_eq!((s[0].1.matched, s[0].1.pid), (MATCH_FLOW, pid));
    }
    assert!(stats_for(&n.dp, |_| true)
        .iter()
        .all(|(_, s)| s.trace_id != [0x0f; 16]));
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn backfill_finds_servers_that_predate_the_agent() {
    let _g = common::lock();
    let lab = Lab::new(1).unwrap();
    let pod = &lab.pods[0];
    let server = Proc::python(pod, ECHO_SERVER, &["7070"]).unwrap();
    let ns = netns::cookie_of(&pod.netns_path()).unwrap();
    let found = backfill::scan();
    assert!(
        found.contains(&(PortKey::new(ns, PROTO_TCP, 7070), server.pid)),
        "listening socket of pid {} not found",
        server.pid
    );
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The programs on `iface`'s ingress in the order they run: the TCX chain,
/// or (kernels before TCX) the clsact filters by priority, named as the
/// kernel shows them (15 bytes).
fn chain(iface: &str) -> Vec<String> {
    if Features::probe().has(Feature::Tcx) {
        return loader::tcx_programs(iface)
            .unwrap()
            .into_iter()
            .map(|p| p.0)
            .collect();
    }
    let out = Command::new("tc")
        .args(["filter", "show", "dev", iface, "ingress"])
        .output()
        .expect("tc");
    let mut v: Vec<String> = Vec::new();
    // "filter protocol all pref 49152 bpf chain 0 handle 0x1 NAME direct-action ..."
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = l
            .split(" handle ")
            .nth(1)
            .and_then(|r| r.split_whitespace().nth(1))
        {
            let name: String = name
                .split(':')
                .next()
                .unwrap_or(name)
                .chars()
                .take(15)
                .collect();
            if v.last() != Some(&name) {
                v.push(name);
            }
        }
    }
    v
}

fn netlink_ids(iface: &str) -> Vec<u32> {
    let out = Command::new("tc")
        .args(["filter", "show", "dev", iface, "ingress"])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("tagflow_ingress"))
        .filter_map(|l| {
            l.split(" id ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A UDP echo server: `UDP_ECHO PORT`; answers each datagram with sendto.
const UDP_ECHO: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", os.getpid(), flush=True)
while True:
    d, peer = s.recvfrom(2048)
    s.sendto(d, peer)
"#;

/// A UDP client: `UDP_CLIENT HOST PORT N`; on a line, sends N datagrams
/// (each answered) from an unbound socket, prints `done`.
const UDP_CLIENT: &str = r#"
import os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for _ in range(n):
    s.sendto(b"q" * 64, (host, port))
    s.recvfrom(2048)
print("done", flush=True)
"#;

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_udp_server_answering_with_sendto_is_a_server() {
    let _g = common::lock();
    let mut n = node(2);
    let (a, b) = (&n.lab.pods[0], &n.lab.pods[1]);
    let (ns_a, ns_b) = (n.ns[0], n.ns[1]);
    let mut table = n.dp.take_trace_table().unwrap();
    let server = Proc::python(b, UDP_ECHO, &["5353"]).unwrap();
    let mut client = Proc::python(a, UDP_CLIENT, &[&b.ip.to_string(), "5353", "4"]).unwrap();
    table
        .set_process(TraceKey::new(client.pid, ns_a), &ctx(0xc1))
        .unwrap();
    table
        .set_process(TraceKey::new(server.pid, ns_b), &ctx(0xd2))
        .unwrap();
    assert_eq!(client.step().unwrap(), "done");
    let asked = stats_for(&n.dp, |k| k.netns == ns_a && k.remote_port == 5353);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        (asked[0].1.pid, asked[0].1.owner),
        (client.pid, OWNER_CONNECTED)
    );
    let answered = stats_for(&n.dp, |k| k.netns == ns_b && k.local_port == 5353);
    assert_eq!(answered.len(), 1, "{answered:?}");
    let s = answered[0].1;
    assert_eq!(
        (s.pid, s.owner),
        (server.pid, OWNER_BOUND),
        "a server, not a client"
    );
    assert_eq!((s.trace_id, s.packets), ([0xd2; 16], 4));
}

fn alive(a: &mut AgentProc) -> bool {
    matches!(a.child.try_wait(), Ok(None))
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn restarts_never_leave_two_programs_on_a_hook() {
    let _g = common::lock();
    let mut lab = Lab::new(1).unwrap();
    let iface = lab.pods[0].host_if.clone();
    for (mode, ids) in [
        ("tcx", tcx_ids as fn(&str) -> Vec<u32>),
        ("netlink", netlink_ids),
    ] {
        let args = ["--no-backfill", "--attach-mode", mode];
        let mut first = AgentProc::start(&lab, &args).unwrap();
        wait_for("first attach", || ids(&iface).len() == 1);
        first.child.kill().unwrap();
        first.child.wait().unwrap();
        // TCX links die with the process; netlink filters stay behind.
        let stale = ids(&iface);
        assert!(stale.len() <= 1, "{mode}: {stale:?} after SIGKILL");
        if mode == "netlink" {
            assert_eq!(stale.len(), 1, "netlink filters outlive the process");
        }
        let mut second = AgentProc::start(&lab, &args).unwrap();
        // Wait for the new agent's own program, not the stale one.
        wait_for("second attach", || {
            let now = ids(&iface);
            now.len() == 1 && !stale.contains(&now[0])
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            ids(&iface).len(),
            1,
            "{mode}: exactly one tagflow program after restart"
        );
        assert!(alive(&mut second));

        // It follows interfaces that appear and disappear.
        let i = lab.add_pod().unwrap();
        let new_if = lab.pods[i].host_if.clone();
        wait_for("attach to a new pod", || ids(&new_if).len() == 1);
        lab.remove_pod(i);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            alive(&mut second),
            "{mode}: agent died when an interface went away"
        );

        drop(second); // SIGTERM
        assert!(ids(&iface).is_empty(), "{mode}: clean detach on SIGTERM");
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_veths_peer_namespace_is_found_from_its_nsid() {
    let _g = common::lock();
    let lab = Lab::new(2).unwrap();
    let links = tagflow::netlink::Socket::open(false)
        .unwrap()
        .dump_links()
        .unwrap();
    let mut peers = tagflow::netns::PeerResolver::default();
    for pod in &lab.pods {
        let link = links
            .iter()
            .find(|l| l.name == pod.host_if)
            .expect("host veth listed");
        assert_eq!(link.kind.as_deref(), Some("veth"));
        assert_eq!(link.index, pod.host_ifindex);
        let nsid = link
            .link_netnsid
            .expect("a veth into a pod has a peer nsid");
        let want = netns::cookie_of(&pod.netns_path()).unwrap();
        assert_eq!(
            peers.cookie_for_nsid(nsid),
            Some(want),
            "{}: IFACE_NETNS value",
            pod.host_if
        );
    }
}

/// Frames of a classic pcap file (link type Ethernet).
fn pcap_frames(path: &std::path::Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap_or_default();
    if b.len() < 24 {
        return Vec::new();
    }
    let le = matches!(&b[..4], [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
    let u32_at = |o: usize| {
        let w: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let n = u32_at(o + 8) as usize;
        if o + 16 + n > b.len() {
            break;
        }
        out.push(b[o + 16..o + 16 + n].to_vec());
        o += 16 + n;
    }
    out
}

struct Capture(Child, std::path::PathBuf);

impl Capture {
    fn start(mut cmd: Command, file: std::path::PathBuf, filter: &str) -> Self {
        let child = cmd
            .args(["-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (`cargo xtask test` installs it)");
        Self(child, file)
    }
    fn frames(mut self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
        let f = pcap_frames(&self.1);
        let _ = std::fs::remove_file(&self.1);
        f
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn programs_and_filters_around_tagflow_see_every_packet_with_bytes_untouched() {
    let _g = common::lock();
    let mut n = node(2);
    let (a, b) = (&n.lab.pods[0], &n.lab.pods[1]);
    let ns_a = n.ns[0];
    let mut table = n.dp.take_trace_table().unwrap();
    let _server = Proc::python(b, ECHO_SERVER, &["9100"]).unwrap();
    // A TCX program in front of tagflow, one behind it, and a legacy clsact
    // filter, which runs after the whole TCX chain.
    let front = CbReader::attach_at(&a.host_if, [0xc1; 16], LinkOrder::first());
    let back = CbReader::attach(&a.host_if, [0xc1; 16]);
    // The pod may send (neighbour discovery) between the two attachments:
    // compare what each saw from here on.
    let (f0, b0) = (front.counts().0, back.counts().0);
    let chain: Vec<String> = loader::tcx_programs(&a.host_if)
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(chain, ["tf_cb_reader", "tagflow_ingress", "tf_cb_reader"]);
    let legacy = CbReader::attach_clsact(&a.host_if, [0xc1; 16]);
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let filter = format!("tcp port 9100 and src host {}", a.ip);
    let before_hook = Capture::start(
        {
            let mut c = Command::new("tcpdump");
            c.args(["-i", &a.host_if]);
            c
        },
        dir.join(format!("tagflow-{pid}-host.pcap")),
        &filter,
    );
    let in_pod_b = Capture::start(
        {
            let mut c = b.command("tcpdump");
            c.args(["-i", "eth0"]);
            c
        },
        dir.join(format!("tagflow-{pid}-podb.pcap")),
        &filter,
    );
    std::thread::sleep(Duration::from_millis(800));

    let mut client = Proc::python(a, CLIENT, &[&b.ip.to_string(), "9100", "0", "20"]).unwrap();
    table
        .set_process(TraceKey::new(client.pid, ns_a), &ctx(0xc1))
        .unwrap();
    assert_eq!(client.step().unwrap(), "done");
    drop(client);
    let pre = before_hook.frames();
    let post = in_pod_b.frames();

    let tagged: u64 = stats_for(&n.dp, |k| k.netns == ns_a && k.remote_port == 9100)
        .iter()
        .map(|(_, s)| s.packets)
        .sum();
    assert!(tagged >= 20, "tagflow tagged the flow ({tagged})");
    let (f_seen, f_magic, _) = front.counts();
    let (b_seen, _, b_match) = back.counts();
    assert_eq!(
        f_seen - f0,
        b_seen - b0,
        "every packet the program in front saw went on through tagflow"
    );
    assert_eq!(
        b_match, tagged,
        "the program behind saw the tag on every tagged packet"
    );
    assert!(
        f_magic <= b_seen - b_match,
        "the program in front never saw tagflow's tag on a tagged packet"
    );
    let (_, l_magic, l_match) = legacy.counts();
    assert_eq!(
        l_match, tagged,
        "the clsact filter after the TCX chain saw every tagged packet, tag intact"
    );
    assert!(l_magic >= l_match);
    // Bytes: what left pod A before the hook is what pod B received.
    assert!(
        pre.len() >= 20,
        "captured {} frames before the hook",
        pre.len()
    );
    assert_eq!(pre, post, "frames changed between the hook and pod B");
}
