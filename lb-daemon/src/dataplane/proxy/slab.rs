//! A generational slab: the table of a worker's connections or sessions.
//!
//! An io_uring completion names its entry by slot index and generation (see
//! [`super::ring::Token`]). A slot's generation changes each time it is freed, so a completion
//! that outlived its entry (which the proxy's "nothing in flight when freed" rule should make
//! impossible) finds a different generation and is ignored instead of touching a stranger.

/// Generations are carried in 24 bits of a completion's `user_data`.
pub(super) const GENERATION_MASK: u32 = 0x00ff_ffff;

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Ticks within which a sweep reaches every slot of a slab ([`Slab::sweep_budget`]).
pub(super) const SWEEP_ROUNDS: u32 = 8;

/// Entries addressed by `(index, generation)`; freed slots are reused, newest first.
pub(super) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    /// An empty slab.
    pub(super) fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `value`; returns its `(index, generation)`.
    pub(super) fn insert(&mut self, value: T) -> (u32, u32) {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return (index, slot.generation);
        }
        let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 open flows per worker");
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        (index, 0)
    }

    /// The entry at `index` if it is live and of `generation`.
    pub(super) fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// The live entry at `index`, whatever its generation, with that generation.
    pub(super) fn at_mut(&mut self, index: u32) -> Option<(u32, &mut T)> {
        let slot = self.slots.get_mut(index as usize)?;
        let generation = slot.generation;
        slot.value.as_mut().map(|v| (generation, v))
    }

    /// Removes and returns the entry at `index` if it is live and of `generation`; the slot
    /// gets a new generation.
    pub(super) fn remove(&mut self, index: u32, generation: u32) -> Option<T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(index);
        self.len -= 1;
        Some(value)
    }

    /// Live entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry is live.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots ever allocated (live or free): the range of valid indices.
    pub(super) fn capacity(&self) -> u32 {
        // `insert` keeps the slot count within u32.
        self.slots.len() as u32
    }

    /// The slots one tick of a periodic sweep looks at: `least`, or an eighth of the slots
    /// when that is more, so that the sweep reaches every slot within eight ticks however
    /// large the slab grew. A slab keeps the slots of its busiest moment (it never shrinks):
    /// with a fixed budget, a worker that once held 100,000 flows would reach each one only
    /// every 25 ticks from then on, and close idle ones that much later.
    pub(super) fn sweep_budget(&self, least: u32) -> u32 {
        least.max(self.capacity().div_ceil(SWEEP_ROUNDS))
    }

    /// Visits the next `budget` slots (at most all of them) from `*cursor` on, wrapping
    /// around, and leaves `*cursor` after the last one: a periodic sweep whose cost is
    /// bounded, and which over several calls reaches every slot. Calls `visit(index,
    /// generation, entry)` for each live one.
    pub(super) fn sweep(
        &mut self,
        cursor: &mut u32,
        budget: u32,
        mut visit: impl FnMut(u32, u32, &mut T),
    ) {
        let capacity = self.capacity();
        if capacity == 0 {
            return;
        }
        for _ in 0..budget.min(capacity) {
            let i = *cursor % capacity;
            *cursor = (i + 1) % capacity;
            if let Some((generation, value)) = self.at_mut(i) {
                visit(i, generation, value);
            }
        }
    }

    /// A [`Slab::sweep`] that returns `(index, generation, verdict)` for each live entry
    /// visited for which `verdict` gives one: the entries a periodic sweep is to act on
    /// (e.g. the flows idle for too long), collected first because acting on one needs the
    /// whole slab.
    pub(super) fn sweep_due<V>(
        &mut self,
        cursor: &mut u32,
        budget: u32,
        mut verdict: impl FnMut(&T) -> Option<V>,
    ) -> Vec<(u32, u32, V)> {
        let mut due = Vec::new();
        self.sweep(cursor, budget, |index, generation, entry| {
            if let Some(v) = verdict(entry) {
                due.push((index, generation, v));
            }
        });
        due
    }

    /// `(index, generation)` of every live entry.
    pub(super) fn keys(&self) -> Vec<(u32, u32)> {
        self.keys_where(|_| true)
    }

    /// `(index, generation)` of every live entry for which `pick` holds.
    pub(super) fn keys_where(&self, mut pick: impl FnMut(&T) -> bool) -> Vec<(u32, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.as_ref().is_some_and(&mut pick))
            .map(|(i, s)| (i as u32, s.generation))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_reused_with_a_new_generation() {
        let mut slab = Slab::new();
        let (a, ga) = slab.insert("a");
        assert_eq!(slab.remove(a, ga), Some("a"));
        let (b, gb) = slab.insert("b");
        assert_eq!(a, b, "the freed slot should be reused");
        assert_ne!(ga, gb, "a reused slot must change generation");
        assert!(
            slab.get_mut(a, ga).is_none(),
            "a stale completion must not reach the new entry"
        );
        assert_eq!(slab.get_mut(b, gb), Some(&mut "b"));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn a_large_slab_is_swept_whole_within_eight_ticks() {
        let mut slab = Slab::new();
        for v in 0..100_000u32 {
            slab.insert(v);
        }
        assert_eq!(slab.sweep_budget(4096), 12_500);
        let (mut cursor, mut seen) = (0, 0);
        for _ in 0..SWEEP_ROUNDS {
            let budget = slab.sweep_budget(4096);
            slab.sweep(&mut cursor, budget, |_, _, _| seen += 1);
        }
        assert_eq!(seen, 100_000, "every slot within eight ticks");
        let small: Slab<u8> = Slab::new();
        assert_eq!(small.sweep_budget(4096), 4096, "at least the least");
    }

    #[test]
    fn a_sweep_visits_budget_slots_from_its_cursor_and_wraps() {
        let mut slab = Slab::new();
        let keys: Vec<_> = (0..5u32).map(|v| slab.insert(v)).collect();
        let (i, g) = keys[3];
        slab.remove(i, g);
        let mut cursor = 2;
        let mut seen = Vec::new();
        slab.sweep(&mut cursor, 4, |i, _, v| seen.push((i, *v)));
        assert_eq!(
            seen,
            [(2, 2), (4, 4), (0, 0)],
            "slots 2, 3 (free, skipped), 4, then 0 after the wrap"
        );
        assert_eq!(
            cursor, 1,
            "the next sweep starts after the last slot visited"
        );
        seen.clear();
        slab.sweep(&mut cursor, 100, |i, g, _| seen.push((i, g)));
        assert_eq!(
            seen.len(),
            4,
            "a budget above the slot count visits each slot once"
        );
        assert_eq!(seen[0].0, 1);
        let mut empty: Slab<u8> = Slab::new();
        let mut cursor = 7;
        empty.sweep(&mut cursor, 10, |_, _, _| {
            panic!("an empty slab has nothing to visit")
        });
    }

    #[test]
    fn a_sweep_collects_the_entries_due_and_keys_where_picks_live_ones() {
        let mut slab = Slab::new();
        let keys: Vec<_> = (0..6u32).map(|v| slab.insert(v)).collect();
        let (i, g) = keys[4];
        slab.remove(i, g);
        let mut cursor = 0;
        let due = slab.sweep_due(&mut cursor, 4, |v| (v % 2 == 0).then_some(*v * 10));
        assert_eq!(
            due,
            [(0, 0, 0), (2, 0, 20)],
            "only the even entries among the first four slots are due"
        );
        assert_eq!(
            slab.keys_where(|v| *v >= 3),
            [(3, 0), (5, 0)],
            "the freed slot 4 is not live, so only 3 and 5 qualify"
        );
        assert_eq!(slab.keys().len(), 5);
    }

    #[test]
    fn generations_wrap_within_the_mask() {
        let mut slab = Slab::new();
        let (i, _) = slab.insert(0u8);
        slab.slots[0].generation = GENERATION_MASK;
        assert_eq!(slab.remove(i, GENERATION_MASK), Some(0));
        let (_, g) = slab.insert(1u8);
        assert_eq!(g, 0, "generation must wrap to 0 after the mask");
    }
}
