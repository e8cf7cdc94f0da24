//! Holding closed spans until their trace is quiet, and releasing them:
//! linked, with wall-clock times, within the bound on held spans.
use super::{link::link, Assembler, Closed, Why};
use crate::{clock::WallClock, spans::SpanRecord};

impl Assembler {
    /// Closed spans waiting for their trace to go quiet.
    pub fn held_spans(&self) -> usize {
        self.held
    }

    /// Spans of traces that are complete (quiet for `settle`, and no span
    /// `awaited` by a captured head: see `Capture::awaits_span`) or held
    /// too long, linked and with wall-clock times.
    pub fn ready(
        &mut self,
        clock: &WallClock,
        now: u64,
        awaited: impl Fn(&[u8; 16]) -> bool,
    ) -> Vec<SpanRecord> {
        let (settle, hold) = (self.cfg.settle_ns, self.cfg.max_hold_ns);
        let due: Vec<[u8; 16]> = self
            .groups
            .iter()
            .filter(|(t, g)| {
                !g.closed.is_empty()
                    && ((g.open == 0 && now.saturating_sub(g.last_change) >= settle && !awaited(t))
                        || now.saturating_sub(g.first) >= hold)
            })
            .map(|(t, _)| *t)
            .collect();
        let releasing: usize = due.iter().map(|t| self.groups[t].closed.len()).sum();
        let mut over = (self.held - releasing).saturating_sub(self.cfg.max_held);
        // (trace, how many of its oldest spans; None = all)
        let mut take: Vec<([u8; 16], Option<usize>)> = due.into_iter().map(|t| (t, None)).collect();
        if over > 0 {
            // Over the bound: the oldest spans of the busiest traces go
            // first, just enough of them, so the fewest links are lost and
            // no burst floods the export queue.
            let chosen: std::collections::HashSet<_> = take.iter().map(|(t, _)| *t).collect();
            let mut rest: Vec<([u8; 16], usize)> = self
                .groups
                .iter()
                .filter(|(t, g)| !g.closed.is_empty() && !chosen.contains(*t))
                .map(|(t, g)| (*t, g.closed.len()))
                .collect();
            rest.sort_by_key(|e| std::cmp::Reverse(e.1));
            for (t, n) in rest {
                if over == 0 {
                    break;
                }
                let k = n.min(over);
                take.push((t, Some(k)));
                self.stats.released_early += k as u64;
                over -= k;
            }
        }
        let mut out = Vec::new();
        for (t, k) in take {
            let g = self.groups.get_mut(&t).expect("listed above");
            let mut spans: Vec<Closed> = match k {
                None => {
                    g.first = now;
                    std::mem::take(&mut g.closed)
                }
                Some(k) => g.closed.drain(..k).collect(),
            };
            self.held -= spans.len();
            if g.open == 0 && g.closed.is_empty() {
                self.groups.remove(&t);
            }
            link(&mut spans);
            for mut c in spans {
                c.record.start_unix_ns = clock.to_unix_ns(c.start);
                c.record.end_unix_ns = clock.to_unix_ns(c.end.max(c.start));
                out.push(c.record);
            }
        }
        self.stats.emitted += out.len() as u64;
        out
    }

    /// Closes everything (shutdown) and returns all spans.
    pub fn flush_all(&mut self, clock: &WallClock, now: u64) -> Vec<SpanRecord> {
        let keys: Vec<_> = self.open.keys().copied().collect();
        for k in keys {
            self.close(k, Why::Idle, now);
        }
        self.ready(clock, u64::MAX / 2, |_| false)
    }
}
