//! The poller: one task per shard reads GetRecords and hands each batch to
//! the shard's dispatcher process (through `link.rs`, as the fan-out reader
//! does), then waits for that batch to be
//! acknowledged before it reads again. A slow handler therefore holds back
//! its shard instead of flooding a mailbox, and the task never holds more
//! than one batch.
//!
//! The task tracks the position after the last batch it delivered, so an
//! expired iterator or a transient failure resumes exactly there.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::types::Record;
use rustler::{LocalPid, ResourceArc, Term};

use super::link::{Flow, Link, Reader};
use super::{is_foreign_position, shard_iterator, Position};
use crate::client::ClientResource;
use crate::error::Error;
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

struct ShardTask {
    client: aws_sdk_kinesis::Client,
    options: PollerOptions,
    resume: Position,
    link: Link,
    policy: RetryPolicy,
}

/// What the read loop does after a GetRecords call.
enum Next {
    Iterator(String),
    Retry,
    Stop,
}

impl ShardTask {
    fn stopped(&self) -> bool {
        self.link.stopped()
    }

    async fn pause(&mut self, duration: Duration) -> bool {
        self.link.pause(duration).await
    }

    fn report(&self, error: &Error) -> bool {
        self.link.report(error)
    }

    /// The task ends on an error retrying cannot cure; the dispatcher decides
    /// what next (it restarts the shard from its checkpoint).
    fn stopped_by(&self, error: &Error) -> bool {
        self.link.stopped_by(error)
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
                report_call(
                    self.link.dispatcher(),
                    &self.options.shard_id,
                    called,
                    &response,
                );
            }
            let next = match response {
                Ok(output) => {
                    failures = 0;
                    self.read(output).await
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
    async fn read(&mut self, mut output: GetRecordsOutput) -> Next {
        let records = std::mem::take(&mut output.records);
        let read_any = !records.is_empty();
        if read_any {
            if let Flow::Stop = self.deliver(records, output.millis_behind_latest()).await {
                return Next::Stop;
            }
        }
        let Some(next) = output.next_shard_iterator() else {
            // A closed shard read to its end.
            self.link.shard_end(&[]);
            return Next::Stop;
        };
        if !read_any {
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

    /// Sends one batch, waits for its acknowledgement, and moves the
    /// resume position past it.
    async fn deliver(&mut self, records: Vec<Record>, millis_behind: Option<i64>) -> Flow {
        let last = records
            .last()
            .expect("not empty")
            .sequence_number()
            .to_owned();
        let flow = self.link.deliver(records, millis_behind).await;
        self.resume = Position::AfterSequenceNumber(last);
        flow
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

/// Starts the poller of one shard; the dispatcher holds the returned
/// `Reader` (see `link.rs`).
#[rustler::nif]
fn poller_start(
    client: ResourceArc<ClientResource>,
    stream_id: Term,
    options: PollerOptions,
    position: Position,
    dispatcher: LocalPid,
) -> ResourceArc<Reader> {
    let (link, reader) = Link::new(dispatcher, options.shard_id.clone(), stream_id);
    let task = ShardTask {
        client: client.client.clone(),
        policy: RetryPolicy {
            base: Duration::from_millis(options.retry_backoff),
            max_backoff: Duration::from_millis(options.max_backoff),
            ..RetryPolicy::default()
        },
        options,
        resume: position,
        link,
    };
    runtime::spawn_guarded("shard poller", Some(dispatcher), task.run());
    reader
}
