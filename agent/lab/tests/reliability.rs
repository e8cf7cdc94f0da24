//! Faults while traffic flows: the agent killed with SIGKILL and restarted
//! under an HTTP load.
mod common;

use std::{process::Stdio, time::Duration};

use common::{finish_load, nginx, tcx_ids, wait_for, Agent};
use tagflow_lab::topo::Lab;

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn killing_and_restarting_the_agent_under_load_fails_no_request_and_keeps_its_tables() {
    let _g = common::lock();
    let lab = Lab::new(2).unwrap();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let dir = std::env::temp_dir().join(format!("tagflow-rel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = nginx(b, &dir);
    std::thread::sleep(Duration::from_millis(500));

    let pins = common::test_pin_dir("restart");
    let tagged = "tagflow_datapath_packets_total{counter=\"tagged\"}";
    let mut first = Agent::start_pinned(&lab, &[], &pins);
    // A registration that outlives its connection (the CLI's): after the
    // restart only the pinned TRACES map still knows it.
    first.register(b, &["begin", "--request-id", "load-1", "--port", "8080"]);
    let wrk = a
        .command("wrk")
        .args(["-t1", "-c8", "-d6s", &format!("http://{}:8080/", b.ip)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk (`cargo xtask test` installs it)");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        first.metric(tagged) > 0.0,
        "traffic was tagged before the kill"
    );
    let traces = "tagflow_map_entries{map=\"TRACES\"}";
    let entries_before = first.metric(traces);
    assert!(entries_before >= 1.0);
    // SIGKILL: no cleanup at all. TCX links die with the process.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) };
    let _ = first.child.wait();
    let second = Agent::start_pinned(&lab, &[], &pins);
    for p in &lab.pods {
        assert_eq!(
            tcx_ids(&p.host_if).len(),
            1,
            "{}: exactly one tagflow program after restart",
            p.host_if
        );
    }
    assert_eq!(second.metric("tagflow_maps_pinned"), 1.0);
    // The process entry, plus per-connection entries of live connections.
    assert!(
        second.metric("tagflow_trace_entries_adopted_total") >= 1.0,
        "the registration was taken over from the pinned maps"
    );
    // No new registration: tagging resumes from the adopted entry.
    wait_for("tagging to resume", 10, || second.metric(tagged) > 0.0);
    assert_eq!(
        second.metric(traces),
        entries_before,
        "the process entries are the adopted ones, nothing was registered since"
    );
    let total = finish_load(wrk, server, &dir, "across the restart");
    assert!(total > 1000, "load ran: {total} requests");
    drop(second);
    drop(first);
}

/// Pinned maps are reused when they match what the agent expects and
/// replaced when they do not (other ABI version, other layout or size).
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn pinned_maps_are_reused_when_compatible_and_recreated_otherwise() {
    use agent_common::{maps as m, TraceContext, TraceKey};
    use tagflow::config::AgentConfig;
    let _g = common::lock();
    let root = common::test_pin_dir("compat");
    let cfg = AgentConfig {
        pin_dir: root.clone(),
        ..AgentConfig::default()
    };
    let fates = |dp: &tagflow::loader::Datapath| dp.pins.maps.clone();
    let mut dp = common::load(&cfg, false);
    assert!(
        fates(&dp).iter().all(|(_, f)| f == "created"),
        "{:?}",
        fates(&dp)
    );
    let abi_dir = root.join(format!("abi-{}", agent_common::ABI_VERSION));
    for name in [
        m::TRACES,
        m::FLOW_TRACES,
        m::SOCK_OWNER,
        m::BOUND_PORTS,
        m::SOCK_FLOW,
        m::THREAD_VIA,
    ] {
        assert!(abi_dir.join(name).exists(), "{name} pinned");
    }
    let key = TraceKey::new(4242, 77);
    let mut t = dp.take_trace_table().unwrap();
    t.set_process(
        key,
        &TraceContext {
            trace_id: [9; 16],
            ..Default::default()
        },
    )
    .unwrap();
    // A second agent while the first holds the directory: refused, and
    // it runs unpinned rather than sharing tables.
    let other = common::load(&cfg, false);
    assert!(other.pins.dir.is_none(), "the pin directory is locked");
    drop(other);
    drop((t, dp));

    // Same ABI and sizes: the entry carries over and is adopted.
    let mut dp = common::load(&cfg, false);
    assert!(
        fates(&dp).iter().all(|(_, f)| f == "reused"),
        "{:?}",
        fates(&dp)
    );
    assert_eq!(dp.pins.adopted, 1);
    let t = dp.take_trace_table().unwrap();
    assert_eq!(t.by_pid().get(&key), Some([9; 16]));
    assert_eq!(t.gate().active_namespaces(), 1, "the gate is open for it");
    drop((t, dp));

    // Another capacity: TRACES is replaced (empty), the others reused.
    let mut bigger = cfg.clone();
    bigger.maps.traces *= 2;
    let dp = common::load(&bigger, false);
    let f = fates(&dp);
    assert!(
        f.iter()
            .any(|(n, s)| n == m::TRACES && s.starts_with("replaced") && s.contains("max_entries")),
        "{f:?}"
    );
    assert!(
        f.iter().any(|(n, s)| n == m::SOCK_OWNER && s == "reused"),
        "{f:?}"
    );
    assert_eq!(dp.pins.adopted, 0);
    drop(dp);

    // Maps left by another ABI version are removed, never reused.
    let old = root.join("abi-0");
    std::fs::rename(&abi_dir, &old).unwrap();
    let dp = common::load(&cfg, false);
    assert!(!old.exists(), "the other ABI version's directory is gone");
    assert!(
        fates(&dp).iter().all(|(_, f)| f == "created"),
        "{:?}",
        fates(&dp)
    );
    drop(dp);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn two_hundred_pods_churning_under_traffic_are_followed_and_leave_nothing_behind() {
    let _g = common::lock();
    let mut lab = Lab::new(2).unwrap();
    let dir = std::env::temp_dir().join(format!("tagflow-churn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = nginx(&lab.pods[1], &dir);
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&lab, &[]);
    let base = |name: &str| agent.metric(name);
    let entries = "tagflow_map_entries{map=\"IFACE_NETNS\"}";
    wait_for("baseline map fill", 15, || base(entries) == 2.0);
    let url = format!("http://{}:8080/", lab.pods[1].ip);
    let wrk = lab.pods[0]
        .command("wrk")
        .args(["-t1", "-c4", "-d25s", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk");
    for round in 0..4 {
        let added: Vec<usize> = (0..50).map(|_| lab.add_pod().unwrap()).collect();
        wait_for("attachments to follow new pods", 30, || {
            base("tagflow_attached_interfaces") == 52.0
        });
        for i in added.into_iter().rev() {
            lab.remove_pod(i);
        }
        wait_for("attachments to follow removed pods", 30, || {
            base("tagflow_attached_interfaces") == 2.0
        });
        eprintln!("churn round {round}: 50 pods added and removed");
    }
    // Map fill is sampled every 10 s: wait for a fresh sample.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(base(entries), 2.0, "IFACE_NETNS back to its baseline");
    assert_eq!(base("tagflow_attach_failures_total"), 0.0);
    let total = finish_load(wrk, server, &dir, "during churn");
    assert!(total > 0, "load ran");
}
