//! Memos of what the compiled path gets for plaintext values at a cost worth saving: data-subject tokens
//! (Python strings), sanitized Kafka keys, and the masks and blind-index tokens it asks Python for (what it
//! computes itself is not memoised: `image::write_image`), bounded by entries and aged in two generations.
//!
//! Why two generations: a memo dropped whole at its limit loses its hot entries with the cold ones. On the
//! bench's realistic workload (Zipf over a million customers, docs/benchmark.md round 28 item 4) each busy
//! plan's memo, which then held every mask and token too, reached its 100,000-entry limit every 1.3-3.6 s:
//! the hot customers' entries were computed again after every clear, and a clear in the middle of a batch
//! dropped the subject tokens the batch's read-ahead had just computed, which the transform then computed
//! again. Measured (round 29): +1.4 points of hits, the same CPU; kept for what it guarantees.
//!
//! Here new entries go into the young generation. When the young generations of one owner (a plan, or a
//! topic's Kafka keys) hold half the limit between them, they all become the old ones and the old ones are
//! dropped (`Memo::age`); a lookup that finds its entry in the old generation moves it back into the young
//! one. So an entry used at least once per half-limit of new entries stays, and the entries held are still
//! at most the limit: half young, and an old generation no larger than that (it only loses entries).
//!
//! The keys are plaintext: `Memo::clear` (`FastPath.clear_memos`, called by
//! `Sanitizer.expire_value_caches`) drops both generations.

use std::borrow::Borrow;
use std::hash::Hash;

use foldhash::HashMap;

/// The longest string value (bytes) a memo keeps: the memos are bounded by entries, and a workload of long
/// distinct values (200-KB addresses) grew a worker by hundreds of MB a minute with whole values as keys.
/// Longer values are computed each time; they don't repeat often enough to be worth their memory. The same
/// bound as the Python path's (`guard.records.encoders.MEMO_MAX_CHARS`, counted there in characters).
pub const MEMO_MAX_BYTES: usize = 256;
/// The longest raw Kafka key a topic's memo of sanitized keys keeps (a schema-wrapped key is a few hundred
/// bytes); `guard.pipeline.protect.KEY_MEMO_MAX_BYTES` on the Python path.
pub const KEY_MEMO_MAX_BYTES: usize = 1024;

/// The young entries of one owner's memos, and the lookups they answered since the counts were last taken.
#[derive(Default)]
pub struct MemoBook {
    /// Entries in the young generations of the owner's memos (inserted or moved back since the last aging).
    young: usize,
    lookups: u64,
    hits: u64,
}

impl MemoBook {
    /// Whether the owner's memos must age before the next insert: their young generations hold half of
    /// `limit` (at least one entry).
    pub fn full(&self, limit: usize) -> bool {
        self.young >= (limit / 2).max(1)
    }

    /// Age the owner's memos when they are `full`: `age` ages every one of them (`Memo::age`), and the
    /// entries counted young start again from none.
    pub fn age_if_full(&mut self, limit: usize, age: impl FnOnce()) {
        if self.full(limit) {
            age();
            self.young = 0;
        }
    }

    /// The owner has cleared all its memos (`Memo::clear`): no young entries left.
    pub fn cleared(&mut self) {
        self.young = 0;
    }

    /// The lookups and hits since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        let counts = (self.lookups, self.hits);
        self.lookups = 0;
        self.hits = 0;
        counts
    }
}

/// One memo: two generations of `key → value`.
pub struct Memo<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self {
            young: HashMap::default(),
            old: HashMap::default(),
        }
    }
}

impl<K: Eq + Hash, V> Memo<K, V> {
    /// The value of `key`, counted in `book`: from the young generation, or moved there from the old one.
    pub fn get<Q>(&mut self, key: &Q, book: &mut MemoBook) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        book.lookups += 1;
        if !self.young.contains_key(key) {
            let (k, v) = self.old.remove_entry(key)?;
            self.young.insert(k, v);
            book.young += 1;
        }
        book.hits += 1;
        self.young.get(key)
    }

    /// Remember `value` for `key` in the young generation. The owner ages its memos first when its book is
    /// `full`.
    pub fn insert(&mut self, key: K, value: V, book: &mut MemoBook) {
        if self.young.insert(key, value).is_none() {
            book.young += 1;
        }
    }

    /// The young generation becomes the old one; the old one is dropped (its maps' capacity is kept).
    /// Called by the owner for each of its memos, through `MemoBook::age_if_full`.
    pub fn age(&mut self) {
        std::mem::swap(&mut self.young, &mut self.old);
        self.young.clear();
    }

    /// Forget every entry of both generations.
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    /// Entries held in both generations.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo() -> (Memo<String, u32>, MemoBook) {
        (Memo::default(), MemoBook::default())
    }

    #[test]
    fn an_entry_used_in_each_generation_survives_agings() {
        let (mut m, mut book) = memo();
        m.insert("hot".into(), 1, &mut book);
        for round in 0..5 {
            m.insert(format!("cold{round}"), 0, &mut book);
            m.age();
            book.young = 0;
            assert_eq!(m.get("hot", &mut book), Some(&1), "round {round}");
        }
        // Each cold entry lived for one aging, then went with its generation.
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("cold0", &mut book), None);
        assert_eq!(m.get("cold4", &mut book), Some(&0));
    }

    #[test]
    fn an_entry_not_used_for_two_agings_is_gone() {
        let (mut m, mut book) = memo();
        m.insert("k".into(), 7, &mut book);
        m.age();
        m.age();
        assert_eq!(m.get("k", &mut book), None);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn moving_an_entry_back_counts_it_young_and_counts_the_lookups() {
        let (mut m, mut book) = memo();
        m.insert("a".into(), 1, &mut book);
        m.insert("a".into(), 2, &mut book); // a replaced entry is not a new one
        assert_eq!(book.young, 1);
        m.age();
        book.young = 0;
        assert_eq!(m.get("a", &mut book), Some(&2));
        assert_eq!(book.young, 1);
        assert_eq!(m.get("a", &mut book), Some(&2));
        assert_eq!(book.young, 1);
        assert_eq!(m.get("b", &mut book), None);
        assert_eq!(book.take_counts(), (3, 2));
        assert_eq!(book.take_counts(), (0, 0));
    }

    #[test]
    fn full_at_half_the_limit_and_never_at_zero() {
        let mut book = MemoBook::default();
        book.young = 49;
        assert!(!book.full(100));
        book.young = 50;
        assert!(book.full(100));
        book.young = 0;
        assert!(!book.full(1));
        book.young = 1;
        assert!(book.full(1) && book.full(0));
    }

    #[test]
    fn clear_forgets_both_generations() {
        let (mut m, mut book) = memo();
        m.insert("a".into(), 1, &mut book);
        m.age();
        m.insert("b".into(), 2, &mut book);
        m.clear();
        assert_eq!(m.len(), 0);
        assert_eq!(m.get("a", &mut book), None);
    }
}
