//! A span's attributes, kept close to their OTLP encoding: the repeated
//! `Span.attributes` field, except that a key the agent writes itself
//! (`KEYS`) is its one-byte index there. Finished spans wait (for their
//! trace to settle, for the collector) and are what the agent's memory is
//! made of: as typed key/value pairs an HTTP call span's ~25 attributes
//! took a dozen allocations and 2 582 bytes of heap; encoded, one
//! allocation of ~800 bytes, of which the key names were ~430. The
//! exporter copies the bytes, writing each key's name as it goes.
use std::{fmt, io::Write};

use crate::protowire::*;

use super::{KeyValue, Value};

/// `Span.attributes` is field 9.
const FIELD: u32 = 9;
/// Inside a `KeyValue` held here: the index into `KEYS` in place of field
/// 1 (the key). Never sent: `write_to` puts the name back.
const KEY_INDEX: u32 = 15;

/// The keys the agent writes on every span, most of them on every call.
const KEYS: [&str; 30] = [
    "network.transport",
    "network.type",
    "network.peer.address",
    "network.peer.port",
    "network.local.address",
    "network.local.port",
    "network.interface.name",
    "network.interface.direction",
    "network.protocol.name",
    "network.protocol.version",
    "process.pid",
    "tagflow.packets",
    "tagflow.bytes",
    "tagflow.tcp_flags",
    "tagflow.source",
    "tagflow.match",
    "tagflow.netns",
    "tagflow.evicted",
    "tagflow.request_id",
    "http.request.method",
    "http.request.header.host",
    "http.request.header.x-request-id",
    "http.response.status_code",
    "url.path",
    "server.address",
    "server.port",
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
];
// An index is one byte of varint.
const _: () = assert!(KEYS.len() < 128);

fn key_index(key: &str) -> Option<u8> {
    KEYS.iter().position(|k| *k == key).map(|i| i as u8)
}

/// Attributes in the order they were pushed. The one writer is `push_*`,
/// which always writes whole `KeyValue` fields, so the bytes always decode;
/// `sent` is what they take once the keys are written out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    wire: Vec<u8>,
    sent: usize,
}

impl Attributes {
    /// Room for `bytes` of encoding: a span's attributes are pushed one by
    /// one, and growing from nothing reallocated about eight times.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            wire: Vec::with_capacity(bytes),
            sent: 0,
        }
    }

    /// The length of `Span.attributes` as `write_to` writes them.
    pub fn encoded_len(&self) -> usize {
        self.sent
    }

    /// Appends the `Span.attributes` fields (field number 9), each key
    /// written out.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut b = &self.wire[..];
        while let Some((_, _, kv)) = read_field(&mut b) {
            let mut body = kv;
            match read_field(&mut body) {
                Some((KEY_INDEX, i, _)) => {
                    let key = KEYS[i as usize];
                    put_key(out, FIELD, LEN);
                    put_varint(out, (opt_bytes_len(1, key.as_bytes()) + body.len()) as u64);
                    put_opt_bytes(out, 1, key.as_bytes());
                    out.extend_from_slice(body);
                }
                _ => {
                    put_key(out, FIELD, LEN);
                    put_varint(out, kv.len() as u64);
                    out.extend_from_slice(kv);
                }
            }
        }
    }

    /// Frees the slack growth left: a span is built once and then waits.
    pub fn shrink_to_fit(&mut self) {
        self.wire.shrink_to_fit();
    }

    /// Starts a `KeyValue` field whose `AnyValue` body is `value_len` bytes.
    fn open(&mut self, key: &str, value_len: usize) {
        let value = delimited_len(2, value_len);
        let named = opt_bytes_len(1, key.as_bytes()) + value;
        self.sent += key_len(FIELD) + varint_len(named as u64) + named;
        put_key(&mut self.wire, FIELD, LEN);
        match key_index(key) {
            Some(i) => {
                put_varint(&mut self.wire, (key_len(KEY_INDEX) + 1 + value) as u64);
                put_key(&mut self.wire, KEY_INDEX, VARINT);
                put_varint(&mut self.wire, i.into());
            }
            None => {
                put_varint(&mut self.wire, named as u64);
                put_opt_bytes(&mut self.wire, 1, key.as_bytes());
            }
        }
        put_key(&mut self.wire, 2, LEN);
        put_varint(&mut self.wire, value_len as u64);
    }

    pub fn push_str(&mut self, key: &str, s: &str) {
        self.open(key, delimited_len(1, s.len()));
        put_bytes(&mut self.wire, 1, s.as_bytes());
    }

    pub fn push_int(&mut self, key: &str, i: i64) {
        self.open(key, key_len(3) + varint_len(i as u64));
        put_key(&mut self.wire, 3, VARINT);
        put_varint(&mut self.wire, i as u64);
    }

    /// A string value formatted in place (addresses, flags): no allocation
    /// for text up to 64 bytes.
    pub fn push_display(&mut self, key: &str, v: impl fmt::Display) {
        let mut buf = [0u8; 64];
        let mut w = &mut buf[..];
        if write!(w, "{v}").is_ok() {
            let n = 64 - w.len();
            self.push_str(key, std::str::from_utf8(&buf[..n]).unwrap_or(""));
        } else {
            self.push_str(key, &v.to_string());
        }
    }

    pub fn push_str_array<S: AsRef<str>>(&mut self, key: &str, items: &[S]) {
        let array = array_len(items);
        self.open(key, delimited_len(5, array));
        put_key(&mut self.wire, 5, LEN);
        put_varint(&mut self.wire, array as u64);
        for s in items {
            let s = s.as_ref();
            put_key(&mut self.wire, 1, LEN);
            put_varint(&mut self.wire, delimited_len(1, s.len()) as u64);
            put_bytes(&mut self.wire, 1, s.as_bytes());
        }
    }

    pub fn push(&mut self, key: &str, v: &Value) {
        match v {
            Value::Str(s) => self.push_str(key, s),
            Value::Int(i) => self.push_int(key, *i),
            Value::StrArray(a) => self.push_str_array(key, a),
        }
    }

    /// Each attribute, decoded.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Value)> {
        let mut b = &self.wire[..];
        std::iter::from_fn(move || {
            let (_, _, kv) = read_field(&mut b)?;
            let mut body = kv;
            match read_field(&mut body)? {
                (KEY_INDEX, i, _) => {
                    let (_, value) = read_key_value(body)?;
                    Some((KEYS[i as usize], value))
                }
                _ => read_key_value(kv),
            }
        })
    }

    /// The first attribute named `key`, decoded.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl FromIterator<KeyValue> for Attributes {
    fn from_iter<I: IntoIterator<Item = KeyValue>>(iter: I) -> Self {
        let mut a = Self::default();
        for kv in iter {
            a.push(kv.key, &kv.value);
        }
        a
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::kv;
    use proptest::prelude::*;
    use std::{borrow::Cow, net::IpAddr};

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            ".{0,200}".prop_map(|s| Value::Str(Cow::Owned(s))),
            any::<i64>().prop_map(Value::Int),
            prop::collection::vec(".{0,20}", 0..4).prop_map(Value::StrArray),
        ]
    }

    proptest! {
        #[test]
        fn what_is_pushed_reads_back_in_order(
            entries in prop::collection::vec(
                (prop_oneof![Just(""), Just("url.path"), Just("k")], value()),
                0..8,
            )
        ) {
            let a: Attributes = entries.iter().map(|(k, v)| kv(k, v.clone())).collect();
            let back: Vec<(String, Value)> =
                a.iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let want: Vec<(String, Value)> =
                entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            prop_assert_eq!(back, want);
            prop_assert_eq!(a.iter().count(), entries.len());
        }
    }

    #[test]
    fn known_keys_are_held_as_an_index_and_sent_by_name() {
        let mut a = Attributes::default();
        a.push_str("network.interface.direction", "ingress");
        a.push_int("x.custom", 7);
        a.push_str_array("http.request.header.x-request-id", &["r1"]);
        let mut out = Vec::new();
        a.write_to(&mut out);
        assert_eq!(out.len(), a.encoded_len());
        let mut b = &out[..];
        let sent: Vec<_> = std::iter::from_fn(|| {
            let (field, _, kv) = read_field(&mut b)?;
            assert_eq!(field, FIELD);
            read_key_value(kv).map(|(k, v)| (k.to_owned(), v))
        })
        .collect();
        assert_eq!(
            sent,
            [
                (
                    "network.interface.direction".into(),
                    Value::Str("ingress".into())
                ),
                ("x.custom".into(), Value::Int(7)),
                (
                    "http.request.header.x-request-id".into(),
                    Value::StrArray(vec!["r1".into()])
                ),
            ]
        );
        let names = "network.interface.direction".len() + "http.request.header.x-request-id".len();
        // A held name is its index, in the place of its length: the name
        // itself is what is saved.
        assert_eq!(a.wire.len() + names, out.len());
    }

    #[test]
    fn values_formatted_in_place_read_as_strings() {
        let mut a = Attributes::default();
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        a.push_display("network.peer.address", ip);
        let long = "x".repeat(100);
        a.push_display("long", &long);
        a.push_str_array("http.request.header.x-request-id", &["r1"]);
        a.push_int("network.peer.port", -1);
        assert_eq!(
            a.get("network.peer.address"),
            Some(Value::Str("fd00::1:2".into()))
        );
        assert_eq!(
            a.get("long"),
            Some(Value::Str(long.into())),
            "past the buffer"
        );
        assert_eq!(
            a.get("http.request.header.x-request-id"),
            Some(Value::StrArray(vec!["r1".into()]))
        );
        assert_eq!(a.get("network.peer.port"), Some(Value::Int(-1)));
        assert_eq!(a.get("missing"), None);
    }
}
