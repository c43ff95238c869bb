//! The AWS SDK for Rust used directly, with nothing of Convoy in between.
//! The benchmarks use it as the ceiling; the tests use it as a writer and
//! reader independent of Convoy's producer and consumer.
//!
//! kinesis_raw put ENDPOINT STREAM COUNT SIZE CONCURRENCY [START] [KEYS]
//!     PutRecords of 500, CONCURRENCY requests in flight, failed entries
//!     retried. Record i has partition key `key-{i % KEYS}` (KEYS defaults
//!     to 64) and data `record-{i}`, padded with `x` to SIZE bytes.
//!     With CONCURRENCY 1 records reach each shard in order.
//! kinesis_raw get ENDPOINT STREAM COUNT [WARM_UPS]
//!     One GetRecords loop per shard from TRIM_HORIZON until COUNT records
//!     are read in total; with WARM_UPS (default 0), that many reads of the
//!     same go before the measured one, so that one finds the process warm
//!     (its connections open, its heap grown).
//! kinesis_raw dump ENDPOINT STREAM
//!     Every record of every shard as Kinesis stores it (aggregated records
//!     are not unpacked), one per line:
//!     shard_id TAB sequence_number TAB hex(partition_key) TAB hex(data)
//!
//! `put` and `get` end with one JSON line: {"records": N, "seconds": S,
//! "cpu_seconds": C} (C: the CPU time of every thread of the process). Both
//! are measured from after the client's first call (it lists the shards,
//! which opens its first connection) to the end of the work, as a Convoy
//! queue is measured once started: a benchmark compares the work, not the
//! program's start.
//!
//! kinesis_raw create-stream ENDPOINT STREAM SHARDS
//! kinesis_raw delete-stream ENDPOINT STREAM
//! kinesis_raw split-shard ENDPOINT STREAM SHARD_ID NEW_STARTING_HASH_KEY
//! kinesis_raw list-shards ENDPOINT STREAM
//!     Stream administration for local endpoints; see `admin.rs` (used by `Convoy.Local`).

mod admin;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use aws_sdk_kinesis::Client;

fn client(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "local",
            "local",
            None,
            None,
            "kinesis_raw",
        ))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

fn entry(i: usize, size: usize, keys: usize) -> PutRecordsRequestEntry {
    let mut data = format!("record-{i}").into_bytes();
    if data.len() < size {
        data.resize(size, b'x');
    }
    PutRecordsRequestEntry::builder()
        .partition_key(format!("key-{}", i % keys.max(1)))
        .data(Blob::new(data))
        .build()
        .expect("entry")
}

async fn put(
    client: Client,
    stream: String,
    range: (usize, usize),
    size: usize,
    concurrency: usize,
    keys: usize,
) {
    let (first, end) = range;
    let next = Arc::new(AtomicUsize::new(first));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, stream, next) = (client.clone(), stream.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(500, Ordering::Relaxed);
                if start >= end {
                    return;
                }
                let mut pending: Vec<usize> = (start..(start + 500).min(end)).collect();
                while !pending.is_empty() {
                    let entries = pending.iter().map(|i| entry(*i, size, keys)).collect();
                    let sent = client
                        .put_records()
                        .stream_name(&stream)
                        .set_records(Some(entries))
                        .send()
                        .await;
                    match sent {
                        Ok(out) => {
                            pending = pending
                                .iter()
                                .zip(out.records())
                                .filter(|(_, r)| r.error_code().is_some())
                                .map(|(i, _)| *i)
                                .collect();
                        }
                        Err(e) => eprintln!("put_records: {e}; retrying"),
                    }
                    if !pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("put worker");
    }
}

async fn shard_ids(client: &Client, stream: &str) -> Vec<String> {
    let out = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("list_shards");
    out.shards()
        .iter()
        .map(|s| s.shard_id().to_owned())
        .collect()
}

async fn iterator(client: &Client, stream: &str, shard_id: &str) -> Option<String> {
    client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("get_shard_iterator")
        .shard_iterator()
        .map(str::to_owned)
}

async fn get(client: Client, stream: String, shards: Vec<String>, count: usize) -> usize {
    let total = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for shard_id in shards {
        let (client, stream, total) = (client.clone(), stream.clone(), total.clone());
        readers.push(tokio::spawn(async move {
            let mut next = iterator(&client, &stream, &shard_id).await;
            while let Some(it) = next {
                if total.load(Ordering::Relaxed) >= count {
                    return;
                }
                let out = client
                    .get_records()
                    .shard_iterator(it)
                    .limit(10_000)
                    .send()
                    .await
                    .expect("get_records");
                let n = out.records().len();
                total.fetch_add(n, Ordering::Relaxed);
                next = out.next_shard_iterator().map(str::to_owned);
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for reader in readers {
        reader.await.expect("get reader");
    }
    total.load(Ordering::Relaxed)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

async fn dump(client: Client, stream: String) {
    for shard_id in shard_ids(&client, &stream).await {
        let mut next = iterator(&client, &stream, &shard_id).await;
        while let Some(it) = next {
            let out = client
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await
                .expect("get_records");
            for r in out.records() {
                let key = r.partition_key().unwrap_or_default();
                println!(
                    "{shard_id}\t{}\t{}\t{}",
                    r.sequence_number(),
                    hex(key.as_bytes()),
                    hex(r.data().as_ref())
                );
            }
            // An open shard has no end: stop at the first empty read.
            next = if out.records().is_empty() {
                None
            } else {
                out.next_shard_iterator().map(str::to_owned)
            };
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    let number = |i: usize, default: Option<usize>| match (args.get(i), default) {
        (Some(v), _) => v.parse::<usize>().unwrap_or_else(|_| usage()),
        (None, Some(d)) => d,
        (None, None) => usage(),
    };
    match arg(0).as_str() {
        "put" => {
            let (client, stream) = (client(&arg(1)), arg(2));
            let (count, start) = (number(3, None), number(6, Some(0)));
            let (size, concurrency, keys) = (number(4, None), number(5, None), number(7, Some(64)));
            // Only to open the connection before the clock: `put` retries
            // whatever fails.
            let _ = client.list_shards().stream_name(&stream).send().await;
            let clock = Clock::start();
            put(
                client,
                stream,
                (start, start + count),
                size,
                concurrency,
                keys,
            )
            .await;
            clock.report(count);
        }
        "get" => {
            let (client, stream, count) = (client(&arg(1)), arg(2), number(3, None));
            let shards = shard_ids(&client, &stream).await;
            for _ in 0..number(4, Some(0)) {
                get(client.clone(), stream.clone(), shards.clone(), count).await;
            }
            let clock = Clock::start();
            let records = get(client, stream, shards, count).await;
            clock.report(records);
        }
        "dump" => dump(client(&arg(1)), arg(2)).await,
        "create-stream" | "delete-stream" | "split-shard" | "list-shards" => {
            administer(&args, &arg).await
        }
        _ => usage(),
    }
}

/// Wall clock and CPU time from the start of a measured piece of work.
struct Clock {
    wall: Instant,
    cpu_seconds: f64,
}

impl Clock {
    fn start() -> Self {
        Clock {
            wall: Instant::now(),
            cpu_seconds: process_cpu_seconds(),
        }
    }

    /// Prints the JSON line `put` and `get` end with.
    fn report(self, records: usize) {
        let seconds = self.wall.elapsed().as_secs_f64();
        let cpu_seconds = process_cpu_seconds() - self.cpu_seconds;
        println!(
            "{{\"records\": {records}, \"seconds\": {seconds:.6}, \"cpu_seconds\": {cpu_seconds:.6}}}"
        );
    }
}

/// The CPU time (user and system) of every thread of this process so far.
fn process_cpu_seconds() -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec for the call to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    time.tv_sec as f64 + time.tv_nsec as f64 * 1.0e-9
}

async fn administer(args: &[String], arg: &dyn Fn(usize) -> String) {
    let client = client(&arg(1));
    let stream = arg(2);
    let result = match args[0].as_str() {
        "create-stream" => {
            let shards = arg(3).parse().unwrap_or_else(|_| usage());
            admin::create_stream(&client, &stream, shards)
                .await
                .map(|_| Vec::new())
        }
        "delete-stream" => admin::delete_stream(&client, &stream)
            .await
            .map(|_| Vec::new()),
        "split-shard" => admin::split_shard(&client, &stream, &arg(3), &arg(4))
            .await
            .map(|_| Vec::new()),
        _ => admin::list_shards(&client, &stream).await,
    };
    match result {
        Ok(lines) => lines.iter().for_each(|line| println!("{line}")),
        Err(admin::Failure(code, message)) => {
            println!("error\t{code}\t{}", message.replace(['\t', '\n'], " "));
            std::process::exit(1)
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: kinesis_raw put ENDPOINT STREAM COUNT SIZE CONCURRENCY [START] [KEYS]\n       \
         kinesis_raw get ENDPOINT STREAM COUNT [WARM_UPS]\n       kinesis_raw dump ENDPOINT STREAM\n       \
         kinesis_raw create-stream ENDPOINT STREAM SHARDS\n       \
         kinesis_raw delete-stream ENDPOINT STREAM\n       \
         kinesis_raw split-shard ENDPOINT STREAM SHARD_ID HASH_KEY\n       \
         kinesis_raw list-shards ENDPOINT STREAM"
    );
    std::process::exit(2)
}
