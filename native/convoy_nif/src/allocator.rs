//! The allocator for everything the NIF allocates: mimalloc.
//!
//! A record is allocated on a scheduler thread (`put`) and freed on a
//! runtime thread (once acknowledged), and the SDK allocates and frees many
//! small strings per request. The system allocator (glibc) handles such
//! cross-thread frees poorly: profiles of the producer on the null endpoint
//! showed `malloc_consolidate` and `_int_free` among the top entries on both
//! kinds of threads. mimalloc frees to the owning thread's heap without a
//! lock. Memory the BEAM allocates (terms, binaries) is not affected.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
