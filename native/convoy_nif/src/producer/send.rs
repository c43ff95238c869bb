//! Sending one request: PutRecords, then retrying the entries Kinesis
//! rejected, alone, with backoff, until each has an outcome. Every user
//! record ends either acknowledged (its caller told, if it awaits) or on the
//! failure path (caller and owner told); none disappears.

use std::sync::atomic::Ordering;
use std::time::Instant;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use convoy_core::aggregation;
use convoy_core::retry;
use rustler::{Binary, Encoder, Env, NewBinary, OwnedEnv, Term};

use super::{Entry, Shared};
use crate::atoms;
use crate::error::{Error, Reason};
use crate::reply::ReplyTo;
use crate::telemetry;

/// A user record's share of an outgoing Kinesis record.
pub(super) struct Member {
    pub reply: Option<ReplyTo>,
    /// Bytes charged to the buffer budget.
    pub size: usize,
}

/// One Kinesis record of a request: a user record, or (with aggregation)
/// several packed into one.
pub(super) struct Outgoing {
    pub key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
    pub members: Vec<Member>,
    pub aggregated: bool,
    /// For an aggregated record, the shard its group maps to.
    pub expected_shard: Option<String>,
}

impl Outgoing {
    pub fn single(entry: Entry) -> Self {
        Outgoing {
            members: vec![Member {
                reply: entry.reply,
                size: entry.size,
            }],
            key: entry.key,
            explicit_hash_key: entry.explicit_hash_key,
            data: entry.data,
            aggregated: false,
            expected_shard: None,
        }
    }

    /// Bytes the user records it carries were charged.
    pub fn member_bytes(&self) -> usize {
        self.members.iter().map(|m| m.size).sum()
    }

    fn records(&self) -> u64 {
        self.members.len() as u64
    }

    /// The user records it carries, for the failure report.
    fn user_records(&self) -> Vec<(String, Vec<u8>)> {
        if self.aggregated {
            if let Some(records) = aggregation::deaggregate(&self.data) {
                return records
                    .into_iter()
                    .map(|r| (r.partition_key, r.data))
                    .collect();
            }
        }
        vec![(self.key.clone(), self.data.clone())]
    }
}

fn records(batch: &[Outgoing]) -> u64 {
    batch.iter().map(Outgoing::records).sum()
}

/// Sends one request and retries its failed entries until each has an
/// outcome; `pending` is empty on return. With a close deadline, whatever is
/// unsent then fails as `:shutdown`. The entries stay in `pending` (owned by
/// the lane) across every await.
pub(super) async fn deliver(
    shared: &Shared,
    pending: &mut Vec<Outgoing>,
    close_deadline: Option<Instant>,
) {
    let stats = &shared.stats;
    let started = Instant::now();
    let mut attempts = 0u32;
    stats
        .in_flight
        .fetch_add(records(pending), Ordering::Relaxed);
    loop {
        if close_deadline.is_some_and(|d| Instant::now() >= d) {
            fail(shared, std::mem::take(pending), &Error::Shutdown);
            return;
        }
        attempts += 1;
        let last_error = attempt(shared, pending).await;
        if pending.is_empty() {
            return;
        }
        if !shared.policy.allows(attempts, started) {
            fail(shared, std::mem::take(pending), &last_error);
            return;
        }
        stats.retried.fetch_add(records(pending), Ordering::Relaxed);
        let mut wait = shared.policy.backoff(attempts);
        if let Some(deadline) = close_deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(wait).await;
    }
}

/// One PutRecords call. Leaves in `pending` the entries worth retrying and
/// returns the error that stopped them.
async fn attempt(shared: &Shared, pending: &mut Vec<Outgoing>) -> Error {
    let stats = &shared.stats;
    let started = Instant::now();
    // For telemetry: user records, Kinesis records and bytes in the request.
    let size = shared.telemetry.then(|| {
        let bytes = pending
            .iter()
            .map(|o| o.data.len() + o.key.len())
            .sum::<usize>();
        (records(pending), pending.len() as u64, bytes as u64)
    });
    // The SDK takes the entries by value; a retry needs the data again, so
    // each attempt sends copies.
    let request: Vec<PutRecordsRequestEntry> = pending
        .iter()
        .map(|o| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(o.data.clone()))
                .partition_key(&o.key)
                .set_explicit_hash_key(o.explicit_hash_key.clone())
                .build()
                .expect("data and partition key are set")
        })
        .collect();
    let response = shared
        .client
        .put_records()
        .stream_name(&shared.stream_name)
        .set_records(Some(request))
        .send()
        .await;

    let output = match response {
        Ok(output) => output,
        Err(sdk_error) => {
            let error = retry::classify(&sdk_error);
            if let Error::Aws { code, .. } = &error {
                if retry::is_throttling_code(code) {
                    stats
                        .throttled
                        .fetch_add(records(pending), Ordering::Relaxed);
                }
            }
            if let Some(size) = size {
                report(shared, started, size, (0, 0, 0), Some(&error));
            }
            if !retry::error_is_retryable(&error) {
                fail(shared, std::mem::take(pending), &error);
            }
            return error;
        }
    };

    let results = output.records();
    let mut fatal = Vec::new();
    let mut last_error = Error::aws("InternalFailure", "no result for the record");
    let mut acknowledged = (0u64, 0u64);
    let mut env = OwnedEnv::new();
    // No await from here on: the entries are back in `pending` before the
    // lane can be suspended again.
    for (index, outgoing) in std::mem::take(pending).into_iter().enumerate() {
        let result = results.get(index);
        let failure = match result {
            None => Some(("InternalFailure", None)),
            Some(r) => r.error_code().map(|c| (c, r.error_message())),
        };
        match (failure, result) {
            (None, Some(r)) => {
                acknowledged.0 += outgoing.records();
                acknowledged.1 += outgoing.member_bytes() as u64;
                let shard = r.shard_id().unwrap_or_default();
                let sequence = r.sequence_number().unwrap_or_default();
                acknowledge(&mut env, &outgoing, shard, sequence);
                if let (Some(expected), Some(aggregation)) =
                    (&outgoing.expected_shard, &shared.aggregation)
                {
                    if expected.starts_with("shardId") && expected != shard {
                        // The shard map is stale: resharding happened.
                        aggregation.refresh.notify_one();
                    }
                }
            }
            (failure, _) => {
                let (code, message) = failure.unwrap_or(("InternalFailure", None));
                if retry::is_throttling_code(code) {
                    stats
                        .throttled
                        .fetch_add(outgoing.records(), Ordering::Relaxed);
                }
                let error = Error::aws(code, message.unwrap_or_default());
                if retry::error_is_retryable(&error) {
                    pending.push(outgoing);
                    last_error = error;
                } else {
                    fatal.push((outgoing, error));
                }
            }
        }
    }
    if let Some(size) = size {
        let rejected: u64 = fatal.iter().map(|(o, _)| o.records()).sum();
        let counts = (acknowledged.0, records(pending), rejected);
        report(shared, started, size, counts, None);
    }
    stats.sent.fetch_add(acknowledged.0, Ordering::Relaxed);
    stats.in_flight.fetch_sub(acknowledged.0, Ordering::Relaxed);
    shared.release(acknowledged.0, acknowledged.1);
    for (outgoing, error) in fatal {
        fail(shared, vec![outgoing], &error);
    }
    last_error
}

/// Sends one request's report to the reporter, for telemetry.
fn report(
    shared: &Shared,
    started: Instant,
    (records, entries, bytes): (u64, u64, u64),
    (acknowledged, retried, failed): (u64, u64, u64),
    error: Option<&Error>,
) {
    let report = telemetry::PutRecordsReport {
        duration: started.elapsed(),
        records,
        entries,
        bytes,
        acknowledged,
        retried,
        failed,
        error,
    };
    telemetry::put_records(&shared.reporter, &report);
}

/// Tells every awaiting caller of the record's members where it landed.
/// Members of an aggregated record also learn their sub-sequence number.
fn acknowledge(env: &mut OwnedEnv, outgoing: &Outgoing, shard: &str, sequence: &str) {
    for (index, member) in outgoing.members.iter().enumerate() {
        let Some(reply) = &member.reply else {
            continue;
        };
        reply.send_with(env, |env| {
            let mut outcome = rustler::types::map::map_new(env)
                .map_put(atoms::shard_id(), shard)
                .and_then(|m| m.map_put(atoms::sequence_number(), sequence))
                .expect("map");
            if outgoing.aggregated {
                outcome = outcome
                    .map_put(atoms::sub_sequence_number(), index as u64)
                    .expect("map");
            }
            (atoms::ok(), outcome).encode(env)
        });
    }
}

/// The failure report: `{:convoy_put_failed, [{key, data, reason}]}`.
fn failure_report<'a>(env: Env<'a>, failed: &[(String, Vec<u8>)], reason: &Error) -> Term<'a> {
    let failed: Vec<Term> = failed
        .iter()
        .map(|(key, data)| {
            let mut bin = NewBinary::new(env, data.len());
            bin.as_mut_slice().copy_from_slice(data);
            let bin: Binary = bin.into();
            (key.as_str(), bin, Reason(reason)).encode(env)
        })
        .collect();
    (atoms::convoy_put_failed(), failed).encode(env)
}

/// The failure path: every user record that will not be sent is handed to
/// the reporter, which logs it, counts it, emits telemetry and calls
/// `on_failure`, and answered to its awaiting caller, if any.
pub(super) fn fail(shared: &Shared, batch: Vec<Outgoing>, reason: &Error) {
    if batch.is_empty() {
        return;
    }
    let count = records(&batch);
    let bytes: u64 = batch.iter().map(|o| o.member_bytes() as u64).sum();
    let stats = &shared.stats;
    stats.failed.fetch_add(count, Ordering::Relaxed);
    stats.in_flight.fetch_sub(count, Ordering::Relaxed);
    shared.release(count, bytes);

    // The reporter first: once a caller learns of its failure, the reporter
    // has it too, so the log and `on_failure` never lag behind the caller.
    let mut env = OwnedEnv::new();
    let failed: Vec<(String, Vec<u8>)> = batch.iter().flat_map(Outgoing::user_records).collect();
    let reported = [shared.reporter, shared.owner].iter().any(|pid| {
        env.send_and_clear(pid, |env| failure_report(env, &failed, reason))
            .is_ok()
    });
    if !reported {
        // Only when the reporter and the owner are both gone (the whole
        // queue was killed): say so where we can.
        eprintln!(
            "convoy: {} record(s) of stream {} failed ({reason:?}) and no reporter is alive",
            failed.len(),
            shared.stream_name
        );
    }
    for reply in batch
        .iter()
        .flat_map(|o| o.members.iter().filter_map(|m| m.reply.as_ref()))
    {
        reply.send_with(&mut env, |env| (atoms::error(), Reason(reason)).encode(env));
    }
}
