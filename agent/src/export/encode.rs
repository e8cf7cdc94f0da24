//! OTLP/protobuf wire encoding of span records, written straight from the
//! records: an `ExportTraceServiceRequest`, byte for byte what prost makes
//! of the generated messages, without building them (the owned copies of
//! every string and their frees were a quarter of the span pipeline's CPU).
//!
//! Each message is written as tag, length, body, so lengths are computed
//! first (`*_len`), from the same fields the writers write.
use std::{collections::HashMap, sync::Arc};

use crate::{
    protowire::*,
    spans::{Resource, SpanKind, SpanRecord},
};

/// W3C trace-flags "sampled" and OTLP's "has remote parent" flag bits.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;
/// `Status.code` ERROR.
const STATUS_ERROR: u64 = 2;

const SCOPE_NAME: &str = "tagflow";
const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

fn flags(s: &SpanRecord) -> u32 {
    let mut flags = FLAG_SAMPLED;
    if s.parent_span_id.is_some() {
        flags |= FLAG_CONTEXT_HAS_IS_REMOTE;
        if s.parent_is_remote {
            flags |= FLAG_CONTEXT_IS_REMOTE;
        }
    }
    flags
}

/// OTLP's SpanKind: UNSPECIFIED 0, INTERNAL 1, SERVER 2, CLIENT 3.
fn kind(k: SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    }
}

// Status: code = 3 (message = 2 stays empty).
const STATUS_BODY_LEN: usize = 2;

// Span: trace_id = 1, span_id = 2, parent_span_id = 4, name = 5, kind = 6,
// start = 7 and end = 8 (fixed64), attributes = 9, status = 15, flags = 16
// (fixed32); prost writes fields by number.
fn span_len(s: &SpanRecord) -> usize {
    let parent = s.parent_span_id.as_ref().map_or(&[][..], |p| &p[..]);
    delimited_len(1, s.trace_id.len())
        + delimited_len(2, s.span_id.len())
        + opt_bytes_len(4, parent)
        + key_len(16)
        + 4
        + opt_bytes_len(5, s.name.as_bytes())
        + key_len(6)
        + varint_len(kind(s.kind))
        + if s.start_unix_ns != 0 {
            key_len(7) + 8
        } else {
            0
        }
        + if s.end_unix_ns != 0 {
            key_len(8) + 8
        } else {
            0
        }
        + s.attributes.encoded_len()
        + if s.error {
            delimited_len(15, STATUS_BODY_LEN)
        } else {
            0
        }
}

/// `len`: its `span_len`.
fn put_span(out: &mut Vec<u8>, s: &SpanRecord, len: usize) {
    put_key(out, 2, LEN);
    put_varint(out, len as u64);
    put_bytes(out, 1, &s.trace_id);
    put_bytes(out, 2, &s.span_id);
    if let Some(p) = &s.parent_span_id {
        put_bytes(out, 4, p);
    }
    put_opt_bytes(out, 5, s.name.as_bytes());
    put_key(out, 6, VARINT);
    put_varint(out, kind(s.kind));
    for (field, t) in [(7, s.start_unix_ns), (8, s.end_unix_ns)] {
        if t != 0 {
            put_key(out, field, FIXED64);
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    s.attributes.write_to(out);
    if s.error {
        put_key(out, 15, LEN);
        put_varint(out, STATUS_BODY_LEN as u64);
        put_key(out, 3, VARINT);
        put_varint(out, STATUS_ERROR);
    }
    put_key(out, 16, FIXED32);
    out.extend_from_slice(&flags(s).to_le_bytes());
}

// InstrumentationScope: name = 1, version = 2.
fn scope_len() -> usize {
    delimited_len(1, SCOPE_NAME.len()) + delimited_len(2, SCOPE_VERSION.len())
}

// ScopeSpans: scope = 1, spans = 2 (`lens`: each span's `span_len`).
fn scope_spans_len(lens: &[usize]) -> usize {
    delimited_len(1, scope_len()) + lens.iter().map(|n| delimited_len(2, *n)).sum::<usize>()
}

/// Spans by resource, resources in order of first appearance. Spans share
/// their process's `Arc`, so a resource is found by pointer first; one
/// compared field by field only when a new pointer turns up (a refreshed
/// cache entry), never hashed: hashing every attribute of every span's
/// resource was a visible share of the pipeline's profile.
fn group(spans: &[SpanRecord]) -> Vec<(&Resource, Vec<&SpanRecord>)> {
    let mut groups: Vec<(&Resource, Vec<&SpanRecord>)> = Vec::new();
    let mut by_ptr: HashMap<*const Resource, usize> = HashMap::new();
    let mut last = None;
    for s in spans {
        let p = Arc::as_ptr(&s.resource);
        let i = match last {
            Some((q, i)) if q == p => i,
            _ => *by_ptr.entry(p).or_insert_with(|| {
                groups
                    .iter()
                    .position(|(r, _)| **r == *s.resource)
                    .unwrap_or_else(|| {
                        groups.push((&*s.resource, Vec::new()));
                        groups.len() - 1
                    })
            }),
        };
        last = Some((p, i));
        groups[i].1.push(s);
    }
    groups
}

/// One request, spans grouped by resource (each its own service), in the
/// order their resources first appear.
pub fn request(spans: &[SpanRecord]) -> Vec<u8> {
    let groups = group(spans);
    let mut out = Vec::new();
    let mut lens = Vec::new();
    for (r, spans) in &groups {
        lens.clear();
        lens.extend(spans.iter().map(|s| span_len(s)));
        // ResourceSpans: resource = 1, scope_spans = 2.
        // Resource: attributes = 1.
        let resource = attributes_len(1, &r.attributes);
        let scope_spans = scope_spans_len(&lens);
        let body = delimited_len(1, resource) + delimited_len(2, scope_spans);
        out.reserve(delimited_len(1, body));
        put_key(&mut out, 1, LEN);
        put_varint(&mut out, body as u64);
        put_key(&mut out, 1, LEN);
        put_varint(&mut out, resource as u64);
        for kv in &r.attributes {
            put_key_value(&mut out, 1, kv);
        }
        put_key(&mut out, 2, LEN);
        put_varint(&mut out, scope_spans as u64);
        put_key(&mut out, 1, LEN);
        put_varint(&mut out, scope_len() as u64);
        put_bytes(&mut out, 1, SCOPE_NAME.as_bytes());
        put_bytes(&mut out, 2, SCOPE_VERSION.as_bytes());
        for (s, n) in spans.iter().zip(&lens) {
            put_span(&mut out, s, *n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{kv, KeyValue, Value};
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue as PKv},
        resource::v1::Resource as PResource,
        trace::v1::{status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
    };
    use proptest::prelude::*;
    use prost::Message;
    use std::borrow::Cow;

    /// The reference: the generated messages, as the exporter built them
    /// before, encoded by prost; each span's attributes as they were given
    /// (`given[i]`), not as the record keeps them.
    fn reference(spans: &[SpanRecord], given: &[Vec<KeyValue>]) -> Vec<u8> {
        let value = |v: &Value| AnyValue {
            value: Some(match v {
                Value::Str(s) => any_value::Value::StringValue(s.to_string()),
                Value::Int(i) => any_value::Value::IntValue(*i),
                Value::StrArray(a) => any_value::Value::ArrayValue(ArrayValue {
                    values: a
                        .iter()
                        .map(|s| AnyValue {
                            value: Some(any_value::Value::StringValue(s.clone())),
                        })
                        .collect(),
                }),
            }),
        };
        let attrs = |a: &[KeyValue]| -> Vec<PKv> {
            a.iter()
                .map(|kv| PKv {
                    key: kv.key.to_string(),
                    value: Some(value(&kv.value)),
                    ..Default::default()
                })
                .collect()
        };
        let mut order: Vec<&Arc<Resource>> = Vec::new();
        for s in spans {
            if !order.iter().any(|r| ***r == *s.resource) {
                order.push(&s.resource);
            }
        }
        let resource_spans = order
            .into_iter()
            .map(|r| ResourceSpans {
                resource: Some(PResource {
                    attributes: attrs(&r.attributes),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.into(),
                        version: SCOPE_VERSION.into(),
                        ..Default::default()
                    }),
                    spans: spans
                        .iter()
                        .zip(given)
                        .filter(|(s, _)| *s.resource == **r)
                        .map(|(s, given)| Span {
                            trace_id: s.trace_id.to_vec(),
                            span_id: s.span_id.to_vec(),
                            parent_span_id: s
                                .parent_span_id
                                .map(|p| p.to_vec())
                                .unwrap_or_default(),
                            flags: flags(s),
                            name: s.name.clone(),
                            kind: kind(s.kind) as i32,
                            start_time_unix_nano: s.start_unix_ns,
                            end_time_unix_nano: s.end_unix_ns,
                            attributes: attrs(given),
                            status: s.error.then(|| Status {
                                code: StatusCode::Error as i32,
                                message: String::new(),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest { resource_spans }.encode_to_vec()
    }

    // Names the spans' attributes hold as an index, and others.
    const KEYS: [&str; 5] = [
        "",
        "http.request.method",
        "tagflow.packets",
        "k",
        "http.request.header.x-request-id",
    ];

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            ".{0,200}".prop_map(|s| Value::Str(Cow::Owned(s))),
            any::<i64>().prop_map(Value::Int),
            prop::collection::vec(".{0,20}", 0..4).prop_map(Value::StrArray),
        ]
    }

    fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
        prop::collection::vec(
            (0..KEYS.len(), value()).prop_map(|(k, value)| KeyValue {
                key: KEYS[k],
                value,
            }),
            0..6,
        )
    }

    fn span(resources: Vec<Arc<Resource>>) -> impl Strategy<Value = (SpanRecord, Vec<KeyValue>)> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 8]>(),
            any::<Option<[u8; 8]>>(),
            any::<bool>(),
            ".{0,40}",
            0..3u8,
            (any::<u64>(), prop_oneof![Just(0u64), any::<u64>()]),
            attributes(),
            0..resources.len(),
            any::<bool>(),
        )
            .prop_map(
                move |(trace_id, span_id, parent_span_id, remote, name, k, t, a, r, error)| {
                    let record = SpanRecord {
                        trace_id,
                        span_id,
                        parent_span_id,
                        parent_is_remote: remote,
                        name,
                        kind: [SpanKind::Internal, SpanKind::Server, SpanKind::Client][k as usize],
                        start_unix_ns: t.0,
                        end_unix_ns: t.1,
                        attributes: a.iter().cloned().collect(),
                        resource: resources[r].clone(),
                        error,
                    };
                    (record, a)
                },
            )
    }

    proptest! {
        #[test]
        fn encodes_what_prost_encodes(
            (spans, _) in attributes()
                .prop_flat_map(|a| {
                    // The third equals the first behind another pointer.
                    let resources = vec![
                        Arc::new(Resource { attributes: a.clone() }),
                        Arc::new(Resource { attributes: vec![] }),
                        Arc::new(Resource { attributes: a }),
                    ];
                    (prop::collection::vec(span(resources.clone()), 0..12), Just(()))
                })
        ) {
            let (records, given): (Vec<_>, Vec<_>) = spans.into_iter().unzip();
            prop_assert_eq!(request(&records), reference(&records, &given));
        }
    }

    fn rec(service: &str, id: u8, parent: Option<[u8; 8]>, remote: bool) -> SpanRecord {
        SpanRecord {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_span_id: parent,
            parent_is_remote: remote,
            name: "tcp 10.0.0.2:80".into(),
            kind: SpanKind::Client,
            start_unix_ns: 10,
            end_unix_ns: 20,
            attributes: [
                kv("tagflow.packets", Value::Int(3)),
                kv(
                    "http.request.header.x-request-id",
                    Value::StrArray(vec!["r".into()]),
                ),
            ]
            .into_iter()
            .collect(),
            resource: Arc::new(Resource {
                attributes: vec![kv("service.name", Value::Str(service.to_string().into()))],
            }),
            error: id == 2,
        }
    }

    #[test]
    fn spans_are_grouped_by_resource_and_encoded_faithfully() {
        let a = rec("frontend", 1, Some([9; 8]), true);
        let b = rec("backend", 2, Some([1; 8]), false);
        let c = rec("frontend", 3, None, false);
        let req = ExportTraceServiceRequest::decode(&request(&[a, b, c])[..]).unwrap();
        assert_eq!(req.resource_spans.len(), 2, "one ResourceSpans per service");
        let names: Vec<String> = req
            .resource_spans
            .iter()
            .map(|r| {
                match &r.resource.as_ref().unwrap().attributes[0]
                    .value
                    .as_ref()
                    .unwrap()
                    .value
                {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(names, ["frontend", "backend"]);
        let fe = &req.resource_spans[0].scope_spans[0];
        assert_eq!(fe.scope.as_ref().unwrap().name, "tagflow");
        assert_eq!(fe.spans.len(), 2);
        let s = &fe.spans[0];
        assert_eq!(
            (s.trace_id.len(), s.span_id.as_slice()),
            (16, &[1u8; 8][..])
        );
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(
            s.flags,
            FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE | FLAG_CONTEXT_IS_REMOTE
        );
        assert_eq!(s.kind, 3);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        assert!(
            fe.spans[1].parent_span_id.is_empty(),
            "a root has no parent"
        );
        assert_eq!(fe.spans[1].flags, FLAG_SAMPLED);
        let local_parent = &req.resource_spans[1].scope_spans[0].spans[0];
        assert_eq!(
            local_parent.flags,
            FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE
        );
        // A failed call's status is Error; others leave it unset.
        let error = local_parent.status.as_ref().map(|s| s.code);
        assert_eq!(error, Some(StatusCode::Error as i32));
        assert_eq!(s.status, None);
    }

    #[test]
    fn varint_lengths_match_the_written_bytes() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
