//! Stream administration used by `Convoy.Local`, the tests and the queue's
//! shard discovery: ListShards (with paging), CreateStream, DeleteStream,
//! SplitShard. Each call runs on the runtime and replies by message.

use std::time::Duration;

use aws_sdk_kinesis::types::{Shard, StreamStatus};
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::client::ClientResource;
use crate::error::Error;
use crate::reply::ReplyTo;
use crate::runtime;
use convoy_core::retry::{self, RetryPolicy};

struct Shards(Vec<Shard>);

impl Encoder for Shards {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let shards: Vec<Term> = self
            .0
            .iter()
            .map(|s| {
                let range = s.hash_key_range();
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
                    Some(s.shard_id()),
                    s.parent_shard_id(),
                    s.adjacent_parent_shard_id(),
                    range.map(|r| r.starting_hash_key()),
                    range.map(|r| r.ending_hash_key()),
                    s.sequence_number_range()
                        .and_then(|r| r.ending_sequence_number()),
                ]
                .map(|v| v.encode(env));
                Term::map_from_term_arrays(env, &keys, &values).expect("distinct keys")
            })
            .collect();
        shards.encode(env)
    }
}

/// Every shard of the stream, closed ones included, following `NextToken`.
pub async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<Shard>, Error> {
    let policy = RetryPolicy::default();
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    let mut failures = 0;
    loop {
        // ListShards takes either the stream name or a token, never both.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        match request.send().await {
            Ok(output) => {
                failures = 0;
                shards.extend(output.shards().iter().cloned());
                match output.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                    _ => return Ok(shards),
                }
            }
            Err(e) => {
                let error = retry::classify(&e);
                failures += 1;
                let throttled =
                    matches!(&error, Error::Aws { code, .. } if retry::is_throttling_code(code));
                if !throttled || failures > 5 {
                    return Err(error);
                }
                tokio::time::sleep(policy.backoff(failures)).await;
            }
        }
    }
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

async fn wait_active(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<(), Error> {
    for _ in 0..300 {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| retry::classify(&e))?;
        let status = summary
            .stream_description_summary()
            .map(|d| d.stream_status().clone());
        if status == Some(StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Timeout)
}

/// Creates a stream and waits until it is ACTIVE. An existing stream is fine.
#[rustler::nif]
fn create_stream(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    shard_count: i32,
    reply: ReplyTo,
) -> rustler::Atom {
    let client = client.client.clone();
    runtime::spawn_reply(reply, async move {
        let created = client
            .create_stream()
            .stream_name(&stream_name)
            .shard_count(shard_count)
            .send()
            .await;
        if let Err(e) = created {
            let error = retry::classify(&e);
            let exists =
                matches!(&error, Error::Aws { code, .. } if code == "ResourceInUseException");
            if !exists {
                return Err(error);
            }
        }
        wait_active(&client, &stream_name)
            .await
            .map(|_| atoms::ok())
    });
    atoms::ok()
}

#[rustler::nif]
fn delete_stream(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    reply: ReplyTo,
) -> rustler::Atom {
    let client = client.client.clone();
    runtime::spawn_reply(reply, async move {
        client
            .delete_stream()
            .stream_name(&stream_name)
            .enforce_consumer_deletion(true)
            .send()
            .await
            .map_err(|e| retry::classify(&e))?;
        Ok(atoms::ok())
    });
    atoms::ok()
}

/// Splits a shard at `new_starting_hash_key` and waits for the stream to be
/// ACTIVE again.
#[rustler::nif]
fn split_shard(
    client: ResourceArc<ClientResource>,
    stream_name: String,
    shard_id: String,
    new_starting_hash_key: String,
    reply: ReplyTo,
) -> rustler::Atom {
    let client = client.client.clone();
    runtime::spawn_reply(reply, async move {
        client
            .split_shard()
            .stream_name(&stream_name)
            .shard_to_split(shard_id)
            .new_starting_hash_key(new_starting_hash_key)
            .send()
            .await
            .map_err(|e| retry::classify(&e))?;
        wait_active(&client, &stream_name)
            .await
            .map(|_| atoms::ok())
    });
    atoms::ok()
}
