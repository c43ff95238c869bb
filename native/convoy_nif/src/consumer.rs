//! The poller: one task per shard reads GetRecords and sends each batch to
//! the shard's dispatcher process, then waits for that batch to be
//! acknowledged before it reads again. A slow handler therefore holds back
//! its shard instead of flooding a mailbox, and the task never holds more
//! than one batch.
//!
//! The task tracks the position after the last batch it delivered, so an
//! expired iterator or a transient failure resumes exactly there.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use rustler::{Binary, Encoder, Env, LocalPid, NewBinary, ResourceArc, Term};
use tokio::sync::{watch, Semaphore};

use crate::atoms;
use crate::client::ClientResource;
use crate::delivery::{self, KeptTerm};
use crate::error::{Error, Reason};
use crate::reply::ReplyTo;
use crate::runtime;
use crate::telemetry;
use crate::timestamp;
use convoy_core::aggregation;
use convoy_core::retry::{self, RetryPolicy};

/// Kinesis allows 5 GetRecords calls per second per shard.
const MIN_CALL_SPACING: Duration = Duration::from_millis(200);

/// Where a shard's reading begins, as the Elixir side names it: `:latest`,
/// `:trim_horizon`, `{:at_sequence_number, s}`, `{:after_sequence_number, s}`
/// or `{:at_timestamp, unix_ms}`.
#[derive(Debug, Clone, PartialEq, rustler::NifTaggedEnum)]
pub enum Position {
    Latest,
    TrimHorizon,
    AtSequenceNumber(String),
    AfterSequenceNumber(String),
    AtTimestamp(i64),
}

async fn shard_iterator(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
    position: &Position,
) -> Result<String, Error> {
    let request = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id);
    let request = match position {
        Position::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
        Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Position::AtSequenceNumber(s) => request
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(s),
        Position::AfterSequenceNumber(s) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(s),
        Position::AtTimestamp(ms) => request
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(*ms)),
    };
    let output = request.send().await.map_err(|e| retry::classify(&e))?;
    output
        .shard_iterator()
        .map(str::to_owned)
        .ok_or_else(|| Error::aws("NoShardIterator", "GetShardIterator returned no iterator"))
}

/// A user record as delivered. An aggregated Kinesis record (KPL format)
/// expands into its user records; one that only looks aggregated is
/// delivered as it is, as the KCL does.
struct Delivered<'r> {
    data: Cow<'r, [u8]>,
    partition_key: Cow<'r, str>,
    sequence_number: &'r str,
    arrival_ms: i64,
    sub_sequence_number: Option<u64>,
    explicit_hash_key: Option<String>,
}

fn expand(record: &Record) -> Vec<Delivered<'_>> {
    let arrival_ms = record
        .approximate_arrival_timestamp()
        .and_then(|t| t.to_millis().ok())
        .unwrap_or(0);
    let sequence_number = record.sequence_number();
    let data = record.data().as_ref();
    if aggregation::looks_aggregated(data) {
        if let Some(users) = aggregation::deaggregate(data) {
            return users
                .into_iter()
                .enumerate()
                .map(|(index, user)| Delivered {
                    data: Cow::Owned(user.data),
                    partition_key: Cow::Owned(user.partition_key),
                    sequence_number,
                    arrival_ms,
                    sub_sequence_number: Some(index as u64),
                    explicit_hash_key: user.explicit_hash_key,
                })
                .collect();
        }
    }
    vec![Delivered {
        data: Cow::Borrowed(data),
        partition_key: Cow::Borrowed(record.partition_key().unwrap_or_default()),
        sequence_number,
        arrival_ms,
        sub_sequence_number: None,
        explicit_hash_key: None,
    }]
}

/// `%Convoy.Record{}`, built here so Elixir receives records ready to use.
#[derive(rustler::NifStruct)]
#[module = "Convoy.Record"]
struct RecordStruct<'a> {
    data: Binary<'a>,
    partition_key: Term<'a>,
    sequence_number: Term<'a>,
    shard_id: Term<'a>,
    approximate_arrival_timestamp: Term<'a>,
    stream_id: Term<'a>,
    sub_sequence_number: Option<u64>,
    explicit_hash_key: Term<'a>,
}

/// What every record of a batch shares: its shard and the queue's `stream_id`.
pub struct Origin<'a> {
    pub shard_id: Term<'a>,
    pub stream_id: Term<'a>,
}

impl Delivered<'_> {
    fn to_struct<'a>(&self, env: Env<'a>, origin: &Origin<'a>) -> RecordStruct<'a> {
        let mut data = NewBinary::new(env, self.data.len());
        data.as_mut_slice().copy_from_slice(&self.data);
        RecordStruct {
            data: data.into(),
            partition_key: self.partition_key.as_ref().encode(env),
            sequence_number: self.sequence_number.encode(env),
            shard_id: origin.shard_id,
            approximate_arrival_timestamp: timestamp::utc_datetime(env, self.arrival_ms),
            stream_id: origin.stream_id,
            sub_sequence_number: self.sub_sequence_number,
            explicit_hash_key: self.explicit_hash_key.as_deref().encode(env),
        }
    }
}

/// A list of `%Convoy.Record{}`, aggregated records expanded.
pub fn encode_records<'a>(env: Env<'a>, records: &[Record], origin: &Origin<'a>) -> Term<'a> {
    let mut terms: Vec<Term<'a>> = Vec::with_capacity(records.len());
    for record in records {
        for delivered in expand(record) {
            terms.push(delivered.to_struct(env, origin).encode(env));
        }
    }
    terms.encode(env)
}

// ---------------------------------------------------------------------------
// Shard pollers

/// A shard reader's options, under their `Convoy.Queue` names.
#[derive(rustler::NifMap)]
pub struct PollerOptions {
    pub stream: String,
    pub shard_id: String,
    pub poll_limit: i32,
    pub poll_interval: u64,
    pub retry_backoff: u64,
    pub max_backoff: u64,
    /// Report each GetRecords call to the dispatcher (see `crate::telemetry`).
    pub telemetry: bool,
}

/// Held by the shard's dispatcher. Dropping it (the dispatcher died) or
/// calling `poller_stop` ends the task.
pub struct Poller {
    credits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
}

#[rustler::resource_impl]
impl rustler::Resource for Poller {}

struct ShardTask {
    client: aws_sdk_kinesis::Client,
    options: PollerOptions,
    resume: Position,
    dispatcher: LocalPid,
    stream_id: KeptTerm,
    credits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    policy: RetryPolicy,
}

enum Flow {
    Continue,
    Stop,
}

impl ShardTask {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps unless told to stop first; false means stop.
    async fn pause(&mut self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => !self.stopped(),
            _ = self.stop.changed() => false,
        }
    }

    fn report(&self, error: &Error) -> bool {
        let shard_id = self.options.shard_id.as_str();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_error(), shard_id, Reason(error)).encode(env)
        })
    }

    /// The task ends on an error retrying cannot cure; the dispatcher decides
    /// what next (it restarts the shard from its checkpoint).
    fn stopped_by(&self, error: &Error) -> bool {
        let shard_id = self.options.shard_id.as_str();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_stopped(), shard_id, Reason(error)).encode(env)
        })
    }

    /// An iterator for the resume position; transient failures are retried
    /// with backoff, a permanent one is reported and ends the task.
    async fn iterator(&mut self) -> Option<String> {
        let mut failures = 0;
        loop {
            if self.stopped() {
                return None;
            }
            let result = shard_iterator(
                &self.client,
                &self.options.stream,
                &self.options.shard_id,
                &self.resume,
            )
            .await;
            match result {
                Ok(iterator) => return Some(iterator),
                Err(error) if self.foreign_position(&error) => {
                    // The stream was deleted and created again: the position
                    // names a record it never had. Reading from the start is
                    // the only way not to miss what it holds now.
                    self.report(&error);
                    self.resume = Position::TrimHorizon;
                }
                Err(error) => {
                    failures += 1;
                    if !retry::error_is_retryable(&error) {
                        self.stopped_by(&error);
                        return None;
                    }
                    if failures == 1 {
                        self.report(&error);
                    }
                    let wait = self.policy.backoff(failures);
                    if !self.pause(wait).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Whether Kinesis refused a sequence-number position as not from this
    /// stream (the wording Kinesis and the emulators use).
    fn foreign_position(&self, error: &Error) -> bool {
        let by_sequence = matches!(
            self.resume,
            Position::AtSequenceNumber(_) | Position::AfterSequenceNumber(_)
        );
        by_sequence
            && matches!(error, Error::Aws { code, message }
                if code == "InvalidArgumentException" && message.contains("did not come from this stream"))
    }

    async fn run(mut self) {
        let Some(mut iterator) = self.iterator().await else {
            return;
        };
        let mut last_call: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            if let Some(at) = last_call {
                let wait = MIN_CALL_SPACING.saturating_sub(at.elapsed());
                if !wait.is_zero() && !self.pause(wait).await {
                    return;
                }
            }
            if self.stopped() {
                return;
            }
            let called = Instant::now();
            last_call = Some(called);
            let response = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.options.poll_limit)
                .send()
                .await;
            if self.options.telemetry {
                report_call(&self.dispatcher, &self.options.shard_id, called, &response);
            }
            match response {
                Ok(output) => {
                    failures = 0;
                    let records = output.records();
                    if !records.is_empty() {
                        if let Flow::Stop =
                            self.deliver(records, output.millis_behind_latest()).await
                        {
                            return;
                        }
                    }
                    match output.next_shard_iterator() {
                        Some(next) => iterator = next.to_owned(),
                        None => {
                            // A closed shard read to its end.
                            let shard_id = self.options.shard_id.as_str();
                            delivery::send(&self.dispatcher, |env| {
                                (atoms::convoy_shard_end(), shard_id).encode(env)
                            });
                            return;
                        }
                    }
                    if records.is_empty() {
                        let interval = Duration::from_millis(self.options.poll_interval);
                        if !self.pause(interval).await {
                            return;
                        }
                    }
                }
                Err(sdk_error) => {
                    let error = retry::classify(&sdk_error);
                    let expired = matches!(&error, Error::Aws { code, .. } if code == "ExpiredIteratorException");
                    if expired {
                        match self.iterator().await {
                            Some(fresh) => iterator = fresh,
                            None => return,
                        }
                        continue;
                    }
                    failures += 1;
                    if !retry::error_is_retryable(&error) {
                        self.stopped_by(&error);
                        return;
                    }
                    if failures == 1 {
                        self.report(&error);
                    }
                    let wait = self.policy.backoff(failures);
                    if !self.pause(wait).await {
                        return;
                    }
                    // The iterator may have expired while we waited.
                    if failures > 3 {
                        match self.iterator().await {
                            Some(fresh) => iterator = fresh,
                            None => return,
                        }
                    }
                }
            }
        }
    }

    /// Sends one batch and waits for its acknowledgement.
    async fn deliver(&mut self, records: &[Record], millis_behind: Option<i64>) -> Flow {
        let shard_id = self.options.shard_id.as_str();
        let stream_id = &self.stream_id;
        let sent = delivery::send(&self.dispatcher, |env| {
            let origin = Origin {
                shard_id: shard_id.encode(env),
                stream_id: stream_id.load(env),
            };
            (
                atoms::convoy_records(),
                origin.shard_id,
                encode_records(env, records, &origin),
                millis_behind.unwrap_or(-1),
            )
                .encode(env)
        });
        if !sent {
            return Flow::Stop;
        }
        let last = records.last().expect("not empty").sequence_number();
        self.resume = Position::AfterSequenceNumber(last.to_owned());
        let credits = self.credits.clone();
        tokio::select! {
            permit = credits.acquire() => match permit {
                Ok(permit) => { permit.forget(); Flow::Continue }
                Err(_) => Flow::Stop,
            },
            _ = self.stop.changed() => Flow::Stop,
        }
    }
}

/// One GetRecords call's report for telemetry, sent before its records.
fn report_call(
    to: &LocalPid,
    shard_id: &str,
    called: Instant,
    response: &Result<GetRecordsOutput, SdkError<GetRecordsError>>,
) {
    let elapsed = called.elapsed();
    match response {
        Ok(output) => telemetry::get_records(
            to,
            shard_id,
            elapsed,
            output.records().len(),
            output.millis_behind_latest(),
            output.next_shard_iterator(),
            None,
        ),
        Err(error) => {
            let error = retry::classify(error);
            telemetry::get_records(to, shard_id, elapsed, 0, None, None, Some(&error));
        }
    }
}

#[rustler::nif]
fn poller_start(
    client: ResourceArc<ClientResource>,
    stream_id: Term,
    options: PollerOptions,
    position: Position,
    dispatcher: LocalPid,
) -> ResourceArc<Poller> {
    let credits = Arc::new(Semaphore::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let task = ShardTask {
        client: client.client.clone(),
        policy: RetryPolicy {
            base: Duration::from_millis(options.retry_backoff),
            max_backoff: Duration::from_millis(options.max_backoff),
            ..RetryPolicy::default()
        },
        options,
        resume: position,
        dispatcher,
        stream_id: KeptTerm::new(stream_id),
        credits: credits.clone(),
        stop: stop_rx,
    };
    runtime::spawn_guarded("shard poller", Some(dispatcher), task.run());
    ResourceArc::new(Poller { credits, stop })
}

/// The dispatcher finished the batch it was sent: the poller may read on.
#[rustler::nif]
fn poller_ack(poller: ResourceArc<Poller>) -> rustler::Atom {
    poller.credits.add_permits(1);
    atoms::ok()
}

#[rustler::nif]
fn poller_stop(poller: ResourceArc<Poller>) -> rustler::Atom {
    let _ = poller.stop.send(true);
    poller.credits.close();
    atoms::ok()
}

// ---------------------------------------------------------------------------
// Pull reads for `Convoy.Queue.get/2`

struct ShardRecords {
    shard_id: String,
    records: Vec<Record>,
}

/// Reads up to `limit` records in total from the given shards, in order,
/// starting at each shard's position. Replies with one entry per shard read.
/// With `telemetry`, each GetRecords call is first reported to the caller
/// (`crate::telemetry::get_records`).
#[rustler::nif]
fn fetch_records(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    stream_id: Term,
    positions: Vec<(String, Position)>,
    limit: i32,
    telemetry: bool,
    reply: ReplyTo,
) -> rustler::Atom {
    let caller = reply.pid();
    let client = client.client.clone();
    let stream_id = KeptTerm::new(stream_id);
    runtime::spawn_reply(reply, async move {
        let mut remaining = limit.max(1);
        let mut out = Vec::new();
        for (shard_id, position) in positions {
            if remaining == 0 {
                break;
            }
            let iterator = shard_iterator(&client, &stream_name, &shard_id, &position).await?;
            let called = Instant::now();
            let response = client
                .get_records()
                .shard_iterator(iterator)
                .limit(remaining)
                .send()
                .await;
            if telemetry {
                report_call(&caller, &shard_id, called, &response);
            }
            let output = response.map_err(|e| retry::classify(&e))?;
            let records = output.records().to_vec();
            remaining -= records.len() as i32;
            out.push(ShardRecords { shard_id, records });
        }
        Ok(EncodedShards(out, stream_id))
    });
    atoms::ok()
}

/// `[{shard_id, [%Convoy.Record{}]}]`, records built as the pollers build them.
struct EncodedShards(Vec<ShardRecords>, KeptTerm);

impl Encoder for EncodedShards {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let stream_id = self.1.load(env);
        let shards: Vec<Term> = self
            .0
            .iter()
            .map(|shard| {
                let origin = Origin {
                    shard_id: shard.shard_id.as_str().encode(env),
                    stream_id,
                };
                (
                    origin.shard_id,
                    encode_records(env, &shard.records, &origin),
                )
                    .encode(env)
            })
            .collect();
        shards.encode(env)
    }
}
