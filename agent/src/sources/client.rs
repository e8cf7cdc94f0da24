//! Client side of the registration protocol (the sidecar, `tagflow register`).
use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use super::protocol::{self, ErrorReply, Registration, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent socket {path}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Io(#[from] std::io::Error),
    #[error("agent replied with a bad frame")]
    Protocol(#[from] protocol::ProtoError),
    #[error("agent refused: {0:?}: {1}")]
    Refused(protocol::Code, String),
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the socket is served by uid {0}, not the agent")]
    Impostor(u32),
}

/// Replies a connection may owe (requests that timed out) before it is
/// given up: an agent that far behind is not answering.
const MAX_OWED: usize = 16;

/// The agent runs as root: a socket served by anyone else is not the agent
/// (a pod that replaced it would receive every registration).
const AGENT_UID: u32 = 0;

/// A connection and the replies it still owes.
struct Conn {
    stream: UnixStream,
    /// Bytes of replies read so far (reads are cancel-safe this way).
    buf: Vec<u8>,
    /// Requests sent whose reply has not been read.
    owed: usize,
    /// A request is being written: cancelling now leaves half a frame.
    writing: bool,
}

impl Conn {
    /// The next whole reply frame's body.
    async fn reply(&mut self) -> Result<Vec<u8>, ClientError> {
        loop {
            if let Some(n) = protocol::frame_len(&self.buf)? {
                if self.buf.len() >= 4 + n {
                    let body = self.buf[4..4 + n].to_vec();
                    self.buf.drain(..4 + n);
                    return Ok(body);
                }
            }
            let mut chunk = [0u8; 4096];
            let k = self.stream.read(&mut chunk).await?;
            if k == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            self.buf.extend_from_slice(&chunk[..k]);
        }
    }
}

/// One connection, one request at a time; reconnects after failures. A
/// request that times out keeps the connection (its late reply is read and
/// dropped before the next one): dropping it would make the agent release
/// every registration open on it, other requests' included. END may be
/// sent without waiting ([`Client::end_unawaited`]): its reply is read the
/// same way.
pub struct Client {
    path: PathBuf,
    conn: Option<Conn>,
    timeout: Duration,
    agent_uid: u32,
    /// Refusals among the replies read and dropped (unawaited ENDs, late
    /// replies).
    late_refusals: u64,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            conn: None,
            timeout,
            agent_uid: AGENT_UID,
            late_refusals: 0,
        }
    }

    /// Refusals in replies nobody waited for since the last call.
    pub fn take_late_refusals(&mut self) -> u64 {
        std::mem::take(&mut self.late_refusals)
    }

    /// Sends END and returns once it is written: the agent applies it in
    /// order with this connection's other requests, and its reply is read
    /// before the next request's (a refusal counted in
    /// [`Client::take_late_refusals`]). Saves the caller a round trip per
    /// request. A connection owing too many replies reads them first.
    pub async fn end_unawaited(&mut self, r: Registration) -> Result<(), ClientError> {
        let t = self.timeout;
        let req = Request::End(r);
        match tokio::time::timeout(t, self.send_only(&req)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    /// After a timeout: the connection is kept (closing it would release
    /// every registration open on it) unless a frame was cut short or it
    /// owes so many replies that the agent is not answering.
    fn timed_out(&mut self) -> ClientError {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.writing || c.owed > MAX_OWED)
        {
            self.conn = None;
        }
        ClientError::Timeout(self.timeout)
    }

    /// Waits for every reply this connection still owes.
    pub async fn settle(&mut self) -> Result<(), ClientError> {
        let t = self.timeout;
        match tokio::time::timeout(t, self.drain(0)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => Err(ClientError::Timeout(t)),
        }
    }

    /// Accepts an agent running as `uid` (tests; agents run as root).
    pub fn with_agent_uid(mut self, uid: u32) -> Self {
        self.agent_uid = uid;
        self
    }

    pub async fn begin(&mut self, r: Registration) -> Result<protocol::Ok, ClientError> {
        self.call(&Request::Begin(r)).await
    }

    pub async fn end(&mut self, r: Registration) -> Result<protocol::Ok, ClientError> {
        self.call(&Request::End(r)).await
    }

    pub async fn ping(&mut self) -> Result<protocol::Ok, ClientError> {
        self.call(&Request::Ping).await
    }

    pub async fn call(&mut self, req: &Request) -> Result<protocol::Ok, ClientError> {
        let t = self.timeout;
        match tokio::time::timeout(t, self.exchange(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                // A refusal leaves the connection usable; anything else may not.
                if !matches!(e, ClientError::Refused(..)) {
                    self.conn = None;
                }
                Err(e)
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let err = |source| ClientError::Connect {
            path: self.path.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.path).await.map_err(err)?;
        let uid = stream.peer_cred().map_err(err)?.uid();
        if uid != self.agent_uid {
            return Err(ClientError::Impostor(uid));
        }
        Ok(Conn {
            stream,
            buf: Vec::new(),
            owed: 0,
            writing: false,
        })
    }

    /// Writes `req` (connecting first if need be); its reply is owed.
    async fn write(&mut self, req: &Request) -> Result<&mut Conn, ClientError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let c = self.conn.as_mut().expect("connected above");
        c.writing = true;
        c.stream.write_all(&protocol::encode_request(req)).await?;
        c.writing = false;
        c.owed += 1;
        Ok(c)
    }

    async fn send_only(&mut self, req: &Request) -> Result<(), ClientError> {
        if self.conn.as_ref().is_some_and(|c| c.owed >= MAX_OWED) {
            self.drain(0).await?;
        }
        self.write(req).await.map(|_| ())
    }

    /// Reads and drops replies until `keep` are still owed.
    async fn drain(&mut self, keep: usize) -> Result<(), ClientError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        while c.owed > keep {
            let body = c.reply().await?;
            c.owed -= 1;
            if let Ok(Response::Error(_)) = protocol::decode_response(&body) {
                self.late_refusals += 1;
            }
        }
        Ok(())
    }

    async fn exchange(&mut self, req: &Request) -> Result<protocol::Ok, ClientError> {
        self.write(req).await?;
        // Replies come in order: those nobody waited for first.
        self.drain(1).await?;
        let c = self.conn.as_mut().expect("written above");
        let body = c.reply().await?;
        c.owed -= 1;
        match protocol::decode_response(&body)? {
            Response::Ok(ok) => Ok(ok),
            Response::Error(ErrorReply { code, message }) => {
                Err(ClientError::Refused(code, message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn read_frame(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; protocol::frame_len(&len).unwrap().unwrap()];
        s.read_exact(&mut body).await.unwrap();
        body
    }

    /// A fresh directory and a socket listening in it, as the agent's.
    fn agent_socket(tag: &str) -> (PathBuf, PathBuf, UnixListener) {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    fn ok(trace: &str) -> Vec<u8> {
        protocol::encode_response(&Response::Ok(protocol::Ok {
            trace_id: Some(trace.into()),
            ..Default::default()
        }))
    }

    /// A slow reply must not end the connection (the agent would release
    /// every registration on it) nor be taken for the next request's.
    #[tokio::test]
    async fn a_timed_out_request_keeps_the_connection_and_its_late_reply_is_dropped() {
        let (dir, path, listener) = agent_socket("tagflow-client");
        let agent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_frame(&mut s).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.write_all(&ok("first")).await.unwrap();
            read_frame(&mut s).await;
            s.write_all(&ok("second")).await.unwrap();
            // Still the one connection: no second accept is needed.
            listener.accept().await.is_ok()
        });
        let me = unsafe { libc::getuid() };
        let mut c = Client::new(&path, Duration::from_millis(50)).with_agent_uid(me);
        assert!(matches!(c.ping().await, Err(ClientError::Timeout(_))));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = c.ping().await.unwrap();
        assert_eq!(second.trace_id.as_deref(), Some("second"));
        assert!(!agent.is_finished(), "the client did not reconnect");
        agent.abort();
        // An agent of another uid is not the agent.
        let mut other = Client::new(&path, Duration::from_millis(50)).with_agent_uid(me + 1);
        let _l = UnixListener::bind(dir.join("other.sock")).unwrap();
        other.path = dir.join("other.sock");
        assert!(matches!(other.ping().await, Err(ClientError::Impostor(u)) if u == me));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// END sent without waiting: the next request gets its own reply, the
    /// END's is read first and a refusal in it is counted, not lost.
    #[tokio::test]
    async fn an_unawaited_end_is_answered_in_order_and_its_refusal_counted() {
        let (dir, path, listener) = agent_socket("tagflow-client-end");
        let agent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut kinds = Vec::new();
            for reply in [
                ok("end-1"),
                protocol::encode_response(&Response::Error(ErrorReply {
                    code: protocol::Code::BadTarget,
                    message: "no such registration".into(),
                })),
                ok("ping"),
                ok("end-3"),
            ] {
                let body = read_frame(&mut s).await;
                kinds.push(protocol::decode_request(&body).unwrap());
                s.write_all(&reply).await.unwrap();
            }
            kinds
        });
        let me = unsafe { libc::getuid() };
        let mut c = Client::new(&path, Duration::from_secs(5)).with_agent_uid(me);
        let reg = Registration {
            headers: [("x-request-id".to_string(), "r".to_string())].into(),
            target: protocol::Target::Pid(1),
            flows: Vec::new(),
            release_on_close: true,
        };
        c.end_unawaited(reg.clone()).await.unwrap();
        c.end_unawaited(reg.clone()).await.unwrap();
        let pong = c.ping().await.unwrap();
        assert_eq!(pong.trace_id.as_deref(), Some("ping"));
        assert_eq!(c.take_late_refusals(), 1);
        assert_eq!(c.take_late_refusals(), 0, "taken");
        c.end_unawaited(reg).await.unwrap();
        c.settle().await.unwrap();
        assert_eq!(c.conn.as_ref().unwrap().owed, 0);
        let kinds = agent.await.unwrap();
        assert!(matches!(
            kinds[..],
            [
                Request::End(_),
                Request::End(_),
                Request::Ping,
                Request::End(_)
            ]
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
