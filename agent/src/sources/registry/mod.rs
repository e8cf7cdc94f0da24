//! The registration server: a Unix stream socket where sidecars (and the
//! `tagflow register` CLI) announce which request their app is serving.
//!
//! Trust: the peer is identified by SO_PEERCRED; it may only register
//! targets in its own network namespace. Every refusal is answered with an
//! error code and counted. Per-namespace rate limits, a per-namespace and a
//! total connection limit, and a cap on open registrations per connection
//! bound what a pod can make the agent do.
mod admission;
mod resolve;
mod serving;
mod transaction;

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_common::TraceKey;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, info, warn};

use admission::Admission;
pub use admission::{Crowded, Limits};
use resolve::{both_ways, parse_flows, Resolver};
pub use serving::Serving;
use transaction::{Full, Ledger, Open};

use super::{
    peer,
    permissions::PermissionError,
    protocol::{self, Code, ErrorReply, Registration, Request, Response},
    targets::{self, NsId},
};
use crate::{
    ids, netns,
    tables::{TableError, TraceTable},
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
    #[error("registration socket refused")]
    Insecure(#[from] PermissionError),
    #[error("registration thread")]
    Thread(#[source] std::io::Error),
}

/// Why a registration was refused: answered with its code, counted, and
/// logged at a bounded rate.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("unusable request id")]
    BadHeader(#[from] ids::IdError),
    #[error("pid {0} is not in your network namespace")]
    NotYourNetns(u32),
    #[error("no process {0}")]
    NoProcess(u32),
    #[error("nothing listens on {0} in your namespace")]
    NoListener(u16),
    #[error("at most {} flows per registration", resolve::MAX_FLOWS)]
    TooManyFlows,
    #[error("flow address {0:?}")]
    BadFlowAddress(String, #[source] std::net::AddrParseError),
    #[error("flow mixes IPv4 and IPv6")]
    MixedFamilies,
    #[error("{} on this connection", full_msg(.0))]
    TooManyOpen(Full),
    #[error("trace table")]
    Table(#[from] TableError),
    #[error("the connection is closing")]
    Gone,
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Self::BadHeader(_) => Code::BadHeader,
            Self::NotYourNetns(_) => Code::NotYourNetns,
            Self::NoProcess(_) | Self::TooManyFlows | Self::BadFlowAddress(..) => Code::BadTarget,
            Self::MixedFamilies => Code::BadTarget,
            Self::NoListener(_) => Code::NoListener,
            Self::TooManyOpen(_) | Self::Table(_) => Code::TableFull,
            Self::Gone => Code::Internal,
        }
    }
}

/// How long a namespace's cookie is reused, and how many are held (each
/// holds its namespace open).
const COOKIE_TTL: Duration = Duration::from_secs(30);
const COOKIE_CACHE: usize = 1024;

/// Refusals are counted in `RegistryStats`; a few per window are logged.
static REFUSAL_LOG: crate::ratelimit::LogLimit =
    crate::ratelimit::LogLimit::new(Duration::from_secs(10), 5);

fn log_refusal(pid: Option<u32>, what: &str, msg: &str) {
    if let Some(held) = REFUSAL_LOG.allow() {
        warn!(?pid, held_back = held, "{what} refused: {msg}");
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
    /// Registrations resolved by walking /proc (on the blocking pool).
    pub proc_walks: AtomicU64,
    /// Peers pinned by pidfd_open(pid), not SO_PEERPIDFD (kernels < 6.5).
    pub peers_by_pid: AtomicU64,
}

/// State shared by all connections.
pub struct Registry {
    table: Arc<Mutex<TraceTable>>,
    admission: Admission,
    resolver: Resolver,
    pub stats: Arc<RegistryStats>,
    cookies: Mutex<HashMap<NsId, (u64, Instant, std::fs::File)>>,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub ns: NsId,
    /// The namespace's cookie, the datapath's key.
    pub cookie: u64,
    /// Whether its pids are ours (the same pid namespace): a pod's are not.
    pub shares_pids: bool,
}

impl Registry {
    pub fn new(table: Arc<Mutex<TraceTable>>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            table,
            admission: Admission::new(limits),
            resolver: Resolver::default(),
            stats: Arc::default(),
            cookies: Mutex::new(HashMap::new()),
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
            super::permissions::check_dir(dir)?;
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
        super::permissions::check_socket(path)?;
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

    /// The datapath's key for the peer's namespace. Cached per namespace
    /// with the namespace file held open: while cached, the namespace
    /// cannot die and its nsfs inode cannot name another one.
    fn netns_cookie(&self, who: peer::Identified) -> Option<u64> {
        let now = Instant::now();
        let mut cache = self.cookies.lock().unwrap();
        if let Some((c, t, _)) = cache.get(&who.ns) {
            if now.duration_since(*t) < COOKIE_TTL {
                return Some(*c);
            }
        }
        let c = netns::cookie_of_file(&who.netns).ok()?;
        if cache.len() >= COOKIE_CACHE {
            cache.retain(|_, (_, t, _)| now.duration_since(*t) < COOKIE_TTL);
            if cache.len() >= COOKIE_CACHE {
                cache.clear();
            }
        }
        cache.insert(who.ns, (c, now, who.netns));
        Some(c)
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let peer = match peer::identify(&stream) {
            Ok(who) => {
                if who.pinned == peer::Pinned::PidfdOpen {
                    self.stats.peers_by_pid.fetch_add(1, Ordering::Relaxed);
                }
                let (pid, ns) = (who.pid, who.ns);
                self.netns_cookie(who).map(|cookie| Peer {
                    pid,
                    ns,
                    cookie,
                    shares_pids: targets::pidns_of(&pid.to_string()) == targets::pidns_of("self"),
                })
            }
            Err(e) => {
                debug!("registration peer: {}", crate::report(&e));
                None
            }
        };
        let Some(peer) = peer else {
            self.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            let msg = "cannot identify the peer";
            log_refusal(None, "registration connection", msg);
            let _ = reply_err(&mut stream, Code::Internal, msg).await;
            return;
        };
        if let Err(e) = self.admission.admit(peer.ns) {
            self.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            let msg = e.to_string();
            log_refusal(Some(peer.pid), "registration connection", &msg);
            let _ = reply_err(&mut stream, Code::TooManyConnections, &msg).await;
            return;
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut open = Ledger::new(self.admission.limits().max_open_per_connection);
        let result = self.session(&mut stream, peer, &mut open).await;
        if let Err(e) = result {
            debug!(pid = peer.pid, "registration connection closed: {e}");
        }
        // Requests that never saw their END and asked for it: undo them
        // now. The others live on until END or the idle timeout.
        for (id, keys, n) in open.close() {
            self.stats
                .open_dropped_at_close
                .fetch_add(n, Ordering::Relaxed);
            self.undo(&id, &keys);
        }
        self.admission.leave(peer.ns);
    }

    /// Serves one connection's requests in order. Reads are buffered and
    /// the replies to frames that arrived together go out in one write: a
    /// client that does not wait for every reply (END) costs no extra
    /// syscalls or wake-ups.
    async fn session(
        self: &Arc<Self>,
        stream: &mut UnixStream,
        peer: Peer,
        open: &mut Ledger,
    ) -> std::io::Result<()> {
        let mut stream = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
        let mut replies = Vec::new();
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
                    return last_reply(stream.get_mut(), &replies, e.code, &e.message).await;
                }
            };
            let mut body = vec![0u8; n];
            if stream.read_exact(&mut body).await.is_err() {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                log_refusal(Some(peer.pid), "registration frame", "truncated frame");
                let w = stream.get_mut();
                return last_reply(w, &replies, Code::BadFrame, "truncated frame").await;
            }
            let response = match protocol::decode_request(&body) {
                Err(e) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    log_refusal(Some(peer.pid), "registration message", &e.message);
                    if e.code.closes_connection() {
                        return last_reply(stream.get_mut(), &replies, e.code, &e.message).await;
                    }
                    error_response(e.code, e.message)
                }
                Ok(_) if !self.admission.take_token(peer.ns) => {
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    log_refusal(Some(peer.pid), "registration", "namespace over its rate");
                    error_response(
                        Code::RateLimited,
                        "namespace over its registration rate".into(),
                    )
                }
                Ok(req) => self.handle(req, peer, open).await,
            };
            replies.extend_from_slice(&protocol::encode_response(&response));
            // Held only while a whole next frame is already here.
            if !whole_frame(stream.buffer()) {
                stream.get_mut().write_all(&replies).await?;
                replies.clear();
            }
        }
    }

    async fn handle(self: &Arc<Self>, req: Request, peer: Peer, open: &mut Ledger) -> Response {
        let r = match req {
            Request::Ping => {
                self.stats.pings.fetch_add(1, Ordering::Relaxed);
                return Response::Ok(protocol::Ok {
                    version: Some(protocol::VERSION),
                    ..Default::default()
                });
            }
            Request::Begin(reg) => self.begin(reg, peer, open).await,
            Request::End(reg) => self.end(reg, peer, open).await,
        };
        match r {
            Ok(ok) => Response::Ok(ok),
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let (code, msg) = (e.code(), crate::report(&e));
                log_refusal(Some(peer.pid), &format!("registration ({code:?})"), &msg);
                error_response(code, msg)
            }
        }
    }

    fn identity(reg: &Registration) -> Result<ids::TraceIdentity, Refusal> {
        Ok(ids::identify(
            reg.header("x-request-id"),
            reg.header("traceparent"),
        )?)
    }

    /// The processes `reg` names. Where that means walking /proc (a port
    /// target, a pid of another pid namespace) the walk runs on the
    /// blocking pool, at most `WALKS_PER_NETNS` per namespace at once, so
    /// slow walks of one pod never hold the runtime (health, export,
    /// other pods' registrations) or more than their share of threads.
    async fn processes(
        self: &Arc<Self>,
        reg: Registration,
        flows: Vec<resolve::FlowSpec>,
        peer: Peer,
    ) -> Result<Vec<u32>, Refusal> {
        if !self.resolver.walks_proc(&reg.target, peer) {
            return self.resolver.processes(&reg.target, &flows, peer);
        }
        let walks = self.admission.walks(peer.ns).ok_or(Refusal::Gone)?;
        let _permit = walks.acquire_owned().await.map_err(|_| Refusal::Gone)?;
        self.stats.proc_walks.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.resolver.processes(&reg.target, &flows, peer))
            .await
            .map_err(|_| Refusal::Gone)?
    }

    async fn begin(
        self: &Arc<Self>,
        reg: Registration,
        peer: Peer,
        open: &mut Ledger,
    ) -> Result<protocol::Ok, Refusal> {
        let id = Self::identity(&reg)?;
        let flows = parse_flows(&reg)?;
        let release_on_close = reg.release_on_close;
        let pids = self.processes(reg, flows.clone(), peer).await?;
        let keys = Open {
            pids: pids
                .iter()
                .map(|p| TraceKey::new(*p, peer.cookie))
                .collect(),
            flows: both_ways(peer.cookie, &flows),
            release_on_close,
        };
        open.fits(&id.trace_id, &keys)
            .map_err(Refusal::TooManyOpen)?;
        let ctx = transaction::context(&id);
        let (_, overlaps) = transaction::begin(
            &mut self.table.lock().expect("table lock"),
            &ctx,
            keys.pids.iter().copied(),
            keys.flows.iter().copied(),
        )?;
        self.stats.begin_ok.fetch_add(1, Ordering::Relaxed);
        self.stats
            .overlaps
            .fetch_add(overlaps as u64, Ordering::Relaxed);
        open.add(id.trace_id, keys).map_err(Refusal::TooManyOpen)?;
        Ok(protocol::Ok {
            trace_id: Some(ids::to_hex(&id.trace_id)),
            pids,
            flows: flows.len(),
            overlaps,
            version: None,
        })
    }

    async fn end(
        self: &Arc<Self>,
        reg: Registration,
        peer: Peer,
        open: &mut Ledger,
    ) -> Result<protocol::Ok, Refusal> {
        let id = Self::identity(&reg)?;
        let flows = parse_flows(&reg)?;
        let keys = both_ways(peer.cookie, &flows);
        let o = match open.end(&id.trace_id, &keys) {
            Some(o) => o,
            // END from another connection (e.g. the CLI): resolve again.
            None => {
                let pids = self.processes(reg, flows.clone(), peer).await?;
                Open {
                    release_on_close: false,
                    pids: pids
                        .iter()
                        .map(|p| TraceKey::new(*p, peer.cookie))
                        .collect(),
                    flows: keys,
                }
            }
        };
        let pids = self.undo(&id.trace_id, &o);
        self.stats.end_ok.fetch_add(1, Ordering::Relaxed);
        Ok(protocol::Ok {
            trace_id: Some(ids::to_hex(&id.trace_id)),
            pids,
            flows: flows.len(),
            overlaps: 0,
            version: None,
        })
    }

    fn undo(&self, trace: &[u8; 16], o: &Open) -> Vec<u32> {
        transaction::undo(&mut self.table.lock().expect("table lock"), trace, o)
    }
}

fn full_msg(f: &Full) -> String {
    match f {
        Full::Records(n) => format!("{n} open registrations"),
        Full::Keys(n) => format!("{n} keys held by open registrations"),
    }
}

/// Bytes read from a registration connection at once (a frame is a few
/// hundred bytes; several can arrive together).
const READ_BUFFER: usize = 8 * 1024;

/// `buf` starts with a complete frame (or a length that is not valid,
/// which the next read rejects at once).
fn whole_frame(buf: &[u8]) -> bool {
    match protocol::frame_len(buf) {
        Ok(Some(n)) => buf.len() >= 4 + n,
        Ok(None) => false,
        Err(_) => true,
    }
}

fn error_response(code: Code, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

async fn reply_err(stream: &mut UnixStream, code: Code, message: &str) -> std::io::Result<()> {
    let r = error_response(code, message.to_string());
    stream.write_all(&protocol::encode_response(&r)).await?;
    stream.shutdown().await
}

/// The replies still held, then an error that ends the connection.
async fn last_reply(
    stream: &mut UnixStream,
    held: &[u8],
    code: Code,
    message: &str,
) -> std::io::Result<()> {
    stream.write_all(held).await?;
    reply_err(stream, code, message).await
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
