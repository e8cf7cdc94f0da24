//! A map that forgets its oldest entries beyond a bound.
use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

use crate::trim::Trim;

/// Entries also leave by `remove`; their places in `order` then go stale
/// and are skipped. Each place carries the insertion it stands for, so a
/// key removed and inserted again is forgotten by its new place, not by
/// the old one still queued ahead of it.
pub(super) struct Bounded<K, V> {
    map: HashMap<K, (u64, V)>,
    order: VecDeque<(u64, K)>,
    next: u64,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V> Bounded<K, V> {
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap,
        }
    }

    /// Sets `k` (a key already there keeps its place); how many entries
    /// it forgot to make room.
    pub fn insert(&mut self, k: K, v: V) -> usize {
        if let Some(e) = self.map.get_mut(&k) {
            e.1 = v;
            return 0;
        }
        let seq = self.next;
        self.next += 1;
        self.map.insert(k, (seq, v));
        self.order.push_back((seq, k));
        let mut forgot = 0;
        while self.map.len() > self.cap {
            let Some((s, old)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.0 == s) {
                self.map.remove(&old);
                forgot += 1;
            }
        }
        // Stale places are dropped once they outnumber the live ones, so
        // the queue stays within about twice the map (amortised O(1)).
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(s, k)| map.get(k).is_some_and(|e| e.0 == *s));
        }
        forgot
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|e| &e.1)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k).map(|e| &mut e.1)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k).map(|e| e.1)
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// Gives back the memory a burst left unused.
    pub fn trim(&mut self) {
        self.map.trim();
        self.order.trim();
    }

    #[cfg(test)]
    fn places(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entries_are_forgotten_beyond_the_bound() {
        let mut b = Bounded::new(3);
        assert_eq!(b.insert(1, 'a') + b.insert(2, 'b') + b.insert(3, 'c'), 0);
        assert_eq!(b.insert(4, 'd'), 1);
        assert!(!b.contains_key(&1));
        assert_eq!(b.insert(2, 'B'), 0, "an update keeps its place");
        assert_eq!(b.insert(5, 'e'), 1);
        assert!(!b.contains_key(&2));
        assert_eq!(b.remove(&4), Some('d'));
        assert_eq!(b.get_mut(&5).copied(), Some('e'));
    }

    #[test]
    fn a_key_inserted_again_is_forgotten_by_its_new_place() {
        let mut b = Bounded::new(3);
        b.insert(1, 'a');
        b.insert(2, 'b');
        assert_eq!(b.remove(&1), Some('a'));
        b.insert(3, 'c');
        b.insert(1, 'A');
        // Full (2, 3, 1). The stale place of the first 1 is at the front:
        // the next insert must forget 2, the oldest live entry.
        assert_eq!(b.insert(4, 'd'), 1);
        assert!(!b.contains_key(&2));
        assert_eq!(b.get_mut(&1).copied(), Some('A'));
        assert_eq!(b.insert(5, 'e'), 1);
        assert!(!b.contains_key(&3) && b.contains_key(&1));
    }

    #[test]
    fn churn_of_removed_keys_keeps_the_queue_bounded() {
        let mut b = Bounded::new(1000);
        for i in 0..100_000u32 {
            b.insert(i, ());
            b.remove(&i);
            // At most twice the one live entry, plus the slack.
            assert!(b.places() <= 2 + 64, "{} places", b.places());
        }
        for i in 0..5000u32 {
            b.insert(i % 50, ());
            if i % 3 == 0 {
                b.remove(&(i % 50));
            }
        }
        assert!(b.places() <= 2 * 50 + 64);
    }
}
