//! Spans: what tagged flows become. Exporter-agnostic model, assembly from
//! datapath events, wall-clock conversion and resources.
pub mod assemble;
mod attributes;
pub mod resource;

pub use attributes::Attributes;

use std::{borrow::Cow, sync::Arc};

/// OTLP span kinds tagflow produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

/// Attribute values. Many are fixed words ("tcp", "ipv4", "http"): those
/// borrow a static string instead of allocating one per span.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
    StrArray(Vec<String>),
}

/// Attribute keys are semantic-convention names: static, so a span's ~20
/// attributes cost no key allocations (the soak showed finished spans
/// dominating memory while a collector was away).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub key: &'static str,
    pub value: Value,
}

pub fn kv(key: &'static str, value: Value) -> KeyValue {
    KeyValue { key, value }
}

/// Who emitted a span (OTLP resource). Spans are grouped by it on export;
/// each distinct resource is its own service in Jaeger.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Resource {
    pub attributes: Vec<KeyValue>,
}

impl Resource {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }

    pub fn service_name(&self) -> &str {
        match self.get("service.name") {
            Some(Value::Str(s)) => s.as_ref(),
            _ => "unknown_service",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// The parent is in another process/node (from `traceparent`).
    pub parent_is_remote: bool,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Attributes,
    pub resource: Arc<Resource>,
    /// Span status Error (the response said the call failed, as the
    /// semantic conventions read its status code); unset otherwise.
    pub error: bool,
}

impl SpanRecord {
    /// The attribute named `key`, decoded (tests and tools; the exporter
    /// copies the encoding).
    pub fn attr(&self, key: &str) -> Option<Value> {
        self.attributes.get(key)
    }
}
