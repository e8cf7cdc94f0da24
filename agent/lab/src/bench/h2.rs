//! HTTP/2 proxies on a real (throw-away) node: `tagflow sidecar` against
//! nginx's `grpc_pass` doing the same job (stamp `X-Request-ID`, forward
//! h2c), both in front of `nghttpd`, driven by `h2load` from another pod
//! with the agent running. Rounds alternate the two. And linking for gRPC
//! (`linking`): a grpcio app behind nginx `grpc_pass` in its pod and behind
//! the sidecar, calls one at a time and 8 in flight on one connection.
use std::{path::Path, process::Command, time::Duration};

use super::{node::row, BenchError, Row};
use crate::{
    collector::{Collector, Wire},
    grpc::{linking as score, served, DOWN_PORT, GRPC_APP, GRPC_CLIENT},
    procs::{nginx, spawn, AgentProc},
    topo::{free_port, Lab, Pod, Proc, SidecarProc, ECHO_SERVER},
};

/// (requests/s, p99 ms) of `h2load` against `url` for `secs` seconds: 16
/// connections, 10 streams each.
fn h2load(client: &Pod, url: &str, secs: u32, log: &Path) -> Result<(f64, f64), BenchError> {
    let mut c: Command = client.command("h2load");
    c.args(["-c16", "-m10", "-t1", &format!("-D{secs}")])
        .arg(format!("--log-file={}", log.display()))
        .arg(url);
    let o = c.output().map_err(|e| BenchError::Other(e.to_string()))?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(BenchError::Other(format!("h2load: {out}")));
    }
    // "finished in 5.00s, 41234.40 req/s, ..." and "requests: ... 0 failed, 0 errored"
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .ok_or_else(|| BenchError::Other(format!("h2load output: {out}")))?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_some_and(|l| !l.contains(" 0 failed, 0 errored"));
    if failed {
        return Err(BenchError::Other(format!("h2load saw failures: {out}")));
    }
    let log = std::fs::read_to_string(log).map_err(|e| BenchError::Other(e.to_string()))?;
    let mut us: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.parse().ok())
        .collect();
    if us.is_empty() {
        return Err(BenchError::Other("h2load logged no request".into()));
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let p99 = us[(us.len() * 99 / 100).min(us.len() - 1)] / 1000.0;
    Ok((rps, p99))
}

pub fn proxies(quick: bool) -> Result<Vec<Row>, BenchError> {
    let (rounds, secs) = if quick { (2, 3) } else { (4, 5) };
    let lab = Lab::new(2)?;
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let dir = std::env::temp_dir().join(format!("tagflow-bench-h2-{}", std::process::id()));
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).map_err(|e| BenchError::Other(e.to_string()))?;
    std::fs::write(docs.join("ok"), b"ok\n").map_err(|e| BenchError::Other(e.to_string()))?;
    let upstream = spawn({
        let mut c = b.command("nghttpd");
        c.args(["--no-tls", "-d"]).arg(&docs).arg("8091");
        c
    })?;
    let proxy = nginx(
        b,
        &dir,
        "upstream h2up { server 127.0.0.1:8091; keepalive 32; }
  server { listen 8092 http2; keepalive_requests 1000000; location / {
    grpc_set_header X-Request-ID $request_id; grpc_pass grpc://h2up; } }",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let agent = AgentProc::start(&lab, &["--no-backfill"])?;
    let sidecar = SidecarProc::start(b, "127.0.0.1:8091", &agent.socket)?;
    let log = dir.join("h2load.log");
    let (mut sc_rps, mut sc_p99, mut ng_rps, mut ng_p99) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (r, p) = h2load(a, &format!("http://{}:15080/ok", b.ip), secs, &log)?;
        sc_rps.push(r);
        sc_p99.push(p);
        let (r, p) = h2load(a, &format!("http://{}:8092/ok", b.ip), secs, &log)?;
        ng_rps.push(r);
        ng_p99.push(p);
    }
    drop((sidecar, agent, proxy, upstream));
    let _ = std::fs::remove_dir_all(&dir);
    let scenario = "h2c: sidecar vs nginx grpc_pass X-Request-ID proxy (h2load)";
    Ok(vec![
        row(
            scenario,
            "requests/s",
            "req/s",
            &mut sc_rps,
            Some(&mut ng_rps),
            ">= 1.0",
        ),
        row(
            scenario,
            "p99",
            "ms",
            &mut sc_p99,
            Some(&mut ng_p99),
            "<= 1.0",
        ),
    ])
}

/// gRPC linking: each call the app makes while serving, under the request
/// it served? (correct / wrong / missing, `requests` calls per row.)
pub fn linking(requests: usize) -> Result<Vec<Row>, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let otlp_port = free_port();
    let got = Collector::start(&rt, ([127, 0, 0, 1], otlp_port).into(), Wire::Grpc, true);
    let mut rows = Vec::new();
    for via_nginx in [true, false] {
        let lab = Lab::new(3)?;
        let (cl, ap, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
        let endpoint = format!("http://127.0.0.1:{otlp_port}");
        let agent = AgentProc::start(&lab, &["--otlp-endpoint", &endpoint])?;
        let _echo = Proc::python(down, ECHO_SERVER, &[&DOWN_PORT.to_string()])?;
        let downstream = format!("{}:{DOWN_PORT}", down.ip);
        let mut app = Proc::python(ap, GRPC_APP, &["127.0.0.1:50051", &downstream])?;
        let dir = std::env::temp_dir().join(format!("tagflow-bench-grpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::Other(e.to_string()))?;
        let (_front, target, name) = if via_nginx {
            let n = nginx(
                ap,
                &dir,
                "upstream grpcapp { server 127.0.0.1:50051; keepalive 8; }
  server { listen 8080 http2; location / {
    grpc_set_header X-Request-ID $request_id; grpc_pass grpc://grpcapp; } }",
            )?;
            (
                Some(n),
                format!("{}:8080", ap.ip),
                "nginx grpc_pass in the app's pod (lo)",
            )
        } else {
            (None, format!("{}:15080", ap.ip), "tagflow sidecar (h2c)")
        };
        let _sidecar = if via_nginx {
            None
        } else {
            Some(SidecarProc::start(ap, "127.0.0.1:50051", &agent.socket)?)
        };
        std::thread::sleep(Duration::from_millis(500));
        for conc in [1usize, 8] {
            let n = requests.to_string();
            let c = conc.to_string();
            let mut client = Proc::python(cl, GRPC_CLIENT, &[&target, &n, &c, "-"])?;
            let out = client
                .run_until_done()
                .map_err(|e| BenchError::Other(e.to_string()))?;
            if out.len() != requests {
                return Err(BenchError::Other(format!(
                    "{name}: {} of {requests} calls answered",
                    out.len()
                )));
            }
            let calls = served(&mut app, requests)?;
            // Spans leave the agent once their trace is quiet.
            let t0 = std::time::Instant::now();
            let mut l = score(&got, app.pid, &calls);
            while l.missing > 0 && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(500));
                l = score(&got, app.pid, &calls);
            }
            let pct = l.correct as f64 * 100.0 / requests.max(1) as f64;
            rows.push(Row {
                scenario: format!("linking: gRPC, {name}, {conc} in flight on one connection"),
                metric: format!(
                    "correct (wrong {}, missing {} of {requests})",
                    l.wrong, l.missing
                ),
                unit: "%".into(),
                value: pct,
                baseline: None,
                ratio: None,
                // One at a time must be exact; with streams in flight the
                // serving worker is not visible on the wire: reported.
                target: if conc == 1 {
                    "== 100".into()
                } else {
                    "-".into()
                },
                spread: (pct, pct),
            });
        }
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(rows)
}
