//! Processes the lab runs beside a topology: `tagflow run` as its own
//! process, nginx, any server stopped on drop, and a plain HTTP GET to talk
//! to them.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::Ipv4Addr,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::os::{fd::AsRawFd, unix::process::CommandExt};

use crate::{
    node::Node,
    topo::{free_port, Lab, Pod, TopoError},
};

/// The `tagflow` binary: `$TAGFLOW_BIN`, else beside this executable (a
/// test harness runs from `target/<profile>/deps/`, the binary sits one
/// directory up). `cargo xtask` builds it before running the lab.
pub fn tagflow_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TAGFLOW_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("tagflow"), dir.join("../tagflow")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no tagflow binary beside {} (build it: cargo build -p tagflow, or run through cargo xtask)",
                exe.display()
            )
        })
}

/// An HTTP response: (status, headers with lowercased names, body).
pub type Reply = (u16, Vec<(String, String)>, String);

/// One HTTP/1.1 GET with extra headers and `Connection: close`.
pub fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let hs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, hs, body.to_string()))
}

/// GET `path`; Some(body) on 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match http_request(addr, path, &[]) {
        Ok((200, _, body)) => Some(body),
        _ => None,
    }
}

/// A child process stopped (and reaped) on drop.
pub struct Server(pub Child);

impl Drop for Server {
    /// SIGTERM first: a server with worker processes (nginx) stops them
    /// and closes its connections; killed outright, its master leaves the
    /// workers running with every connection open. SIGKILL after 5 s.
    fn drop(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: signalling our own unreaped child (its pid is not reused
        // before we wait for it).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `c` with its output discarded.
pub fn spawn(mut c: Command) -> Result<Server, TopoError> {
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c.spawn().map(Server).map_err(|e| TopoError::Command {
        cmd: format!("{c:?}"),
        stderr: e.to_string(),
    })
}

/// Writes an nginx.conf in `dir` (everything it writes stays in `dir`)
/// whose `http {}` block holds `body`; an `app` upstream points at
/// 127.0.0.1:8081.
pub fn nginx_conf(dir: &Path, body: &str) -> PathBuf {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log; daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  upstream app {{ server 127.0.0.1:8081; keepalive 32; }}
  {body}
}}
"
    );
    let p = dir.join("nginx.conf");
    let _ = std::fs::write(&p, conf);
    p
}

/// nginx in `pod` with `nginx_conf(dir, body)`.
pub fn nginx(pod: &Pod, dir: &Path, body: &str) -> Result<Server, TopoError> {
    let mut c = pod.command("nginx");
    c.arg("-c").arg(nginx_conf(dir, body));
    spawn(c)
}

/// nginx in `pod` answering 200 "ok" on :8080.
pub fn nginx_ok(pod: &Pod, dir: &Path) -> Result<Server, TopoError> {
    nginx(
        pod,
        dir,
        "server { listen 8080; location / { return 200 \"ok\\n\"; } }",
    )
}

/// `tagflow run` as its own process, attached to the lab's pods; stopped
/// with SIGTERM on drop, its socket directory (and pin directory, if it
/// had one of its own) removed.
pub struct AgentProc {
    pub child: Child,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    pin_dir: Option<PathBuf>,
}

impl AgentProc {
    /// Starts `tagflow run` on the lab's interfaces with `extra` flags and
    /// nothing pinned; returns once every pod is attached.
    pub fn start(lab: &Lab, extra: &[&str]) -> Result<Self, TopoError> {
        let mut args = vec!["--no-pin"];
        args.extend_from_slice(extra);
        Self::launch(lab, &args, None, None, Ipv4Addr::LOCALHOST)
    }

    /// Like `start`, its operations endpoint on `ip` (an address pods
    /// reach, as a DaemonSet's on the node's IP).
    pub fn start_at(lab: &Lab, extra: &[&str], ip: Ipv4Addr) -> Result<Self, TopoError> {
        let mut args = vec!["--no-pin"];
        args.extend_from_slice(extra);
        Self::launch(lab, &args, None, None, ip)
    }

    /// `tagflow run` on another node (inside its namespace), attached to
    /// the pods of `lab` there; its metrics answer on the node's
    /// management address.
    pub fn start_on(node: &Node, lab: &Lab, extra: &[&str]) -> Result<Self, TopoError> {
        let mut args = vec!["--no-pin"];
        args.extend_from_slice(extra);
        Self::launch(lab, &args, None, Some(node), node.mgmt)
    }

    /// With its maps pinned in `pin_dir` (removed on drop): a restarted
    /// agent given its predecessor's directory takes over its tables.
    pub fn start_pinned(lab: &Lab, extra: &[&str], pin_dir: &Path) -> Result<Self, TopoError> {
        let mut args = vec!["--pin-dir", pin_dir.to_str().expect("utf-8 pin dir")];
        args.extend_from_slice(extra);
        Self::launch(lab, &args, Some(pin_dir.into()), None, Ipv4Addr::LOCALHOST)
    }

    fn launch(
        lab: &Lab,
        extra: &[&str],
        pin_dir: Option<PathBuf>,
        node: Option<&Node>,
        ip: Ipv4Addr,
    ) -> Result<Self, TopoError> {
        let metrics = SocketAddr::from((ip, free_port()));
        let socket = std::env::temp_dir().join(format!(
            "tagflow-lab-{}-{}/agent.sock",
            std::process::id(),
            metrics.port()
        ));
        let mut cmd = Command::new(tagflow_bin());
        if let Some(n) = node {
            let ns = std::fs::File::open(n.netns_path())?;
            // SAFETY: between fork and exec only setns, which is
            // async-signal-safe, on a descriptor the parent keeps open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["run", "--iface-prefix", &lab.prefix])
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            // The lab's own nodes name their uplinks; the machine's is not
            // the lab's business.
            .args(if extra.contains(&"--uplink") {
                &[][..]
            } else {
                &["--uplink", "none"][..]
            })
            // TAGFLOW_LOG: the agent's log filter when diagnosing a test.
            .env(
                "RUST_LOG",
                std::env::var("TAGFLOW_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()?;
        let a = Self {
            child,
            socket,
            metrics,
            pin_dir,
        };
        let t0 = Instant::now();
        while a.metric("tagflow_attached_interfaces") < lab.pods.len() as f64 {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(TopoError::NotReady("tagflow run did not attach".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(a)
    }

    /// /metrics as name → value. A sample line that does not parse as
    /// Prometheus text is an error naming the line.
    pub fn metrics(&self) -> Option<Result<HashMap<String, f64>, String>> {
        let text = http_get(self.metrics, "/metrics")?;
        Some(parse_metrics(&text))
    }

    /// Whether the agent has nothing more to send: no span open, held for
    /// its trace or awaited by a head, and every span it queued for export
    /// accepted by the collector or given up on (counted). False when
    /// /metrics does not answer.
    ///
    /// The agent refreshes these gauges each second: one reading may be
    /// that old, so a caller looks for over a second.
    ///
    /// A span can close long after its request (a keep-alive connection's
    /// last request closes at idle, then waits for its trace to go quiet
    /// and for the next export batch): a test that reads the collector
    /// waits for this, not for a guess at those delays.
    pub fn settled(&self) -> bool {
        let Some(Ok(m)) = self.metrics() else {
            return false;
        };
        let g = |k: &str| m.get(&format!("tagflow_{k}")).copied();
        let idle = ["spans_open", "spans_held", "capture_spans_awaited"]
            .iter()
            .all(|k| g(k) == Some(0.0));
        // A span dropped at a full queue was never queued.
        let sent = match (
            g("spans_enqueued_total"),
            g("spans_exported_total"),
            g("spans_failed_total"),
        ) {
            (Some(q), Some(e), Some(f)) => q == e + f,
            _ => false,
        };
        idle && sent
    }

    /// One metric; -1 when the endpoint does not answer or lacks it.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .and_then(Result::ok)
            .and_then(|m| m.get(name).copied())
            .unwrap_or(-1.0)
    }

    /// `tagflow register ARGS` run inside `pod` (its own namespace);
    /// returns the reply printed.
    pub fn register(&self, pod: &Pod, args: &[&str]) -> Result<String, TopoError> {
        let out = pod
            .command(&tagflow_bin().to_string_lossy())
            .arg("register")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(TopoError::Command {
                cmd: format!("tagflow register {args:?}"),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// (user + system CPU seconds, VmRSS KiB, VmHWM KiB, BPF map memlock KiB)
    pub fn usage(&self) -> (f64, u64, u64, u64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = (f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
            / tick;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        (cpu, kib("VmRSS:"), kib("VmHWM:"), map_memlock_kib(pid))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // Only a child not yet reaped: its pid cannot have been reused.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill on our own, unreaped child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        if let Some(d) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(d) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Prometheus text → name (with labels) → value.
pub fn parse_metrics(text: &str) -> Result<HashMap<String, f64>, String> {
    let mut m = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let bad = || format!("bad sample line {line:?}");
        let (name, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let v: f64 = value.parse().map_err(|_| bad())?;
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(bad());
        }
        m.insert(name.to_string(), v);
    }
    Ok(m)
}

/// Memory of every BPF map the process holds (fdinfo `memlock`),
/// deduplicated by map id.
pub fn map_memlock_kib(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if !info.contains("map_type:") {
                continue;
            }
            let field = |k: &str| {
                info.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            };
            if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) {
                if seen.insert(id) {
                    total += mem;
                }
            }
        }
    }
    total / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_parses_or_names_the_bad_line() {
        let m = parse_metrics("# HELP x y\nx_total 3\ny{a=\"b\"} 1.5\n").unwrap();
        assert_eq!(m["x_total"], 3.0);
        assert_eq!(m["y{a=\"b\"}"], 1.5);
        let e = parse_metrics("x_total three\n").unwrap_err();
        assert!(e.contains("x_total three"), "{e}");
        assert!(parse_metrics("9x 1\n").is_err());
    }
}
