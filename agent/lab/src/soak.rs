//! `tagflow soak`: everything at once on a throw-away node for N minutes.
//! The agent runs as its own process (`tagflow run`) while
//! - a sidecar in front of nginx registers every request (keep-alive load),
//! - a client sends `x-request-id` heads on a new connection per request
//!   (passive capture, a span per connection),
//! - another pod sends untraced load and is registered from the CLI every
//!   10 s (and tries a registration it is not allowed, which is refused),
//! - pods (namespaces + veths) are added and removed every 10 s,
//! - the OTLP collector is up 20 s, down 20 s.
//!
//! Every `sample` it records the agent's RSS, every map's fill and every
//! loss counter. After warm-up, RSS and map fill must be flat: the second
//! half of the run may not exceed the first half's peak (plus noise).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    collector::{Collector, Wire},
    procs::{nginx_ok, AgentProc},
    topo::{free_port, Lab, Pod, SidecarProc, TopoError},
};

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error(transparent)]
    Topo(#[from] TopoError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One sample of the agent under soak.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: u64,
    pub rss_kib: u64,
    pub pods: usize,
    pub collector_up: bool,
    /// Entries per map.
    pub maps: BTreeMap<String, u64>,
    /// Every loss counter (cumulative).
    pub losses: BTreeMap<String, u64>,
    /// The agent's bounded working sets: open and held spans, cached
    /// request details.
    pub working: BTreeMap<String, u64>,
    pub spans_exported: u64,
    /// Spans the collector decoded.
    pub spans_received: u64,
    pub registrations: u64,
}

/// Names of metrics that count lost or refused data.
fn is_loss(name: &str) -> bool {
    [
        "dropped",
        "failed",
        "full",
        "evicted",
        "refused",
        "truncated",
        "malformed",
        "rate_limited",
        "released_early",
        "table_errors",
        "unknown",
        "parse_failed",
    ]
    .iter()
    .any(|w| name.contains(w))
}

fn wrk(pod: &Pod, secs: u64, conns: u32, extra: &[&str], url: &str) -> Result<Child, SoakError> {
    Ok(pod
        .command("wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s")])
        .args(["--timeout", "5s"])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// (requests, failure lines) of a finished wrk.
fn wrk_result(c: Child) -> Result<(u64, Vec<String>), SoakError> {
    let out = c.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut bad: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .map(|l| l.trim().to_string())
        .collect();
    if !out.status.success() {
        bad.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok((requests, bad))
}

fn sample(t0: Instant, agent: &AgentProc, lab: &Lab, c: &Collector) -> Sample {
    let m = agent.metrics().and_then(Result::ok).unwrap_or_default();
    let label = |k: &str, prefix: &str| -> Option<String> {
        k.strip_prefix(prefix)?
            .strip_suffix("\"}")
            .map(String::from)
    };
    let mut maps = BTreeMap::new();
    let mut losses = BTreeMap::new();
    for (k, v) in &m {
        if let Some(map) = label(k, "tagflow_map_entries{map=\"") {
            maps.insert(map, *v as u64);
        } else if let Some(c) = label(k, "tagflow_datapath_packets_total{counter=\"") {
            if is_loss(&c) {
                losses.insert(format!("datapath_{c}"), *v as u64);
            }
        } else if let Some(name) = k.strip_prefix("tagflow_") {
            if !name.contains('{') && is_loss(name) {
                losses.insert(name.to_string(), *v as u64);
            }
        }
    }
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
    let mut working: BTreeMap<String, u64> = ["spans_open", "spans_held", "capture_heads_cached"]
        .iter()
        .map(|k| (k.to_string(), get(&format!("tagflow_{k}"))))
        .collect();
    // Live heap vs free-but-held: a leak grows the first.
    for k in ["heap_in_use", "heap_free"] {
        working.insert(
            format!("{k}_kib"),
            get(&format!("tagflow_{k}_bytes")) / 1024,
        );
    }
    Sample {
        t_s: t0.elapsed().as_secs(),
        rss_kib: agent.usage().1,
        pods: lab.pods.len(),
        collector_up: c.is_up(),
        maps,
        losses,
        working,
        spans_exported: get("tagflow_spans_exported_total"),
        spans_received: c.received(),
        registrations: get("tagflow_registrations_begin_total"),
    }
}

fn print(s: &Sample) {
    let maps: Vec<String> = s.maps.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let losses: Vec<String> = s
        .losses
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "t={:>4}s rss={:>6.1}MiB pods={:<2} collector={:<4} spans exported={} received={} registrations={}\n        working: {}\n        maps: {}\n        losses: {}",
        s.t_s,
        s.rss_kib as f64 / 1024.0,
        s.pods,
        if s.collector_up { "up" } else { "down" },
        s.spans_exported,
        s.spans_received,
        s.registrations,
        s.working
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        maps.join(" "),
        if losses.is_empty() { "none".into() } else { losses.join(" ") },
    );
}

/// One quantity judged for flatness: its median and peak in each half of
/// the post-warm-up window.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    pub what: String,
    pub median: (u64, u64),
    pub peak: (u64, u64),
    pub flat: bool,
}

/// Flatness after warm-up, half against half. RSS: the second half's median
/// may exceed the first's by at most 5 % + 2 MiB (a leak moves it; healthy
/// runs moved it by a few percent either way), its peak by 10 % + 4 MiB (spikes come and go with
/// collector outages). A 1 MiB per 10 s leak fails a 5-minute run. Map fill
/// is bursty (its peaks differ by up to a third between halves of a healthy
/// run, measured), so growth means its peak rising by more than half (+64):
/// a map that keeps what it should drop grows far faster under this churn.
pub fn verdict(samples: &[Sample], warm_s: u64) -> Result<Vec<Judgement>, String> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warm_s).collect();
    if after.len() < 4 {
        return Err("too few samples after warm-up to judge".into());
    }
    let (h1, h2) = after.split_at(after.len() / 2);
    let stats = |h: &[&Sample], f: &dyn Fn(&Sample) -> u64| {
        let mut v: Vec<u64> = h.iter().map(|s| f(s)).collect();
        v.sort_unstable();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let judge = |what: String, f: &dyn Fn(&Sample) -> u64, rss: bool| {
        let ((m1, p1), (m2, p2)) = (stats(h1, f), stats(h2, f));
        let flat = if rss {
            m2 <= m1 + m1 / 20 + 2048 && p2 <= p1 + p1 / 10 + 4096
        } else {
            p2 <= p1 + p1 / 2 + 64
        };
        Judgement {
            what,
            median: (m1, m2),
            peak: (p1, p2),
            flat,
        }
    };
    let mut out = vec![judge("RSS (KiB)".into(), &|s| s.rss_kib, true)];
    for map in after[0].maps.keys() {
        out.push(judge(
            format!("{map} fill"),
            &|s| s.maps.get(map).copied().unwrap_or(0),
            false,
        ));
    }
    Ok(out)
}

/// What a soak run saw, and what was wrong with it (empty: passed).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub judgements: Vec<Judgement>,
    pub requests: u64,
    pub problems: Vec<String>,
}

/// Runs the soak. The report's `problems` name what was not flat, any
/// failed request and any forbidden registration that was accepted.
pub fn soak(minutes: f64, sample_s: u64) -> Result<Report, SoakError> {
    let secs = (minutes * 60.0).round().max(30.0) as u64;
    // Allocator high-water marks settle within about a minute (measured).
    let warm_s = (secs / 5).max(60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut lab = Lab::new(3)?;
    let dir = std::env::temp_dir().join(format!("tagflow-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _nginx = nginx_ok(&lab.pods[1], &dir)?;
    std::thread::sleep(Duration::from_millis(300));

    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let col = Collector::start(&rt, otlp, Wire::Http, false);
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/tagflow-soak-{}", std::process::id()));
    let endpoint = format!("http://{otlp}/v1/traces");
    let agent = AgentProc::start_pinned(
        &lab,
        &[
            "--no-backfill",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-no-gzip",
        ],
        &pins,
    )?;
    // Registering every request: the soak keeps the registration path under load.
    let _sidecar = SidecarProc::start_registering(&lab.pods[1], "127.0.0.1:8080", &agent.socket)?;
    let b = lab.pods[1].ip;
    let loads = vec![
        wrk(&lab.pods[0], secs, 4, &[], &format!("http://{b}:15080/"))?,
        wrk(
            &lab.pods[0],
            secs,
            1,
            &[
                "-H",
                "x-request-id: soak-capture",
                "-H",
                "Connection: close",
            ],
            &format!("http://{b}:8080/"),
        )?,
        wrk(&lab.pods[2], secs, 2, &[], &format!("http://{b}:8080/"))?,
    ];
    let untraced_pid = loads[2].id().to_string();
    println!(
        "soak: {secs} s, sample every {sample_s} s, warm-up {warm_s} s; agent pid {}",
        agent.child.id()
    );

    let t0 = Instant::now();
    let mut samples = Vec::new();
    let (mut churned, mut cli_ok, mut cli_refused) = (Vec::<usize>::new(), 0u64, 0u64);
    let mut tick = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        if tick.is_multiple_of(20) {
            col.set_up(!col.is_up());
        }
        if tick.is_multiple_of(10) {
            for i in churned.drain(..).rev() {
                lab.remove_pod(i);
            }
            for _ in 0..4 {
                churned.push(lab.add_pod()?);
            }
            let register = |pid: &str, id: &str| {
                agent
                    .register(&lab.pods[2], &["begin", "--request-id", id, "--pid", pid])
                    .is_ok()
            };
            cli_ok += register(&untraced_pid, &format!("soak-cli-{tick}")) as u64;
            // pid 1 is the host's init, outside the pod: must be refused.
            cli_refused += !register("1", "soak-forbidden") as u64;
        }
        if tick.is_multiple_of(sample_s) {
            let s = sample(t0, &agent, &lab, &col);
            print(&s);
            samples.push(s);
        }
    }
    let mut failures = Vec::new();
    let mut requests = 0;
    for (name, w) in ["sidecar", "capture", "untraced"].into_iter().zip(loads) {
        let (n, bad) = wrk_result(w)?;
        requests += n;
        failures.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    }
    for i in churned.drain(..).rev() {
        lab.remove_pod(i);
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "requests: {requests}; CLI registrations accepted {cli_ok}, refused as expected {cli_refused}"
    );
    let (judgements, mut problems) = match verdict(&samples, warm_s) {
        Ok(j) => (j, Vec::new()),
        Err(e) => (Vec::new(), vec![e]),
    };
    println!("after warm-up, first half → second half:");
    for j in &judgements {
        println!(
            "  {:<20} median {:>8} → {:<8} peak {:>8} → {:<8} {}",
            j.what,
            j.median.0,
            j.median.1,
            j.peak.0,
            j.peak.1,
            if j.flat { "flat" } else { "GREW" }
        );
        if !j.flat {
            problems.push(format!(
                "{} grew after warm-up: median {} → {}, peak {} → {}",
                j.what, j.median.0, j.median.1, j.peak.0, j.peak.1
            ));
        }
    }
    problems.extend(failures);
    // The collector is up half the time: spans must reach it (an export
    // path that fails every batch would otherwise look like a calm agent).
    if let Some(p) = export_problem(&samples) {
        problems.push(p);
    }
    if cli_refused != tick / 10 {
        problems.push(format!(
            "{} forbidden registrations were accepted",
            tick / 10 - cli_refused
        ));
    }
    if problems.is_empty() {
        println!("soak: RSS and map fill flat after warm-up; no request failed");
    }
    Ok(Report {
        samples,
        judgements,
        requests,
        problems,
    })
}

/// Why the samples show export not working: nothing received, or a
/// collector-up period after warm-up in which nothing arrived.
fn export_problem(samples: &[Sample]) -> Option<String> {
    let last = samples.last()?;
    if last.spans_received == 0 {
        return Some(format!(
            "the collector received no span ({} exported)",
            last.spans_exported
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soak_whose_collector_received_nothing_fails() {
        let mut a = s(10, 1000, 5);
        assert!(export_problem(&[a.clone()]).is_some());
        a.spans_received = 3;
        assert_eq!(export_problem(&[a]), None);
    }

    fn s(t_s: u64, rss_kib: u64, flows: u64) -> Sample {
        Sample {
            t_s,
            rss_kib,
            pods: 3,
            collector_up: true,
            maps: [("FLOW_STATS".to_string(), flows)].into(),
            losses: BTreeMap::new(),
            working: BTreeMap::new(),
            spans_exported: 0,
            spans_received: 0,
            registrations: 0,
        }
    }

    fn grew(samples: &[Sample]) -> Vec<String> {
        verdict(samples, 30)
            .unwrap()
            .into_iter()
            .filter(|j| !j.flat)
            .map(|j| j.what)
            .collect()
    }

    #[test]
    fn flat_runs_pass_and_growth_after_warm_up_is_named() {
        // Warm-up growth does not count; noise within the margins passes.
        let flat: Vec<Sample> = (0..10)
            .map(|i| {
                s(
                    i * 10,
                    if i < 3 { 10_000 * (i + 1) } else { 40_000 + i },
                    100 + i,
                )
            })
            .collect();
        assert!(grew(&flat).is_empty());
        // A 5-minute run at 80 MiB leaking 1 MiB every 10 s: caught.
        let leaky: Vec<Sample> = (0..30)
            .map(|i| s(i * 10, 80_000 + i * 1_024, 100))
            .collect();
        let j = verdict(&leaky, 60).unwrap();
        assert!(!j[0].flat && j[0].what == "RSS (KiB)", "{j:?}");
        let filling: Vec<Sample> = (0..10).map(|i| s(i * 10, 40_000, 100 * (i + 1))).collect();
        assert_eq!(grew(&filling), ["FLOW_STATS fill"]);
        assert!(
            verdict(&flat[..6], 30).is_err(),
            "too few samples is not a pass"
        );
        // One spike in the second half is not growth.
        let mut spiky: Vec<Sample> = (0..10).map(|i| s(i * 10, 40_000, 100)).collect();
        spiky[8].rss_kib = 47_000;
        assert!(grew(&spiky).is_empty());
    }

    #[test]
    fn loss_counters_are_recognised_by_name() {
        for n in [
            "spans_dropped_total",
            "datapath_ringbuf_full",
            "registrations_refused_total",
            "spans_released_early_total",
        ] {
            assert!(is_loss(n), "{n}");
        }
        for n in [
            "spans_exported_total",
            "datapath_tagged",
            "flow_stats_collected_total",
        ] {
            assert!(!is_loss(n), "{n}");
        }
    }
}
