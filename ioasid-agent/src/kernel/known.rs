//! Reading a hash map without walking it while no key was added.
//!
//! A walk (`BPF_MAP_GET_NEXT_KEY`) visits every bucket of the kernel's hash table, however few
//! entries it holds: the swept maps have some 120,000 buckets together, and the agent read them
//! ten times a second, idle or not (half of an idle agent's CPU). The programs count each key
//! they add (`names::MAP_KEYS_GEN`); while a map's count stands still, the keys the agent last
//! walked are all there are, and each is read by one lookup.

/// What a lookup of one known key found.
pub enum Lookup<V> {
    Found(V),
    /// The key is gone (the agent forgot it, or a program removed it).
    Gone,
    /// The lookup failed otherwise: the key is kept, and the next read walks the map.
    Failed,
}

/// The keys of one map as of its last walk, and the key count it had before that walk.
pub struct Known<K> {
    /// `None`: never walked, or a walk or lookup failed since (the next read walks).
    gen: Option<u64>,
    keys: Vec<K>,
}

impl<K> Default for Known<K> {
    fn default() -> Self {
        Self { gen: None, keys: Vec::new() }
    }
}

impl<K: Copy> Known<K> {
    /// Every entry of the map. `gen` is the map's key count, read now (before the walk, so a key
    /// added during the walk shows at the next read; `None` where it cannot be read: every read
    /// walks). `walk` returns every entry, and whether the walk went to the end; `get` looks
    /// one key up.
    pub fn read<V>(
        &mut self,
        gen: Option<u64>,
        walk: impl FnOnce() -> (Vec<(K, V)>, bool),
        get: impl Fn(&K) -> Lookup<V>,
    ) -> Vec<(K, V)> {
        if gen.is_none() || gen != self.gen {
            let (entries, complete) = walk();
            self.keys = entries.iter().map(|(k, _)| *k).collect();
            self.gen = if complete { gen } else { None };
            return entries;
        }
        let mut out = Vec::with_capacity(self.keys.len());
        let mut failed = false;
        self.keys.retain(|k| match get(k) {
            Lookup::Found(v) => {
                out.push((*k, v));
                true
            }
            Lookup::Gone => false,
            Lookup::Failed => {
                failed = true;
                true
            }
        });
        if failed {
            self.gen = None;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    /// A map, its key count and how many times it was walked.
    struct Map {
        entries: RefCell<BTreeMap<u32, u64>>,
        gen: u64,
        walks: RefCell<u32>,
    }

    impl Map {
        fn new() -> Self {
            Self { entries: RefCell::new(BTreeMap::new()), gen: 0, walks: RefCell::new(0) }
        }

        fn add(&mut self, k: u32, v: u64) {
            self.entries.borrow_mut().insert(k, v);
            self.gen += 1;
        }

        fn read(&self, known: &mut Known<u32>) -> Vec<(u32, u64)> {
            let mut got = known.read(
                Some(self.gen),
                || {
                    *self.walks.borrow_mut() += 1;
                    (self.entries.borrow().iter().map(|(k, v)| (*k, *v)).collect(), true)
                },
                |k| self.entries.borrow().get(k).map_or(Lookup::Gone, |v| Lookup::Found(*v)),
            );
            got.sort();
            got
        }
    }

    #[test]
    fn a_map_is_walked_only_when_a_key_was_added() {
        let mut map = Map::new();
        let mut known = Known::default();
        assert_eq!(map.read(&mut known), vec![]);
        map.add(7, 1);
        assert_eq!(map.read(&mut known), vec![(7, 1)]);
        assert_eq!(*map.walks.borrow(), 2);
        // Values change in place: read by lookup, no walk.
        map.entries.borrow_mut().insert(7, 5);
        assert_eq!(map.read(&mut known), vec![(7, 5)]);
        assert_eq!(*map.walks.borrow(), 2);
        map.add(3, 2);
        assert_eq!(map.read(&mut known), vec![(3, 2), (7, 5)]);
        assert_eq!(*map.walks.borrow(), 3);
        // A key removed is dropped at its failed lookup.
        map.entries.borrow_mut().remove(&7);
        assert_eq!(map.read(&mut known), vec![(3, 2)]);
        assert_eq!(known.keys, vec![3]);
        assert_eq!(*map.walks.borrow(), 3);
    }

    #[test]
    fn a_key_added_during_a_walk_is_read_next_time() {
        let mut known = Known::default();
        // The count was read (0), then a key was added while the walk ran, after it passed.
        let got = known.read(Some(0), || (vec![(1u32, 1u64)], true), |_| Lookup::Failed);
        assert_eq!(got, vec![(1, 1)]);
        let got = known.read(Some(1), || (vec![(1, 1), (2, 1)], true), |_| Lookup::Failed);
        assert_eq!(got, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn a_failure_makes_the_next_read_walk() {
        let mut known = Known::default();
        let walks = RefCell::new(0);
        let walk = |complete| {
            *walks.borrow_mut() += 1;
            (vec![(1u32, 1u64)], complete)
        };
        // An incomplete walk is walked again.
        known.read(Some(4), || walk(false), |_| Lookup::Found(1));
        known.read(Some(4), || walk(true), |_| Lookup::Found(1));
        assert_eq!(*walks.borrow(), 2);
        // A failed lookup keeps the key and walks next time.
        let got = known.read(Some(4), || walk(true), |_| Lookup::Failed);
        assert_eq!((got, known.keys.clone()), (vec![], vec![1]));
        known.read(Some(4), || walk(true), |_| Lookup::Found(1));
        assert_eq!(*walks.borrow(), 3);
        // No count: every read walks.
        known.read(None, || walk(true), |_| Lookup::Found(1));
        known.read(None, || walk(true), |_| Lookup::Found(1));
        assert_eq!(*walks.borrow(), 5);
    }
}
