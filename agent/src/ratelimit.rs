//! Logs that cannot flood. A hostile or broken pod can make the agent
//! refuse thousands of requests a second: every refusal is counted (see
//! /metrics), and at most `burst` of them per `window` are logged; the next
//! line that gets through says how many were held back.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

pub struct LogLimit {
    window: Duration,
    burst: u32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    start: Option<Instant>,
    used: u32,
    held: u64,
}

impl LogLimit {
    pub const fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            state: Mutex::new(State {
                start: None,
                used: 0,
                held: 0,
            }),
        }
    }

    /// Some(lines held back since the last one logged) when this line may
    /// be logged; None when it must be dropped (it is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.start
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window)
        {
            s.start = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.held))
        } else {
            s.held += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_burst_lines_per_window_and_the_next_reports_the_rest() {
        let l = LogLimit::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let logged: Vec<_> = (0..1000).filter_map(|_| l.allow_at(t0)).collect();
        assert_eq!(logged, vec![0, 0, 0]);
        // Still the same window: nothing.
        assert_eq!(l.allow_at(t0 + Duration::from_secs(9)), None);
        // Next window: the first line reports the 998 held back.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.allow_at(t1), Some(998));
        assert_eq!(l.allow_at(t1), Some(0));
    }
}
