//! Convoy's pure logic, kept apart from the NIF crate so `cargo test` can run
//! it without a BEAM (a NIF crate's test binary cannot link the `enif_*`
//! symbols the VM provides).

pub mod aggregation;
pub mod chunk;
pub mod civil;
pub mod error;
pub mod lanes;
pub mod retry;
pub mod sequence;
pub mod validate;
