//! Benchmarks on a real (throw-away) node: two pods, the agent as its own
//! process (`tagflow run`), load from one pod to the other. Every figure is
//! A/B-alternated against the same topology without the agent.
use std::{process::Command, time::Duration};

use super::{median, BenchError, Row};
use crate::{
    procs::{nginx, spawn, AgentProc},
    topo::{Lab, Pod, SidecarProc},
};

fn output(mut c: Command) -> Result<String, BenchError> {
    let o = c.output().map_err(|e| BenchError::Other(e.to_string()))?;
    if !o.status.success() {
        return Err(BenchError::Other(format!(
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn iperf(client: &Pod, server: &Pod, secs: u32) -> Result<f64, BenchError> {
    let mut c = client.command("iperf3");
    c.args([
        "-c",
        &server.ip.to_string(),
        "-t",
        &secs.to_string(),
        "-R",
        "-J",
    ]);
    let j: serde_json::Value = serde_json::from_str(&output(c)?)
        .map_err(|e| BenchError::Other(format!("iperf3 json: {e}")))?;
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| BenchError::Other("iperf3: no result".into()))
}

/// (requests/s, p50 ms, p99 ms, requests)
fn wrk(client: &Pod, url: &str, secs: u32) -> Result<(f64, f64, f64, f64), BenchError> {
    let mut c = client.command("wrk");
    c.args(["-t1", "-c16", &format!("-d{secs}s"), "--latency", url]);
    let out = output(c)?;
    let ms = |v: &str| -> Option<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let find = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    let rps: f64 = find("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| BenchError::Other(format!("wrk output: {out}")))?;
    let p50 = find("50%").and_then(|v| ms(&v)).unwrap_or(0.0);
    let p99 = find("99%").and_then(|v| ms(&v)).unwrap_or(0.0);
    let total: f64 = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        return Err(BenchError::Other(format!("wrk saw errors: {out}")));
    }
    Ok((rps, p50, p99, total))
}

pub(super) fn row(
    scenario: &str,
    metric: &str,
    unit: &str,
    v: &mut [f64],
    base: Option<&mut [f64]>,
    target: &str,
) -> Row {
    let value = median(v);
    let spread = (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    );
    let baseline = base.map(median);
    Row {
        scenario: scenario.into(),
        metric: metric.into(),
        unit: unit.into(),
        value,
        baseline,
        ratio: baseline.map(|b| if b != 0.0 { value / b } else { 0.0 }),
        target: target.into(),
        spread,
    }
}

pub fn node(quick: bool) -> Result<Vec<Row>, BenchError> {
    let (rounds, secs) = if quick { (2, 3) } else { (4, 5) };
    let lab = Lab::new(2)?;
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let dir = std::env::temp_dir().join(format!("tagflow-bench-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Other(e.to_string()))?;
    let sub = |name: &str| {
        let d = dir.join(name);
        let _ = std::fs::create_dir_all(&d);
        d
    };
    let servers = [
        spawn({
            let mut c = b.command("iperf3");
            c.arg("-s");
            c
        })?,
        nginx(
            b,
            &sub("up"),
            "server { listen 8081; location / { return 200 \"ok\\n\"; } }",
        )?,
        nginx(
            b,
            &sub("proxy"),
            "server { listen 8082; location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Request-ID $request_id; proxy_pass http://app; } }",
        )?,
    ];
    std::thread::sleep(Duration::from_millis(500));

    let (mut gb_off, mut gb_on) = (Vec::new(), Vec::new());
    let (mut rps_off, mut rps_on, mut p50_off, mut p50_on, mut p99_off, mut p99_on) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut cpu, mut rss, mut hwm, mut maps) = (vec![], vec![], vec![], vec![]);
    let (mut sc_rps, mut sc_p99, mut ng_rps, mut ng_p99, mut di_rps, mut di_p99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut sr_rps, mut sr_p99) = (vec![], vec![]);
    let url = |port: u16| format!("http://{}:{port}/", b.ip);
    for _ in 0..rounds {
        // Without the agent.
        gb_off.push(iperf(a, b, secs)?);
        let (r, p50, p99, _) = wrk(a, &url(8081), secs)?;
        rps_off.push(r);
        p50_off.push(p50);
        p99_off.push(p99);
        // With the agent attached, both servers' traffic tagged.
        let agent = AgentProc::start(&lab, &["--no-backfill"])?;
        for (port, rid) in [("5201", "bench-iperf"), ("8081", "bench-http")] {
            agent.register(b, &["begin", "--request-id", rid, "--port", port])?;
        }
        gb_on.push(iperf(a, b, secs)?);
        let (c0, ..) = agent.usage();
        let (r, p50, p99, total) = wrk(a, &url(8081), secs)?;
        let (c1, r1, h1, m1) = agent.usage();
        rps_on.push(r);
        p50_on.push(p50);
        p99_on.push(p99);
        cpu.push((c1 - c0) / (total / 10_000.0).max(1e-9));
        rss.push(r1 as f64 / 1024.0);
        hwm.push(h1 as f64 / 1024.0);
        maps.push(m1 as f64 / 1024.0);
        // The sidecar against nginx doing the same job, and a direct call.
        let sidecar = SidecarProc::start(b, "127.0.0.1:8081", &agent.socket)?;
        let (r, _, p99, _) = wrk(a, &url(15080), secs)?;
        sc_rps.push(r);
        sc_p99.push(p99);
        drop(sidecar);
        // ... and registering every request as well (agents without
        // loopback capture).
        let sidecar = SidecarProc::start_registering(b, "127.0.0.1:8081", &agent.socket)?;
        let (r, _, p99, _) = wrk(a, &url(15080), secs)?;
        sr_rps.push(r);
        sr_p99.push(p99);
        drop(sidecar);
        let (r, _, p99, _) = wrk(a, &url(8082), secs)?;
        ng_rps.push(r);
        ng_p99.push(p99);
        let (r, _, p99, _) = wrk(a, &url(8081), secs)?;
        di_rps.push(r);
        di_p99.push(p99);
        drop(agent);
    }
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![
        row(
            "veth TCP throughput, agent tagging",
            "throughput",
            "Gbit/s",
            &mut gb_on,
            Some(&mut gb_off),
            ">= 0.98",
        ),
        row(
            "HTTP through a tagged pod (wrk)",
            "requests/s",
            "req/s",
            &mut rps_on,
            Some(&mut rps_off),
            ">= 0.98",
        ),
        row(
            "HTTP through a tagged pod (wrk)",
            "p50",
            "ms",
            &mut p50_on,
            Some(&mut p50_off),
            "",
        ),
        row(
            "HTTP through a tagged pod (wrk)",
            "p99",
            "ms",
            &mut p99_on,
            Some(&mut p99_off),
            "<= 1.05",
        ),
        row(
            "agent CPU at that load",
            "CPU-seconds per 10k requests",
            "s",
            &mut cpu,
            None,
            "<= 0.01",
        ),
        row(
            "agent memory",
            "RSS after load",
            "MiB",
            &mut rss,
            None,
            "<= 32",
        ),
        row("agent memory", "peak RSS", "MiB", &mut hwm, None, ""),
        row("agent memory", "BPF maps", "MiB", &mut maps, None, "<= 32"),
        row(
            "sidecar vs nginx X-Request-ID proxy",
            "requests/s",
            "req/s",
            &mut sc_rps,
            Some(&mut ng_rps),
            ">= 1.0",
        ),
        row(
            "sidecar vs nginx X-Request-ID proxy",
            "p99",
            "ms",
            &mut sc_p99,
            Some(&mut ng_p99),
            "<= 1.0",
        ),
        row(
            "sidecar --register vs nginx X-Request-ID proxy",
            "requests/s",
            "req/s",
            &mut sr_rps,
            Some(&mut ng_rps.clone()),
            "",
        ),
        row(
            "sidecar --register vs nginx X-Request-ID proxy",
            "p99",
            "ms",
            &mut sr_p99,
            Some(&mut ng_p99.clone()),
            "",
        ),
        row(
            "sidecar vs direct call",
            "requests/s",
            "req/s",
            &mut sc_rps.clone(),
            Some(&mut di_rps.clone()),
            "",
        ),
        row(
            "sidecar vs direct call",
            "p99",
            "ms",
            &mut sc_p99.clone(),
            Some(&mut di_p99),
            "",
        ),
    ])
}
