//! Order per partition key inside one request.
//!
//! Kinesis answers each entry of a PutRecords request on its own: when a
//! shard's byte budget is spent it rejects a large record and may still
//! store a smaller one of the same key behind it, and an entry can fail
//! internally while the next one is stored. Retrying the rejected record
//! would then store it after a later one of its key. So with
//! [`KeyOrder::PerKey`] a request carries each partition key in one Kinesis
//! record at most (the user record itself, or one aggregated record holding
//! all of that key's records in the request); records of the key that would
//! need another Kinesis record wait, in order, for the next request, which
//! the lane sends only once this one has an outcome.
//!
//! A request is cut by walking the front of the lane's buffer with a
//! [`Scan`]: `next` shows the next record that may be considered, the cut
//! decides which Kinesis record of the request it would join (its slot), and
//! `take` or `set_aside` moves it on. Records set aside go back to the front
//! of the buffer when the scan ends, in their order.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::FixedState;

use super::entry::Entry;
use super::MAX_REQUEST_RECORDS;

/// How strictly records of one partition key keep their `put` order.
#[derive(rustler::NifUnitEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyOrder {
    /// In `put` order, through rejections and retries.
    PerKey,
    /// Requests are filled in arrival order; a retried record may land after
    /// later records of its key.
    Relaxed,
}

/// The Kinesis record of the request a key's records are in, by the key's
/// hash. Two keys with one hash are treated as one, which can only make a
/// record wait a request longer, never break order. Kept by the lane so its
/// capacity is reused from one request to the next.
#[derive(Default)]
pub(super) struct KeySlots(HashMap<u64, u32, FixedState>);

/// The slot of a key with a record waiting for the next request: no Kinesis
/// record of this request is numbered so.
const WAITING: u32 = u32::MAX;

/// At most this many records are set aside in one cut, which bounds the work
/// of a cut (a few microseconds) when a few keys fill the buffer. Records
/// further back wait until the keys before them thin out.
const MAX_SET_ASIDE: usize = 4 * MAX_REQUEST_RECORDS;

/// How many records ahead of the one it returns `next` prefetches: enough
/// to cover a memory access while the records in between are handled.
const PREFETCH_AHEAD: usize = 8;

pub(super) struct Scan<'a> {
    buffer: &'a mut VecDeque<Entry>,
    order: KeyOrder,
    slots: &'a mut KeySlots,
    set_aside: Vec<Entry>,
    /// The hash of the key of the record `next` returned (per-key order).
    current: u64,
    /// Records moved off the buffer so far, and the positions, in the buffer
    /// as it was before the cut, of those taken into the request.
    moved: u32,
    taken: Vec<u32>,
    /// Panics as this many records were taken (tests of a panic mid-cut).
    #[cfg(feature = "test-hooks")]
    pub panic_at_take: Option<usize>,
}

impl<'a> Scan<'a> {
    pub fn new(buffer: &'a mut VecDeque<Entry>, order: KeyOrder, slots: &'a mut KeySlots) -> Self {
        slots.0.clear();
        Scan {
            buffer,
            order,
            slots,
            set_aside: Vec::new(),
            current: 0,
            moved: 0,
            taken: Vec::new(),
            #[cfg(feature = "test-hooks")]
            panic_at_take: None,
        }
    }

    /// Records still in the buffer.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// The next record the request may take, skipping (and setting aside)
    /// those of keys that already wait. `None` when the buffer is used up,
    /// or enough records were set aside.
    pub fn next(&mut self) -> Option<&Entry> {
        if self.order == KeyOrder::Relaxed {
            self.prefetch();
            return self.buffer.front();
        }
        loop {
            if self.set_aside.len() >= MAX_SET_ASIDE {
                return None;
            }
            self.prefetch();
            self.current = FixedState::default().hash_one(self.buffer.front()?.record.key());
            if self.slots.0.get(&self.current) != Some(&WAITING) {
                return self.buffer.front();
            }
            self.set_aside();
        }
    }

    /// Starts loading the bytes of a record a few places ahead: the cut
    /// reads every record's key (to hash it, to group it) and then its data,
    /// each in an allocation of its own, so without this nearly every record
    /// costs a cache miss (80% of `next`'s samples in a profile of per-key
    /// order with aggregation, where records set aside are scanned again by
    /// the next cut).
    fn prefetch(&self) {
        if let Some(ahead) = self.buffer.get(PREFETCH_AHEAD) {
            ahead.record.prefetch();
        }
    }

    /// Whether the record `next` returned may join the request's Kinesis
    /// record numbered `slot`: always in relaxed order; in per-key order only
    /// if no other Kinesis record of the request holds its key.
    pub fn admits(&self, slot: u32) -> bool {
        self.order == KeyOrder::Relaxed
            || self.slots.0.get(&self.current).is_none_or(|s| *s == slot)
    }

    /// Moves the record `next` returned into the request, in Kinesis record
    /// `slot`.
    pub fn take(&mut self, slot: u32) -> Entry {
        #[cfg(feature = "test-hooks")]
        if self.panic_at_take == Some(self.taken.len()) {
            panic!("convoy: deliberate panic in a cut (test)");
        }
        let entry = self.buffer.pop_front().expect("next returned it");
        if self.order == KeyOrder::PerKey {
            self.slots.0.insert(self.current, slot);
        }
        self.taken.push(self.moved);
        self.moved += 1;
        entry
    }

    /// Leaves the record `next` returned, and every later one of its key,
    /// for the next request.
    pub fn set_aside(&mut self) {
        let entry = self.buffer.pop_front().expect("next returned it");
        self.slots.0.insert(self.current, WAITING);
        self.set_aside.push(entry);
        self.moved += 1;
    }

    /// Ends the scan: the records set aside are back at the front of the
    /// buffer. Returns the positions the taken records had there, to tell
    /// which flushes they were ahead of.
    pub fn finish(mut self) -> Vec<u32> {
        std::mem::take(&mut self.taken)
    }
}

impl Drop for Scan<'_> {
    /// Also on a panic mid-cut, so the lane can still account for them.
    /// (Records already taken into the request being built are the cut's:
    /// a panic there loses them, without a failure report, though a caller
    /// awaiting one is answered; see `entry::Extras`.)
    fn drop(&mut self) {
        for entry in self.set_aside.drain(..).rev() {
            self.buffer.push_front(entry);
        }
    }
}
