//! Per-request reports for `:telemetry`, sent only when the queue was
//! started with telemetry on: one message per PutRecords request to the
//! queue's reporter, one per GetRecords call to the shard's dispatcher. The
//! Elixir side turns them into span events; nothing is sent otherwise.

use std::time::Duration;

use rustler::types::map::map_new;
use rustler::{Encoder, Env, LocalPid, Term};

use crate::atoms;
use crate::delivery;
use crate::error::{Error, Reason};

/// What one PutRecords request did. Counts are user records (an aggregated
/// Kinesis record counts each record it carries).
pub struct PutRecordsReport<'e> {
    pub duration: Duration,
    /// User records in the request...
    pub records: u64,
    /// ...in this many Kinesis records...
    pub entries: u64,
    /// ...of this many bytes (data and partition keys).
    pub bytes: u64,
    /// Acknowledged by Kinesis.
    pub acknowledged: u64,
    /// Rejected, to be retried.
    pub retried: u64,
    /// Rejected for good.
    pub failed: u64,
    /// Set when the request as a whole failed.
    pub error: Option<&'e Error>,
}

fn nil_or<'a, T: Encoder>(env: Env<'a>, value: Option<T>) -> Term<'a> {
    match value {
        Some(v) => v.encode(env),
        None => atoms::nil().encode(env),
    }
}

/// `{:convoy_put_records, %{duration: ns, records, entries, bytes,
/// acknowledged, retried, failed, error: nil | reason}}`. Whether `to` was
/// alive to receive it.
pub fn put_records(to: &LocalPid, report: &PutRecordsReport) -> bool {
    delivery::send(to, |env| {
        let map = map_new(env)
            .map_put(atoms::duration(), report.duration.as_nanos() as u64)
            .and_then(|m| m.map_put(atoms::records(), report.records))
            .and_then(|m| m.map_put(atoms::entries(), report.entries))
            .and_then(|m| m.map_put(atoms::bytes(), report.bytes))
            .and_then(|m| m.map_put(atoms::acknowledged(), report.acknowledged))
            .and_then(|m| m.map_put(atoms::retried(), report.retried))
            .and_then(|m| m.map_put(atoms::failed(), report.failed))
            .and_then(|m| m.map_put(atoms::error(), nil_or(env, report.error.map(Reason))))
            .expect("map");
        (atoms::convoy_put_records(), map).encode(env)
    })
}

/// `{:convoy_get_records, shard_id, %{duration: ns, count, millis_behind_latest,
/// next_iterator, error}}`: `count` Kinesis records; `millis_behind_latest`,
/// `next_iterator` and `error` may be nil.
pub fn get_records(
    to: &LocalPid,
    shard_id: &str,
    duration: Duration,
    count: usize,
    millis_behind_latest: Option<i64>,
    next_iterator: Option<&str>,
    error: Option<&Error>,
) {
    delivery::send(to, |env| {
        let map = map_new(env)
            .map_put(atoms::duration(), duration.as_nanos() as u64)
            .and_then(|m| m.map_put(atoms::count(), count as u64))
            .and_then(|m| {
                m.map_put(
                    atoms::millis_behind_latest(),
                    nil_or(env, millis_behind_latest),
                )
            })
            .and_then(|m| m.map_put(atoms::next_iterator(), nil_or(env, next_iterator)))
            .and_then(|m| m.map_put(atoms::error(), nil_or(env, error.map(Reason))))
            .expect("map");
        (atoms::convoy_get_records(), shard_id, map).encode(env)
    });
}
