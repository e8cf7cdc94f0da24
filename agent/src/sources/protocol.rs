//! The registration protocol, version 1 (see docs/registration.md).
//!
//! A frame is a 4-byte big-endian body length, then the body: version (1
//! byte), message type (1 byte), two reserved zero bytes, and a UTF-8 JSON
//! payload. Bodies are at most [`MAX_BODY`] bytes. Every request gets exactly
//! one response frame. This module is pure: encoding and decoding only.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 1;
/// Largest accepted body (header + JSON).
pub const MAX_BODY: usize = 16 * 1024;
const BODY_HEADER: usize = 4;

/// Message types.
pub const T_BEGIN: u8 = 1;
pub const T_END: u8 = 2;
pub const T_PING: u8 = 3;
pub const T_OK: u8 = 0x81;
pub const T_ERROR: u8 = 0x82;

/// Error codes carried in error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// Length field of 0..4 or a truncated frame. Connection closed.
    BadFrame,
    /// Body over MAX_BODY. Connection closed.
    TooLarge,
    UnsupportedVersion,
    UnknownType,
    BadUtf8,
    BadJson,
    /// x-request-id or traceparent unusable (see ids.rs).
    BadHeader,
    BadTarget,
    /// The target (pid or listener) is not in the caller's network namespace.
    NotYourNetns,
    NoListener,
    RateLimited,
    TooManyConnections,
    TableFull,
    Internal,
}

impl Code {
    /// Framing errors leave the stream in an unknown state: close it.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Code::BadFrame
                | Code::TooLarge
                | Code::UnsupportedVersion
                | Code::BadUtf8
                | Code::TooManyConnections
        )
    }
}

/// Whose traffic a registration is for. On the wire: `{"pid": 42}` or
/// `{"port": 8080}` (optionally with `"proto": "tcp"|"udp"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TargetWire", into = "TargetWire")]
pub enum Target {
    /// A process, in the caller's own network namespace.
    Pid(u32),
    /// Whoever listens on this port in the caller's namespace (every
    /// process sharing the listening socket, e.g. prefork workers).
    Port { port: u16, proto: Proto },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proto: Option<Proto>,
}

impl TryFrom<TargetWire> for Target {
    type Error = String;
    fn try_from(w: TargetWire) -> Result<Self, String> {
        match (w.pid, w.port) {
            (Some(pid), None) if w.proto.is_none() => Ok(Target::Pid(pid)),
            (None, Some(port)) => Ok(Target::Port {
                port,
                proto: w.proto.unwrap_or(Proto::Tcp),
            }),
            _ => Err("target wants exactly one of pid or port (proto only with port)".into()),
        }
    }
}

impl From<Target> for TargetWire {
    fn from(t: Target) -> Self {
        match t {
            Target::Pid(pid) => TargetWire {
                pid: Some(pid),
                port: None,
                proto: None,
            },
            Target::Port { port, proto } => TargetWire {
                pid: None,
                port: Some(port),
                proto: Some(proto),
            },
        }
    }
}

fn tcp() -> Proto {
    Proto::Tcp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// A connection to tag exactly, as seen from the caller ("local" is the
/// caller's end). `local`/`remote` are `ip:port` (`[v6]:port`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    #[serde(default = "tcp")]
    pub proto: Proto,
    pub local: String,
    pub remote: String,
}

/// BEGIN and END.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Request headers: `x-request-id` and/or `traceparent` (names are
    /// case-insensitive).
    pub headers: BTreeMap<String, String>,
    pub target: Target,
    #[serde(default)]
    pub flows: Vec<Flow>,
    /// BEGIN: undo this registration if the connection closes before its
    /// END (a sidecar that dies leaves nothing behind). Without it the
    /// registration lives until END or the idle timeout (the CLI).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release_on_close: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Begin(Registration),
    End(Registration),
    Ping,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ok {
    /// 32 lowercase hex digits (BEGIN/END).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Processes whose traffic now carries (BEGIN) or no longer carries (END)
    /// the trace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// Connections tagged exactly.
    #[serde(default)]
    pub flows: usize,
    /// BEGIN: processes that were carrying another trace (the newer wins).
    #[serde(default)]
    pub overlaps: usize,
    /// PING: protocol version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: Code,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok(Ok),
    Error(ErrorReply),
}

/// A decoding failure, with the code to reply with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtoError {
    pub code: Code,
    pub message: String,
}

fn err(code: Code, message: impl Into<String>) -> ProtoError {
    ProtoError {
        code,
        message: message.into(),
    }
}

/// Reads a frame's length prefix: Ok(None) when more bytes are needed.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n < BODY_HEADER {
        return Err(err(
            Code::BadFrame,
            format!("body length {n} < {BODY_HEADER}"),
        ));
    }
    if n > MAX_BODY {
        return Err(err(Code::TooLarge, format!("body length {n} > {MAX_BODY}")));
    }
    Ok(Some(n))
}

fn split_body(body: &[u8]) -> Result<(u8, &str), ProtoError> {
    if body.len() < BODY_HEADER {
        return Err(err(Code::BadFrame, "body shorter than its header"));
    }
    if body[0] != VERSION {
        return Err(err(
            Code::UnsupportedVersion,
            format!("version {} (this agent speaks {VERSION})", body[0]),
        ));
    }
    let payload =
        std::str::from_utf8(&body[BODY_HEADER..]).map_err(|e| err(Code::BadUtf8, e.to_string()))?;
    Ok((body[1], payload))
}

/// Decodes a request body (the bytes after the length prefix).
pub fn decode_request(body: &[u8]) -> Result<Request, ProtoError> {
    let (ty, payload) = split_body(body)?;
    let reg = || {
        serde_json::from_str::<Registration>(payload).map_err(|e| err(Code::BadJson, e.to_string()))
    };
    match ty {
        T_BEGIN => Ok(Request::Begin(reg()?)),
        T_END => Ok(Request::End(reg()?)),
        T_PING => Ok(Request::Ping),
        t => Err(err(Code::UnknownType, format!("message type {t:#x}"))),
    }
}

pub fn decode_response(body: &[u8]) -> Result<Response, ProtoError> {
    let (ty, payload) = split_body(body)?;
    match ty {
        T_OK => serde_json::from_str(payload).map(Response::Ok),
        T_ERROR => serde_json::from_str(payload).map(Response::Error),
        t => return Err(err(Code::UnknownType, format!("response type {t:#x}"))),
    }
    .map_err(|e| err(Code::BadJson, e.to_string()))
}

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&((BODY_HEADER + payload.len()) as u32).to_be_bytes());
    f.extend_from_slice(&[VERSION, ty, 0, 0]);
    f.extend_from_slice(payload);
    f
}

pub fn encode_request(r: &Request) -> Vec<u8> {
    match r {
        Request::Begin(reg) => frame(T_BEGIN, &serde_json::to_vec(reg).expect("serializable")),
        Request::End(reg) => frame(T_END, &serde_json::to_vec(reg).expect("serializable")),
        Request::Ping => frame(T_PING, b"{}"),
    }
}

pub fn encode_response(r: &Response) -> Vec<u8> {
    match r {
        Response::Ok(o) => frame(T_OK, &serde_json::to_vec(o).expect("serializable")),
        Response::Error(e) => frame(T_ERROR, &serde_json::to_vec(e).expect("serializable")),
    }
}

impl Registration {
    /// Header lookup, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin() -> Registration {
        Registration {
            headers: [("X-Request-Id".to_string(), "abc".to_string())].into(),
            target: Target::Port {
                port: 8080,
                proto: Proto::Tcp,
            },
            flows: vec![Flow {
                proto: Proto::Tcp,
                local: "10.0.0.1:40000".into(),
                remote: "10.0.0.2:8080".into(),
            }],
            release_on_close: true,
        }
    }

    fn body(f: &[u8]) -> &[u8] {
        let n = frame_len(f).unwrap().unwrap();
        assert_eq!(f.len(), 4 + n);
        &f[4..]
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for r in [
            Request::Begin(begin()),
            Request::End(begin()),
            Request::Ping,
        ] {
            assert_eq!(decode_request(body(&encode_request(&r))).unwrap(), r);
        }
        let ok = Response::Ok(Ok {
            trace_id: Some("00".repeat(16)),
            pids: vec![1, 2],
            flows: 1,
            overlaps: 0,
            version: None,
        });
        assert_eq!(decode_response(body(&encode_response(&ok))).unwrap(), ok);
        let e = Response::Error(ErrorReply {
            code: Code::NotYourNetns,
            message: "no".into(),
        });
        assert_eq!(decode_response(body(&encode_response(&e))).unwrap(), e);
        assert_eq!(begin().header("x-request-id"), Some("abc"));
        // The pid form.
        let j = r#"{"headers":{"traceparent":"x"},"target":{"pid":42}}"#;
        let mut f = vec![VERSION, T_BEGIN, 0, 0];
        f.extend_from_slice(j.as_bytes());
        match decode_request(&f).unwrap() {
            Request::Begin(r) => assert_eq!((r.target, r.flows.len()), (Target::Pid(42), 0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_malformed_class_gets_its_code() {
        let code = |b: &[u8]| decode_request(b).unwrap_err().code;
        assert_eq!(frame_len(&[0, 0, 0, 2]).unwrap_err().code, Code::BadFrame);
        assert_eq!(
            frame_len(&(MAX_BODY as u32 + 1).to_be_bytes())
                .unwrap_err()
                .code,
            Code::TooLarge
        );
        assert_eq!(frame_len(&[0, 0]).unwrap(), None, "needs more bytes");
        assert_eq!(code(&[VERSION, T_BEGIN]), Code::BadFrame);
        assert_eq!(code(&[9, T_PING, 0, 0]), Code::UnsupportedVersion);
        assert_eq!(code(&[VERSION, 0x42, 0, 0]), Code::UnknownType);
        assert_eq!(code(&[VERSION, T_BEGIN, 0, 0, 0xff, 0xfe]), Code::BadUtf8);
        assert_eq!(code(&[VERSION, T_BEGIN, 0, 0, b'{']), Code::BadJson);
        let unknown_field = br#"{"headers":{},"target":{"pid":1},"nope":1}"#;
        assert_eq!(
            code(&[&[VERSION, T_BEGIN, 0, 0][..], unknown_field].concat()),
            Code::BadJson
        );
        assert!(Code::TooLarge.closes_connection() && !Code::NotYourNetns.closes_connection());
        for bad_target in [
            r#"{"pid":1,"port":2}"#,
            r#"{}"#,
            r#"{"pid":1,"proto":"udp"}"#,
        ] {
            let j = format!(r#"{{"headers":{{}},"target":{bad_target}}}"#);
            assert_eq!(
                code(&[&[VERSION, T_BEGIN, 0, 0][..], j.as_bytes()].concat()),
                Code::BadJson,
                "{bad_target}"
            );
        }
        let j = br#"{"headers":{},"target":{"port":53,"proto":"udp"}}"#;
        match decode_request(&[&[VERSION, T_END, 0, 0][..], j].concat()).unwrap() {
            Request::End(r) => assert_eq!(
                r.target,
                Target::Port {
                    port: 53,
                    proto: Proto::Udp
                }
            ),
            other => panic!("{other:?}"),
        }
    }
}
