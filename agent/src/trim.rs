//! Giving back what a burst made a table grow to. Hash tables and queues
//! keep their largest capacity; the agent's bounded tables would otherwise
//! hold memory sized by their busiest moment for good (under the soak,
//! megabytes of tables a tenth full).
use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{BuildHasher, Hash},
};

/// Below this capacity a table is left alone: small tables cost little and
/// would only rehash back and forth.
const MIN_CAPACITY: usize = 1024;

/// Shrinks a collection that uses less than a quarter of its capacity to
/// twice what it holds: amortised, since it must grow fourfold again
/// before the next shrink.
pub trait Trim {
    fn trim(&mut self);
}

fn oversized(len: usize, capacity: usize) -> bool {
    capacity > MIN_CAPACITY && len.saturating_mul(4) < capacity
}

impl<K: Eq + Hash, V, S: BuildHasher> Trim for HashMap<K, V, S> {
    fn trim(&mut self) {
        if oversized(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<K: Eq + Hash, S: BuildHasher> Trim for HashSet<K, S> {
    fn trim(&mut self) {
        if oversized(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<T> Trim for VecDeque<T> {
    fn trim(&mut self) {
        if oversized(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_a_burst_grew_gives_memory_back_once_mostly_empty() {
        let mut m: HashMap<u32, u64> = (0..100_000).map(|i| (i, 0)).collect();
        let grown = m.capacity();
        m.retain(|k, _| *k < 10_000);
        m.trim();
        assert!(m.capacity() <= grown / 4, "{} of {grown}", m.capacity());
        assert!(m.capacity() >= 10_000);
        assert_eq!(m.len(), 10_000, "nothing lost");
        assert!((0..10_000).all(|k| m.contains_key(&k)));
    }

    #[test]
    fn a_table_in_use_or_small_is_left_alone() {
        let mut m: HashMap<u32, u64> = (0..100_000).map(|i| (i, 0)).collect();
        m.retain(|k, _| *k < 40_000);
        // (Removal leaves tombstones that `capacity` does not count.)
        let before = m.capacity();
        m.trim();
        assert_eq!(m.capacity(), before, "more than a quarter used");
        let mut q: VecDeque<u8> = VecDeque::with_capacity(MIN_CAPACITY);
        q.push_back(1);
        q.trim();
        assert!(q.capacity() >= MIN_CAPACITY, "small: not worth a rehash");
        let mut q: VecDeque<u32> = (0..50_000).collect();
        q.drain(..49_000);
        q.trim();
        assert!(q.capacity() < 50_000 / 4);
        assert_eq!(q.front(), Some(&49_000));
        let mut s: HashSet<u32> = (0..50_000).collect();
        s.retain(|k| *k < 100);
        s.trim();
        assert!(s.capacity() <= MIN_CAPACITY * 2 && s.contains(&99));
    }
}
