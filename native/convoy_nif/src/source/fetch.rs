//! Pull reads for `Convoy.Queue.get/2`.

use aws_sdk_kinesis::types::Record;
use rustler::{Encoder, Env, ResourceArc, Term};

use std::time::Instant;

use super::poller::report_call;
use super::{shard_iterator, Position};
use crate::atoms;
use crate::client::ClientResource;
use crate::delivery::KeptTerm;
use crate::record::{encode_records, Origin};
use crate::reply::ReplyTo;
use crate::runtime;
use convoy_core::retry;

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
