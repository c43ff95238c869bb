//! Enhanced fan-out: a registered stream consumer with its own read
//! throughput, records pushed over SubscribeToShard. One subscription per
//! shard at a time; it lasts up to five minutes and is renewed from where the
//! last one stood. The reader speaks the same protocol as the poller, so the
//! dispatcher, handlers and checkpoints are the same for both modes.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardOutput;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{
    ChildShard, ConsumerStatus, Record, ShardIteratorType, StartingPosition, SubscribeToShardEvent,
    SubscribeToShardEventStream,
};
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};
use tokio::sync::Mutex;

use super::link::{Flow, Link, Reader};
use super::Position;
use crate::atoms;
use crate::client::ClientResource;
use crate::error::Error;
use crate::reply::ReplyTo;
use crate::runtime;
use crate::telemetry;
use convoy_core::retry::{self, RetryPolicy};
use convoy_core::sequence;

/// Kinesis sends an event at least every few seconds, even on a quiet
/// shard; a subscription silent for this long is treated as dropped.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// How long registration waits for the consumer to become ACTIVE.
const ACTIVATION_LIMIT: Duration = Duration::from_secs(180);

/// A stream consumer by name, its ARN resolved (and the consumer registered
/// if missing) by the first shard that needs it, once for all shards.
pub struct StreamConsumer {
    client: aws_sdk_kinesis::Client,
    stream: String,
    name: String,
    arn: Mutex<Option<String>>,
}

#[rustler::resource_impl]
impl rustler::Resource for StreamConsumer {}

impl StreamConsumer {
    async fn arn(&self) -> Result<String, Error> {
        let mut arn = self.arn.lock().await;
        if arn.is_none() {
            *arn = Some(register(&self.client, &self.stream, &self.name).await?);
        }
        Ok(arn.clone().expect("set above"))
    }

    /// Forgets an ARN Kinesis no longer knows (the consumer was deregistered
    /// or the stream created again): the next subscription registers anew.
    async fn forget(&self, stale: &str) {
        let mut arn = self.arn.lock().await;
        if arn.as_deref() == Some(stale) {
            *arn = None;
        }
    }
}

async fn stream_arn(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<String, Error> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| retry::classify(&e))?;
    summary
        .stream_description_summary()
        .map(|d| d.stream_arn().to_owned())
        .ok_or_else(|| Error::aws("NoStreamArn", "DescribeStreamSummary returned no ARN"))
}

/// Registers the consumer unless it exists, then waits until it is ACTIVE.
async fn register(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    name: &str,
) -> Result<String, Error> {
    let stream_arn = stream_arn(client, stream).await?;
    let registered = client
        .register_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name(name)
        .send()
        .await;
    if let Err(e) = registered {
        let error = retry::classify(&e);
        // ResourceInUse: it exists already (or is being created); reuse it.
        if !matches!(&error, Error::Aws { code, .. } if code == "ResourceInUseException") {
            return Err(error);
        }
    }
    let started = tokio::time::Instant::now();
    loop {
        let described = client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await
            .map_err(|e| retry::classify(&e))?;
        if let Some(consumer) = described.consumer_description() {
            match consumer.consumer_status() {
                ConsumerStatus::Active => return Ok(consumer.consumer_arn().to_owned()),
                ConsumerStatus::Deleting => {
                    return Err(Error::aws(
                        "ResourceInUseException",
                        format!("stream consumer {name} is being deleted"),
                    ))
                }
                _ => {}
            }
        }
        if started.elapsed() > ACTIVATION_LIMIT {
            return Err(Error::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deregisters a stream consumer; replies `:ok`, also when it is unknown.
#[rustler::nif]
fn fan_out_deregister(
    client: ResourceArc<ClientResource>,
    stream: String,
    name: String,
    reply: ReplyTo,
) -> rustler::Atom {
    let client = client.client.clone();
    runtime::spawn_reply(reply, async move {
        let stream_arn = stream_arn(&client, &stream).await?;
        let result = client
            .deregister_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(name)
            .send()
            .await;
        match result.map_err(|e| retry::classify(&e)) {
            Ok(_) => Ok(atoms::ok()),
            Err(Error::Aws { code, .. }) if code == "ResourceNotFoundException" => Ok(atoms::ok()),
            Err(error) => Err(error),
        }
    });
    atoms::ok()
}

/// The queue's stream consumer, shared by its shards' subscriptions. Makes
/// no call: registration happens when the first subscription starts.
/// Returned as a term: the SDK client inside is not `RefUnwindSafe`, which
/// rustler asks of typed return values.
#[rustler::nif]
fn fan_out_consumer(
    env: Env,
    client: ResourceArc<ClientResource>,
    stream: String,
    name: String,
) -> Term {
    ResourceArc::new(StreamConsumer {
        client: client.client.clone(),
        stream,
        name,
        arn: Mutex::new(None),
    })
    .encode(env)
}

// ---------------------------------------------------------------------------
// Subscriptions

/// A subscription reader's options, under their `Convoy.Queue` names.
#[derive(rustler::NifMap)]
pub struct SubscriptionOptions {
    pub shard_id: String,
    pub retry_backoff: u64,
    pub max_backoff: u64,
    /// Report each event to the dispatcher (see `crate::telemetry`).
    pub telemetry: bool,
}

/// How a subscription ended.
enum Ended {
    /// Its five minutes are over (or the connection closed cleanly).
    Renew,
    /// The shard was read to its end; the children the last event named
    /// (none when it named none).
    ShardEnd(Vec<ChildShard>),
    Stop,
    Failed(Error),
}

/// AWS allows one SubscribeToShard per second per shard and consumer.
const MIN_SUBSCRIBE_SPACING: Duration = Duration::from_secs(1);

/// After this many failures in a row a missing resource (shard, stream or
/// consumer) ends the reader; the consumer restarts it later.
const NOT_FOUND_RETRIES: u32 = 5;

/// The first record a reader may hand over: a record a server sends again,
/// or one from before the start, never reaches the handlers. A renewal
/// starts after the last record delivered, but not every server honours a
/// starting position (ferrokinesis 0.7's own SubscribeToShard keeps only its
/// type and replays the shard from its start).
enum Floor {
    Any,
    Since(i64),
    At(String),
    After(String),
}

impl Floor {
    fn of(position: &Position) -> Floor {
        match position {
            Position::Latest | Position::TrimHorizon => Floor::Any,
            Position::AtTimestamp(ms) => Floor::Since(*ms),
            Position::AtSequenceNumber(s) => Floor::At(s.clone()),
            Position::AfterSequenceNumber(s) => Floor::After(s.clone()),
        }
    }

    fn admits(&self, record: &Record) -> bool {
        let seq = record.sequence_number();
        match self {
            Floor::Any => true,
            // To the second: some servers keep arrival times in whole
            // seconds, and a record of the start's second must not be lost.
            Floor::Since(ms) => record
                .approximate_arrival_timestamp()
                .map(|t| t.secs())
                .is_none_or(|arrival| arrival >= ms.div_euclid(1000)),
            Floor::At(s) => !sequence::after(s, seq),
            Floor::After(s) => sequence::after(seq, s),
        }
    }

    /// Takes the records of an event at or past the floor (they come in
    /// order) out of it.
    fn cut(&self, records: &mut Vec<Record>) -> Vec<Record> {
        let first = records
            .iter()
            .position(|r| self.admits(r))
            .unwrap_or(records.len());
        records.split_off(first)
    }
}

struct Subscriber {
    consumer: ResourceArc<StreamConsumer>,
    link: Link,
    /// Where the next subscription starts.
    resume: Position,
    floor: Floor,
    policy: RetryPolicy,
    telemetry: bool,
}

impl Subscriber {
    async fn run(mut self) {
        let mut failures = 0u32;
        let mut last_subscribe: Option<Instant> = None;
        loop {
            if let Some(at) = last_subscribe {
                let wait = MIN_SUBSCRIBE_SPACING.saturating_sub(at.elapsed());
                if !wait.is_zero() && !self.link.pause(wait).await {
                    return;
                }
            }
            if self.link.stopped() {
                return;
            }
            last_subscribe = Some(Instant::now());
            let shard_id = self.link.shard_id().to_owned();
            let subscribed = tokio::select! {
                subscribed = subscribe(&self.consumer, &shard_id, &self.resume) => subscribed,
                _ = self.link.stop_requested() => return,
            };
            let ended = match subscribed {
                Ok(output) => self.consume(output, &mut failures).await,
                Err(error) => Ended::Failed(error),
            };
            match ended {
                Ended::Renew => {}
                Ended::ShardEnd(children) => {
                    self.link.shard_end(&children);
                    return;
                }
                Ended::Stop => return,
                Ended::Failed(error) => {
                    failures += 1;
                    if !self.recover(&error, failures).await {
                        return;
                    }
                }
            }
        }
    }

    /// After a failed subscription: false ends the reader.
    async fn recover(&mut self, error: &Error, failures: u32) -> bool {
        self.report_failure(error);
        if super::is_foreign_position(&self.resume, error) {
            // The stream was created again, or the number is another
            // shard's: read the shard from its start.
            self.link.report(error);
            self.resume = Position::TrimHorizon;
            self.floor = Floor::Any;
            return true;
        }
        if !retryable(error, failures) {
            self.link.stopped_by(error);
            return false;
        }
        if failures == 1 {
            self.link.report(error);
        }
        self.link.pause(self.policy.backoff(failures)).await
    }

    fn report_failure(&self, error: &Error) {
        if self.telemetry {
            let (to, shard_id) = (self.link.dispatcher(), self.link.shard_id());
            telemetry::get_records(to, shard_id, Duration::ZERO, 0, None, None, Some(error));
        }
    }

    /// Reads a subscription's events until it ends. While a batch waits for
    /// its acknowledgement the next events stay unread, so a slow handler
    /// holds the shard back instead of filling memory.
    async fn consume(&mut self, mut output: SubscribeToShardOutput, failures: &mut u32) -> Ended {
        loop {
            let waited = Instant::now();
            let event = tokio::select! {
                event = tokio::time::timeout(SILENCE_LIMIT, output.event_stream.recv()) => event,
                _ = self.link.stop_requested() => return Ended::Stop,
            };
            let event = match event {
                Err(_silent) => {
                    return Ended::Failed(Error::aws("SubscriptionSilent", "no event for 30 s"))
                }
                Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => event,
                Ok(Ok(Some(_other))) => continue,
                Ok(Ok(None)) => return Ended::Renew,
                Ok(Err(error)) => return Ended::Failed(classify_stream_error(&error)),
            };
            *failures = 0;
            if let Some(ended) = self.handle(event, waited).await {
                return ended;
            }
        }
    }

    async fn handle(&mut self, mut event: SubscribeToShardEvent, waited: Instant) -> Option<Ended> {
        let had_records = !event.records.is_empty();
        let records = self.floor.cut(&mut event.records);
        let millis_behind = event.millis_behind_latest();
        let continuation = Some(event.continuation_sequence_number()).filter(|c| !c.is_empty());
        if self.telemetry {
            // Reported as a GetRecords call would be: the wait for the
            // event, the records it brought, the continuation as next position.
            let (to, shard_id) = (self.link.dispatcher(), self.link.shard_id());
            let next = continuation;
            let n = records.len();
            telemetry::get_records(
                to,
                shard_id,
                waited.elapsed(),
                n,
                Some(millis_behind),
                next,
                None,
            );
        }
        if let Some(last) = records.last() {
            let last = last.sequence_number().to_owned();
            if let Flow::Stop = self.link.deliver(records, Some(millis_behind)).await {
                return Some(Ended::Stop);
            }
            self.resume = Position::AfterSequenceNumber(last.clone());
            self.floor = Floor::After(last);
        } else if let Some(continuation) = continuation {
            // Before the first record of a position without a sequence
            // number, the continuation marks how far the shard was seen. AT,
            // not AFTER: an emulator's continuation may already be the next
            // number, and a renewal must never skip a record.
            if matches!(
                self.resume,
                Position::Latest | Position::TrimHorizon | Position::AtTimestamp(_)
            ) {
                self.resume = Position::AtSequenceNumber(continuation.to_owned());
                self.floor = Floor::At(continuation.to_owned());
            }
        }
        // The end of a closed shard: no continuation, or its children named
        // in an event with nothing more to read.
        let at_end = continuation.is_none() || (!had_records && !event.child_shards().is_empty());
        at_end.then(|| Ended::ShardEnd(event.child_shards().to_vec()))
    }
}

async fn subscribe(
    consumer: &StreamConsumer,
    shard_id: &str,
    position: &Position,
) -> Result<SubscribeToShardOutput, Error> {
    let arn = consumer.arn().await?;
    let subscribed = consumer
        .client
        .subscribe_to_shard()
        .consumer_arn(&arn)
        .shard_id(shard_id)
        .starting_position(starting_position(position))
        .send()
        .await
        .map_err(|e| retry::classify(&e));
    if let Err(Error::Aws { code, message }) = &subscribed {
        // The consumer is gone (deregistered, or the stream created again):
        // the next try registers it anew.
        if code == "ResourceNotFoundException" && message.contains("onsumer") {
            consumer.forget(&arn).await;
        }
    }
    subscribed
}

fn starting_position(position: &Position) -> StartingPosition {
    let builder = StartingPosition::builder();
    let builder = match position {
        Position::Latest => builder.r#type(ShardIteratorType::Latest),
        Position::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        Position::AtSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(s),
        Position::AfterSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(s),
        Position::AtTimestamp(ms) => builder
            .r#type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(*ms)),
    };
    builder.build().expect("type is set")
}

/// Errors that end a subscription but not the reader: two subscribers
/// racing for the shard, or our previous subscription still closing
/// (ResourceInUse; kinesis-mock sends it unnamed), a dropped or silent
/// connection, a missing consumer (registered again) for a few tries,
/// besides the usual transient ones.
fn retryable(error: &Error, failures: u32) -> bool {
    match error {
        // Before the general rule, which retries a missing resource forever.
        Error::Aws { code, .. } if code == "ResourceNotFoundException" => {
            failures <= NOT_FOUND_RETRIES
        }
        Error::Aws { code, message } => match code.as_str() {
            "SubscriptionSilent" | "LimitExceededException" => true,
            "Unknown" => message.contains("active subscription"),
            _ => retry::error_is_retryable(error),
        },
        _ => retry::error_is_retryable(error),
    }
}

fn classify_stream_error<E, R>(error: &SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(service) => {
            let e = service.err();
            Error::aws(
                e.code().unwrap_or("Unknown"),
                e.message().unwrap_or_default(),
            )
        }
        SdkError::TimeoutError(_) => Error::aws("TimeoutError", "subscription timed out"),
        _ => Error::aws("ResponseError", "subscription interrupted"),
    }
}

/// Starts the subscription reader of one shard; the dispatcher holds the
/// returned `Reader`.
#[rustler::nif]
fn subscription_start(
    consumer: ResourceArc<StreamConsumer>,
    stream_id: Term,
    options: SubscriptionOptions,
    position: Position,
    dispatcher: LocalPid,
) -> ResourceArc<Reader> {
    let (link, reader) = Link::new(dispatcher, options.shard_id, stream_id);
    let subscriber = Subscriber {
        consumer,
        link,
        floor: Floor::of(&position),
        resume: position,
        policy: RetryPolicy {
            base: Duration::from_millis(options.retry_backoff),
            max_backoff: Duration::from_millis(options.max_backoff),
            ..RetryPolicy::default()
        },
        telemetry: options.telemetry,
    };
    runtime::spawn_guarded("shard subscription", Some(dispatcher), subscriber.run());
    reader
}
