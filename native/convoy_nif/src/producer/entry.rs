//! A buffered record, kept small: its partition key and data share one
//! allocation, the parts most records lack (an explicit hash key, a caller
//! awaiting the outcome) share one optional box, and its arrival is a
//! millisecond count. A record then holds a 32-byte entry besides its key
//! and data (plus the allocator's rounding), where separate key, data,
//! hash key, reply and `Instant` fields took more than twice that and
//! several allocations.

use std::time::{Duration, Instant};

use crate::atoms;
use crate::reply::ReplyTo;

/// A partition key and data in one allocation: the key's bytes, then the
/// data's. The key is valid UTF-8 (checked on `put`).
pub(super) struct Packed {
    bytes: Box<[u8]>,
    key_len: u16,
    /// 32 bits that would otherwise be padding: an [`Entry`] keeps its
    /// arrival here, which keeps the entry at 32 bytes.
    stamp: u32,
}

impl Packed {
    pub fn new(key: &str, data: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(key.len() + data.len());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(data);
        Packed::from_vec(bytes, key.len())
    }

    /// `bytes` starts with a key of `key_len` bytes, checked here as UTF-8
    /// (once per aggregated record, the only caller besides `new`).
    ///
    /// # Panics
    ///
    /// If the key is not valid UTF-8.
    pub fn from_vec(bytes: Vec<u8>, key_len: usize) -> Self {
        assert!(
            std::str::from_utf8(&bytes[..key_len]).is_ok(),
            "a partition key is UTF-8"
        );
        Packed {
            bytes: bytes.into_boxed_slice(),
            key_len: u16::try_from(key_len).expect("a partition key is at most 1 KiB"),
            stamp: 0,
        }
    }

    pub fn key(&self) -> &str {
        // Not checked again: a cut asks for a record's key four or five
        // times, and in per-key order records set aside are scanned again
        // by the next cut; the checks were 5 to 9% of the runtime's samples
        // in profiles of the aggregated producer.
        // SAFETY: `bytes[..key_len]` was checked as UTF-8 when the `Packed`
        // was built (`new` takes a `&str`, `from_vec` checks) and is never
        // changed afterwards.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[..usize::from(self.key_len)]) }
    }

    pub fn data(&self) -> &[u8] {
        &self.bytes[usize::from(self.key_len)..]
    }

    /// Asks the CPU to load the start of the key and data into its cache.
    /// A cut walks records whose bytes are scattered over the heap and
    /// reads each record's key: a cache miss per record, which prefetching
    /// a few records ahead hides (see `order::Scan::next`).
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: SSE is part of every x86_64 CPU; a prefetch is a hint
            // that never faults, and the address is the record's own.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.bytes.as_ptr().cast()) };
        }
    }

    /// Key plus data: what Kinesis counts against its limits.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// What a record rarely has, boxed together so that a record with neither
/// pays one null pointer.
pub(super) struct Extras {
    pub explicit_hash_key: Option<Box<str>>,
    /// The caller awaiting the record's outcome (`put/4` with `await:`),
    /// until it is answered (see the `Drop` below).
    reply: Option<ReplyTo>,
}

/// What a caller awaiting a record hears when the record is dropped without
/// an outcome.
const DROPPED: &str = "the record was dropped without an outcome";

impl Extras {
    /// Boxed when there is something to keep.
    fn boxed(explicit_hash_key: Option<Box<str>>, reply: Option<ReplyTo>) -> Option<Box<Self>> {
        (explicit_hash_key.is_some() || reply.is_some()).then(|| {
            Box::new(Extras {
                explicit_hash_key,
                reply,
            })
        })
    }

    /// The caller awaiting the record's outcome, if it was not answered yet.
    pub fn reply(&self) -> Option<&ReplyTo> {
        self.reply.as_ref()
    }

    /// The awaiting caller, to answer now: it is answered once.
    pub fn take_reply(&mut self) -> Option<ReplyTo> {
        self.reply.take()
    }
}

impl Drop for Extras {
    /// Every outcome path answers the awaiting caller first, so a reply still
    /// here means the record was lost to a bug (a panic while its request was
    /// being cut). The caller hears `{:error, {:panic, _}}` now rather than
    /// waiting out its `await:` timeout. Nothing here can panic: this also
    /// runs while a panic unwinds.
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            reply.send_anywhere((atoms::error(), (atoms::panic(), DROPPED)));
        }
    }
}

/// A record waiting in a lane.
pub(super) struct Entry {
    pub record: Packed,
    /// The explicit hash key and the awaiting caller, boxed together and
    /// only when there is one: most records have neither.
    pub extras: Option<Box<Extras>>,
}

// What the memory budget of a buffered record rests on.
const _: () = assert!(std::mem::size_of::<Entry>() == 32);

impl Entry {
    /// `enqueued`: when it was put, in ms since the producer started (see
    /// [`Clock`]).
    pub fn new(
        mut record: Packed,
        explicit_hash_key: Option<Box<str>>,
        reply: Option<ReplyTo>,
        enqueued: u32,
    ) -> Self {
        record.stamp = enqueued;
        Entry {
            record,
            extras: Extras::boxed(explicit_hash_key, reply),
        }
    }

    /// When it was put, in ms since the producer started.
    pub fn enqueued(&self) -> u32 {
        self.record.stamp
    }

    pub fn explicit_hash_key(&self) -> Option<&str> {
        self.extras.as_ref()?.explicit_hash_key.as_deref()
    }

    /// Bytes charged to the budget and to the request size.
    pub fn size(&self) -> usize {
        self.record.len()
    }
}

/// Milliseconds since the producer started, in 32 bits. Ages are computed
/// with wrapping arithmetic, so they stay right for records younger than
/// 49 days.
///
/// Every put stamps its record, so the clock is read on the hot path. On
/// Linux it is the coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: the
/// time of the last timer tick, 1 to 4 ms old, read in about 8 ns), not
/// `Instant` (about 40 ns with the conversion to milliseconds on this
/// project's machines). A stamp, an age and so a batch's deadline are then
/// exact to a tick: a record may leave up to one tick before or after its
/// `batch_timeout`, which is a target for batching, not a promise.
pub(super) struct Clock {
    epoch: u64,
}

impl Clock {
    pub fn new() -> Self {
        Clock { epoch: clock_ms() }
    }

    pub fn now(&self) -> u32 {
        // Truncation is the point: the count wraps.
        clock_ms().wrapping_sub(self.epoch) as u32
    }

    pub fn age(&self, at: u32) -> Duration {
        Duration::from_millis(u64::from(self.now().wrapping_sub(at)))
    }

    /// The instant at which a record put at `at` is `after` old.
    pub fn deadline(&self, at: u32, after: Duration) -> Instant {
        Instant::now() + after.saturating_sub(self.age(at))
    }
}

/// A monotonic clock in milliseconds, coarse where the system has one.
#[cfg(target_os = "linux")]
fn clock_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC_COARSE
    // exists on every Linux since 2.6.32 and cannot fail with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000 + now.tv_nsec as u64 / 1_000_000
}

#[cfg(not(target_os = "linux"))]
fn clock_ms() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_splits_key_and_data() {
        let packed = Packed::new("kéy", b"data");
        assert_eq!(packed.key(), "kéy");
        assert_eq!(packed.data(), b"data");
        assert_eq!(packed.len(), "kéy".len() + 4);
        let empty = Packed::new("k", b"");
        assert_eq!((empty.key(), empty.data()), ("k", &b""[..]));
        let joined = Packed::from_vec(b"k\xc3\xa9ydata".to_vec(), 4);
        assert_eq!((joined.key(), joined.data()), ("kéy", &b"data"[..]));
    }

    #[test]
    #[should_panic(expected = "UTF-8")]
    fn packed_refuses_a_key_that_is_not_utf8() {
        let _ = Packed::from_vec(b"\xffdata".to_vec(), 1);
    }

    #[test]
    fn ages_survive_the_wrap() {
        let clock = Clock::new();
        let now = clock.now();
        assert!(clock.age(now) < Duration::from_secs(1));
        assert!(clock.age(now.wrapping_sub(5_000)) >= Duration::from_secs(5));
    }
}
