//! Convoy's native core: a tokio runtime hosting the Kinesis batcher (producer)
//! and pollers (consumer), reached from Elixir through `Convoy.Native`.

mod allocator;
mod atoms;
mod client;
mod delivery;
#[cfg(feature = "test-hooks")]
mod diagnostics;
mod error;
mod json;
mod kinesis_config;
mod leases;
mod producer;
mod put_record;
mod record;
mod reply;
mod runtime;
mod shards;
mod source;
mod telemetry;
mod timestamp;

rustler::init!("Elixir.Convoy.Native");
