//! SubscribeToShard as Kinesis serves it: a subscription pushes records
//! within a few milliseconds of their arrival.
//!
//! ferrokinesis 0.7's own handler looks for new records every 200 ms, which
//! puts a 200 ms floor under every put-to-handler latency measured through
//! the emulator, and under enhanced fan-out's whole point. This handler
//! looks every [`PUSH_POLL`] instead and sends an event as soon as records
//! are found (and an empty one every [`HEARTBEAT`] otherwise, as Kinesis
//! does).
//!
//! It reads through ferrokinesis' own GetShardIterator and GetRecords, so
//! positions, iterators, sequence numbers and records mean exactly what they
//! mean to a polling consumer, and each read takes the server's one-request
//! gate (see `serve` in main.rs). A request it does not take over (CBOR
//! bodies, an unknown or inactive consumer, a shard or position the emulator
//! refuses) goes on to ferrokinesis' handler, which answers it, errors
//! included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrokinesis::actions::{get_records, get_shard_iterator};
use ferrokinesis::event_stream;
use ferrokinesis::shard_iterator::decode_shard_iterator;
use ferrokinesis::store::Store;
use ferrokinesis::types::{ConsumerStatus, StreamStatus};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// How often an idle subscription looks for new records.
const PUSH_POLL: Duration = Duration::from_millis(5);
/// How often an idle subscription sends an event with no records.
const HEARTBEAT: Duration = Duration::from_millis(200);
/// The only request encoding taken over; others go to ferrokinesis.
const JSON: &str = "application/x-amz-json-1.1";

/// What every subscription shares: the emulator's store and the gate that
/// lets one request at a time reach it.
#[derive(Clone)]
pub struct Subscriptions {
    store: Store,
    gate: Arc<Semaphore>,
}

impl Subscriptions {
    pub fn new(store: Store, gate: Arc<Semaphore>) -> Self {
        Subscriptions { store, gate }
    }
}

/// Middleware: serves SubscribeToShard requests it can, passes the rest on.
pub async fn middleware(
    State(subscriptions): State<Subscriptions>,
    request: Request,
    next: Next,
) -> Response {
    let ours = is_json_subscribe(&request);
    if !ours {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1024 * 1024).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let opened = match serde_json::from_slice::<Value>(&bytes) {
        Ok(input) => subscriptions.open(&input).await,
        Err(_) => None,
    };
    match opened {
        Some(session) => session.into_response(),
        None => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

fn is_json_subscribe(request: &Request) -> bool {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    };
    header("x-amz-target").ends_with(".SubscribeToShard")
        && header(header::CONTENT_TYPE.as_str()) == JSON
}

impl Subscriptions {
    /// A session at the request's starting position, or `None` when the
    /// request is one ferrokinesis should answer (with its error).
    async fn open(&self, input: &Value) -> Option<Session> {
        let consumer_arn = input["ConsumerARN"].as_str()?;
        let shard_id = input["ShardId"].as_str()?;
        let consumer = self.store.get_consumer(consumer_arn).await?;
        if consumer.consumer_status != ConsumerStatus::Active {
            return None;
        }
        let stream_arn = &consumer_arn[..consumer_arn.find("/consumer/")?];
        let stream_name = self.store.stream_name_from_arn(stream_arn)?;
        let stream = self.store.get_stream(&stream_name).await.ok()?;
        if stream.stream_status != StreamStatus::Active
            || !stream.shards.iter().any(|shard| shard.shard_id == shard_id)
        {
            return None;
        }

        let position = &input["StartingPosition"];
        let mut request = json!({
            "StreamName": stream_name,
            "ShardId": shard_id,
            "ShardIteratorType": position["Type"],
        });
        for (from, to) in [
            ("SequenceNumber", "StartingSequenceNumber"),
            ("Timestamp", "Timestamp"),
        ] {
            if !position[from].is_null() {
                request[to] = position[from].clone();
            }
        }
        let answer = get_shard_iterator::execute(&self.store, request)
            .await
            .ok()??;
        let iterator = answer["ShardIterator"].as_str()?.to_owned();

        let session_ms = self.store.options.subscribe_to_shard_session_ms;
        Some(Session {
            subscriptions: self.clone(),
            stream_name,
            shard_id: shard_id.to_owned(),
            iterator: Some(iterator),
            until: Instant::now() + Duration::from_millis(session_ms),
            last_event: None,
        })
    }
}

/// One subscription: where it stands in its shard and when it ends.
struct Session {
    subscriptions: Subscriptions,
    stream_name: String,
    shard_id: String,
    /// `None` once the shard's end was sent: the subscription is over.
    iterator: Option<String>,
    until: Instant,
    /// `None` until the initial response is sent.
    last_event: Option<Instant>,
}

impl IntoResponse for Session {
    fn into_response(self) -> Response {
        let frames = futures_util::stream::unfold(self, |mut session| async move {
            let frame = session.next_frame().await?;
            Some((Ok::<Bytes, std::io::Error>(Bytes::from(frame)), session))
        });
        let mut response = Response::new(Body::from_stream(frames));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.amazon.eventstream"),
        );
        response
    }
}

impl Session {
    /// The next event-stream frame, or `None` when the subscription ends:
    /// its time is up, its shard's end was sent, or a read failed (the
    /// stream deleted, an iterator expired while the client held back), in
    /// which case the client subscribes again from where it stands.
    async fn next_frame(&mut self) -> Option<Vec<u8>> {
        let Some(last_event) = self.last_event else {
            self.last_event = Some(Instant::now());
            return Some(event_stream::encode_initial_response());
        };
        let mut last_event = last_event;
        loop {
            let iterator = self.iterator.take()?;
            if Instant::now() >= self.until {
                return None;
            }
            let read = self.read(&iterator).await?;
            let records = read["Records"].as_array().map_or(0, Vec::len);
            let next = read["NextShardIterator"].as_str().map(str::to_owned);
            if records == 0 && next.is_some() && last_event.elapsed() < HEARTBEAT {
                self.iterator = next;
                tokio::time::sleep(PUSH_POLL).await;
                continue;
            }
            last_event = Instant::now();
            self.last_event = Some(last_event);
            let event = self.event(read, next.as_deref()).await;
            self.iterator = next;
            let payload = serde_json::to_vec(&event).expect("JSON values serialize");
            return Some(event_stream::encode_subscribe_event(
                &payload,
                "application/json",
            ));
        }
    }

    async fn read(&self, iterator: &str) -> Option<Value> {
        let limit = self
            .subscriptions
            .store
            .options
            .subscribe_to_shard_event_record_limit;
        let _turn = self.subscriptions.gate.acquire().await.ok()?;
        let request = json!({ "ShardIterator": iterator, "Limit": limit });
        get_records::execute(&self.subscriptions.store, request)
            .await
            .ok()?
    }

    /// A SubscribeToShardEvent from a GetRecords answer: the continuation is
    /// the position of the next iterator; at the shard's end there is none,
    /// and the event names the shard's children.
    async fn event(&self, mut read: Value, next: Option<&str>) -> Value {
        let continuation = next
            .and_then(|iterator| decode_shard_iterator(iterator).ok())
            .map(|(_time, _stream, _shard, sequence)| sequence);
        let children = match next {
            Some(_) => Vec::new(),
            None => self.children().await,
        };
        let mut event = json!({
            "Records": read["Records"].take(),
            "MillisBehindLatest": read["MillisBehindLatest"].take(),
            "ChildShards": children,
        });
        if let Some(continuation) = continuation {
            event["ContinuationSequenceNumber"] = json!(continuation);
        }
        event
    }

    async fn children(&self) -> Vec<Value> {
        let store = &self.subscriptions.store;
        let Ok(_turn) = self.subscriptions.gate.acquire().await else {
            return Vec::new();
        };
        let Ok(stream) = store.get_stream(&self.stream_name).await else {
            return Vec::new();
        };
        let me = Some(self.shard_id.as_str());
        stream
            .shards
            .iter()
            .filter(|shard| {
                shard.parent_shard_id.as_deref() == me
                    || shard.adjacent_parent_shard_id.as_deref() == me
            })
            .map(|child| {
                let parents: Vec<&String> = child
                    .parent_shard_id
                    .iter()
                    .chain(child.adjacent_parent_shard_id.iter())
                    .collect();
                json!({
                    "ShardId": child.shard_id,
                    "ParentShards": parents,
                    "HashKeyRange": child.hash_key_range,
                })
            })
            .collect()
    }
}
