//! The poller: one task per shard reads GetRecords and sends each batch to
//! the shard's dispatcher process, then waits for that batch to be
//! acknowledged before it reads again. A slow handler therefore holds back
//! its shard instead of flooding a mailbox, and the task never holds more
//! than one batch.
//!
//! The task tracks the position after the last batch it delivered, so an
//! expired iterator or a transient failure resumes exactly there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::types::Record;
use rustler::{Encoder, LocalPid, ResourceArc, Term};
use tokio::sync::{watch, Semaphore};

use super::{is_foreign_position, shard_iterator, Position};
use crate::atoms;
use crate::client::ClientResource;
use crate::delivery::{self, KeptTerm};
use crate::error::{Error, Reason};
use crate::record::{encode_records, encode_unparseable, Origin};
use crate::runtime;
use crate::telemetry;
use convoy_core::retry::{self, RetryPolicy};

/// Kinesis allows 5 GetRecords calls per second per shard.
const MIN_CALL_SPACING: Duration = Duration::from_millis(200);

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

/// What the read loop does after a GetRecords call.
enum Next {
    Iterator(String),
    Retry,
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

    /// Whether Kinesis refused the resume position as not from this shard.
    fn foreign_position(&self, error: &Error) -> bool {
        is_foreign_position(&self.resume, error)
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
            let next = match response {
                Ok(output) => {
                    failures = 0;
                    self.read(&output).await
                }
                Err(sdk_error) => {
                    self.recover(retry::classify(&sdk_error), &mut failures)
                        .await
                }
            };
            match next {
                Next::Iterator(fresh) => iterator = fresh,
                Next::Retry => {}
                Next::Stop => return,
            }
        }
    }

    /// Delivers a GetRecords response and says where to read next.
    async fn read(&mut self, output: &GetRecordsOutput) -> Next {
        let records = output.records();
        if !records.is_empty() {
            if let Flow::Stop = self.deliver(records, output.millis_behind_latest()).await {
                return Next::Stop;
            }
        }
        let Some(next) = output.next_shard_iterator() else {
            // A closed shard read to its end.
            let shard_id = self.options.shard_id.as_str();
            delivery::send(&self.dispatcher, |env| {
                (atoms::convoy_shard_end(), shard_id).encode(env)
            });
            return Next::Stop;
        };
        if records.is_empty() {
            let interval = Duration::from_millis(self.options.poll_interval);
            if !self.pause(interval).await {
                return Next::Stop;
            }
        }
        Next::Iterator(next.to_owned())
    }

    /// After a failed GetRecords: a fresh iterator for an expired one,
    /// backoff for a transient error, the end of the task for any other.
    async fn recover(&mut self, error: Error, failures: &mut u32) -> Next {
        let expired =
            matches!(&error, Error::Aws { code, .. } if code == "ExpiredIteratorException");
        if expired {
            // Reported (logged and counted), so that a batch held past the
            // iterator's lifetime shows, then read again from the position.
            self.report(&error);
        } else {
            *failures += 1;
            let failures = *failures;
            if !retry::error_is_retryable(&error) {
                self.stopped_by(&error);
                return Next::Stop;
            }
            if failures == 1 {
                self.report(&error);
            }
            let wait = self.policy.backoff(failures);
            if !self.pause(wait).await {
                return Next::Stop;
            }
            // The iterator may have expired while we waited.
            if failures <= 3 {
                return Next::Retry;
            }
        }
        match self.iterator().await {
            Some(fresh) => Next::Iterator(fresh),
            None => Next::Stop,
        }
    }

    /// Sends one batch and waits for its acknowledgement.
    async fn deliver(&mut self, records: &[Record], millis_behind: Option<i64>) -> Flow {
        let shard_id = self.options.shard_id.as_str();
        let stream_id = &self.stream_id;
        let mut unparseable = Vec::new();
        let sent = delivery::send(&self.dispatcher, |env| {
            let origin = Origin {
                shard_id: shard_id.encode(env),
                stream_id: stream_id.load(env),
            };
            (
                atoms::convoy_records(),
                origin.shard_id,
                encode_records(env, records, &origin, &mut unparseable),
                millis_behind.unwrap_or(-1),
            )
                .encode(env)
        });
        if !sent {
            return Flow::Stop;
        }
        if !unparseable.is_empty() {
            // Logged and counted by the dispatcher; the batch goes on.
            delivery::send(&self.dispatcher, |env| {
                (
                    atoms::convoy_unparseable(),
                    shard_id,
                    encode_unparseable(env, &unparseable),
                )
                    .encode(env)
            });
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
pub(super) fn report_call(
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
