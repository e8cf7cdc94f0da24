//! A throw-away "node" for tests, the demo and benchmarks: pods as network
//! namespaces, each with a veth whose host-side end sits on a private bridge
//! (no address on the host, no routes, no sysctl changes). Names are unique
//! per process and lab so parallel runs cannot collide; everything is removed
//! on drop.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static LABS: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("child said {0:?}, expected `ready <pid>`")]
    NotReady(String),
}

pub struct Pod {
    pub name: String,
    /// Host-side veth end (where tagflow attaches).
    pub host_if: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside the pod's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

pub struct Lab {
    /// Interface-name prefix shared by every host-side veth of this lab.
    pub prefix: String,
    pub bridge: String,
    pub pods: Vec<Pod>,
    /// The node namespace the bridge and host-side veths live in (`None`:
    /// this process's own, the host).
    node: Option<String>,
    subnet: [u8; 3],
    next: u8,
}

pub fn run(args: &[&str]) -> Result<String, TopoError> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(TopoError::Command {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A number unique to this process and call (names of lab objects).
pub fn unique() -> u32 {
    let n = LABS.fetch_add(1, Ordering::Relaxed);
    (std::process::id().wrapping_mul(31).wrapping_add(n)) & 0xffffff
}

impl Lab {
    /// A lab with `pods` pods, named `<prefix>-0`, `<prefix>-1`, ...
    pub fn new(pods: usize) -> Result<Self, TopoError> {
        Self::build(None, pods)
    }

    /// A lab whose bridge and host-side veths live in the namespace
    /// `node` (another "machine", see `node::Node`).
    pub fn on_node(node: &str, pods: usize) -> Result<Self, TopoError> {
        Self::build(Some(node.to_string()), pods)
    }

    fn build(node: Option<String>, pods: usize) -> Result<Self, TopoError> {
        let uniq = unique();
        let prefix = format!("tfv{uniq:06x}");
        let bridge = format!("tfb{uniq:06x}");
        let mut lab = Self {
            prefix,
            bridge: String::new(),
            pods: Vec::new(),
            node,
            subnet: [10, 100 + (uniq % 100) as u8, (uniq >> 8) as u8],
            next: 0,
        };
        lab.ip(&["link", "add", &bridge, "type", "bridge"])?;
        lab.bridge = bridge;
        lab.ip(&["link", "set", &lab.bridge, "up"])?;
        for _ in 0..pods {
            lab.add_pod()?;
        }
        Ok(lab)
    }

    /// Adds one pod; returns its index.
    pub fn add_pod(&mut self) -> Result<usize, TopoError> {
        let i = self.next;
        self.next += 1;
        let name = format!("{}-{i}", self.prefix);
        let host_if = format!("{}{}", self.prefix, i);
        let peer = format!("{}p{}", self.prefix, i);
        let ip = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 2 + i);
        run(&["ip", "netns", "add", &name])?;
        // Register the pod before anything else can fail so Drop removes it.
        self.pods.push(Pod {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ifindex: 0,
            ip,
        });
        self.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &name,
        ])?;
        self.ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
        let addr = format!("{ip}/24");
        for args in [
            vec!["ip", "link", "set", &peer, "name", "eth0"],
            vec!["ip", "addr", "add", &addr, "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &name];
            full.extend(args);
            run(&full)?;
        }
        // `N: name@peer: ...`
        let line = self.ip(&["-o", "link", "show", "dev", &host_if])?;
        let pod = self.pods.last_mut().expect("just pushed");
        pod.host_ifindex = line
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        Ok(self.pods.len() - 1)
    }

    /// The host routes between the lab's pods, as a node does: the bridge
    /// gets the subnet's `.1` (only this bridge forwards; nothing global
    /// changes) and each pod a default route through it. Returns `.1`.
    pub fn route_via_host(&self) -> Result<Ipv4Addr, TopoError> {
        let gw = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1);
        self.ip(&["addr", "add", &format!("{gw}/24"), "dev", &self.bridge])?;
        let knob = format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.bridge);
        match &self.node {
            None => std::fs::write(knob, "1")?,
            Some(n) => {
                let set = format!("echo 1 > {knob}");
                run(&["ip", "netns", "exec", n, "sh", "-c", &set])?;
            }
        }
        for pod in &self.pods {
            let gw = gw.to_string();
            run(&[
                "ip", "netns", "exec", &pod.name, "ip", "route", "add", "default", "via", &gw,
            ])?;
        }
        Ok(gw)
    }

    /// An address no pod has, standing for a Service's ClusterIP.
    pub fn service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.subnet[1], self.subnet[2])
    }

    /// The pods' subnet, `a.b.c.0/24`.
    pub fn cidr(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Removes a pod (namespace and veth) while the lab lives on.
    pub fn remove_pod(&mut self, i: usize) {
        let pod = self.pods.remove(i);
        let _ = run(&["ip", "netns", "del", &pod.name]);
        let _ = self.ip(&["link", "del", &pod.host_if]);
    }

    /// `ip ARGS` in the lab's node namespace.
    fn ip(&self, args: &[&str]) -> Result<String, TopoError> {
        let mut full = vec!["ip"];
        if let Some(n) = &self.node {
            full.extend(["-n", n.as_str()]);
        }
        full.extend(args);
        run(&full)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut self.pods);
        for pod in pods {
            // Kill anything still running in the pod, then remove it.
            let _ = Command::new("ip")
                .args(["netns", "pids", &pod.name])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = run(&["ip", "netns", "del", &pod.name]);
            let _ = self.ip(&["link", "del", &pod.host_if]);
        }
        let _ = self.ip(&["link", "del", &self.bridge]);
    }
}

/// A TCP echo server: `python3 -c ECHO_SERVER PORT [fork]`. Prints
/// `ready <pid>` once listening. With `fork` every connection is served by
/// a forked child.
pub const ECHO_SERVER: &str = r#"
import os, socket, sys, threading
port = int(sys.argv[1]); fork = len(sys.argv) > 2 and sys.argv[2] == "fork"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(128)
print("ready", os.getpid(), flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d: return
            c.sendall(d)
while True:
    c, _ = s.accept()
    if fork:
        if os.fork() == 0:
            s.close(); serve(c); os._exit(0)
        c.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]: pass
        except ChildProcessError: pass
    else:
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A TCP client: `python3 -c CLIENT HOST PORT SPORT ROUNDS`. Prints
/// `ready <pid>`, waits for a line on stdin, connects (from SPORT unless 0),
/// sends ROUNDS × 100 bytes and reads each echo, prints `done`, waits for
/// another line, exits.
pub const CLIENT: &str = r#"
import os, socket, sys
host, port, sport, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sport: s.bind(("0.0.0.0", sport))
s.connect((host, port))
for _ in range(rounds):
    s.sendall(b"x" * 100)
    got = 0
    while got < 100:
        d = s.recv(100 - got)
        if not d: sys.exit("server closed")
        got += len(d)
print("done", flush=True)
sys.stdin.readline()
s.close()
"#;

/// The Python the lab runs: `TAGFLOW_PYTHON` (set by `cargo xtask` to the
/// interpreter its packages were installed for), else `python3` on PATH.
pub fn python() -> String {
    std::env::var("TAGFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A process in a pod that talks over stdin/stdout.
pub struct Proc {
    pub pid: u32,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    /// Starts `python3 -c script args...` in `pod` and waits for `ready <pid>`.
    pub fn python(pod: &Pod, script: &str, args: &[&str]) -> Result<Self, TopoError> {
        let mut cmd = pod.command(&python());
        cmd.arg("-c").arg(script).args(args);
        Self::spawn(cmd)
    }

    /// Like [`Proc::python`], in the host's namespace.
    pub fn host_python(script: &str, args: &[&str]) -> Result<Self, TopoError> {
        let mut cmd = Command::new(python());
        cmd.arg("-c").arg(script).args(args);
        Self::spawn(cmd)
    }

    /// Starts `cmd` and waits for it to print `ready <pid>`.
    pub fn spawn(mut cmd: Command) -> Result<Self, TopoError> {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let pid = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| TopoError::NotReady(line.clone()))?;
        Ok(Self {
            pid,
            child,
            stdin,
            stdout,
        })
    }

    /// Sends a line, then reads one line back (empty at EOF).
    pub fn step(&mut self) -> Result<String, TopoError> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

impl Drop for Proc {
    /// Kills the whole process group: a forking server's children hold its
    /// listening socket (and keep-alive connections) after it is gone.
    fn drop(&mut self) {
        // SAFETY: a signal to the group our own unreaped child leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP app: `python3 -c HTTP_APP PORT DOWNSTREAM MODE [NAME]` where
/// DOWNSTREAM is `host:port` of an echo server to call while serving each
/// request, an `http://` URL to GET (propagating `x-request-id` and
/// `traceparent`, as an instrumented app does), or `-`; MODE `thread`,
/// `fork` (a child process per connection) or `prefork` (three worker
/// processes sharing the listening socket); NAME sets the process name.
/// Replies `rid=<x-request-id> tp=<traceparent> pid=<serving pid>`. Prints
/// `ready <pid>`.
pub const HTTP_APP: &str = r#"
import os, socket, sys, socketserver, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
port, down, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if len(sys.argv) > 4:
    import ctypes
    ctypes.CDLL(None).prctl(15, sys.argv[4].encode(), 0, 0, 0)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        rid = self.headers.get("x-request-id", "")
        tp = self.headers.get("traceparent", "")
        if down.startswith("http"):
            req = urllib.request.Request(down)
            for k in ("x-request-id", "traceparent"):
                if self.headers.get(k): req.add_header(k, self.headers.get(k))
            urllib.request.urlopen(req, timeout=10).read()
        elif down != "-":
            h, p = down.rsplit(":", 1)
            with socket.create_connection((h, int(p))) as s:
                for _ in range(3):
                    s.sendall(b"y" * 100)
                    got = 0
                    while got < 100:
                        d = s.recv(100 - got)
                        if not d: break
                        got += len(d)
        body = f"rid={rid} tp={tp} pid={os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class Threaded(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
class Forking(socketserver.ForkingMixIn, HTTPServer):
    allow_reuse_address = True
if mode == "prefork":
    srv = HTTPServer(("0.0.0.0", port), H)
    for _ in range(3):
        if os.fork() == 0:
            srv.serve_forever()
    print("ready", os.getpid(), flush=True)
    while True:
        os.wait()
srv = (Forking if mode == "fork" else Threaded)(("0.0.0.0", port), H)
print("ready", os.getpid(), flush=True)
srv.serve_forever()
"#;

/// An HTTP client: `python3 -c HTTP_CLIENT URL REQUEST_ID N [NAME]`. Prints
/// `ready <pid>`, waits for a line, sends N GETs (with `x-request-id:
/// REQUEST_ID` unless it is `-`), printing `<x-request-id of the
/// response> <body>` per request, then `done`.
pub const HTTP_CLIENT: &str = r#"
import os, sys, urllib.request
url, rid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:
    import ctypes
    ctypes.CDLL(None).prctl(15, sys.argv[4].encode(), 0, 0, 0)
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(n):
    req = urllib.request.Request(url)
    if rid != "-": req.add_header("X-Request-ID", rid)
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.headers.get("x-request-id"), r.read().decode().strip(), flush=True)
print("done", flush=True)
sys.stdin.readline()
"#;

impl Proc {
    /// Reads one line of output.
    pub fn line(&mut self) -> Result<String, TopoError> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }

    /// Sends a line and collects output lines up to `done`.
    pub fn run_until_done(&mut self) -> Result<Vec<String>, TopoError> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        let mut out = Vec::new();
        loop {
            let l = self.line()?;
            if l == "done" || l.is_empty() {
                return Ok(out);
            }
            out.push(l);
        }
    }
}

/// `tagflow sidecar` inside a pod, up once it says `sidecar ready`;
/// killed on drop.
pub struct SidecarProc(Child);

impl SidecarProc {
    /// `tagflow sidecar` in `pod` in front of `upstream`; the agent learns
    /// its requests from loopback capture.
    pub fn start(pod: &Pod, upstream: &str, socket: &std::path::Path) -> Result<Self, TopoError> {
        Self::launch(pod, upstream, socket, false)
    }

    /// The same, registering every request with the agent (for agents that
    /// do not capture on pod loopbacks).
    pub fn start_registering(
        pod: &Pod,
        upstream: &str,
        socket: &std::path::Path,
    ) -> Result<Self, TopoError> {
        Self::launch(pod, upstream, socket, true)
    }

    fn launch(
        pod: &Pod,
        upstream: &str,
        socket: &std::path::Path,
        register: bool,
    ) -> Result<Self, TopoError> {
        let mut child = pod
            .command(&crate::procs::tagflow_bin().to_string_lossy())
            .args([
                "sidecar",
                "--listen",
                "0.0.0.0:15080",
                "--upstream",
                upstream,
                "--agent-socket",
            ])
            .arg(socket)
            .args(register.then_some("--register"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        let t0 = std::time::Instant::now();
        while !line.contains("sidecar ready") {
            line.clear();
            if err.read_line(&mut line)? == 0 || t0.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TopoError::NotReady("sidecar did not start".into()));
            }
        }
        // Keep draining so the sidecar never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        Ok(Self(child))
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
