//! ListShards with paging and throttling retries, shared by the producer
//! (its shard map for aggregation) and the consumer's source.

use aws_sdk_kinesis::types::Shard;

use crate::error::Error;
use convoy_core::retry::{self, RetryPolicy};

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
