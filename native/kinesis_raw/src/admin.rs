//! Stream administration for local endpoints (`Convoy.Local` and the tests):
//! the library an application loads has none of it.
//!
//! Output is one line per result, fields separated by tabs, `-` for none.
//! A failure prints `error<TAB>code<TAB>message` on stdout and exits with 1.

use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::StreamStatus;
use aws_sdk_kinesis::Client;

/// A failed call: the Kinesis error code and its message.
pub struct Failure(pub String, pub String);

impl<E: ProvideErrorMetadata + std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        let code = error.code().unwrap_or("Unknown").to_owned();
        let message = error
            .message()
            .map_or_else(|| error.to_string(), str::to_owned);
        Failure(code, message)
    }
}

async fn wait_active(client: &Client, stream: &str) -> Result<(), Failure> {
    for _ in 0..600 {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await?;
        let status = summary
            .stream_description_summary()
            .map(|d| d.stream_status().clone());
        if status == Some(StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Failure(
        "Timeout".into(),
        format!("{stream} is not ACTIVE after 60 s"),
    ))
}

/// Creates a stream and waits until it is ACTIVE; an existing one is fine.
pub async fn create_stream(client: &Client, stream: &str, shards: i32) -> Result<(), Failure> {
    let created = client
        .create_stream()
        .stream_name(stream)
        .shard_count(shards)
        .send()
        .await;
    if let Err(error) = created {
        let failure = Failure::from(error);
        if failure.0 != "ResourceInUseException" {
            return Err(failure);
        }
    }
    wait_active(client, stream).await
}

pub async fn delete_stream(client: &Client, stream: &str) -> Result<(), Failure> {
    client
        .delete_stream()
        .stream_name(stream)
        .enforce_consumer_deletion(true)
        .send()
        .await?;
    Ok(())
}

/// Splits a shard and waits until the stream is ACTIVE again.
pub async fn split_shard(
    client: &Client,
    stream: &str,
    shard_id: &str,
    hash_key: &str,
) -> Result<(), Failure> {
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard_id)
        .new_starting_hash_key(hash_key)
        .send()
        .await?;
    wait_active(client, stream).await
}

/// Every shard, closed ones included, one line each:
/// shard_id, parent, adjacent parent, starting and ending hash key, ending
/// sequence number.
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<String>, Failure> {
    let mut lines = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // ListShards takes either the stream name or a token, never both.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let output = request.send().await?;
        for shard in output.shards() {
            let range = shard.hash_key_range();
            let fields = [
                Some(shard.shard_id()),
                shard.parent_shard_id(),
                shard.adjacent_parent_shard_id(),
                range.map(|r| r.starting_hash_key()),
                range.map(|r| r.ending_hash_key()),
                shard
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number()),
            ];
            lines.push(fields.map(|f| f.unwrap_or("-")).join("\t"));
        }
        match output.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(lines),
        }
    }
}
