//! What a shard reader shares with its dispatcher process: the messages of
//! the reader protocol (`Convoy.Consumer.Source`), the acknowledgement
//! credits that hold the reader back while a batch is being handled, and the
//! stop signal. The dispatcher holds the `Reader` resource; dropping it
//! (the dispatcher died: the stop sender goes with it) or `reader_stop`
//! ends the reader.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::types::{ChildShard, Record};
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};
use tokio::sync::{watch, Semaphore};

use super::shard_map;
use crate::atoms;
use crate::delivery::{self, KeptTerm};
use crate::error::{Error, Reason};
use crate::record::{encode_records, encode_unparseable, Origin};

/// The dispatcher's handle on its reader.
pub struct Reader {
    credits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
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
    shard_id: String,
    stream_id: KeptTerm,
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
        let link = Link {
            dispatcher,
            shard_id,
            stream_id: KeptTerm::new(stream_id),
            credits: credits.clone(),
            stop: stop_rx,
        };
        (link, ResourceArc::new(Reader { credits, stop }))
    }

    pub fn dispatcher(&self) -> &LocalPid {
        &self.dispatcher
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
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
        let shard_id = self.shard_id.as_str();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_error(), shard_id, Reason(error)).encode(env)
        })
    }

    /// The reader ends on an error retrying cannot cure; the consumer
    /// restarts the shard from its checkpoint.
    pub fn stopped_by(&self, error: &Error) -> bool {
        let shard_id = self.shard_id.as_str();
        delivery::send(&self.dispatcher, |env| {
            (atoms::convoy_poller_stopped(), shard_id, Reason(error)).encode(env)
        })
    }

    /// A closed shard was read to its end. `children` are the shards that
    /// continue it as Kinesis named them at the end (a SubscribeToShard
    /// event's ChildShards); when there are none the message has no list
    /// and the consumer finds the children by listing the shards.
    pub fn shard_end(&self, children: &[ChildShard]) -> bool {
        let shard_id = self.shard_id.as_str();
        delivery::send(&self.dispatcher, |env| {
            if children.is_empty() {
                (atoms::convoy_shard_end(), shard_id).encode(env)
            } else {
                let children = encode_children(env, children);
                (atoms::convoy_shard_end(), shard_id, children).encode(env)
            }
        })
    }

    /// Sends one batch and waits for its acknowledgement.
    pub async fn deliver(&mut self, records: &[Record], millis_behind: Option<i64>) -> Flow {
        let shard_id = self.shard_id.as_str();
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
                let reasons = encode_unparseable(env, &unparseable);
                (atoms::convoy_unparseable(), shard_id, reasons).encode(env)
            });
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
