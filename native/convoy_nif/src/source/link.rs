//! What a shard reader shares with its dispatcher process: the messages of
//! the reader protocol (`Convoy.Consumer.Source`), the batch handed over,
//! the acknowledgement credits that hold the reader back while a batch is
//! being handled, and the stop signal. The dispatcher holds the `Reader`
//! resource; dropping it (the dispatcher died: the stop sender goes with it)
//! or `reader_stop` ends the reader.
//!
//! A batch is not sent as terms: the reader leaves the records it read in
//! the handover and tells the dispatcher, which takes them in chunks
//! (`reader_take`), built as terms on its own heap. Terms built by a runtime
//! thread travel in heap fragments that the VM's allocators hand out under
//! locks to threads it does not run, and that the receiver walks when it
//! takes the message in; building them in the receiving process saves that
//! (about 9% of the consumer's CPU per record, bench/PROFILE.md). Chunks
//! keep the dispatcher's heap small (`convoy_core::chunk`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::types::{ChildShard, Record};
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};
use tokio::sync::{watch, Semaphore};

use super::shard_map;
use crate::atoms;
use crate::delivery::{self, KeptTerm};
use crate::error::{Error, Reason};
use crate::record::{encode_records, encode_unparseable, Origin};
use convoy_core::chunk;

/// The dispatcher's handle on its reader.
pub struct Reader {
    credits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
    handover: Arc<Handover>,
}

/// A delivered batch waiting for its dispatcher to take it, and what every
/// record of it shares.
struct Handover {
    shard_id: String,
    stream_id: KeptTerm,
    /// The Kinesis records announced that the dispatcher has not taken yet.
    batch: Mutex<VecDeque<Record>>,
}

#[rustler::resource_impl]
impl rustler::Resource for Reader {}

/// Whether the reader goes on after handing over a batch.
pub enum Flow {
    Continue,
    Stop,
}

/// The reader's side of the link.
pub struct Link {
    dispatcher: LocalPid,
    handover: Arc<Handover>,
    credits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Link {
    pub fn new(
        dispatcher: LocalPid,
        shard_id: String,
        stream_id: Term,
    ) -> (Link, ResourceArc<Reader>) {
        let credits = Arc::new(Semaphore::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let handover = Arc::new(Handover {
            shard_id,
            stream_id: KeptTerm::new(stream_id),
            batch: Mutex::new(VecDeque::new()),
        });
        let link = Link {
            dispatcher,
            handover: handover.clone(),
            credits: credits.clone(),
            stop: stop_rx,
        };
        let reader = Reader {
            credits,
            stop,
            handover,
        };
        (link, ResourceArc::new(reader))
    }

    pub fn dispatcher(&self) -> &LocalPid {
        &self.dispatcher
    }

    pub fn shard_id(&self) -> &str {
        &self.handover.shard_id
    }

    /// Told to stop, or the dispatcher's handle is gone.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Resolves when the dispatcher stops the reader.
    pub async fn stop_requested(&mut self) {
        while !*self.stop.borrow() {
            if self.stop.changed().await.is_err() {
                return;
            }
        }
    }

    /// Sleeps unless told to stop first; false means stop.
    pub async fn pause(&mut self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => !self.stopped(),
            _ = self.stop_requested() => false,
        }
    }

    /// An error worth logging; the reader goes on.
    pub fn report(&self, error: &Error) -> bool {
        let shard_id = self.shard_id();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_error(), shard_id, Reason(error)).encode(env)
        })
    }

    /// The reader ends on an error retrying cannot cure; the consumer
    /// restarts the shard from its checkpoint.
    pub fn stopped_by(&self, error: &Error) -> bool {
        let shard_id = self.shard_id();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_stopped(), shard_id, Reason(error)).encode(env)
        })
    }

    /// A closed shard was read to its end. `children` are the shards that
    /// continue it as Kinesis named them at the end (a SubscribeToShard
    /// event's ChildShards); when there are none the message has no list
    /// and the consumer finds the children by listing the shards.
    pub fn shard_end(&self, children: &[ChildShard]) -> bool {
        let shard_id = self.shard_id();
        delivery::send(&self.dispatcher, |env| {
            if children.is_empty() {
                (atoms::convoy_shard_end(), shard_id).encode(env)
            } else {
                let children = encode_children(env, children);
                (atoms::convoy_shard_end(), shard_id, children).encode(env)
            }
        })
    }

    /// Hands one batch over and waits for its acknowledgement.
    pub async fn deliver(&mut self, records: Vec<Record>, millis_behind: Option<i64>) -> Flow {
        let count = records.len();
        // The dispatcher takes all of a batch before it acknowledges it, so
        // the handover is empty here. Should an extra acknowledgement ever
        // let the reader run ahead, the records still waiting are extended,
        // not overwritten; the dispatcher, which takes chunks until none is
        // left, ignores announcements while it does.
        let waiting = {
            let mut batch = self.handover.batch.lock().expect("no panic holds it");
            if batch.is_empty() {
                *batch = records.into();
                false
            } else {
                batch.extend(records);
                true
            }
        };
        let shard_id = self.shard_id();
        let sent = waiting
            || delivery::send(&self.dispatcher, |env| {
                let millis_behind = millis_behind.unwrap_or(-1);
                (
                    atoms::convoy_records_ready(),
                    shard_id,
                    count,
                    millis_behind,
                )
                    .encode(env)
            });
        if !sent {
            return Flow::Stop;
        }
        let credits = self.credits.clone();
        tokio::select! {
            permit = credits.acquire() => match permit {
                Ok(permit) => { permit.forget(); Flow::Continue }
                Err(_) => Flow::Stop,
            },
            _ = self.stop_requested() => Flow::Stop,
        }
    }
}

/// Child shards as maps of the keys `list_shards` gives a shard: the first
/// parent is `parent_shard_id`, a second one `adjacent_parent_shard_id`.
fn encode_children<'a>(env: Env<'a>, children: &[ChildShard]) -> Term<'a> {
    let children: Vec<Term> = children
        .iter()
        .map(|child| {
            let parents = child.parent_shards();
            let parents = [0, 1].map(|i| parents.get(i).map(String::as_str));
            shard_map(env, child.shard_id(), parents, child.hash_key_range(), None)
        })
        .collect();
    children.encode(env)
}

/// The next chunk of the batch handed over (`convoy_core::chunk`) as
/// `{records, unparseable}`: a list of `%Convoy.Record{}` built on the
/// calling process's heap, aggregated records expanded, and
/// `[{sequence_number, reason}]` for the Kinesis records that could not be
/// unpacked. `:done` when all of the batch was taken; `:dirty`, taking
/// nothing, when the chunk is too much work for the normal scheduler the
/// caller runs on (aggregated records, or one record over 1 MiB).
fn take_chunk<'a>(env: Env<'a>, reader: &Reader, on_dirty_scheduler: bool) -> Term<'a> {
    let handover = &reader.handover;
    let mut batch = handover.batch.lock().expect("no panic holds it");
    let chunk = chunk::next(batch.iter().map(|record| record.data().as_ref()));
    if chunk.records == 0 {
        return atoms::done().encode(env);
    }
    if chunk.dirty && !on_dirty_scheduler {
        return atoms::dirty().encode(env);
    }
    let records: Vec<Record> = batch.drain(..chunk.records).collect();
    drop(batch);

    let origin = Origin {
        shard_id: handover.shard_id.encode(env),
        stream_id: handover.stream_id.load(env),
    };
    let mut unparseable = Vec::new();
    let records = encode_records(env, &records, &origin, &mut unparseable);
    (records, encode_unparseable(env, &unparseable)).encode(env)
}

/// `take_chunk` on the caller's scheduler; `:dirty` sends the caller to
/// `reader_take_dirty`.
#[rustler::nif]
fn reader_take<'a>(env: Env<'a>, reader: ResourceArc<Reader>) -> Term<'a> {
    take_chunk(env, &reader, false)
}

/// `take_chunk` on a dirty CPU scheduler, for a chunk of any kind.
#[rustler::nif(schedule = "DirtyCpu")]
fn reader_take_dirty<'a>(env: Env<'a>, reader: ResourceArc<Reader>) -> Term<'a> {
    take_chunk(env, &reader, true)
}

/// The dispatcher finished the batch it was sent: the reader may go on.
#[rustler::nif]
fn reader_ack(reader: ResourceArc<Reader>) -> rustler::Atom {
    reader.credits.add_permits(1);
    atoms::ok()
}

#[rustler::nif]
fn reader_stop(reader: ResourceArc<Reader>) -> rustler::Atom {
    let _ = reader.stop.send(true);
    reader.credits.close();
    atoms::ok()
}
