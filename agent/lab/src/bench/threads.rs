//! The receive-path hook (`tagflow_recv`, issue 13) per call, against an
//! empty program of the same type on the same tracepoint, both attached at
//! once and timed by the kernel (`BPF_ENABLE_STATS`): every read of a TCP
//! ping-pong on loopback runs both. Steady state: the reading thread reads
//! the same accepted connection again and again (a lookup of the socket's
//! connection, one of the thread's entry, no write).
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use aya::{
    programs::BtfTracePoint,
    sys::{enable_stats, Stats},
    Btf, Ebpf,
};

use super::{median, BenchError, Row};
use crate::TESTPROGS_OBJECT;
use tagflow::{config::AgentConfig, loader::Datapath};

/// `round_trips` 64-byte ping-pongs per round, `rounds` rounds.
pub fn recv_hook(round_trips: usize, rounds: usize) -> Result<Vec<Row>, BenchError> {
    let _stats = enable_stats(Stats::RunTime).map_err(|e| BenchError::Other(e.to_string()))?;
    let dp = Datapath::load(&AgentConfig::scratch(), true)?;
    if !dp.thread_hooks.contains(&agent_common::programs::RECV) {
        return Err(BenchError::Other(
            "the kernel refused the thread hooks (see the agent's warning)".into(),
        ));
    }
    let mut test = Ebpf::load(TESTPROGS_OBJECT)?;
    let btf = Btf::from_sys_fs().map_err(|e| BenchError::Other(e.to_string()))?;
    let empty: &mut BtfTracePoint = test
        .program_mut("tagflow_empty_recv")
        .ok_or_else(|| BenchError::Other("tagflow_empty_recv missing".into()))?
        .try_into()?;
    empty.load("tcp_rcv_space_adjust", &btf)?;
    empty.attach()?;

    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 64];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(_) => return Ok(()),
            }
        }
    });
    let mut c = TcpStream::connect(addr).map_err(io)?;
    c.set_nodelay(true).map_err(io)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let per_call = |i: &aya::programs::ProgramInfo| (i.run_time().as_nanos() as f64, i.run_count());
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut buf = [7u8; 64];
    for _ in 0..rounds {
        let o0 = per_call(&dp.program_info(agent_common::programs::RECV)?);
        let e0 = per_call(&empty.info()?);
        for _ in 0..round_trips {
            c.write_all(&buf).map_err(io)?;
            c.read_exact(&mut buf).map_err(io)?;
        }
        let o1 = per_call(&dp.program_info(agent_common::programs::RECV)?);
        let e1 = per_call(&empty.info()?);
        let calls = (o1.1 - o0.1).max(1) as f64;
        ours.push((o1.0 - o0.0) / calls);
        base.push((e1.0 - e0.0) / (e1.1 - e0.1).max(1) as f64);
    }
    drop(c);
    let _ = echo.join();
    let spread = |v: &[f64]| {
        (
            v.iter().cloned().fold(f64::MAX, f64::min),
            v.iter().cloned().fold(0.0, f64::max),
        )
    };
    let (so, sb) = (spread(&ours), spread(&base));
    let (o, b) = (median(&mut ours), median(&mut base));
    Ok(vec![
        Row {
            scenario: "receive-path hook: empty tp_btf program — time per call (bpf_stats)".into(),
            metric: "ns per call".into(),
            unit: "ns".into(),
            value: b,
            baseline: None,
            ratio: None,
            target: "".into(),
            spread: sb,
        },
        Row {
            scenario: "receive-path hook: tagflow_recv, a thread reading its connection — time per call (bpf_stats)".into(),
            metric: "ns per call".into(),
            unit: "ns".into(),
            value: o,
            baseline: Some(b),
            ratio: Some(o / b.max(1.0)),
            target: "".into(),
            spread: so,
        },
    ])
}

fn io(e: std::io::Error) -> BenchError {
    BenchError::Other(e.to_string())
}
