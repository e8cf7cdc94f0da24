//! BOUND_PORTS (who listens on a port) is one node-wide LRU map, and the
//! bind hook records before the kernel checks the bind: a pod looping over
//! failing binds can evict every other pod's listeners. When the map runs
//! near full, the listeners are re-learnt from /proc (as at start-up), on
//! the blocking pool, at most every `PERIOD`.
use std::time::{Duration, Instant};

use agent_common::PortKey;
use tokio::sync::mpsc;

use crate::backfill;

/// Fill (of capacity) from which evictions are likely.
const PRESSURE: f64 = 0.9;
const PERIOD: Duration = Duration::from_secs(30);

pub struct Relearn {
    tx: mpsc::Sender<Vec<(PortKey, u32)>>,
    rx: mpsc::Receiver<Vec<(PortKey, u32)>>,
    last: Option<Instant>,
}

impl Relearn {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Self { tx, rx, last: None }
    }

    /// Starts a /proc scan if BOUND_PORTS (`maps`: name, fill, capacity)
    /// is under pressure and none ran lately. Returns whether one started.
    pub fn check(&mut self, maps: &[(String, u64, u64)]) -> bool {
        let pressed = maps.iter().any(|(m, n, c)| {
            m == agent_common::maps::BOUND_PORTS && *c > 0 && *n as f64 >= *c as f64 * PRESSURE
        });
        if !pressed || self.last.is_some_and(|t| t.elapsed() < PERIOD) {
            return false;
        }
        self.last = Some(Instant::now());
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.blocking_send(backfill::scan());
        });
        true
    }

    /// The next finished scan's listeners.
    pub async fn next(&mut self) -> Option<Vec<(PortKey, u32)>> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_map_is_relearnt_at_most_once_a_period() {
        let mut r = Relearn::new();
        let fill = |n| vec![(agent_common::maps::BOUND_PORTS.to_string(), n, 100)];
        assert!(!r.check(&fill(50)), "no pressure");
        assert!(r.check(&fill(95)));
        assert!(!r.check(&fill(100)), "once per period");
        // This process listens: the scan finds it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let owners = r.next().await.unwrap();
        assert!(owners
            .iter()
            .any(|(k, pid)| k.port == port && *pid == std::process::id()));
    }
}
