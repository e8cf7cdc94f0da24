//! The default sink: one JSON object per span per line on stdout, with
//! stable field names, so `tagflow run` is useful without a collector.
use std::io::Write;

use serde_json::{json, Map, Value as J};

use crate::{
    ids::to_hex,
    spans::{SpanRecord, Value},
};

fn attrs<'a>(a: impl Iterator<Item = (&'a str, Value)>) -> J {
    let mut m = Map::new();
    for (key, value) in a {
        let v = match value {
            Value::Str(s) => J::from(s.as_ref()),
            Value::Int(i) => J::from(i),
            Value::StrArray(v) => J::from(v),
        };
        m.insert(key.to_string(), v);
    }
    J::Object(m)
}

pub fn line(s: &SpanRecord) -> String {
    json!({
        "trace_id": to_hex(&s.trace_id),
        "span_id": to_hex(&s.span_id),
        "parent_span_id": s.parent_span_id.map(|p| to_hex(&p)),
        "parent_is_remote": s.parent_is_remote,
        "name": s.name,
        "kind": s.kind.as_str(),
        "start_unix_nano": s.start_unix_ns,
        "end_unix_nano": s.end_unix_ns,
        "duration_ns": s.end_unix_ns.saturating_sub(s.start_unix_ns),
        "status": if s.error { "error" } else { "unset" },
        "service": s.resource.service_name(),
        "attributes": attrs(s.attributes.iter()),
        "resource": attrs(
            s.resource
                .attributes
                .iter()
                .map(|kv| (kv.key, kv.value.clone()))
        ),
    })
    .to_string()
}

pub fn write(spans: &[SpanRecord]) {
    let out = std::io::stdout();
    let mut out = out.lock();
    for s in spans {
        // A closed stdout (piped into a dead process) must not kill the agent.
        let _ = writeln!(out, "{}", line(s));
    }
    let _ = out.flush();
}
