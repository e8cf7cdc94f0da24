//! The agent's clocks. `bpf_ktime_get_ns` (and TCP's skb timestamps) are CLOCK_MONOTONIC; spans
//! need wall time. The offset between the clocks is measured at start-up
//! and re-measured periodically (NTP slews the realtime clock).
use std::time::{Duration, Instant};

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    offset_ns: i128,
    measured: Instant,
}

impl WallClock {
    pub fn measure() -> Self {
        // Bracket the realtime read with two monotonic reads: the midpoint
        // halves the error of a preemption between them.
        let m1 = now_ns(libc::CLOCK_MONOTONIC);
        let r = now_ns(libc::CLOCK_REALTIME);
        let m2 = now_ns(libc::CLOCK_MONOTONIC);
        Self::with_offset(r - (m1 + m2) / 2)
    }

    pub fn with_offset(offset_ns: i128) -> Self {
        Self {
            offset_ns,
            measured: Instant::now(),
        }
    }

    /// Re-measures when the last measurement is older than `every`.
    pub fn refresh(&mut self, every: Duration) {
        if self.measured.elapsed() >= every {
            *self = Self::measure();
        }
    }

    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, the datapath's
/// time stamps and the trace entries' `updated_ns`.
pub fn monotonic_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_the_offset_and_matches_the_system_clock() {
        let c = WallClock::with_offset(1_000);
        assert_eq!(c.to_unix_ns(5), 1_005);
        assert_eq!(
            WallClock::with_offset(-10).to_unix_ns(5),
            0,
            "never negative"
        );
        let m = WallClock::measure();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let conv = m.to_unix_ns(monotonic_ns()) as i128;
        assert!(
            (conv - wall).abs() < 50_000_000,
            "within 50 ms of the system clock"
        );
    }
}
