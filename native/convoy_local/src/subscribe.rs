//! SubscribeToShard as Kinesis serves it: a subscription pushes records as
//! they arrive.
//!
//! ferrokinesis 0.7's own handler looks for new records every 200 ms, which
//! puts a 200 ms floor under every put-to-handler latency measured through
//! the emulator, and under enhanced fan-out's whole point. This handler
//! looks again as soon as a PutRecord or PutRecords request has been served
//! (it sees them pass, see [`middleware`]) and sends an event when it finds
//! records, or an empty one every [`HEARTBEAT`] otherwise, as Kinesis does.
//!
//! It reads through ferrokinesis' own GetShardIterator and GetRecords, so
//! positions, iterators, sequence numbers and records mean exactly what they
//! mean to a polling consumer, and each read takes the server's one-request
//! gate (see `serve` in main.rs). A request it does not take over (CBOR
//! bodies, an unknown or inactive consumer, a shard or position the emulator
//! refuses) goes on to ferrokinesis' handler, which answers it, errors
//! included.
//!
//! As on Kinesis, one consumer has one live subscription per shard: a second
//! one within [`TAKEOVER_AFTER`] of the first is refused with
//! ResourceInUseException, a later one takes the shard over and the first
//! ends. Each subscription opened or refused prints a line
//! (`convoy_local subscribe SHARD opened|in_use`) for tests to count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
use tokio::sync::{watch, Semaphore};

/// How often an idle subscription sends an event with no records.
const HEARTBEAT: Duration = Duration::from_millis(200);
/// A second subscription of a consumer to a shard sooner than this after
/// the first is refused (Kinesis: 5 s); a later one takes over.
const TAKEOVER_AFTER: Duration = Duration::from_secs(5);
/// The only request encoding taken over; others go to ferrokinesis.
const JSON: &str = "application/x-amz-json-1.1";

/// What every subscription shares: the emulator's store, the gate that lets
/// one request at a time reach it, the count of served puts (a change wakes
/// idle subscriptions), and the live subscription of each consumer and shard.
#[derive(Clone)]
pub struct Subscriptions {
    store: Store,
    gate: Arc<Semaphore>,
    puts: Arc<watch::Sender<u64>>,
    live: Arc<Mutex<HashMap<(String, String), Live>>>,
}

/// A consumer's subscription to a shard while its session lasts.
struct Live {
    opened: Instant,
    /// Set when a later subscription takes the shard over.
    replaced: Arc<AtomicBool>,
}

impl Subscriptions {
    pub fn new(store: Store, gate: Arc<Semaphore>) -> Self {
        Subscriptions {
            store,
            gate,
            puts: Arc::new(watch::Sender::new(0)),
            live: Arc::default(),
        }
    }
}

/// Middleware: serves the SubscribeToShard requests it can and passes the
/// rest on; wakes the subscriptions once a put has been served.
pub async fn middleware(
    State(subscriptions): State<Subscriptions>,
    request: Request,
    next: Next,
) -> Response {
    match Operation::of(&request) {
        Operation::Subscribe => subscriptions.subscribe(request, next).await,
        Operation::Put => {
            let response = next.run(request).await;
            subscriptions.puts.send_modify(|count| *count += 1);
            response
        }
        Operation::Other => next.run(request).await,
    }
}

enum Operation {
    Subscribe,
    Put,
    Other,
}

impl Operation {
    fn of(request: &Request) -> Operation {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
        };
        let target = header("x-amz-target");
        let action = target.rsplit('.').next().unwrap_or("");
        match action {
            "SubscribeToShard" if header(header::CONTENT_TYPE.as_str()) == JSON => {
                Operation::Subscribe
            }
            "PutRecord" | "PutRecords" => Operation::Put,
            _ => Operation::Other,
        }
    }
}

impl Subscriptions {
    async fn subscribe(&self, request: Request, next: Next) -> Response {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, 1024 * 1024).await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let opened = match serde_json::from_slice::<Value>(&bytes) {
            Ok(input) => self.open(&input).await,
            Err(_) => None,
        };
        match opened {
            Some(Ok(session)) => {
                println!("convoy_local subscribe {} opened", session.shard_id);
                session.into_response()
            }
            Some(Err(in_use)) => in_use,
            None => {
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
        }
    }

    /// A session at the request's starting position; a ResourceInUse answer
    /// when the consumer subscribed to the shard less than
    /// [`TAKEOVER_AFTER`] ago; `None` when the request is one ferrokinesis
    /// should answer (with its error).
    async fn open(&self, input: &Value) -> Option<Result<Session, Response>> {
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
        let iterator = self
            .iterator(&stream_name, shard_id, &input["StartingPosition"])
            .await?;

        let key = (consumer_arn.to_owned(), shard_id.to_owned());
        let Some(replaced) = self.take(&key) else {
            println!("convoy_local subscribe {shard_id} in_use");
            return Some(Err(resource_in_use(consumer_arn, shard_id)));
        };
        let session_ms = self.store.options.subscribe_to_shard_session_ms;
        Some(Ok(Session {
            subscriptions: self.clone(),
            key,
            replaced,
            stream_name,
            shard_id: shard_id.to_owned(),
            iterator: Some(iterator),
            until: Instant::now() + Duration::from_millis(session_ms),
            last_event: None,
            puts: self.puts.subscribe(),
        }))
    }

    /// The shard iterator of a starting position, from the emulator's own
    /// GetShardIterator.
    async fn iterator(
        &self,
        stream_name: &str,
        shard_id: &str,
        position: &Value,
    ) -> Option<String> {
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
        answer["ShardIterator"].as_str().map(str::to_owned)
    }

    /// Makes a new subscription the live one of its consumer and shard, the
    /// one it replaces told to end; `None` if that one is too recent.
    fn take(&self, key: &(String, String)) -> Option<Arc<AtomicBool>> {
        let mut live = self.live.lock().expect("not poisoned");
        if let Some(current) = live.get(key) {
            if current.opened.elapsed() < TAKEOVER_AFTER {
                return None;
            }
            current.replaced.store(true, Ordering::Relaxed);
        }
        let replaced = Arc::new(AtomicBool::new(false));
        live.insert(
            key.clone(),
            Live {
                opened: Instant::now(),
                replaced: replaced.clone(),
            },
        );
        Some(replaced)
    }
}

fn resource_in_use(consumer_arn: &str, shard_id: &str) -> Response {
    let body = json!({
        "__type": "ResourceInUseException",
        "message": format!("Another active subscription exists for consumer {consumer_arn} and shard {shard_id}."),
    });
    let mut response = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

/// One subscription: where it stands in its shard and when it ends.
struct Session {
    subscriptions: Subscriptions,
    key: (String, String),
    replaced: Arc<AtomicBool>,
    stream_name: String,
    shard_id: String,
    /// `None` once the shard's end was sent: the subscription is over.
    iterator: Option<String>,
    until: Instant,
    /// `None` until the initial response is sent.
    last_event: Option<Instant>,
    puts: watch::Receiver<u64>,
}

/// A session that ends (its body dropped: done, or the client went away)
/// leaves its shard free at once for the consumer's next subscription.
impl Drop for Session {
    fn drop(&mut self) {
        let mut live = self.subscriptions.live.lock().expect("not poisoned");
        if live
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(&current.replaced, &self.replaced))
        {
            live.remove(&self.key);
        }
    }
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
    /// its time is up, another took its shard over, its shard's end was
    /// sent, or a read failed (the stream deleted, an iterator expired while
    /// the client held back), in which case the client subscribes again
    /// from where it stands.
    async fn next_frame(&mut self) -> Option<Vec<u8>> {
        let Some(mut last_event) = self.last_event else {
            self.last_event = Some(Instant::now());
            return Some(event_stream::encode_initial_response());
        };
        loop {
            let iterator = self.iterator.take()?;
            let now = Instant::now();
            if now >= self.until || self.replaced.load(Ordering::Relaxed) {
                return None;
            }
            // Marked seen before the read: a put served during the read
            // wakes the wait below.
            self.puts.borrow_and_update();
            let read = self.read(&iterator).await?;
            let records = read["Records"].as_array().map_or(0, Vec::len);
            let next = read["NextShardIterator"].as_str().map(str::to_owned);
            let heartbeat_at = (last_event + HEARTBEAT).min(self.until);
            if records == 0 && next.is_some() && Instant::now() < heartbeat_at {
                self.iterator = next;
                let deadline = tokio::time::Instant::from_std(heartbeat_at);
                let _ = tokio::time::timeout_at(deadline, self.puts.changed()).await;
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
