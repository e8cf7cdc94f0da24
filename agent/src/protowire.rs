//! Protocol buffers' wire format, as far as OTLP spans need it: varints,
//! field keys, length-delimited fields, and OTLP's `KeyValue`/`AnyValue`
//! both ways (spans keep their attributes encoded, see
//! `spans::Attributes`).
use std::borrow::Cow;

use crate::spans::{KeyValue, Value};

// Wire types.
pub const VARINT: u32 = 0;
pub const FIXED64: u32 = 1;
pub const LEN: u32 = 2;
pub const FIXED32: u32 = 5;

pub fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn key_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

pub fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from(field << 3 | wire));
}

/// A length-delimited field of `n` bytes: its whole size.
pub fn delimited_len(field: u32, n: usize) -> usize {
    key_len(field) + varint_len(n as u64) + n
}

pub fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// proto3: an empty string or bytes field is not written.
pub fn opt_bytes_len(field: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        delimited_len(field, b.len())
    }
}

pub fn put_opt_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        put_bytes(out, field, b);
    }
}

// AnyValue: string_value = 1, int_value = 3, array_value = 5 (a oneof:
// written even when empty or zero). ArrayValue: values = 1.
pub fn any_value_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => delimited_len(1, s.len()),
        Value::Int(i) => key_len(3) + varint_len(*i as u64),
        Value::StrArray(a) => delimited_len(5, array_len(a)),
    }
}

pub fn array_len<S: AsRef<str>>(a: &[S]) -> usize {
    a.iter()
        .map(|s| delimited_len(1, delimited_len(1, s.as_ref().len())))
        .sum()
}

pub fn put_any_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Str(s) => put_bytes(out, 1, s.as_bytes()),
        Value::Int(i) => {
            put_key(out, 3, VARINT);
            put_varint(out, *i as u64);
        }
        Value::StrArray(a) => {
            put_key(out, 5, LEN);
            put_varint(out, array_len(a) as u64);
            for s in a {
                put_key(out, 1, LEN);
                put_varint(out, delimited_len(1, s.len()) as u64);
                put_bytes(out, 1, s.as_bytes());
            }
        }
    }
}

// KeyValue: key = 1, value = 2.
pub fn key_value_len(kv: &KeyValue) -> usize {
    opt_bytes_len(1, kv.key.as_bytes()) + delimited_len(2, any_value_len(&kv.value))
}

pub fn put_key_value(out: &mut Vec<u8>, field: u32, kv: &KeyValue) {
    put_key(out, field, LEN);
    put_varint(out, key_value_len(kv) as u64);
    put_opt_bytes(out, 1, kv.key.as_bytes());
    put_key(out, 2, LEN);
    put_varint(out, any_value_len(&kv.value) as u64);
    put_any_value(out, &kv.value);
}

pub fn attributes_len(field: u32, a: &[KeyValue]) -> usize {
    a.iter()
        .map(|kv| delimited_len(field, key_value_len(kv)))
        .sum()
}

/// Reads one varint off the front of `b`.
pub fn read_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Reads one field off the front of `b`: its number and, for a
/// length-delimited field, its bytes (a varint field: its value in `.1`,
/// no bytes). Other wire types are not written by tagflow: `None`.
pub fn read_field<'a>(b: &mut &'a [u8]) -> Option<(u32, u64, &'a [u8])> {
    let key = read_varint(b)?;
    let field = u32::try_from(key >> 3).ok()?;
    match (key & 7) as u32 {
        VARINT => Some((field, read_varint(b)?, &[])),
        LEN => {
            let n = usize::try_from(read_varint(b)?).ok()?;
            let (body, rest) = (b.get(..n)?, b.get(n..)?);
            *b = rest;
            Some((field, n as u64, body))
        }
        _ => None,
    }
}

fn read_str(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// An `AnyValue` as tagflow writes it (string, int or array of strings).
pub fn read_any_value(mut b: &[u8]) -> Option<Value> {
    let (field, n, body) = read_field(&mut b)?;
    Some(match field {
        1 => Value::Str(Cow::Owned(read_str(body)?.to_owned())),
        3 => Value::Int(n as i64),
        5 => {
            let mut items = Vec::new();
            let mut body = body;
            while !body.is_empty() {
                let (_, _, item) = read_field(&mut body)?;
                match read_any_value(item)? {
                    Value::Str(s) => items.push(s.into_owned()),
                    _ => return None,
                }
            }
            Value::StrArray(items)
        }
        _ => return None,
    })
}

/// A `KeyValue` message's body: its key and value.
pub fn read_key_value(mut b: &[u8]) -> Option<(&str, Value)> {
    let (mut key, mut value) = ("", None);
    while !b.is_empty() {
        match read_field(&mut b)? {
            (1, _, k) => key = read_str(k)?,
            (2, _, v) => value = Some(read_any_value(v)?),
            _ => return None,
        }
    }
    Some((key, value?))
}
