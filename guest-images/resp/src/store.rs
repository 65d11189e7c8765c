//! The keyspace: string keys to string values, with optional deadlines on the guest clock.
//!
//! Ordered maps only (`BTreeMap`/`BTreeSet`): iteration order, and so every reply and every
//! eviction, depends on the keys alone, never on a hash seed, as lockstep replay requires.
//!
//! Expiry is lazy, as in Redis: a key past its deadline is removed when a command touches it.
//! A second index, ordered by deadline, lets [`Store::sweep`] and the commands that count keys
//! (DBSIZE, KEYS, INFO) remove every expired key without scanning the live ones.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::limits::{ENTRY_OVERHEAD, EXPIRY_OVERHEAD};

/// A guest-clock instant in nanoseconds (the clock device's reading).
pub(crate) type Nanos = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    /// Removed once the clock reads this or later.
    expires_at: Option<Nanos>,
}

/// Counters reported by INFO.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    pub(crate) commands_processed: u64,
    pub(crate) expired_keys: u64,
    pub(crate) keyspace_hits: u64,
    pub(crate) keyspace_misses: u64,
    pub(crate) connections_received: u64,
}

/// The keyspace of the kvstore guest (Redis database 0; there is no other).
///
/// Memory is accounted per entry as key + value + [`ENTRY_OVERHEAD`] (plus key +
/// [`EXPIRY_OVERHEAD`] for an entry with a deadline, for its place in the deadline index).
/// Commands that can grow the store are refused with `-OOM` when the growth they could cause
/// would take [`Store::used_bytes`] past the limit, so the accounted usage never exceeds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Entry>,
    /// (deadline, key) for every entry with a deadline.
    expiries: BTreeSet<(Nanos, Vec<u8>)>,
    used: usize,
    limit: usize,
    next_client_id: u64,
    connected_clients: usize,
    pub(crate) stats: Stats,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store with no memory limit. A guest should use [`Store::with_limit`].
    pub fn new() -> Self {
        Self::with_limit(usize::MAX)
    }

    /// An empty store that refuses writes (`-OOM`) which could take [`Store::used_bytes`]
    /// past `limit_bytes`.
    pub fn with_limit(limit_bytes: usize) -> Self {
        Self {
            map: BTreeMap::new(),
            expiries: BTreeSet::new(),
            used: 0,
            limit: limit_bytes,
            next_client_id: 1,
            connected_clients: 0,
            stats: Stats::default(),
        }
    }

    /// Accounted bytes held by keys, values and deadlines (see the type's documentation).
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// The limit given to [`Store::with_limit`] (`usize::MAX` for [`Store::new`]).
    pub fn limit_bytes(&self) -> usize {
        self.limit
    }

    /// Records how many client connections the guest has open, for INFO's
    /// `connected_clients` (the engine does not see connections open or close).
    pub fn set_connected_clients(&mut self, n: usize) {
        self.connected_clients = n;
    }

    /// The count last given to [`Store::set_connected_clients`].
    pub fn connected_clients(&self) -> usize {
        self.connected_clients
    }

    /// Keys held, including expired ones not yet removed.
    pub fn stored_keys(&self) -> usize {
        self.map.len()
    }

    /// Removes up to `budget` keys whose deadline is at or before `now_ns`, earliest first;
    /// returns how many it removed. The guest may call it from its poll loop to reclaim
    /// memory of keys nobody touches; correctness never depends on it.
    pub fn sweep(&mut self, now_ns: u64, budget: usize) -> usize {
        let mut removed = 0usize;
        while removed < budget {
            let Some((deadline, key)) = self.expiries.first() else {
                break;
            };
            if *deadline > now_ns {
                break;
            }
            let key = key.clone();
            self.remove(&key);
            self.stats.expired_keys = self.stats.expired_keys.saturating_add(1);
            removed = removed.saturating_add(1);
        }
        removed
    }

    /// Removes every expired key (before counting or listing keys).
    pub(crate) fn purge_expired(&mut self, now: Nanos) {
        self.sweep(now, usize::MAX);
    }

    /// Hands out client ids 1, 2, 3... in the order connections first send something.
    pub(crate) fn next_client_id(&mut self) -> u64 {
        let id = self.next_client_id;
        self.next_client_id = self.next_client_id.saturating_add(1);
        self.stats.connections_received = self.stats.connections_received.saturating_add(1);
        id
    }

    /// Whether a command that could grow the store by up to `growth` bytes must be refused.
    pub(crate) fn would_exceed(&self, growth: usize) -> bool {
        self.used.checked_add(growth).is_none_or(|total| total > self.limit)
    }

    fn cost(key: &[u8], entry: &Entry) -> usize {
        let base = key.len().saturating_add(entry.value.len()).saturating_add(ENTRY_OVERHEAD);
        match entry.expires_at {
            Some(_) => base.saturating_add(key.len()).saturating_add(EXPIRY_OVERHEAD),
            None => base,
        }
    }

    /// Removes `key` if its deadline has passed; true if it did.
    fn expire_if_due(&mut self, key: &[u8], now: Nanos) -> bool {
        let due = matches!(self.map.get(key), Some(Entry { expires_at: Some(t), .. }) if *t <= now);
        if due {
            self.remove(key);
            self.stats.expired_keys = self.stats.expired_keys.saturating_add(1);
        }
        due
    }

    /// The live value of `key`.
    pub(crate) fn get(&mut self, key: &[u8], now: Nanos) -> Option<&[u8]> {
        self.expire_if_due(key, now);
        self.map.get(key).map(|e| e.value.as_slice())
    }

    /// Like [`Store::get`], counting a keyspace hit or miss (GET, MGET, GETSET...).
    pub(crate) fn lookup_read(&mut self, key: &[u8], now: Nanos) -> Option<&[u8]> {
        self.expire_if_due(key, now);
        match self.map.get(key) {
            Some(e) => {
                self.stats.keyspace_hits = self.stats.keyspace_hits.saturating_add(1);
                Some(e.value.as_slice())
            }
            None => {
                self.stats.keyspace_misses = self.stats.keyspace_misses.saturating_add(1);
                None
            }
        }
    }

    /// Whether `key` is live.
    pub(crate) fn contains(&mut self, key: &[u8], now: Nanos) -> bool {
        self.expire_if_due(key, now);
        self.map.contains_key(key)
    }

    /// The deadline of a live key: `None` if the key does not exist, `Some(None)` if it has
    /// no deadline.
    pub(crate) fn deadline(&mut self, key: &[u8], now: Nanos) -> Option<Option<Nanos>> {
        self.expire_if_due(key, now);
        self.map.get(key).map(|e| e.expires_at)
    }

    /// Removes `key` (live or not); true if it was present.
    pub(crate) fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove_entry(key) {
            Some((k, entry)) => {
                self.used = self.used.saturating_sub(Self::cost(&k, &entry));
                if let Some(t) = entry.expires_at {
                    self.expiries.remove(&(t, k));
                }
                true
            }
            None => false,
        }
    }

    /// Sets `key` to `value` with `expires_at`, replacing any previous entry (and its
    /// deadline). Callers that keep the deadline pass the old one.
    pub(crate) fn insert(&mut self, key: &[u8], value: Vec<u8>, expires_at: Option<Nanos>) {
        self.remove(key);
        let entry = Entry { value, expires_at };
        self.used = self.used.saturating_add(Self::cost(key, &entry));
        if let Some(t) = expires_at {
            self.expiries.insert((t, key.to_vec()));
        }
        self.map.insert(key.to_vec(), entry);
    }

    /// Replaces the value of a live key, keeping its deadline (INCR, APPEND); creates the
    /// key without a deadline if it does not exist.
    pub(crate) fn update_value(&mut self, key: &[u8], value: Vec<u8>, now: Nanos) {
        let deadline = self.deadline(key, now).flatten();
        self.insert(key, value, deadline);
    }

    /// Sets or clears the deadline of an existing key; false if the key does not exist.
    pub(crate) fn set_deadline(&mut self, key: &[u8], deadline: Option<Nanos>) -> bool {
        let Some((k, entry)) = self.map.remove_entry(key) else {
            return false;
        };
        self.used = self.used.saturating_sub(Self::cost(&k, &entry));
        if let Some(t) = entry.expires_at {
            self.expiries.remove(&(t, k.clone()));
        }
        self.insert(&k, entry.value, deadline);
        true
    }

    /// Removes every key.
    pub(crate) fn flush(&mut self) {
        self.map.clear();
        self.expiries.clear();
        self.used = 0;
    }

    /// Live keys (after [`Store::purge_expired`]).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.map.keys().map(Vec::as_slice)
    }

    /// Keys with a deadline (after [`Store::purge_expired`]).
    pub(crate) fn keys_with_deadline(&self) -> usize {
        self.expiries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    impl Store {
        /// The accounted bytes and the deadline index agree with the map.
        fn assert_consistent(&self) {
            let used: usize = self.map.iter().map(|(k, e)| Store::cost(k, e)).sum();
            assert_eq!(self.used, used);
            let deadlines: BTreeSet<(Nanos, Vec<u8>)> =
                self.map.iter().filter_map(|(k, e)| e.expires_at.map(|t| (t, k.clone()))).collect();
            assert_eq!(self.expiries, deadlines);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, Vec<u8>, Option<u64>),
        Update(u8, Vec<u8>),
        Remove(u8),
        SetDeadline(u8, Option<u64>),
        Get(u8),
        Sweep(usize),
        Purge,
        Flush,
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let deadline = proptest::option::of(0u64..200);
        prop_oneof![
            (0u8..8, proptest::collection::vec(any::<u8>(), 0..8), deadline.clone())
                .prop_map(|(k, v, d)| Op::Insert(k, v, d)),
            (0u8..8, proptest::collection::vec(any::<u8>(), 0..8)).prop_map(|(k, v)| Op::Update(k, v)),
            (0u8..8).prop_map(Op::Remove),
            (0u8..8, deadline).prop_map(|(k, d)| Op::SetDeadline(k, d)),
            (0u8..8).prop_map(Op::Get),
            (0usize..4).prop_map(Op::Sweep),
            Just(Op::Purge),
            Just(Op::Flush),
            (0u64..50).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #[test]
        fn accounting_and_index_stay_consistent(ops in proptest::collection::vec(op(), 0..60)) {
            let mut s = Store::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(k, v, d) => s.insert(&[k], v, d),
                    Op::Update(k, v) => s.update_value(&[k], v, now),
                    Op::Remove(k) => { s.remove(&[k]); }
                    Op::SetDeadline(k, d) => { s.set_deadline(&[k], d); }
                    Op::Get(k) => {
                        let live = s.get(&[k], now).is_some();
                        prop_assert_eq!(live, s.map.contains_key([k].as_slice()));
                    }
                    Op::Sweep(n) => { s.sweep(now, n); }
                    Op::Purge => {
                        s.purge_expired(now);
                        prop_assert!(s.expiries.first().is_none_or(|(t, _)| *t > now));
                    }
                    Op::Flush => s.flush(),
                    Op::Tick(d) => now += d,
                }
                s.assert_consistent();
            }
        }
    }

    #[test]
    fn accounting_returns_to_zero() {
        let mut s = Store::new();
        s.insert(b"a", vec![1, 2, 3], None);
        s.insert(b"b", vec![1], Some(10));
        assert_eq!(s.used_bytes(), (1 + 3 + ENTRY_OVERHEAD) + (1 + 1 + ENTRY_OVERHEAD + 1 + EXPIRY_OVERHEAD));
        s.set_deadline(b"a", Some(5));
        s.set_deadline(b"b", None);
        s.insert(b"a", vec![], None);
        assert!(s.remove(b"a"));
        assert!(s.remove(b"b"));
        assert_eq!(s.used_bytes(), 0);
        assert!(s.expiries.is_empty());
    }

    #[test]
    fn sweep_respects_budget_and_order() {
        let mut s = Store::new();
        for (i, t) in [30u64, 10, 20, 40].iter().enumerate() {
            s.insert(&[b'k', b'0' + i as u8], vec![], Some(*t));
        }
        s.insert(b"forever", vec![], None);
        assert_eq!(s.sweep(25, 1), 1);
        assert!(!s.map.contains_key(b"k1".as_slice()));
        assert_eq!(s.sweep(25, 10), 1);
        assert_eq!(s.sweep(25, 10), 0);
        assert_eq!(s.stored_keys(), 3);
        assert_eq!(s.sweep(u64::MAX, 10), 2);
        assert_eq!(s.stored_keys(), 1);
        assert_eq!(s.stats.expired_keys, 4);
    }

    #[test]
    fn deadline_is_inclusive() {
        let mut s = Store::new();
        s.insert(b"k", b"v".to_vec(), Some(100));
        assert_eq!(s.get(b"k", 99), Some(b"v".as_slice()));
        assert_eq!(s.get(b"k", 100), None);
        assert_eq!(s.used_bytes(), 0);
    }
}
