//! Enhanced fan-out: a registered stream consumer with its own read
//! throughput, records pushed over SubscribeToShard. One subscription per
//! shard at a time; it lasts up to five minutes and is renewed from where the
//! last one stood. The reader speaks the same protocol as the poller, so the
//! dispatcher, handlers and checkpoints are the same for both modes.

use std::time::Duration;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardOutput;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{
    ConsumerStatus, Record, ShardIteratorType, StartingPosition, SubscribeToShardEvent,
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
}

/// How a subscription ended.
enum Ended {
    /// Its five minutes are over (or the connection closed cleanly).
    Renew,
    /// The shard was read to its end.
    ShardEnd,
    Stop,
    Failed(Error),
}

struct Subscriber {
    consumer: ResourceArc<StreamConsumer>,
    link: Link,
    /// Where the next subscription starts.
    resume: Position,
    /// Whether a record was handed over, so `resume` follows records.
    delivered: bool,
    policy: RetryPolicy,
}

impl Subscriber {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            if self.link.stopped() {
                return;
            }
            let ended = match self.subscribe().await {
                Ok(output) => self.consume(output, &mut failures).await,
                Err(error) => Ended::Failed(error),
            };
            match ended {
                Ended::Renew => {}
                Ended::ShardEnd => {
                    self.link.shard_end();
                    return;
                }
                Ended::Stop => return,
                Ended::Failed(error) => {
                    failures += 1;
                    if !retryable(&error) {
                        self.link.stopped_by(&error);
                        return;
                    }
                    if failures == 1 {
                        self.link.report(&error);
                    }
                    if !self.link.pause(self.policy.backoff(failures)).await {
                        return;
                    }
                }
            }
        }
    }

    async fn subscribe(&mut self) -> Result<SubscribeToShardOutput, Error> {
        let consumer = &self.consumer;
        let arn = consumer.arn().await?;
        let subscribed = consumer
            .client
            .subscribe_to_shard()
            .consumer_arn(&arn)
            .shard_id(self.link.shard_id())
            .starting_position(starting_position(&self.resume))
            .send()
            .await
            .map_err(|e| retry::classify(&e));
        if let Err(Error::Aws { code, .. }) = &subscribed {
            if code == "ResourceNotFoundException" {
                consumer.forget(&arn).await;
            }
        }
        subscribed
    }

    /// Reads a subscription's events until it ends. While a batch waits for
    /// its acknowledgement the next events stay unread, so a slow handler
    /// holds the shard back instead of filling memory.
    async fn consume(&mut self, mut output: SubscribeToShardOutput, failures: &mut u32) -> Ended {
        loop {
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
            if let Some(ended) = self.handle(&event).await {
                return ended;
            }
        }
    }

    async fn handle(&mut self, event: &SubscribeToShardEvent) -> Option<Ended> {
        let records = self.unseen(event.records());
        let continuation = Some(event.continuation_sequence_number()).filter(|c| !c.is_empty());
        if let Some(last) = records.last() {
            if let Flow::Stop = self
                .link
                .deliver(records, Some(event.millis_behind_latest()))
                .await
            {
                return Some(Ended::Stop);
            }
            self.resume = Position::AfterSequenceNumber(last.sequence_number().to_owned());
            self.delivered = true;
        } else if let (false, Some(continuation)) = (self.delivered, continuation) {
            // Nothing read yet: the continuation marks how far the shard was
            // seen. AT, not AFTER, so a renewal can never skip a record (an
            // emulator's continuation may already be the next number).
            self.resume = Position::AtSequenceNumber(continuation.to_owned());
        }
        // The end of a closed shard: no continuation, or the children named
        // once everything is read.
        let at_end =
            continuation.is_none() || (records.is_empty() && !event.child_shards().is_empty());
        at_end.then_some(Ended::ShardEnd)
    }
}

impl Subscriber {
    /// The records after the last one delivered. A renewed subscription
    /// starts after it, but an emulator may start earlier (ferrokinesis 0.7
    /// ignores the sequence number of the starting position), and a record
    /// must not reach the handlers twice.
    fn unseen<'r>(&self, records: &'r [Record]) -> &'r [Record] {
        match (&self.resume, self.delivered) {
            (Position::AfterSequenceNumber(last), true) => {
                let first_new = records
                    .iter()
                    .position(|r| sequence::after(r.sequence_number(), last))
                    .unwrap_or(records.len());
                &records[first_new..]
            }
            _ => records,
        }
    }
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
/// racing for the shard (or our previous subscription still closing), a
/// consumer that is gone (registered again on the next try), a dropped or
/// silent connection, an error the SDK could not name (kinesis-mock's
/// "another active subscription exists" arrives so), besides the usual
/// transient ones.
fn retryable(error: &Error) -> bool {
    retry::error_is_retryable(error)
        || matches!(error, Error::Aws { code, .. }
            if code == "ResourceInUseException"
                || code == "Unknown"
                || code == "ResourceNotFoundException"
                || code == "SubscriptionSilent"
                || code == "LimitExceededException")
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
        resume: position,
        delivered: false,
        policy: RetryPolicy {
            base: Duration::from_millis(options.retry_backoff),
            max_backoff: Duration::from_millis(options.max_backoff),
            ..RetryPolicy::default()
        },
    };
    runtime::spawn_guarded("shard subscription", Some(dispatcher), subscriber.run());
    reader
}
