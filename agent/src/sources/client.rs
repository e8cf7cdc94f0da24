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
}

/// One connection, one request at a time; reconnects after failures.
pub struct Client {
    path: PathBuf,
    stream: Option<UnixStream>,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            path: path.into(),
            stream: None,
            timeout,
        }
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
                    self.stream = None;
                }
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(ClientError::Timeout(t))
            }
        }
    }

    async fn exchange(&mut self, req: &Request) -> Result<protocol::Ok, ClientError> {
        if self.stream.is_none() {
            let s =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|source| ClientError::Connect {
                        path: self.path.clone(),
                        source,
                    })?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected above");
        s.write_all(&protocol::encode_request(req)).await?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let n = protocol::frame_len(&len)?.expect("four bytes");
        let mut body = vec![0u8; n];
        s.read_exact(&mut body).await?;
        match protocol::decode_response(&body)? {
            Response::Ok(ok) => Ok(ok),
            Response::Error(ErrorReply { code, message }) => {
                Err(ClientError::Refused(code, message))
            }
        }
    }
}
