//! Field offsets of kernel structures, from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`): aya-ebpf has no CO-RE, so the few fields
//! the eBPF side reads through a kernel pointer are located here at load
//! time and handed over as globals. Only what tagflow needs: the byte
//! offset of a named member of a named struct, looking through anonymous
//! struct/union members.
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type kind {0} unknown")]
    Kind(u32),
    #[error("struct {0} not in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
}

const MAGIC: u16 = 0xeb9f;
const STRUCT: u32 = 4;
const UNION: u32 = 5;

struct Member {
    name: u32,
    ty: u32,
    bits: u32,
}

/// The struct and union types of a BTF blob (other kinds are skipped).
pub struct Types {
    strings: Vec<u8>,
    /// type id → (name offset, kind, members).
    composite: HashMap<u32, (u32, u32, Vec<Member>)>,
    /// Resolves typedef/const/volatile chains to an anonymous member's type.
    alias: HashMap<u32, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

impl Types {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let hdr = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data
            .get(hdr + type_off..hdr + type_off + type_len)
            .ok_or(BtfError::Truncated(hdr + type_off))?;
        let strings = data
            .get(hdr + str_off..hdr + str_off + str_len)
            .ok_or(BtfError::Truncated(hdr + str_off))?
            .to_vec();
        let mut out = Self {
            strings,
            composite: HashMap::new(),
            alias: HashMap::new(),
        };
        let (mut at, mut id) = (0usize, 1u32);
        while at < types.len() {
            let name = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            let (vlen, kind, kflag) = (info & 0xffff, (info >> 24) & 0x1f, info >> 31);
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen as usize,
                6 | 13 => 8 * vlen as usize,
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                k => return Err(BtfError::Kind(k)),
            };
            if kind == STRUCT || kind == UNION {
                let mut members = Vec::with_capacity(vlen as usize);
                for i in 0..vlen as usize {
                    let m = at + 12 * i;
                    let off = u32_at(types, m + 8)?;
                    members.push(Member {
                        name: u32_at(types, m)?,
                        ty: u32_at(types, m + 4)?,
                        // With kind_flag the top 8 bits are a bitfield size.
                        bits: if kflag == 1 { off & 0xff_ffff } else { off },
                    });
                }
                out.composite.insert(id, (name, kind, members));
            } else if matches!(kind, 8..=10 | 18) {
                out.alias.insert(id, size_or_type);
            }
            if at + extra > types.len() {
                return Err(BtfError::Truncated(at));
            }
            at += extra;
            id += 1;
        }
        Ok(out)
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.alias.get(&id) {
                Some(t) => id = *t,
                None => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct name` (a struct with members:
    /// forward declarations are skipped).
    pub fn offset_of(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .composite
            .iter()
            .find(|(_, (n, k, m))| {
                *k == STRUCT && !m.is_empty() && self.name(*n) == name.as_bytes()
            })
            .map(|(id, _)| *id)
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find(id, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        let (_, _, members) = self.composite.get(&self.resolve(id))?;
        for m in members {
            if self.name(m.name) == member {
                return Some(m.bits);
            }
        }
        if depth < 4 {
            for m in members.iter().filter(|m| m.name == 0) {
                if let Some(b) = self.find(m.ty, member, depth + 1) {
                    return Some(m.bits + b);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int`, `struct task_struct { int a; union { int x; int pid; }; int tgid; }`
    /// (the union anonymous, at byte 8), and a forward declaration.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0task_struct\0a\0x\0pid\0tgid\0".to_vec();
        let s = |n: &str| {
            let pos = strings
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n.as_bytes() && w[n.len() + 1] == 0)
                .unwrap();
            (pos + 1) as u32
        };
        let mut t = Vec::new();
        let mut put = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int (INT, 4 bytes)
        put(s("int"));
        put(1 << 24);
        put(4);
        put(32);
        // 2: anonymous union { int x; int pid; }
        put(0);
        put((UNION << 24) | 2);
        put(4);
        for n in ["x", "pid"] {
            put(s(n));
            put(1);
            put(0);
        }
        // 3: forward declaration of task_struct
        put(s("task_struct"));
        put(7 << 24);
        put(0);
        // 4: struct task_struct
        put(s("task_struct"));
        put((STRUCT << 24) | 3);
        put(16);
        put(s("a"));
        put(1);
        put(0);
        put(0);
        put(2);
        put(64);
        put(s("tgid"));
        put(1);
        put(96);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        let t = Types::parse(&blob()).unwrap();
        assert_eq!(t.offset_of("task_struct", "tgid"), Ok(12));
        assert_eq!(t.offset_of("task_struct", "pid"), Ok(8));
        assert_eq!(
            t.offset_of("task_struct", "comm"),
            Err(BtfError::NoMember("task_struct".into(), "comm".into()))
        );
        assert_eq!(
            t.offset_of("sock", "x"),
            Err(BtfError::NoStruct("sock".into()))
        );
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let b = blob();
        assert_eq!(Types::parse(&b[..10]).err(), Some(BtfError::Header));
        for cut in 24..b.len() {
            let _ = Types::parse(&b[..cut]);
        }
        let mut bad = b.clone();
        bad[24 + 4 + 3] = 0x1f; // kind 31
        assert!(Types::parse(&bad).is_err());
    }

    #[test]
    fn the_running_kernel_has_task_pids() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        let t = Types::parse(&data).unwrap();
        let pid = t.offset_of("task_struct", "pid").unwrap();
        let tgid = t.offset_of("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid_t pid; pid_t tgid; side by side");
    }
}
