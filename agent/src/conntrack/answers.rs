//! Conntrack's answers, cached per connection, oldest first. An entry is
//! its key and one word: under churn the cache sits at its bound (the
//! soak: 16 384 buckets), and with a `Translation` and an `Instant` in
//! every entry each took 120 bytes of table instead of 56. A translated
//! answer's other key lives apart, in `via`: few connections have one.
use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use agent_common::FlowKey;

use super::Translation;
use crate::trim::Trim;

const DIRECT: u64 = 0;
const UNKNOWN: u64 = 1;
const VIA: u64 = 2;
const KIND_SHIFT: u32 = 62;
const UNTIL_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// What was answered (top two bits) and until when it holds (the rest:
/// milliseconds since the cache began). The one writer is `Entry::new`.
#[derive(Clone, Copy)]
struct Entry(u64);

impl Entry {
    fn new(kind: u64, until_ms: u64) -> Self {
        Self(kind << KIND_SHIFT | until_ms.min(UNTIL_MASK))
    }

    fn kind(self) -> u64 {
        self.0 >> KIND_SHIFT
    }

    fn until_ms(self) -> u64 {
        self.0 & UNTIL_MASK
    }
}

pub(super) struct Answers {
    began: Instant,
    map: HashMap<FlowKey, Entry>,
    via: HashMap<FlowKey, FlowKey>,
    /// Keys in insertion order: `trim` and the bound drop the oldest.
    order: VecDeque<FlowKey>,
    cap: usize,
}

impl Answers {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            began: Instant::now(),
            map: HashMap::new(),
            via: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// How many answers are kept at most (0: none, lookups are off).
    pub(super) fn cap(&self) -> usize {
        self.cap
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.began).as_millis() as u64
    }

    /// The answer for `key`, if one holds at `now`.
    pub(super) fn get(&self, key: &FlowKey, now: Instant) -> Option<Translation> {
        let e = self.map.get(key)?;
        if self.ms(now) >= e.until_ms() {
            return None;
        }
        Some(match e.kind() {
            VIA => Translation::Via(*self.via.get(key)?),
            UNKNOWN => Translation::Unknown,
            _ => Translation::Direct,
        })
    }

    /// Keeps `answer` for `ttl`; past the bound, the oldest answers go.
    pub(super) fn insert(
        &mut self,
        key: FlowKey,
        answer: Translation,
        now: Instant,
        ttl: Duration,
    ) {
        let kind = match answer {
            Translation::Via(v) => {
                self.via.insert(key, v);
                VIA
            }
            Translation::Direct => DIRECT,
            Translation::Unknown => UNKNOWN,
        };
        if kind != VIA {
            self.via.remove(&key);
        }
        if self
            .map
            .insert(key, Entry::new(kind, self.ms(now + ttl)))
            .is_none()
        {
            self.order.push_back(key);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.remove(&old);
                }
            }
        }
    }

    /// Ends a cached `Unknown` now (so it is asked again); true if there
    /// was one. The key keeps its place in the order.
    pub(super) fn expire_unknown(&mut self, key: &FlowKey, now: Instant) -> bool {
        let now_ms = self.ms(now);
        match self.map.get_mut(key) {
            Some(e) if e.kind() == UNKNOWN => {
                *e = Entry::new(UNKNOWN, now_ms);
                true
            }
            _ => false,
        }
    }

    /// Forgets answers past their time, oldest first, and gives back the
    /// table memory they held.
    pub(super) fn trim(&mut self, now: Instant) {
        let now_ms = self.ms(now);
        while let Some(k) = self.order.front() {
            match self.map.get(k) {
                // Still good: those behind it wait (answers live 1 s or
                // 30 s, so some may be past their time; `cap` bounds them).
                Some(e) if now_ms < e.until_ms() => break,
                _ => {
                    let k = *k;
                    self.remove(&k);
                    self.order.pop_front();
                }
            }
        }
        self.map.trim();
        self.via.trim();
        self.order.trim();
    }

    fn remove(&mut self, key: &FlowKey) {
        if let Some(e) = self.map.remove(key) {
            if e.kind() == VIA {
                self.via.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize, usize) {
        (self.map.len(), self.via.len(), self.order.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::PROTO_TCP;

    fn conn(port: u16) -> FlowKey {
        FlowKey::new(
            7,
            PROTO_TCP,
            ([10, 1, 0, 2], port).into(),
            ([10, 96, 0, 10], 80).into(),
        )
    }

    #[test]
    fn each_answer_reads_back_until_its_time() {
        let mut a = Answers::new(16);
        let t0 = a.began;
        let pod = conn(9);
        a.insert(conn(3), Translation::Unknown, t0, Duration::from_secs(1));
        a.insert(conn(1), Translation::Via(pod), t0, Duration::from_secs(30));
        a.insert(conn(2), Translation::Direct, t0, Duration::from_secs(30));
        let soon = t0 + Duration::from_millis(500);
        assert_eq!(a.get(&conn(1), soon), Some(Translation::Via(pod)));
        assert_eq!(a.get(&conn(2), soon), Some(Translation::Direct));
        assert_eq!(a.get(&conn(3), soon), Some(Translation::Unknown));
        assert_eq!(a.get(&conn(4), soon), None);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(a.get(&conn(3), later), None, "past its second");
        assert_eq!(a.get(&conn(1), later), Some(Translation::Via(pod)));
        a.trim(later);
        assert_eq!(a.len(), (2, 1, 2));
        a.trim(t0 + Duration::from_secs(31));
        assert_eq!(a.len(), (0, 0, 0));
    }

    #[test]
    fn a_translation_answered_again_drops_its_other_key() {
        let mut a = Answers::new(16);
        let t0 = a.began;
        a.insert(
            conn(1),
            Translation::Via(conn(9)),
            t0,
            Duration::from_secs(30),
        );
        a.insert(conn(1), Translation::Direct, t0, Duration::from_secs(30));
        assert_eq!(a.get(&conn(1), t0), Some(Translation::Direct));
        assert_eq!(a.len(), (1, 0, 1));
    }

    #[test]
    fn past_the_bound_the_oldest_go_with_their_translations() {
        let mut a = Answers::new(3);
        let t0 = a.began;
        for p in 0..5 {
            a.insert(
                conn(p),
                Translation::Via(conn(100 + p)),
                t0,
                Duration::from_secs(30),
            );
        }
        assert_eq!(a.len(), (3, 3, 3));
        assert_eq!(a.get(&conn(1), t0), None);
        assert_eq!(a.get(&conn(2), t0), Some(Translation::Via(conn(102))));
    }

    #[test]
    fn only_an_unknown_is_expired_for_asking_again() {
        let mut a = Answers::new(16);
        let t0 = a.began;
        let t1 = t0 + Duration::from_millis(10);
        a.insert(conn(1), Translation::Unknown, t0, Duration::from_secs(1));
        a.insert(conn(2), Translation::Direct, t0, Duration::from_secs(30));
        assert!(a.expire_unknown(&conn(1), t1));
        assert!(!a.expire_unknown(&conn(2), t1));
        assert!(!a.expire_unknown(&conn(3), t1));
        assert_eq!(a.get(&conn(1), t1), None);
        assert_eq!(a.get(&conn(2), t1), Some(Translation::Direct));
        assert_eq!(a.len().2, 2, "the key keeps its place");
    }

    #[test]
    fn an_entry_is_its_key_and_one_word() {
        assert_eq!(std::mem::size_of::<(FlowKey, Entry)>(), 56);
    }
}
