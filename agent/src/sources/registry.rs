//! The registration server: a Unix stream socket where sidecars (and the
//! `tagflow register` CLI) announce which request their app is serving.
//!
//! Trust: the peer is identified by SO_PEERCRED; it may only register
//! targets in its own network namespace. Every refusal is answered with an
//! error code and counted. Per-namespace rate limits, a per-namespace and a
//! total connection limit, and a cap on open registrations per connection
//! bound what a pod can make the agent do.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_common::{
    FlowKey, TraceContext, TraceKey, TraceSource, PROTO_TCP, PROTO_UDP, TRACE_FLAG_HAS_PARENT,
    TRACE_FLAG_SAMPLED,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, info, warn};

use super::{
    protocol::{self, Code, ErrorReply, Proto, Registration, Request, Response, Target},
    targets::{self, ListenerCache, NsId},
};
use crate::{
    ids, netns,
    tables::{SetOutcome, TraceTable},
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("socket {path}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {0} is in use by a running agent")]
    InUse(PathBuf),
    #[error("group {0} not found")]
    NoGroup(String),
    #[error("registration socket refused: {0}")]
    Insecure(String),
}

/// A connection in a namespace: (namespace, client end, server end).
type ConnKey = (NsId, SocketAddr, SocketAddr);

/// Polls for the holder of a freshly accepted connection (2 ms apart).
const ACCEPT_RETRIES: usize = 8;
/// How long a connection's serving process is trusted without a new look.
const SERVED_BY_TTL: Duration = Duration::from_secs(30);

/// Refusals are counted in `RegistryStats`; a few per window are logged.
static REFUSAL_LOG: crate::ratelimit::LogLimit =
    crate::ratelimit::LogLimit::new(Duration::from_secs(10), 5);

fn log_refusal(pid: Option<u32>, what: &str, msg: &str) {
    if let Some(held) = REFUSAL_LOG.allow() {
        warn!(?pid, held_back = held, "{what} refused: {msg}");
    }
}

/// Registration server settings (see `AgentConfig::registration`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_netns: usize,
    /// Messages per second per namespace, with a burst of the same size.
    pub rate_per_netns: u32,
    /// Open (begun, not ended) registrations per connection.
    pub max_open_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_netns: 32,
            rate_per_netns: 100_000,
            max_open_per_connection: 4096,
        }
    }
}

/// Counters of the registration path (exported as metrics).
#[derive(Default, Debug)]
pub struct RegistryStats {
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub begin_ok: AtomicU64,
    pub end_ok: AtomicU64,
    pub pings: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    pub rate_limited: AtomicU64,
    pub overlaps: AtomicU64,
    pub open_dropped_at_close: AtomicU64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// State shared by all connections.
pub struct Registry {
    table: Arc<Mutex<TraceTable>>,
    limits: Limits,
    pub stats: Arc<RegistryStats>,
    listeners: Mutex<ListenerCache>,
    /// Who serves a connection does not change while it lives: the process
    /// found behind a (namespace, client end, server end) is reused for
    /// later requests on the same (pooled) connection.
    served_by: Mutex<HashMap<ConnKey, (Vec<u32>, Instant)>>,
    cookies: Mutex<HashMap<NsId, (u64, Instant)>>,
    per_netns: Mutex<HashMap<NsId, (usize, Bucket)>>,
    total: AtomicU64,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: u32,
    ns: NsId,
    cookie: u64,
}

/// What a BEGIN wrote, so END (or the connection closing) can undo it.
#[derive(Default)]
struct Open {
    pids: Vec<TraceKey>,
    flows: Vec<FlowKey>,
    release_on_close: bool,
}

impl Registry {
    pub fn new(table: Arc<Mutex<TraceTable>>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            table,
            limits,
            stats: Arc::default(),
            listeners: Mutex::new(ListenerCache::new(Duration::from_secs(2))),
            served_by: Mutex::new(HashMap::new()),
            cookies: Mutex::new(HashMap::new()),
            per_netns: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
        })
    }

    /// Binds the socket (mode 0660, optional group), replacing a stale file.
    pub async fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, RegistryError> {
        let err = |source| RegistryError::Socket {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
            super::permissions::check_dir(dir).map_err(RegistryError::Insecure)?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(RegistryError::InUse(path.into()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        if let Some(g) = group {
            let gid = group_id(g).ok_or_else(|| RegistryError::NoGroup(g.into()))?;
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        }
        super::permissions::check_socket(path).map_err(RegistryError::Insecure)?;
        Ok(listener)
    }

    /// Serves connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.connection(stream).await });
                }
                Err(e) => {
                    warn!("registration socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn netns_cookie(&self, pid: u32, ns: NsId) -> Option<u64> {
        // nsfs inode numbers can be reused after a namespace dies: cached
        // cookies expire.
        let now = Instant::now();
        if let Some((c, t)) = self.cookies.lock().unwrap().get(&ns) {
            if now.duration_since(*t) < Duration::from_secs(30) {
                return Some(*c);
            }
        }
        let c = netns::cookie_of(Path::new(&format!("/proc/{pid}/ns/net"))).ok()?;
        let mut cache = self.cookies.lock().unwrap();
        if cache.len() > 8192 {
            cache.retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(30));
            if cache.len() > 8192 {
                cache.clear();
            }
        }
        cache.insert(ns, (c, now));
        Some(c)
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let peer = stream.peer_cred().ok().and_then(|c| {
            let pid = c.pid()? as u32;
            let ns = targets::netns_id_of(pid)?;
            Some(Peer {
                pid,
                ns,
                cookie: self.netns_cookie(pid, ns)?,
            })
        });
        let Some(peer) = peer else {
            self.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            let msg = "cannot identify the peer (SO_PEERCRED)";
            log_refusal(None, "registration connection", msg);
            let _ = reply_err(&mut stream, Code::Internal, msg).await;
            return;
        };
        if let Err(msg) = self.admit(peer.ns) {
            self.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            log_refusal(Some(peer.pid), "registration connection", &msg);
            let _ = reply_err(&mut stream, Code::TooManyConnections, &msg).await;
            return;
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut open: HashMap<[u8; 16], Open> = HashMap::new();
        let result = self.session(&mut stream, peer, &mut open).await;
        if let Err(e) = result {
            debug!(pid = peer.pid, "registration connection closed: {e}");
        }
        // Requests that never saw their END and asked for it: undo them
        // now. The others live on until END or the idle timeout.
        for (id, o) in open.drain().filter(|(_, o)| o.release_on_close) {
            self.stats
                .open_dropped_at_close
                .fetch_add(1, Ordering::Relaxed);
            self.undo(&id, &o);
        }
        self.leave(peer.ns);
    }

    fn admit(&self, ns: NsId) -> Result<(), String> {
        if self.total.load(Ordering::Relaxed) as usize >= self.limits.max_connections {
            return Err(format!(
                "agent has {} connections",
                self.limits.max_connections
            ));
        }
        let mut m = self.per_netns.lock().unwrap();
        let e = m.entry(ns).or_insert((
            0,
            Bucket {
                tokens: self.limits.rate_per_netns as f64,
                last: Instant::now(),
            },
        ));
        if e.0 >= self.limits.max_connections_per_netns {
            return Err(format!("namespace has {} connections", e.0));
        }
        e.0 += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn leave(&self, ns: NsId) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        let mut m = self.per_netns.lock().unwrap();
        if let Some(e) = m.get_mut(&ns) {
            e.0 -= 1;
            if e.0 == 0 {
                m.remove(&ns);
            }
        }
    }

    fn take_token(&self, ns: NsId) -> bool {
        let rate = self.limits.rate_per_netns as f64;
        let mut m = self.per_netns.lock().unwrap();
        let Some((_, b)) = m.get_mut(&ns) else {
            return false;
        };
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    async fn session(
        &self,
        stream: &mut UnixStream,
        peer: Peer,
        open: &mut HashMap<[u8; 16], Open>,
    ) -> std::io::Result<()> {
        let mut len = [0u8; 4];
        loop {
            if let Err(e) = stream.read_exact(&mut len).await {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            let n = match protocol::frame_len(&len) {
                Ok(Some(n)) => n,
                Ok(None) => unreachable!("four bytes read"),
                Err(e) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    log_refusal(Some(peer.pid), "registration frame", &e.message);
                    return reply_err(stream, e.code, &e.message).await;
                }
            };
            let mut body = vec![0u8; n];
            if stream.read_exact(&mut body).await.is_err() {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                log_refusal(Some(peer.pid), "registration frame", "truncated frame");
                return reply_err(stream, Code::BadFrame, "truncated frame").await;
            }
            let response = match protocol::decode_request(&body) {
                Err(e) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    log_refusal(Some(peer.pid), "registration message", &e.message);
                    if e.code.closes_connection() {
                        return reply_err(stream, e.code, &e.message).await;
                    }
                    error_response(e.code, e.message)
                }
                Ok(_) if !self.take_token(peer.ns) => {
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    log_refusal(Some(peer.pid), "registration", "namespace over its rate");
                    error_response(
                        Code::RateLimited,
                        "namespace over its registration rate".into(),
                    )
                }
                // Port targets walk /proc (and may wait for an accept):
                // off the async workers. Pid targets need one stat.
                Ok(req) if needs_proc_walk(&req) => {
                    tokio::task::block_in_place(|| self.handle(req, peer, open))
                }
                Ok(req) => self.handle(req, peer, open),
            };
            stream
                .write_all(&protocol::encode_response(&response))
                .await?;
        }
    }

    fn handle(&self, req: Request, peer: Peer, open: &mut HashMap<[u8; 16], Open>) -> Response {
        let r = match req {
            Request::Ping => {
                self.stats.pings.fetch_add(1, Ordering::Relaxed);
                return Response::Ok(protocol::Ok {
                    version: Some(protocol::VERSION),
                    ..Default::default()
                });
            }
            Request::Begin(reg) => self.begin(&reg, peer, open),
            Request::End(reg) => self.end(&reg, peer, open),
        };
        match r {
            Ok(ok) => Response::Ok(ok),
            Err((code, msg)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                log_refusal(Some(peer.pid), &format!("registration ({code:?})"), &msg);
                error_response(code, msg)
            }
        }
    }

    fn identity(reg: &Registration) -> Result<ids::TraceIdentity, (Code, String)> {
        ids::identify(reg.header("x-request-id"), reg.header("traceparent"))
            .map_err(|e| (Code::BadHeader, e.to_string()))
    }

    /// The processes a registration is for, in the peer's namespace.
    fn resolve(
        &self,
        reg: &Registration,
        flows: &[FlowSpec],
        peer: Peer,
    ) -> Result<Vec<u32>, (Code, String)> {
        match &reg.target {
            Target::Pid(pid) => match targets::netns_id_of(*pid) {
                Some(ns) if ns == peer.ns => Ok(vec![*pid]),
                Some(_) => Err((
                    Code::NotYourNetns,
                    format!("pid {pid} is not in your network namespace"),
                )),
                None => Err((Code::BadTarget, format!("no process {pid}"))),
            },
            Target::Port { port, proto } => {
                let p = proto_num(*proto);
                // The exact server-side sockets of the given connections
                // name the process that serves this request.
                let to_port: Vec<_> = flows
                    .iter()
                    .filter(|(_, remote, fp)| *fp == p && p == PROTO_TCP && remote.port() == *port)
                    .collect();
                let mut pids = Vec::new();
                let now = Instant::now();
                if let Some((l, r, _)) = to_port.first() {
                    if let Some((p, t)) = self.served_by.lock().unwrap().get(&(peer.ns, *l, *r)) {
                        if now.duration_since(*t) < SERVED_BY_TTL
                            && p.iter()
                                .all(|pid| targets::netns_id_of(*pid) == Some(peer.ns))
                        {
                            pids = p.clone();
                        }
                    }
                }
                // A connection just made may not be accepted yet (or its
                // forked handler not born): give the server a moment.
                for attempt in 0..ACCEPT_RETRIES {
                    if to_port.is_empty() || !pids.is_empty() {
                        break;
                    }
                    let accepted: Vec<u64> = to_port
                        .iter()
                        .filter_map(|(l, r, _)| targets::accepted_inode(peer.pid, *l, *r))
                        .collect();
                    pids = targets::holders(peer.ns, &accepted);
                    if !pids.is_empty() {
                        let (l, r, _) = to_port[0];
                        let mut cache = self.served_by.lock().unwrap();
                        if cache.len() >= 16384 {
                            cache.retain(|_, (_, t)| now.duration_since(*t) < SERVED_BY_TTL);
                            // Still full of fresh entries: start over (a
                            // cache miss costs one /proc walk, growth is
                            // unbounded memory).
                            if cache.len() >= 16384 {
                                cache.clear();
                            }
                        }
                        cache.insert((peer.ns, *l, *r), (pids.clone(), now));
                        break;
                    }
                    if attempt + 1 < ACCEPT_RETRIES {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                if pids.is_empty() {
                    pids = self
                        .listeners
                        .lock()
                        .unwrap()
                        .get(peer.ns, peer.pid, *port, p);
                }
                if pids.is_empty() {
                    return Err((
                        Code::NoListener,
                        format!("nothing listens on {port} in your namespace"),
                    ));
                }
                Ok(pids)
            }
        }
    }

    fn begin(
        &self,
        reg: &Registration,
        peer: Peer,
        open: &mut HashMap<[u8; 16], Open>,
    ) -> Result<protocol::Ok, (Code, String)> {
        let id = Self::identity(reg)?;
        let flows = parse_flows(reg)?;
        let pids = self.resolve(reg, &flows, peer)?;
        if !open.contains_key(&id.trace_id) && open.len() >= self.limits.max_open_per_connection {
            return Err((
                Code::TableFull,
                format!("{} open registrations on this connection", open.len()),
            ));
        }
        let mut flags = TraceSource::Registration.to_flags();
        if id.parent_span_id.is_some() {
            flags |= TRACE_FLAG_HAS_PARENT;
        }
        if id.sampled {
            flags |= TRACE_FLAG_SAMPLED;
        }
        let ctx = TraceContext {
            trace_id: id.trace_id,
            parent_span_id: id.parent_span_id.unwrap_or_default(),
            flags,
            ..Default::default()
        };
        let mut o = Open::default();
        let mut overlaps = 0;
        let mut table = self.table.lock().unwrap();
        for pid in &pids {
            let k = TraceKey::new(*pid, peer.cookie);
            match table.set_process(k, &ctx) {
                Ok(SetOutcome::Replaced { .. }) => overlaps += 1,
                Ok(_) => {}
                Err(e) => return Err((Code::TableFull, e.to_string())),
            }
            o.pids.push(k);
        }
        for k in both_ways(peer.cookie, &flows) {
            table
                .set_flow(k, &ctx)
                .map_err(|e| (Code::TableFull, e.to_string()))?;
            o.flows.push(k);
        }
        drop(table);
        self.stats.begin_ok.fetch_add(1, Ordering::Relaxed);
        self.stats
            .overlaps
            .fetch_add(overlaps as u64, Ordering::Relaxed);
        let reply = protocol::Ok {
            trace_id: Some(ids::to_hex(&id.trace_id)),
            pids: pids.clone(),
            flows: flows.len(),
            overlaps,
            version: None,
        };
        // A repeated BEGIN for the same trace adds to what END must undo.
        let e = open.entry(id.trace_id).or_default();
        e.pids.extend(o.pids);
        e.flows.extend(o.flows);
        e.release_on_close |= reg.release_on_close;
        Ok(reply)
    }

    fn end(
        &self,
        reg: &Registration,
        peer: Peer,
        open: &mut HashMap<[u8; 16], Open>,
    ) -> Result<protocol::Ok, (Code, String)> {
        let id = Self::identity(reg)?;
        let o = match open.remove(&id.trace_id) {
            Some(o) => o,
            // END from another connection (e.g. the CLI): resolve again.
            None => {
                let flows = parse_flows(reg)?;
                let pids = self.resolve(reg, &flows, peer)?;
                Open {
                    release_on_close: false,
                    pids: pids
                        .iter()
                        .map(|p| TraceKey::new(*p, peer.cookie))
                        .collect(),
                    flows: both_ways(peer.cookie, &flows),
                }
            }
        };
        let pids = self.undo(&id.trace_id, &o);
        self.stats.end_ok.fetch_add(1, Ordering::Relaxed);
        Ok(protocol::Ok {
            trace_id: Some(ids::to_hex(&id.trace_id)),
            pids,
            flows: o.flows.len() / 2,
            overlaps: 0,
            version: None,
        })
    }

    /// Compare-and-delete of everything a BEGIN wrote; returns the pids whose
    /// entry still held this trace.
    fn undo(&self, trace: &[u8; 16], o: &Open) -> Vec<u32> {
        let mut table = self.table.lock().unwrap();
        let mut cleared = Vec::new();
        for k in &o.pids {
            if table.clear_process(k, trace).unwrap_or(false) {
                cleared.push(k.pid);
            }
        }
        for k in &o.flows {
            let _ = table.clear_flow(k, trace);
        }
        cleared
    }
}

fn needs_proc_walk(req: &Request) -> bool {
    matches!(req, Request::Begin(r) | Request::End(r) if matches!(r.target, Target::Port { .. }))
}

fn proto_num(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

/// A connection from a registration: (local, remote, IP protocol).
type FlowSpec = (SocketAddr, SocketAddr, u8);

fn parse_flows(reg: &Registration) -> Result<Vec<FlowSpec>, (Code, String)> {
    if reg.flows.len() > 16 {
        return Err((Code::BadTarget, "at most 16 flows per registration".into()));
    }
    reg.flows
        .iter()
        .map(|f| {
            let parse = |s: &str| {
                s.parse::<SocketAddr>()
                    .map_err(|e| (Code::BadTarget, format!("flow address {s:?}: {e}")))
            };
            let (l, r) = (parse(&f.local)?, parse(&f.remote)?);
            if l.is_ipv4() != r.is_ipv4() {
                return Err((Code::BadTarget, "flow mixes IPv4 and IPv6".into()));
            }
            Ok((l, r, proto_num(f.proto)))
        })
        .collect()
}

/// Keys for both ends of each flow: the caller's, and the peer's for when
/// it is in the same namespace (a sidecar and its app).
fn both_ways(netns: u64, flows: &[FlowSpec]) -> Vec<FlowKey> {
    flows
        .iter()
        .flat_map(|(l, r, p)| {
            [
                FlowKey::new(netns, *p, *l, *r),
                FlowKey::new(netns, *p, *r, *l),
            ]
        })
        .collect()
}

fn error_response(code: Code, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

async fn reply_err(stream: &mut UnixStream, code: Code, message: &str) -> std::io::Result<()> {
    let r = error_response(code, message.to_string());
    stream.write_all(&protocol::encode_response(&r)).await?;
    stream.shutdown().await
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
        })
}

/// Logs the socket path once bound.
pub fn announce(path: &Path) {
    info!(socket = %path.display(), "registration socket ready");
}
