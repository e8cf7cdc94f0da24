//! The programs a pre-6.14 kernel loads must not use what it lacks: its
//! verifier would refuse them (6.1 is tested in a VM by `cargo xtask
//! test`; 5.15 is claimed by design and held here). Read from the very
//! object the agent embeds.
use object::{Object, ObjectSection, ObjectSymbol};

/// `__sk_buff.tstamp_type` (Linux 5.18).
const SKB_TSTAMP_TYPE: i16 = 180;
const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;

/// The instructions of program `name`: (opcode, src_reg, off, imm).
fn program(name: &str) -> Vec<(u8, u8, i16, i32)> {
    let obj = object::File::parse(tagflow::loader::TAGFLOW_OBJECT).expect("the eBPF object");
    let sym = obj
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} in the object"));
    let section = obj
        .section_by_index(sym.section_index().expect("a section"))
        .unwrap();
    let data = section.data().unwrap();
    let start = (sym.address() - section.address()) as usize;
    let code = &data[start..start + sym.size() as usize];
    assert!(
        !code.is_empty() && code.len() % 8 == 0,
        "{name}: {} bytes",
        code.len()
    );
    code.chunks(8)
        .map(|i| {
            (
                i[0],
                i[1] >> 4,
                i16::from_le_bytes([i[2], i[3]]),
                i32::from_le_bytes([i[4], i[5], i[6], i[7]]),
            )
        })
        .collect()
}

fn reads_ctx_at(insns: &[(u8, u8, i16, i32)], off: i16) -> usize {
    // BPF_LDX | BPF_MEM | BPF_B: the only load of a u8 field.
    insns.iter().filter(|i| i.0 == 0x71 && i.2 == off).count()
}

fn calls_helper(insns: &[(u8, u8, i16, i32)], id: i32) -> usize {
    // BPF_JMP | BPF_CALL with src_reg 0: a helper call.
    insns
        .iter()
        .filter(|i| i.0 == 0x85 && i.1 == 0 && i.3 == id)
        .count()
}

#[test]
fn the_variant_for_older_kernels_reads_no_newer_skb_field_and_calls_no_newer_helper() {
    for name in ["tagflow_ingress_ifns", "tagflow_uplink"] {
        let p = program(name);
        assert_eq!(
            reads_ctx_at(&p, SKB_TSTAMP_TYPE),
            0,
            "{name} reads tstamp_type"
        );
        assert_eq!(
            calls_helper(&p, BPF_FUNC_GET_NETNS_COOKIE),
            0,
            "{name} calls bpf_get_netns_cookie"
        );
    }
}

#[test]
fn the_check_sees_what_the_newer_variant_uses() {
    // Else the test above would pass on a misread object.
    let p = program("tagflow_ingress");
    assert!(reads_ctx_at(&p, SKB_TSTAMP_TYPE) > 0);
    assert!(calls_helper(&p, BPF_FUNC_GET_NETNS_COOKIE) > 0);
}
