//! Rate limits: the token bucket that meters each pod's registrations, and
//! logs that cannot flood. A hostile or broken pod can make the agent refuse
//! thousands of requests a second: every refusal is counted (see /metrics),
//! and at most `burst` of them per `window` are logged; the next line that
//! gets through says how many were held back.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// `rate` tokens per second, at most `rate` banked (a burst of one
/// second's worth); starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

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
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 10, "burst");
        // Half a second refills five; never more than one second's worth.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 5);
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 10);
    }

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
