//! A header block through the connection's HPACK table: a request's head
//! on a client side, a response's status on a server's.
use loona_hpack::Decoder;

use super::{frames::RawBlock, GiveUp, StreamHead};
use crate::sources::capture::{head_info, HeadOutcome, Protocol, Request};

/// A server side's block: a response's status or its trailers'.
pub(super) struct StreamReply {
    pub stream: u32,
    pub end_stream: bool,
    pub status: Option<u16>,
    pub grpc_status: Option<u32>,
}

/// Decodes one header block: on a client side, a request's head; on a
/// server's, a response's status. Every block goes through the table.
pub(super) fn decode(
    b: RawBlock<'_>,
    hpack: &mut Decoder<'static>,
    server: bool,
    id_headers: &[String],
    requests: &mut Vec<StreamHead>,
    replies: &mut Vec<StreamReply>,
) -> Result<(), GiveUp> {
    let (stream, promise) = (b.stream, b.promise);
    let mut fields: Vec<(String, String)> = Vec::new();
    hpack
        .decode_with_cb(b.bytes, |n, v| {
            // Only what a head or a status needs is kept (names are lower
            // case in HTTP/2).
            let n = String::from_utf8_lossy(&n);
            let wanted = n.starts_with(':')
                || n == "traceparent"
                || n == "content-type"
                || n == "grpc-status"
                || id_headers.iter().any(|h| h.eq_ignore_ascii_case(&n));
            if wanted {
                fields.push((n.into_owned(), String::from_utf8_lossy(&v).into_owned()));
            }
        })
        .map_err(|_| GiveUp::Hpack)?;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if server {
        // A push's promised request is the server's, not a reply.
        if !promise {
            replies.push(StreamReply {
                stream,
                end_stream: b.end_stream,
                status: get(":status").and_then(|s| s.parse().ok()),
                grpc_status: get("grpc-status").and_then(|s| s.parse().ok()),
            });
        }
        return Ok(());
    }
    let head = match (promise, get(":method")) {
        (false, Some(method)) => {
            let grpc = get("content-type").is_some_and(|t| t.starts_with("application/grpc"));
            let request = Request {
                method,
                target: get(":path").unwrap_or(""),
                host: get(":authority"),
                protocol: if grpc {
                    Protocol::Grpc
                } else {
                    Protocol::Http2
                },
            };
            head_info(
                request,
                id_headers.iter().find_map(|h| get(h)),
                get("traceparent"),
            )
        }
        // Trailers, or a push: no request of this connection.
        _ => Err(HeadOutcome::NotHttp),
    };
    requests.push(StreamHead { stream, head });
    Ok(())
}
