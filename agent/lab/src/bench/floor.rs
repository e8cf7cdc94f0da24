//! The datapath's floor: reference programs (`tagflow-lab-ebpf`,
//! `floor.rs`) that do only what any program placing and tagging a packet
//! must do, measured like `datapath`'s rows against the empty program in
//! the same run, on the same frame. They show what part of the ratio
//! targets this kernel and machine leave to a program's own work.
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{ProgramType, SchedClassifier},
    sys::{is_helper_supported, BpfHelper},
    Ebpf,
};

use super::{flow_key, median, ns_per_run, pin, v4, BenchError, Row};
use crate::{
    frames::{self, Frame},
    FLOOR_OBJECT,
};
use tagflow::netns;

/// One rung: its program, its row, whether it runs in the namespace the
/// gate knows, and the helper it needs that older kernels do not give TC.
struct Rung {
    prog: &'static str,
    name: &'static str,
    in_traced: bool,
    needs: Option<BpfHelper>,
}

const fn rung(prog: &'static str, name: &'static str) -> Rung {
    Rung {
        prog,
        name,
        in_traced: false,
        needs: None,
    }
}

const NETNS: Option<BpfHelper> = Some(BpfHelper::BPF_FUNC_get_netns_cookie);

const LADDER: [Rung; 11] = [
    rung("ref_empty", "empty program"),
    rung("ref_parse", "parse Ethernet, IPv4, TCP ports"),
    Rung {
        needs: NETNS,
        ..rung(
            "ref_gate",
            "parse + namespace helper + gate (array read), pod without traces",
        )
    },
    Rung {
        needs: NETNS,
        ..rung(
            "ref_gate_head",
            "the same + a look for a request head (4 payload bytes, helper read)",
        )
    },
    rung(
        "ref_flow48",
        "parse + one flow-cache hit, 48-byte key (tagflow's)",
    ),
    rung("ref_flow24", "parse + one flow-cache hit, 24-byte IPv4 key"),
    rung(
        "ref_cookie_tag",
        "socket cookie + one hit by it (8-byte key) + trace id to cb",
    ),
    Rung {
        needs: Some(BpfHelper::BPF_FUNC_sk_storage_get),
        ..rung(
            "ref_sk_storage",
            "socket-local storage slot (no hash table) + trace id to cb",
        )
    },
    Rung {
        in_traced: true,
        needs: NETNS,
        ..rung(
            "ref_tag48",
            "tagflow's design alone: parse, namespace, gate, flow-cache hit, trace id to cb",
        )
    },
    Rung {
        in_traced: true,
        needs: NETNS,
        ..rung(
            "ref_tag48_head",
            "the same + the look for a request head: tagging and capture, nothing else",
        )
    },
    Rung {
        in_traced: true,
        needs: NETNS,
        ..rung(
            "ref_tag48_account",
            "the same + (flow, trace) accounting: 2 atomic adds, flags, skb->tstamp",
        )
    },
];

/// Entries in each reference map besides the ones the runs insert, as in
/// `datapath`'s realistic fill.
const FILL: u32 = 1000;

pub fn floor(repeat: u32, rounds: usize) -> Result<Vec<Row>, BenchError> {
    let pinned = pin::Pinned::new();
    let mut obj = Ebpf::load(FLOOR_OBJECT)?;
    let quiet_pod = netns::anonymous()?;
    let traced_pod = netns::anonymous()?;
    let traced = netns::in_netns_file(&traced_pod, netns::current_cookie)??;
    fill(&mut obj, traced)?;

    let mut loaded = Vec::new();
    for r in &LADDER {
        if let Some(h) = r.needs {
            if !is_helper_supported(ProgramType::SchedClassifier, h).unwrap_or(false) {
                tracing::warn!(
                    "floor row {} skipped: this kernel's TC has no {h:?}",
                    r.prog
                );
                continue;
            }
        }
        let p: &mut SchedClassifier = obj
            .program_mut(r.prog)
            .ok_or_else(|| BenchError::Other(format!("{} missing", r.prog)))?
            .try_into()?;
        p.load()?;
        loaded.push(r);
    }

    let mut f = Frame::tcp(v4([10, 1, 0, 1]), 40000, v4([10, 2, 0, 1]), 80);
    f.payload = vec![b'x'; 100];
    let frame = f.build();
    let skb = frames::skb_ctx(1, 0, [0; 5]);
    let mut samples = vec![Vec::new(); loaded.len()];
    for round in 0..rounds.max(1) {
        for (i, r) in loaded.iter().enumerate() {
            let p: &SchedClassifier = obj
                .program(r.prog)
                .ok_or_else(|| BenchError::Other(format!("{} missing", r.prog)))?
                .try_into()?;
            let pod = if r.in_traced { &traced_pod } else { &quiet_pod };
            let before = sunk(&obj)?;
            samples[i].push(netns::in_netns_file(pod, || {
                ns_per_run(p, &frame, &skb, repeat)
            })??);
            // Each rung did its work (found its namespace, its entry, its
            // socket) rather than returning early: it added to the sink.
            if round == 0 && i > 0 && sunk(&obj)? == before {
                return Err(BenchError::Other(format!("{} found nothing", r.prog)));
            }
        }
    }

    let base = median(&mut samples[0].clone());
    let cpu = pinned
        .as_ref()
        .map(|p| format!(" on CPU {}", p.cpu))
        .unwrap_or_default();
    Ok(loaded
        .iter()
        .zip(samples.iter_mut())
        .enumerate()
        .map(|(i, (r, s))| {
            let spread = (
                s.iter().copied().fold(f64::INFINITY, f64::min),
                s.iter().copied().fold(0.0, f64::max),
            );
            let value = median(s);
            Row {
                scenario: format!(
                    "datapath floor (reference program, not tagflow): {}",
                    r.name
                ),
                metric: format!("time per packet (test_run){cpu}"),
                unit: "ns".into(),
                value,
                baseline: (i > 0).then_some(base),
                ratio: (i > 0).then_some(value / base),
                target: String::new(),
                spread,
            }
        })
        .collect())
}

/// What the reference programs added to `REF_SINK`, over all CPUs.
fn sunk(obj: &Ebpf) -> Result<u64, BenchError> {
    let sink: PerCpuArray<&MapData, u64> = obj
        .map("REF_SINK")
        .ok_or_else(|| BenchError::Other("REF_SINK missing".into()))?
        .try_into()?;
    Ok(sink
        .get(&0, 0)?
        .iter()
        .fold(0u64, |a, v| a.wrapping_add(*v)))
}

/// Other connections' entries in every reference map, and the traced
/// pod's namespace in the gate.
fn fill(obj: &mut Ebpf, traced: u64) -> Result<(), BenchError> {
    // Borrowed, not taken: the programs load after this and need the maps'
    // descriptors still open.
    fn map<'a>(obj: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, BenchError> {
        obj.map_mut(name)
            .ok_or_else(|| BenchError::Other(format!("{name} missing")))
    }
    for i in 0..FILL {
        let other = 1_000_000 + i as u64;
        let a = [10, 9, (i >> 8) as u8, i as u8];
        let mut f48: HashMap<_, agent_common::FlowKey, u64> = map(obj, "REF_FLOW48")?.try_into()?;
        f48.insert(flow_key(other, a, 30000, [10, 8, 0, 1], 80), 2, 0)?;
        let mut f24: HashMap<_, [u32; 6], u64> = map(obj, "REF_FLOW24")?.try_into()?;
        f24.insert([other as u32, 0, u32::from_ne_bytes(a), 1, 2, 6], 2, 0)?;
        let mut cookies: HashMap<_, u64, u64> = map(obj, "REF_COOKIE")?.try_into()?;
        cookies.insert((1 << 40) + i as u64, 2, 0)?;
    }
    let mut gate: Array<_, [u64; 2]> = map(obj, "REF_GATE")?.try_into()?;
    gate.set((traced as u32) & 1023, [traced, 1], 0)?;
    Ok(())
}
