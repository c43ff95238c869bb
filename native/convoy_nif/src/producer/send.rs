//! Sending one request: PutRecords, then retrying the entries Kinesis
//! rejected, alone, with backoff, until each has an outcome. Every user
//! record ends either acknowledged (its caller told, if it awaits) or on the
//! failure path (caller and owner told); none disappears.

use std::sync::atomic::Ordering;
use std::time::Instant;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use convoy_core::aggregation;
use convoy_core::retry;
use rustler::{Binary, Encoder, Env, NewBinary, OwnedEnv, Term};

use super::entry::{Entry, Extras, Packed};
use super::Shared;
use crate::atoms;
use crate::error::{Error, Reason};
use crate::reply::ReplyTo;
use crate::telemetry;

/// A user record's share of an outgoing Kinesis record.
pub(super) struct Member {
    /// The entry's extras, kept for their reply (see [`Member::take_reply`]).
    pub extras: Option<Box<Extras>>,
    /// Bytes charged to the buffer budget.
    pub size: usize,
}

impl Member {
    /// The caller awaiting this record's outcome, if any and not answered
    /// yet, to answer now.
    pub fn take_reply(&mut self) -> Option<ReplyTo> {
        self.extras.as_mut()?.take_reply()
    }
}

/// The user records an outgoing record carries: one, without a `Vec` of
/// its own, or (aggregated) many.
pub(super) enum Members {
    One(Member),
    Many(Vec<Member>),
}

impl Members {
    pub fn as_slice(&self) -> &[Member] {
        match self {
            Members::One(member) => std::slice::from_ref(member),
            Members::Many(members) => members,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [Member] {
        match self {
            Members::One(member) => std::slice::from_mut(member),
            Members::Many(members) => members,
        }
    }
}

/// One Kinesis record of a request: a user record, or (with aggregation)
/// several packed into one.
pub(super) struct Outgoing {
    /// Partition key and data (for an aggregated record, the first user
    /// record's key and the aggregate).
    pub record: Packed,
    pub explicit_hash_key: Option<Box<str>>,
    pub members: Members,
    /// For an aggregated record, the shard its group maps to, when known.
    pub expected_shard: Option<Box<str>>,
    pub aggregated: bool,
}

impl Outgoing {
    pub fn single(entry: Entry) -> Self {
        let Entry { record, mut extras } = entry;
        // The hash key moves to the outgoing record; the box stays only for
        // a reply.
        let explicit_hash_key = extras.as_mut().and_then(|x| x.explicit_hash_key.take());
        if extras.as_ref().is_some_and(|x| x.reply().is_none()) {
            extras = None;
        }
        Outgoing {
            members: Members::One(Member {
                extras,
                size: record.len(),
            }),
            record,
            explicit_hash_key,
            expected_shard: None,
            aggregated: false,
        }
    }

    /// Bytes the user records it carries were charged.
    pub fn member_bytes(&self) -> usize {
        self.members.as_slice().iter().map(|m| m.size).sum()
    }

    fn records(&self) -> u64 {
        self.members.as_slice().len() as u64
    }

    /// The user records it carries, for the failure report.
    fn user_records(&self) -> Vec<(String, Vec<u8>)> {
        if self.aggregated {
            if let Some(records) = aggregation::deaggregate(self.record.data()) {
                return records
                    .into_iter()
                    .map(|r| (r.partition_key, r.data))
                    .collect();
            }
        }
        vec![(self.record.key().to_owned(), self.record.data().to_vec())]
    }

    /// The SDK's entry: the SDK takes entries by value and a retry needs the
    /// data again, so each attempt sends a copy.
    fn request_entry(&self) -> PutRecordsRequestEntry {
        PutRecordsRequestEntry::builder()
            .data(Blob::new(self.record.data().to_vec()))
            .partition_key(self.record.key())
            .set_explicit_hash_key(self.explicit_hash_key.as_deref().map(str::to_owned))
            .build()
            .expect("data and partition key are set")
    }
}

fn records(batch: &[Outgoing]) -> u64 {
    batch.iter().map(Outgoing::records).sum()
}

/// Sends one request and retries its failed entries until each has an
/// outcome; `pending` is empty on return. Once the producer's close deadline
/// passes, whatever is unsent fails as `:shutdown`, also mid-request (its
/// outcome is then unknown: Kinesis may have stored some of it) or
/// mid-backoff. The entries stay in `pending` (owned by the lane) across
/// every await.
pub(super) async fn deliver(shared: &Shared, pending: &mut Vec<Outgoing>) {
    let stats = &shared.stats;
    let started = Instant::now();
    let mut attempts = 0u32;
    stats
        .in_flight
        .fetch_add(records(pending), Ordering::Relaxed);
    loop {
        if shared
            .close_deadline
            .borrow()
            .is_some_and(|d| Instant::now() >= d)
        {
            fail(shared, std::mem::take(pending), &Error::Shutdown);
            return;
        }
        attempts += 1;
        // Cancel-safe: `attempt` changes `pending` only once answered.
        let last_error = tokio::select! {
            error = attempt(shared, pending) => error,
            () = close_deadline_reached(shared) => continue,
        };
        if pending.is_empty() {
            return;
        }
        if !shared.policy.allows(attempts, started) {
            fail(shared, std::mem::take(pending), &last_error);
            return;
        }
        stats.retried.fetch_add(records(pending), Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(shared.policy.backoff(attempts)) => {}
            () = close_deadline_reached(shared) => {}
        }
    }
}

/// Resolves when the producer is closing and its deadline has passed.
async fn close_deadline_reached(shared: &Shared) {
    let mut deadline = shared.close_deadline.subscribe();
    // The guard is dropped at the end of this statement, before any await.
    let at = deadline
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|set| *set);
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        // The sender lives as long as `shared`: it never closes first.
        None => std::future::pending().await,
    }
}

/// One PutRecords call. Leaves in `pending` the entries worth retrying and
/// returns the error that stopped them.
async fn attempt(shared: &Shared, pending: &mut Vec<Outgoing>) -> Error {
    let started = Instant::now();
    let size = shared.telemetry.then(|| request_size(pending));
    let request: Vec<PutRecordsRequestEntry> =
        pending.iter().map(Outgoing::request_entry).collect();
    let response = shared
        .client
        .put_records()
        .stream_name(&shared.stream_name)
        .set_records(Some(request))
        .send()
        .await;
    match response {
        Ok(output) => {
            let settled = settle(shared, pending, output.records());
            if let Some(size) = size {
                let counts = (settled.acknowledged(), records(pending), settled.failed());
                report(shared, started, size, counts, None);
            }
            settled.finish(shared)
        }
        Err(sdk_error) => {
            let error = retry::classify(&sdk_error);
            if let Some(size) = size {
                report(shared, started, size, (0, 0, 0), Some(&error));
            }
            request_failed(shared, pending, error)
        }
    }
}

/// For telemetry: user records, Kinesis records and bytes in the request.
fn request_size(pending: &[Outgoing]) -> (u64, u64, u64) {
    let bytes: usize = pending.iter().map(|o| o.record.len()).sum();
    (records(pending), pending.len() as u64, bytes as u64)
}

/// The whole request failed: throttling is counted, and a final error
/// fails every entry (a retryable one leaves them all in `pending`).
fn request_failed(shared: &Shared, pending: &mut Vec<Outgoing>, error: Error) -> Error {
    if let Error::Aws { code, .. } = &error {
        if retry::is_throttling_code(code) {
            shared
                .stats
                .throttled
                .fetch_add(records(pending), Ordering::Relaxed);
        }
    }
    if !retry::error_is_retryable(&error) {
        fail(shared, std::mem::take(pending), &error);
    }
    error
}

/// What became of each entry of a request that Kinesis answered.
#[derive(Default)]
struct Settled {
    acknowledged_records: u64,
    acknowledged_bytes: u64,
    fatal: Vec<(Outgoing, Error)>,
    retry_error: Option<Error>,
}

/// Matches the response's results to the entries, in order: acknowledged
/// ones are answered, retryable failures go back to `pending`, final ones
/// fail. No await here: the entries are back in `pending` before the lane
/// can be suspended again.
fn settle(
    shared: &Shared,
    pending: &mut Vec<Outgoing>,
    results: &[PutRecordsResultEntry],
) -> Settled {
    let mut settled = Settled::default();
    let mut env = OwnedEnv::new();
    for (index, mut outgoing) in std::mem::take(pending).into_iter().enumerate() {
        match results.get(index) {
            Some(result) if result.error_code().is_none() => {
                acknowledged(shared, &mut env, &mut settled, &mut outgoing, result);
            }
            result => {
                let code = result
                    .and_then(|r| r.error_code())
                    .unwrap_or("InternalFailure");
                let message = match result {
                    Some(r) => r.error_message().unwrap_or_default(),
                    None => "no result for the record",
                };
                rejected(shared, pending, &mut settled, outgoing, code, message);
            }
        }
    }
    settled
}

impl Settled {
    /// User records acknowledged, for telemetry.
    fn acknowledged(&self) -> u64 {
        self.acknowledged_records
    }

    /// User records that failed for good, for telemetry.
    fn failed(&self) -> u64 {
        self.fatal.iter().map(|(o, _)| o.records()).sum()
    }

    /// Pays back what was acknowledged, fails what failed for good, and
    /// returns the error to retry the rest with.
    fn finish(self, shared: &Shared) -> Error {
        let stats = &shared.stats;
        let done = self.acknowledged_records;
        stats.sent.fetch_add(done, Ordering::Relaxed);
        stats.in_flight.fetch_sub(done, Ordering::Relaxed);
        shared.release(done, self.acknowledged_bytes);
        for (outgoing, error) in self.fatal {
            fail(shared, vec![outgoing], &error);
        }
        self.retry_error
            .unwrap_or_else(|| Error::aws("InternalFailure", "no result for the record"))
    }
}

fn acknowledged(
    shared: &Shared,
    env: &mut OwnedEnv,
    settled: &mut Settled,
    outgoing: &mut Outgoing,
    result: &PutRecordsResultEntry,
) {
    settled.acknowledged_records += outgoing.records();
    settled.acknowledged_bytes += outgoing.member_bytes() as u64;
    let shard = result.shard_id().unwrap_or_default();
    acknowledge(
        env,
        outgoing,
        shard,
        result.sequence_number().unwrap_or_default(),
    );
    if let (Some(expected), Some(aggregation)) = (&outgoing.expected_shard, &shared.aggregation) {
        if **expected != *shard {
            // The shard map is stale: resharding happened.
            aggregation.refresh.notify_one();
        }
    }
}

fn rejected(
    shared: &Shared,
    pending: &mut Vec<Outgoing>,
    settled: &mut Settled,
    outgoing: Outgoing,
    code: &str,
    message: &str,
) {
    if retry::is_throttling_code(code) {
        shared
            .stats
            .throttled
            .fetch_add(outgoing.records(), Ordering::Relaxed);
    }
    let error = Error::aws(code, message);
    if retry::error_is_retryable(&error) {
        pending.push(outgoing);
        settled.retry_error = Some(error);
    } else {
        settled.fatal.push((outgoing, error));
    }
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
    // Like failures: to the reporter, else (while it restarts) the owner.
    let _ = [shared.reporter(), shared.owner]
        .iter()
        .any(|pid| telemetry::put_records(pid, &report));
}

/// Tells every awaiting caller of the record's members where it landed.
/// Members of an aggregated record also learn their sub-sequence number.
fn acknowledge(env: &mut OwnedEnv, outgoing: &mut Outgoing, shard: &str, sequence: &str) {
    let aggregated = outgoing.aggregated;
    for (index, member) in outgoing.members.as_mut_slice().iter_mut().enumerate() {
        let Some(reply) = member.take_reply() else {
            continue;
        };
        reply.send_with(env, |env| {
            let mut outcome = rustler::types::map::map_new(env)
                .map_put(atoms::shard_id(), shard)
                .and_then(|m| m.map_put(atoms::sequence_number(), sequence))
                .expect("map");
            if aggregated {
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
pub(super) fn fail(shared: &Shared, mut batch: Vec<Outgoing>, reason: &Error) {
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
    let reported = [shared.reporter(), shared.owner].iter().any(|pid| {
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
        .iter_mut()
        .flat_map(|o| o.members.as_mut_slice().iter_mut())
        .filter_map(Member::take_reply)
    {
        reply.send_with(&mut env, |env| (atoms::error(), Reason(reason)).encode(env));
    }
}
