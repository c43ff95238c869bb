//! Reading Kinesis for `Convoy.Services.Kinesis.Source`: the shard list,
//! one reader per shard for the consumer, polling (`poller`) or pushed by
//! enhanced fan-out (`fan_out`), and the pull reads of `Convoy.Queue.get/2`
//! (`fetch`).

mod fan_out;
mod fetch;
mod link;
mod poller;

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{HashKeyRange, Shard, ShardIteratorType};
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::client::ClientResource;
use crate::error::Error;
use crate::reply::ReplyTo;
use crate::runtime;
use crate::shards::list_shards;
use convoy_core::retry;

/// Where a shard's reading begins, as the Elixir side names it: `:latest`,
/// `:trim_horizon`, `{:at_sequence_number, s}`, `{:after_sequence_number, s}`
/// or `{:at_timestamp, unix_ms}`.
#[derive(Debug, Clone, PartialEq, rustler::NifTaggedEnum)]
pub enum Position {
    Latest,
    TrimHorizon,
    AtSequenceNumber(String),
    AfterSequenceNumber(String),
    AtTimestamp(i64),
}

async fn shard_iterator(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
    position: &Position,
) -> Result<String, Error> {
    let request = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id);
    let request = match position {
        Position::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
        Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Position::AtSequenceNumber(s) => request
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(s),
        Position::AfterSequenceNumber(s) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(s),
        Position::AtTimestamp(ms) => request
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from_millis(*ms)),
    };
    let output = request.send().await.map_err(|e| retry::classify(&e))?;
    output
        .shard_iterator()
        .map(str::to_owned)
        .ok_or_else(|| Error::aws("NoShardIterator", "GetShardIterator returned no iterator"))
}

/// Whether Kinesis refused a sequence-number position as not from this
/// stream, or from another shard (the wording Kinesis and the emulators
/// use): the caller then reads the shard from its start.
pub(crate) fn is_foreign_position(position: &Position, error: &Error) -> bool {
    let by_sequence = matches!(
        position,
        Position::AtSequenceNumber(_) | Position::AfterSequenceNumber(_)
    );
    by_sequence
        && matches!(error, Error::Aws { code, message }
            if code == "InvalidArgumentException"
                && (message.contains("did not come from this stream")
                    || message.contains("while it was used in a call to a shard with")))
}

struct Shards(Vec<Shard>);

impl Encoder for Shards {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let shards: Vec<Term> = self
            .0
            .iter()
            .map(|s| {
                let ending = s
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number());
                let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()];
                shard_map(env, s.shard_id(), parents, s.hash_key_range(), ending)
            })
            .collect();
        shards.encode(env)
    }
}

/// A shard as Elixir sees it, from ListShards or from an event's
/// ChildShards: `%{shard_id, parent_shard_id, adjacent_parent_shard_id,
/// starting_hash_key, ending_hash_key, ending_sequence_number}`.
pub(crate) fn shard_map<'a>(
    env: Env<'a>,
    shard_id: &str,
    [parent, adjacent_parent]: [Option<&str>; 2],
    range: Option<&HashKeyRange>,
    ending_sequence_number: Option<&str>,
) -> Term<'a> {
    let keys = [
        atoms::shard_id(),
        atoms::parent_shard_id(),
        atoms::adjacent_parent_shard_id(),
        atoms::starting_hash_key(),
        atoms::ending_hash_key(),
        atoms::ending_sequence_number(),
    ]
    .map(|a| a.encode(env));
    let values = [
        Some(shard_id),
        parent,
        adjacent_parent,
        range.map(|r| r.starting_hash_key()),
        range.map(|r| r.ending_hash_key()),
        ending_sequence_number,
    ]
    .map(|v| v.encode(env));
    Term::map_from_term_arrays(env, &keys, &values).expect("distinct keys")
}

#[rustler::nif]
fn list_shards_nif(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    reply: ReplyTo,
) -> rustler::Atom {
    let client = client.client.clone();
    runtime::spawn_reply(reply, async move {
        list_shards(&client, &stream_name).await.map(Shards)
    });
    atoms::ok()
}
