//! The 10-s map walks (FLOW_STATS / CAPTURE_SKIP collection, fill counts)
//! on a thread of their own: on the event loop a walk of a busy node's
//! maps stalled the ring buffer's reader long enough for it to overflow.
use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc as tokio_mpsc;

use crate::{clock::monotonic_ns, loader::Housekeeper};

/// How often the maps are walked.
const PERIOD: Duration = Duration::from_secs(10);
/// FLOW_STATS entries without a packet for this long are deleted ("no
/// trace" entries sooner: remaking one costs one slow-path lookup).
const FLOW_GC_NS: u64 = 60_000_000_000;
const NEGATIVE_GC_NS: u64 = 10_000_000_000;

/// One round of walks.
pub struct Report {
    /// FLOW_STATS and CAPTURE_SKIP entries deleted.
    pub flows_collected: u64,
    pub skips_collected: u64,
    /// (map, entries, capacity).
    pub maps: Vec<(String, u64, u64)>,
    /// How long the round took.
    pub took: Duration,
}

/// The walking thread. Dropping this stops it (within one round) and
/// waits for it.
pub struct Walks {
    pub reports: tokio_mpsc::Receiver<Report>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Walks {
    /// Starts the walks: a round every `PERIOD`, its report on `reports`.
    pub fn start(mut keeper: Housekeeper) -> std::io::Result<Self> {
        let (tx, reports) = tokio_mpsc::channel(1);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("tagflow-maps".into())
            .spawn(move || {
                // The stop side closing ends the wait at once.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PERIOD) {
                    let start = Instant::now();
                    let (flows, skips) = keeper.gc(monotonic_ns(), FLOW_GC_NS, NEGATIVE_GC_NS);
                    let report = Report {
                        flows_collected: flows,
                        skips_collected: skips,
                        maps: keeper.map_fill(),
                        took: start.elapsed(),
                    };
                    if tx.blocking_send(report).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            reports,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Walks {
    fn drop(&mut self) {
        self.stop.take();
        self.reports.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
