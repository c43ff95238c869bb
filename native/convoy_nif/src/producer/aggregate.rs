//! KPL aggregation on the producer side: user records bound for the same
//! shard are packed into aggregated records of at most `max_bytes`, so one
//! Kinesis record (and one unit of the per-shard record limit) carries many.
//!
//! Records are grouped by the shard their partition key (or explicit hash
//! key) maps to, using the stream's shard map, refreshed periodically and
//! whenever Kinesis places an aggregated record on another shard than
//! expected (after resharding). Until the map is known, records are grouped
//! by partition key, which is always safe.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use convoy_core::aggregation::{hash_key, Aggregator, Measured, ShardMap};
use foldhash::fast::RandomState;
use tokio::sync::{watch, Notify};

use super::entry::{Entry, Packed};
use super::order::Scan;
use super::send::{Member, Members, Outgoing};
use super::{Shared, MAX_REQUEST_BYTES, MAX_REQUEST_RECORDS};
use crate::shards;

pub(super) struct Aggregation {
    pub max_bytes: usize,
    pub shard_map: RwLock<Arc<ShardMap>>,
    pub refresh: Notify,
    /// Turns true after the first attempt to load the shard map.
    first_load: watch::Sender<bool>,
}

impl Aggregation {
    pub fn new(max_bytes: usize) -> Self {
        Aggregation {
            max_bytes,
            shard_map: RwLock::new(Arc::new(ShardMap::default())),
            refresh: Notify::new(),
            first_load: watch::Sender::new(false),
        }
    }

    /// Waits (briefly) for the first shard map, so the first requests are
    /// already grouped by shard rather than by key.
    pub async fn await_first_load(&self) {
        let mut loaded = self.first_load.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), loaded.wait_for(|done| *done)).await;
    }

    fn map(&self) -> Arc<ShardMap> {
        self.shard_map.read().expect("not poisoned").clone()
    }
}

/// Which aggregated record a user record may join: records that reach the
/// same shard. By the shard map when it knows the record's hash key, else
/// by the hash key itself (records with one hash key always share a shard).
/// No string is built per record.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Shard(usize),
    Hash(u128),
}

/// The hash keys (MD5) of the partition keys a lane has seen, so a record's
/// shard is found without hashing its key each time: keys repeat, and MD5
/// cost more than the rest of placing a record. Bounded: once full, new
/// keys are hashed without being kept, so unique keys allocate nothing.
#[derive(Default)]
pub(super) struct KeyHashes {
    known: HashMap<Box<str>, u128, RandomState>,
}

impl KeyHashes {
    const CAPACITY: usize = 1024;

    fn of(&mut self, key: &str) -> u128 {
        if let Some(hash) = self.known.get(key) {
            return *hash;
        }
        let hash = hash_key(key);
        if self.known.len() < Self::CAPACITY {
            self.known.insert(key.into(), hash);
        }
        hash
    }
}

fn group_of(map: &ShardMap, key: &str, entry: &Entry, hashes: &mut KeyHashes) -> Group {
    let hash = match entry.explicit_hash_key() {
        Some(ehk) => ehk.parse().unwrap_or(0),
        None => hashes.of(key),
    };
    match map.index_for(hash) {
        Some(index) => Group::Shard(index),
        None => Group::Hash(hash),
    }
}

/// An aggregated record being filled, for one group.
struct Open {
    /// Its number among the request's Kinesis records.
    slot: u32,
    group: Group,
    aggregator: Aggregator,
    members: Vec<Member>,
    explicit_hash_key: Option<Box<str>>,
}

impl Open {
    fn new(slot: u32, group: Group, entry: &Entry) -> Self {
        Open {
            slot,
            group,
            aggregator: Aggregator::new(),
            members: Vec::new(),
            explicit_hash_key: entry.explicit_hash_key().map(Box::from),
        }
    }

    /// Its size against the request limit (data plus partition key).
    fn request_bytes(&self) -> usize {
        self.aggregator.encoded_len() + self.aggregator.first_partition_key().map_or(0, str::len)
    }

    /// Adds the entry, measured against this aggregate if it was (a record
    /// joining it), else measured here (the first record of a new one).
    fn add(&mut self, entry: Entry, measured: Option<Measured>) {
        let record = &entry.record;
        let (key, ehk, data) = (record.key(), entry.explicit_hash_key(), record.data());
        match measured {
            Some(measured) => self.aggregator.add_measured(measured, key, ehk, data),
            None => self.aggregator.add(key, ehk, data),
        }
        self.members.push(Member {
            extras: entry.extras,
            size: record.len(),
        });
    }

    fn finish(self, map: &ShardMap) -> Outgoing {
        let key = self
            .aggregator
            .first_partition_key()
            .expect("an open aggregate has a record")
            .to_owned();
        let mut bytes = Vec::with_capacity(key.len() + self.aggregator.encoded_len());
        bytes.extend_from_slice(key.as_bytes());
        self.aggregator.finish_into(&mut bytes);
        Outgoing {
            record: Packed::from_vec(bytes, key.len()),
            explicit_hash_key: self.explicit_hash_key,
            members: Members::Many(self.members),
            expected_shard: match self.group {
                Group::Shard(index) => Some(map.id(index).into()),
                Group::Hash(_) => None,
            },
            aggregated: true,
        }
    }
}

/// Where the next user record goes, and by how many bytes it grows the
/// request there (each size computed once).
enum Place {
    /// Into the open aggregate at this index, measured against it.
    Join(usize, Measured),
    /// Into a new aggregate (closing the full one at this index first).
    Start(Option<usize>, usize),
    /// Too large to share a record: sent as it is, as the KPL does.
    Alone(usize),
}

/// A request being cut: finished Kinesis records, and the aggregates still
/// open, one per group at most.
struct Cut<'a> {
    aggregation: &'a Aggregation,
    map: Arc<ShardMap>,
    done: Vec<Outgoing>,
    done_bytes: usize,
    open: Vec<Open>,
    /// The number the next Kinesis record of the request gets.
    next_slot: u32,
}

impl<'a> Cut<'a> {
    fn new(aggregation: &'a Aggregation) -> Self {
        Cut {
            aggregation,
            map: aggregation.map(),
            done: Vec::new(),
            done_bytes: 0,
            open: Vec::new(),
            next_slot: 0,
        }
    }

    /// `key` is the entry's partition key (checked once by the caller).
    fn place(&self, group: Group, key: &str, entry: &Entry) -> Place {
        let max = self.aggregation.max_bytes;
        let ehk = entry.explicit_hash_key();
        let data_len = entry.record.data().len();
        let slot = self.open.iter().position(|o| o.group == group);
        if let Some(i) = slot {
            let current = &self.open[i].aggregator;
            let measured = current.measure(key, ehk, data_len);
            if current.encoded_len() + measured.growth() <= max {
                return Place::Join(i, measured);
            }
        }
        let alone = Aggregator::single_len(key, ehk, data_len);
        if alone > max {
            Place::Alone(entry.size())
        } else {
            Place::Start(slot, alone + key.len())
        }
    }

    /// Whether the request stays within 500 records and 5 MiB with the
    /// entry placed there. An empty request takes any one record.
    fn fits(&self, place: &Place) -> bool {
        if self.done.is_empty() && self.open.is_empty() {
            return true;
        }
        let (extra_records, extra_bytes) = match *place {
            Place::Join(_, measured) => (0, measured.growth()),
            Place::Start(_, bytes) | Place::Alone(bytes) => (1, bytes),
        };
        let open_bytes: usize = self.open.iter().map(Open::request_bytes).sum();
        let records = self.done.len() + self.open.len() + extra_records;
        let bytes = self.done_bytes + open_bytes + extra_bytes;
        records <= MAX_REQUEST_RECORDS && bytes <= MAX_REQUEST_BYTES
    }

    /// The Kinesis record of the request the entry would be in.
    fn slot(&self, place: &Place) -> u32 {
        match *place {
            Place::Join(i, _) => self.open[i].slot,
            Place::Start(..) | Place::Alone(_) => self.next_slot,
        }
    }

    fn take(&mut self, place: Place, group: Group, entry: Entry) {
        let (index, measured) = match place {
            Place::Alone(_) => {
                // The group's open aggregate may hold earlier records of
                // this key: it goes first, so the request keeps put order.
                if let Some(i) = self.open.iter().position(|o| o.group == group) {
                    let open = self.open.remove(i);
                    self.done_bytes += open.request_bytes();
                    self.done.push(open.finish(&self.map));
                }
                self.next_slot += 1;
                self.done_bytes += entry.size();
                self.done.push(Outgoing::single(entry));
                return;
            }
            Place::Join(i, measured) => (i, Some(measured)),
            Place::Start(full, _) => {
                if let Some(i) = full {
                    // Full: close it, keeping its place before newer records
                    // of the group, and start another.
                    let full = self.open.remove(i);
                    self.done_bytes += full.request_bytes();
                    self.done.push(full.finish(&self.map));
                }
                self.open.push(Open::new(self.next_slot, group, &entry));
                self.next_slot += 1;
                (self.open.len() - 1, None)
            }
        };
        self.open[index].add(entry, measured);
    }

    fn finish(self) -> Vec<Outgoing> {
        let Cut {
            map,
            mut done,
            open,
            ..
        } = self;
        done.extend(open.into_iter().map(|o| o.finish(&map)));
        done
    }
}

/// Takes records from the front of the buffer into aggregated records until
/// the request would pass 500 records or 5 MiB. Records of one key go to
/// one group, and a group's aggregates are emitted in order. In per-key
/// order a key's records of one request are all in one aggregated record
/// (or its one record too large to share), so Kinesis stores or rejects
/// them together; the rest wait for the next request.
pub(super) fn cut(
    scan: &mut Scan,
    aggregation: &Aggregation,
    hashes: &mut KeyHashes,
) -> Vec<Outgoing> {
    let mut cut = Cut::new(aggregation);
    while let Some(entry) = scan.next() {
        let key = entry.record.key();
        let group = group_of(&cut.map, key, entry, hashes);
        let place = cut.place(group, key, entry);
        if !cut.fits(&place) {
            break;
        }
        let slot = cut.slot(&place);
        if !scan.admits(slot) {
            scan.set_aside();
            continue;
        }
        cut.take(place, group, scan.take(slot));
    }
    cut.finish()
}

/// Keeps the shard map current while the producer takes records: every
/// `interval`, and at once when a record landed on an unexpected shard.
/// Once the producer is closed its lanes finish with the map they have:
/// callers may hold its handle long after (see `Convoy.Queue.HandleCache`),
/// which must not keep this loop calling ListShards.
pub(super) async fn refresh_shard_map(
    shared: Weak<Shared>,
    aggregation: Arc<Aggregation>,
    interval: Duration,
) {
    loop {
        {
            let Some(producer) = shared.upgrade() else {
                return;
            };
            // Closed after its first load (which the lanes wait for).
            if producer.closed.load(Ordering::Relaxed) && *aggregation.first_load.borrow() {
                return;
            }
            if let Ok(shards) = shards::list_shards(&producer.client, &producer.stream_name).await {
                let open = shards.iter().filter(|s| {
                    s.sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_none()
                });
                let map = ShardMap::new(open.filter_map(|s| {
                    let range = s.hash_key_range()?;
                    Some((
                        s.shard_id(),
                        range.starting_hash_key(),
                        range.ending_hash_key(),
                    ))
                }));
                *aggregation.shard_map.write().expect("not poisoned") = Arc::new(map);
            }
            aggregation.first_load.send_replace(true);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = aggregation.refresh.notified() => {}
        }
    }
}
