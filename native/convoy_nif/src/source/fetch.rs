//! Pull reads for `Convoy.Queue.get/2`: one GetRecords call on one shard,
//! from a position or from the iterator the previous call returned. The
//! consumer (`Convoy.Consumer`) decides which shard to read next, follows
//! the iterators across empty responses and spaces the calls.

use aws_sdk_kinesis::types::Record;
use rustler::{Encoder, Env, ResourceArc, Term};

use std::time::Instant;

use super::poller::report_call;
use super::{is_foreign_position, shard_iterator, Position};
use crate::atoms;
use crate::client::ClientResource;
use crate::delivery::KeptTerm;
use crate::record::{encode_records, encode_unparseable, Origin};
use crate::reply::ReplyTo;
use crate::runtime;
use convoy_core::retry;

struct Fetched {
    shard_id: String,
    records: Vec<Record>,
    next_iterator: Option<String>,
    millis_behind: Option<i64>,
    stream_id: KeptTerm,
}

/// Reads up to `limit` Kinesis records of one shard, from `iterator` when
/// given, else from `position` (a sequence number the shard refuses as not
/// its own falls back to the shard's start). Replies `{records,
/// next_iterator | nil, millis_behind_latest | -1, unparseable}`; no next
/// iterator means a closed shard read to its end. With `telemetry`, the
/// GetRecords call is first reported to the caller
/// (`crate::telemetry::get_records`).
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn fetch_records(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    stream_id: Term,
    shard_id: String,
    position: Position,
    iterator: Option<String>,
    limit: i32,
    telemetry: bool,
    reply: ReplyTo,
) -> rustler::Atom {
    let caller = reply.pid();
    let client = client.client.clone();
    let stream_id = KeptTerm::new(stream_id);
    runtime::spawn_reply(reply, async move {
        let iterator = match iterator {
            Some(iterator) => iterator,
            None => match shard_iterator(&client, &stream_name, &shard_id, &position).await {
                Err(error) if is_foreign_position(&position, &error) => {
                    shard_iterator(&client, &stream_name, &shard_id, &Position::TrimHorizon).await?
                }
                other => other?,
            },
        };
        let called = Instant::now();
        let response = client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit.clamp(1, 10_000))
            .send()
            .await;
        if telemetry {
            report_call(&caller, &shard_id, called, &response);
        }
        let output = response.map_err(|e| retry::classify(&e))?;
        Ok(Fetched {
            shard_id,
            records: output.records().to_vec(),
            next_iterator: output.next_shard_iterator().map(str::to_owned),
            millis_behind: output.millis_behind_latest(),
            stream_id,
        })
    });
    atoms::ok()
}

impl Encoder for Fetched {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let origin = Origin {
            shard_id: self.shard_id.as_str().encode(env),
            stream_id: self.stream_id.load(env),
        };
        let mut unparseable = Vec::new();
        let records = encode_records(env, &self.records, &origin, &mut unparseable);
        (
            records,
            self.next_iterator.as_deref(),
            self.millis_behind.unwrap_or(-1),
            encode_unparseable(env, &unparseable),
        )
            .encode(env)
    }
}
