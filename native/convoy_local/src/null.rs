//! `convoy_local null`: a Kinesis endpoint that stores nothing and
//! acknowledges everything at once, for measuring a client's own ceiling.
//!
//! It answers `PutRecords` (every entry succeeds), `PutRecord`,
//! `ListShards`, `DescribeStreamSummary`, `DescribeStream` and
//! `CreateStream` for any stream name, as if every stream had `shards`
//! shards splitting the hash-key space evenly. A record is placed on the
//! shard its partition key (or explicit hash key) hashes to, as Kinesis
//! would, so a client that groups records by shard (KPL aggregation) sees
//! its guess confirmed. Anything else answers `UnknownOperationException`.
//!
//! The AWS SDKs speak JSON 1.1 (`application/x-amz-json-1.1`) to Kinesis;
//! some also speak CBOR (`application/x-amz-cbor-1.1`, data as byte
//! strings). Both are read, and answered in the same encoding, as the
//! ferrokinesis emulator does. Only what the answer needs is decoded: the
//! number of entries, their partition keys and explicit hash keys; the
//! data is skipped.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use md5::{Digest, Md5};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

const JSON: &str = "application/x-amz-json-1.1";
const CBOR: &str = "application/x-amz-cbor-1.1";

/// What every request sees: the shard layout and the sequence counter.
pub struct NullKinesis {
    shards: u32,
    sequence: AtomicU64,
    /// Requests and entries acknowledged, printed when the server stops.
    pub requests: AtomicU64,
    pub entries: AtomicU64,
}

impl NullKinesis {
    pub fn new(shards: u32) -> Arc<Self> {
        Arc::new(NullKinesis {
            shards: shards.max(1),
            sequence: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        })
    }

    fn shard_id(index: u32) -> String {
        format!("shardId-{index:012}")
    }

    /// Width of each shard's slice of the hash-key space (the last one
    /// takes the remainder).
    fn width(&self) -> u128 {
        u128::MAX / u128::from(self.shards)
    }

    fn shard_of(&self, hash: u128) -> u32 {
        ((hash / self.width()) as u32).min(self.shards - 1)
    }

    fn range(&self, index: u32) -> (u128, u128) {
        let start = self.width() * u128::from(index);
        let end = if index + 1 == self.shards {
            u128::MAX
        } else {
            start + self.width() - 1
        };
        (start, end)
    }

    /// The shard an entry lands on, as Kinesis computes it: MD5 of the
    /// partition key as a big-endian 128-bit number, unless an explicit
    /// hash key says otherwise.
    fn place(&self, partition_key: &str, explicit_hash_key: Option<&str>) -> u32 {
        let hash = match explicit_hash_key.map(str::parse::<u128>) {
            Some(Ok(hash)) => hash,
            _ => u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into()),
        };
        self.shard_of(hash)
    }

    /// Writes the next sequence number: Kinesis' are decimal strings of
    /// 56 digits.
    fn write_sequence(&self, out: &mut Vec<u8>) {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        let _ = write!(out, "49{n:054}");
    }

    fn next_sequence(&self) -> String {
        let mut out = Vec::with_capacity(56);
        self.write_sequence(&mut out);
        String::from_utf8(out).expect("digits")
    }
}

/// The part of a `PutRecords` / `PutRecord` entry the answer depends on.
/// JSON keys are borrowed from the body (unless escaped)...
#[derive(Deserialize)]
struct JsonEntry<'a> {
    #[serde(rename = "PartitionKey", borrow)]
    partition_key: Cow<'a, str>,
    #[serde(rename = "ExplicitHashKey", borrow, default)]
    explicit_hash_key: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct JsonPutRecords<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<JsonEntry<'a>>,
}

/// ...CBOR ones are copied (ciborium reads owned values only).
#[derive(Deserialize)]
struct OwnedEntry {
    #[serde(rename = "PartitionKey")]
    partition_key: String,
    #[serde(rename = "ExplicitHashKey", default)]
    explicit_hash_key: Option<String>,
}

#[derive(Deserialize)]
struct OwnedPutRecords {
    #[serde(rename = "Records")]
    records: Vec<OwnedEntry>,
}

#[derive(Deserialize, Default)]
struct StreamName {
    #[serde(rename = "StreamName", default)]
    stream_name: Option<String>,
    #[serde(rename = "StreamARN", default)]
    stream_arn: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Json,
    Cbor,
}

impl Encoding {
    fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Option<T> {
        match self {
            Encoding::Json => serde_json::from_slice(body).ok(),
            Encoding::Cbor => ciborium::from_reader(body).ok(),
        }
    }

    fn encode(self, value: &Value) -> Vec<u8> {
        match self {
            Encoding::Json => serde_json::to_vec(value).expect("a Value serializes"),
            Encoding::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(value, &mut out).expect("a Value serializes");
                out
            }
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::Cbor => CBOR,
        }
    }
}

/// The one handler: routes on `X-Amz-Target`.
pub async fn handle(kinesis: Arc<NullKinesis>, headers: HeaderMap, body: Bytes) -> Response {
    let encoding = match headers.get("content-type").and_then(|v| v.to_str().ok()) {
        Some(ct) if ct.starts_with(CBOR) => Encoding::Cbor,
        _ => Encoding::Json,
    };
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix("Kinesis_20131202."))
        .unwrap_or("");
    kinesis.requests.fetch_add(1, Ordering::Relaxed);
    let answer = match (operation, encoding) {
        // The hot path: written straight into the response body.
        ("PutRecords", Encoding::Json) => return put_records_json(&kinesis, &body),
        ("PutRecords", Encoding::Cbor) => put_records_cbor(&kinesis, &body),
        ("PutRecord", _) => put_record(&kinesis, encoding, &body),
        ("ListShards", _) => Ok(list_shards(&kinesis)),
        ("DescribeStreamSummary", _) => {
            Ok(describe_stream_summary(&kinesis, stream(encoding, &body)))
        }
        ("DescribeStream", _) => Ok(describe_stream(&kinesis, stream(encoding, &body))),
        ("CreateStream", _) => Ok(json!({})),
        _ => Err(("UnknownOperationException", format!("{operation:?}"))),
    };
    match answer {
        Ok(value) => respond(encoding, StatusCode::OK, encoding.encode(&value)),
        Err(error) => fail(encoding, error),
    }
}

fn fail(encoding: Encoding, (kind, message): (&'static str, String)) -> Response {
    let body = encoding.encode(&json!({"__type": kind, "message": message}));
    respond(encoding, StatusCode::BAD_REQUEST, body)
}

fn respond(encoding: Encoding, status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static(encoding.content_type()),
    );
    response
}

type Answer = Result<Value, (&'static str, String)>;

fn invalid(body: &[u8]) -> (&'static str, String) {
    (
        "SerializationException",
        format!("cannot read a request of {} bytes", body.len()),
    )
}

/// Places each entry on its shard, remembering each partition key's shard
/// for the rest of the request (keys repeat; MD5 is the costly part).
struct Placer<'n, 'k> {
    kinesis: &'n NullKinesis,
    seen: HashMap<&'k str, u32>,
}

impl<'n, 'k> Placer<'n, 'k> {
    fn new(kinesis: &'n NullKinesis) -> Self {
        Placer {
            kinesis,
            seen: HashMap::new(),
        }
    }

    fn place(&mut self, partition_key: &'k str, explicit_hash_key: Option<&str>) -> u32 {
        if explicit_hash_key.is_some() {
            return self.kinesis.place(partition_key, explicit_hash_key);
        }
        let kinesis = self.kinesis;
        *self
            .seen
            .entry(partition_key)
            .or_insert_with(|| kinesis.place(partition_key, None))
    }
}

fn put_records_json(kinesis: &NullKinesis, body: &[u8]) -> Response {
    match put_records_json_body(kinesis, body) {
        Some(out) => respond(Encoding::Json, StatusCode::OK, out),
        None => fail(Encoding::Json, invalid(body)),
    }
}

fn put_records_json_body(kinesis: &NullKinesis, body: &[u8]) -> Option<Vec<u8>> {
    let request: JsonPutRecords = serde_json::from_slice(body).ok()?;
    let mut placer = Placer::new(kinesis);
    let mut out = Vec::with_capacity(32 + request.records.len() * 96);
    out.extend_from_slice(b"{\"FailedRecordCount\":0,\"Records\":[");
    for (i, entry) in request.records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let shard = placer.place(&entry.partition_key, entry.explicit_hash_key.as_deref());
        out.extend_from_slice(b"{\"SequenceNumber\":\"");
        kinesis.write_sequence(&mut out);
        let _ = write!(out, "\",\"ShardId\":\"shardId-{shard:012}\"}}");
    }
    out.extend_from_slice(b"]}");
    kinesis
        .entries
        .fetch_add(request.records.len() as u64, Ordering::Relaxed);
    Some(out)
}

fn put_records_cbor(kinesis: &NullKinesis, body: &[u8]) -> Answer {
    let request: OwnedPutRecords = Encoding::Cbor.decode(body).ok_or_else(|| invalid(body))?;
    let mut placer = Placer::new(kinesis);
    let results: Vec<Value> = request
        .records
        .iter()
        .map(|entry| {
            let shard = placer.place(&entry.partition_key, entry.explicit_hash_key.as_deref());
            json!({
                "SequenceNumber": kinesis.next_sequence(),
                "ShardId": NullKinesis::shard_id(shard),
            })
        })
        .collect();
    kinesis
        .entries
        .fetch_add(results.len() as u64, Ordering::Relaxed);
    Ok(json!({"FailedRecordCount": 0, "Records": results}))
}

fn put_record(kinesis: &NullKinesis, encoding: Encoding, body: &[u8]) -> Answer {
    let entry: OwnedEntry = encoding.decode(body).ok_or_else(|| invalid(body))?;
    kinesis.entries.fetch_add(1, Ordering::Relaxed);
    let shard = kinesis.place(&entry.partition_key, entry.explicit_hash_key.as_deref());
    Ok(json!({
        "SequenceNumber": kinesis.next_sequence(),
        "ShardId": NullKinesis::shard_id(shard),
    }))
}

fn stream(encoding: Encoding, body: &[u8]) -> String {
    let names: StreamName = encoding.decode(body).unwrap_or_default();
    names
        .stream_name
        .or_else(|| {
            names
                .stream_arn
                .and_then(|arn| arn.rsplit('/').next().map(str::to_owned))
        })
        .unwrap_or_else(|| "null".to_owned())
}

fn shards(kinesis: &NullKinesis) -> Vec<Value> {
    (0..kinesis.shards)
        .map(|index| {
            let (start, end) = kinesis.range(index);
            json!({
                "ShardId": NullKinesis::shard_id(index),
                "HashKeyRange": {
                    "StartingHashKey": start.to_string(),
                    "EndingHashKey": end.to_string(),
                },
                "SequenceNumberRange": {"StartingSequenceNumber": format!("49{:054}", 0)},
            })
        })
        .collect()
}

fn list_shards(kinesis: &NullKinesis) -> Value {
    json!({"Shards": shards(kinesis)})
}

fn summary_fields(stream: &str) -> Value {
    json!({
        "StreamName": stream,
        "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{stream}"),
        "StreamStatus": "ACTIVE",
        "StreamModeDetails": {"StreamMode": "PROVISIONED"},
        "RetentionPeriodHours": 24,
        "StreamCreationTimestamp": 1_700_000_000,
        "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
        "EncryptionType": "NONE",
    })
}

fn describe_stream_summary(kinesis: &NullKinesis, stream: String) -> Value {
    let mut summary = summary_fields(&stream);
    summary["OpenShardCount"] = json!(kinesis.shards);
    summary["ConsumerCount"] = json!(0);
    json!({"StreamDescriptionSummary": summary})
}

fn describe_stream(kinesis: &NullKinesis, stream: String) -> Value {
    let mut description = summary_fields(&stream);
    description["Shards"] = Value::Array(shards(kinesis));
    description["HasMoreShards"] = json!(false);
    json!({"StreamDescription": description})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_hash_key_space() {
        let kinesis = NullKinesis::new(4);
        assert_eq!(kinesis.range(0).0, 0);
        assert_eq!(kinesis.range(3).1, u128::MAX);
        for i in 0..3 {
            assert_eq!(kinesis.range(i).1 + 1, kinesis.range(i + 1).0);
        }
        for i in 0..4 {
            let (start, end) = kinesis.range(i);
            assert_eq!(kinesis.shard_of(start), i);
            assert_eq!(kinesis.shard_of(end), i);
        }
    }

    #[test]
    fn put_records_acknowledges_every_entry_in_json_and_cbor() {
        let kinesis = NullKinesis::new(2);
        let json_body = br#"{"StreamName":"s","Records":[
            {"Data":"AAAA","PartitionKey":"a"},
            {"Data":"","PartitionKey":"b\"q","ExplicitHashKey":"0"}]}"#;
        let out = put_records_json_body(&kinesis, json_body).unwrap();
        let answer: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(answer["FailedRecordCount"], 0);
        let records = answer["Records"].as_array().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["ShardId"], "shardId-000000000000");
        assert_eq!(records[0]["SequenceNumber"].as_str().unwrap().len(), 56);

        use ciborium::Value as C;
        let cbor_request = C::Map(vec![
            (C::Text("StreamName".into()), C::Text("s".into())),
            (
                C::Text("Records".into()),
                C::Array(vec![C::Map(vec![
                    (C::Text("Data".into()), C::Bytes(vec![1, 2])),
                    (C::Text("PartitionKey".into()), C::Text("a".into())),
                ])]),
            ),
        ]);
        let mut cbor_body = Vec::new();
        ciborium::into_writer(&cbor_request, &mut cbor_body).unwrap();
        let answer = put_records_cbor(&kinesis, &cbor_body).unwrap();
        assert_eq!(answer["Records"].as_array().unwrap().len(), 1);
        // Placed as Kinesis places it: md5("a") starts with 0x0cc1...
        assert_eq!(answer["Records"][0]["ShardId"], "shardId-000000000000");
        let encoded = Encoding::Cbor.encode(&answer);
        let back: ciborium::Value = ciborium::from_reader(&encoded[..]).unwrap();
        assert!(back.is_map());
    }

    #[test]
    fn a_bad_body_is_a_serialization_error() {
        let kinesis = NullKinesis::new(1);
        assert!(put_records_json_body(&kinesis, b"{").is_none());
        assert!(put_records_cbor(&kinesis, b"\xff").is_err());
    }
}
