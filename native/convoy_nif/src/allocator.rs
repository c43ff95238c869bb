//! The allocator for everything the NIF allocates: mimalloc.
//!
//! A record is allocated on a scheduler thread (`put`) and freed on a
//! runtime thread (once acknowledged), and the SDK allocates and frees many
//! small strings per request. The system allocator (glibc) handles such
//! cross-thread frees poorly: profiles of the producer on the null endpoint
//! showed `malloc_consolidate` and `_int_free` among the top entries on both
//! kinds of threads. mimalloc frees to the owning thread's heap without a
//! lock. Memory the BEAM allocates (terms, binaries) is not affected.

use std::ffi::{c_int, c_long};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // mimalloc's C API (mimalloc.h), linked in with the allocator.
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same in its v2
/// and v3, which keep retired options in place).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// How long freed memory stays with the process before mimalloc gives it
/// back to the system, in ms (mimalloc's default: 10). A poller frees a
/// whole GetRecords response (up to 10,000 records) once its batch is
/// acknowledged and reads the next one at least 200 ms later; with 10 ms
/// those pages went back to the system in between, and the next response
/// faulted them in again, zeroed by the kernel: 11% of the consumer's CPU
/// in a profile of 400,000 records. A second covers that gap.
const PURGE_DELAY_MS: c_long = 1_000;

/// Sets mimalloc's options; called once, before the runtime starts.
pub fn configure() {
    // SAFETY: sets a process-wide option; mimalloc reads it as it purges.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}
