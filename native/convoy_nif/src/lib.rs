//! Convoy's native core: a tokio runtime hosting the Kinesis batcher (producer)
//! and pollers (consumer), reached from Elixir through `Convoy.Native`.

mod admin;
mod atoms;
mod client;
mod config;
mod consumer;
mod delivery;
#[cfg(feature = "test-hooks")]
mod diagnostics;
mod error;
mod json;
mod producer;
mod reply;
mod runtime;
mod telemetry;
mod timestamp;

rustler::init!("Elixir.Convoy.Native");
