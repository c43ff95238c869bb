//! KPL aggregation on the producer side: user records bound for the same
//! shard are packed into aggregated records of at most `max_bytes`, so one
//! Kinesis record (and one unit of the per-shard record limit) carries many.
//!
//! Records are grouped by the shard their partition key (or explicit hash
//! key) maps to, using the stream's shard map, refreshed periodically and
//! whenever Kinesis places an aggregated record on another shard than
//! expected (after resharding). Until the map is known, records are grouped
//! by partition key, which is always safe.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use convoy_core::aggregation::{hash_key, Aggregator, ShardMap};
use tokio::sync::{watch, Notify};

use super::send::{Member, Outgoing};
use super::{Entry, Shared, MAX_REQUEST_BYTES, MAX_REQUEST_RECORDS};
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

/// An aggregated record being filled, for one group (a shard, or a key while
/// the shard map is unknown).
struct Open {
    group: String,
    aggregator: Aggregator,
    members: Vec<Member>,
    explicit_hash_key: Option<String>,
}

impl Open {
    fn new(group: String, entry: &Entry) -> Self {
        Open {
            group,
            aggregator: Aggregator::new(),
            members: Vec::new(),
            explicit_hash_key: entry.explicit_hash_key.clone(),
        }
    }

    /// Its size against the request limit (data plus partition key).
    fn request_bytes(&self) -> usize {
        self.aggregator.encoded_len() + self.aggregator.first_partition_key().map_or(0, str::len)
    }

    fn finish(self) -> Outgoing {
        let key = self
            .aggregator
            .first_partition_key()
            .expect("an open aggregate has a record")
            .to_owned();
        Outgoing {
            key,
            explicit_hash_key: self.explicit_hash_key,
            data: self.aggregator.finish(),
            members: self.members,
            aggregated: true,
            expected_shard: Some(self.group),
        }
    }
}

fn group_of(map: &ShardMap, entry: &Entry) -> String {
    let hash = match &entry.explicit_hash_key {
        Some(ehk) => ehk.parse().unwrap_or(0),
        None => hash_key(&entry.key),
    };
    match map.shard_for(hash) {
        Some(shard) => shard.to_owned(),
        None => match &entry.explicit_hash_key {
            Some(ehk) => format!("hash:{ehk}"),
            None => format!("key:{}", entry.key),
        },
    }
}

/// Takes records from the front of the buffer into aggregated records until
/// the request would pass 500 records or 5 MiB. Records of one key go to
/// one group, and a group's aggregates are emitted in order, so order holds.
pub(super) fn cut(buffer: &mut VecDeque<Entry>, aggregation: &Aggregation) -> Vec<Outgoing> {
    let map = aggregation.map();
    let mut done: Vec<Outgoing> = Vec::new();
    let mut done_bytes = 0usize;
    let mut open: Vec<Open> = Vec::new();

    while let Some(entry) = buffer.front() {
        let group = group_of(&map, entry);
        let slot = open.iter().position(|o| o.group == group);
        let fits_open = slot.is_some_and(|i| {
            open[i].aggregator.encoded_len_with(
                &entry.key,
                entry.explicit_hash_key.as_deref(),
                entry.data.len(),
            ) <= aggregation.max_bytes
        });
        let alone = Aggregator::new().encoded_len_with(
            &entry.key,
            entry.explicit_hash_key.as_deref(),
            entry.data.len(),
        );
        let aggregatable = alone <= aggregation.max_bytes;

        // What the request would hold after taking this record.
        let open_bytes: usize = open.iter().map(Open::request_bytes).sum();
        let (extra_records, extra_bytes) = if fits_open {
            let current = &open[slot.expect("fits_open")];
            let grown = current.aggregator.encoded_len_with(
                &entry.key,
                entry.explicit_hash_key.as_deref(),
                entry.data.len(),
            );
            (0, grown - current.aggregator.encoded_len())
        } else if aggregatable {
            (1, alone + entry.key.len())
        } else {
            (1, entry.size)
        };
        let records = done.len() + open.len() + extra_records;
        let bytes = done_bytes + open_bytes + extra_bytes;
        let empty = done.is_empty() && open.is_empty();
        if !empty && (records > MAX_REQUEST_RECORDS || bytes > MAX_REQUEST_BYTES) {
            break;
        }

        let entry = buffer.pop_front().expect("front exists");
        if !aggregatable {
            // Too large to share a record: send it as it is, as the KPL does.
            let single = Outgoing::single(entry);
            done_bytes += single.key.len() + single.data.len();
            done.push(single);
            continue;
        }
        let index = match slot {
            Some(i) if fits_open => i,
            Some(i) => {
                // Full: close it (keeping its place before newer records of
                // the group) and start another.
                let full = open.remove(i);
                done_bytes += full.request_bytes();
                done.push(full.finish());
                open.push(Open::new(group, &entry));
                open.len() - 1
            }
            None => {
                open.push(Open::new(group, &entry));
                open.len() - 1
            }
        };
        let target = &mut open[index];
        target.members.push(Member {
            reply: entry.reply,
            size: entry.size,
        });
        target
            .aggregator
            .add(&entry.key, entry.explicit_hash_key.as_deref(), entry.data);
    }
    done.extend(open.into_iter().map(Open::finish));
    done
}

/// Keeps the shard map current while the producer lives: every `interval`,
/// and at once when a record landed on an unexpected shard.
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
