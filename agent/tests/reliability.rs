//! Faults while traffic flows: the agent killed with SIGKILL and restarted
//! under an HTTP load.
mod common;

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use agent::topo::{Lab, Pod};
use common::{tcx_ids, wait_for, Agent};

fn nginx(pod: &Pod, dir: &std::path::Path) -> std::process::Child {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log; daemon off;
events {{}}
http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen 8080; location / {{ return 200 \"ok\\n\"; }} }} }}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    pod.command("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for a wrk run, stops the server, removes its directory, and
/// asserts no request failed. Returns the number of requests made.
fn finish_load(wrk: Child, server: &mut Child, dir: &std::path::Path, when: &str) -> u64 {
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(dir);
    assert!(
        out.status.success(),
        "wrk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("Socket errors") && !text.contains("Non-2xx"),
        "requests failed {when}:\n{text}"
    );
    text.lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn killing_and_restarting_the_agent_under_load_fails_no_request() {
    let _g = common::lock();
    let lab = Lab::new(2).unwrap();
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let dir = std::env::temp_dir().join(format!("tagflow-rel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = nginx(b, &dir);
    std::thread::sleep(Duration::from_millis(500));

    let mut first = Agent::start(&lab, &[]);
    first.register(b, &["begin", "--request-id", "load-1", "--port", "8080"]);
    let wrk = a
        .command("wrk")
        .args(["-t1", "-c8", "-d6s", &format!("http://{}:8080/", b.ip)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk (`cargo xtask test` installs it)");
    std::thread::sleep(Duration::from_secs(2));
    let tagged_before = first.metric("tagflow_datapath_packets_total{counter=\"tagged\"}");
    assert!(tagged_before > 0.0, "traffic was tagged before the kill");
    // SIGKILL: no cleanup at all. TCX links die with the process.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) };
    let _ = first.child.wait();
    let second = Agent::start(&lab, &[]);
    for p in &lab.pods {
        assert_eq!(
            tcx_ids(&p.host_if).len(),
            1,
            "{}: exactly one tagflow program after restart",
            p.host_if
        );
    }
    second.register(b, &["begin", "--request-id", "load-2", "--port", "8080"]);
    wait_for("tagging to resume", 10, || {
        second.metric("tagflow_datapath_packets_total{counter=\"tagged\"}") > 0.0
    });
    let total = finish_load(wrk, &mut server, &dir, "across the restart");
    assert!(total > 1000, "load ran: {total} requests");
    drop(second);
}

#[test]
fn two_hundred_pods_churning_under_traffic_are_followed_and_leave_nothing_behind() {
    let _g = common::lock();
    let mut lab = Lab::new(2).unwrap();
    let dir = std::env::temp_dir().join(format!("tagflow-churn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = nginx(&lab.pods[1], &dir);
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
    let total = finish_load(wrk, &mut server, &dir, "during churn");
    assert!(total > 0, "load ran");
}
