//! `convoy_local`: the embedded Kinesis emulator (ferrokinesis) for Convoy's
//! demo and tests, and a raw-SDK writer used as an independent producer.
//!
//! `serve` binds 127.0.0.1 only, prints `convoy_local listening on
//! http://127.0.0.1:PORT` once it accepts connections, and exits when its
//! standard input closes, so it never outlives the Elixir port that started it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrokinesis::store::StoreOptions;
use tokio::io::AsyncReadExt;

#[derive(Parser)]
#[command(
    version,
    about = "Local Kinesis for Convoy (ferrokinesis, bound to 127.0.0.1)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Kinesis API on 127.0.0.1.
    Serve {
        /// Port to bind; 0 picks a free one (printed on start).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Enforce the per-shard write limits (1 MiB/s, 1,000 records/s).
        #[arg(long)]
        enforce_limits: bool,
        /// Shard iterator lifetime in seconds (AWS: 300).
        #[arg(long, default_value_t = 300)]
        iterator_ttl_seconds: u64,
        /// Maximum open shards across all streams.
        #[arg(long, default_value_t = 1000)]
        shard_limit: u32,
        /// Keep running when standard input closes (for use from a shell).
        #[arg(long)]
        ignore_stdin: bool,
    },
    /// Write records with PutRecords straight through the AWS SDK, as an
    /// independent producer: record `i` has partition key `key-{i % keys}`
    /// and data `record-{i}` padded with `.` to `size` bytes.
    Put {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        start: usize,
        #[arg(long, default_value_t = 16)]
        keys: usize,
        #[arg(long, default_value_t = 0)]
        size: usize,
    },
    /// Read every record of every shard from the start, as Kinesis stores it
    /// (aggregated records are not unpacked), one per line:
    /// `shard_id<TAB>sequence_number<TAB>hex(partition_key)<TAB>hex(data)`.
    Get {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        stream: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("convoy-local")
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                port,
                enforce_limits,
                iterator_ttl_seconds,
                shard_limit,
                ignore_stdin,
            } => {
                serve(
                    port,
                    enforce_limits,
                    iterator_ttl_seconds,
                    shard_limit,
                    ignore_stdin,
                )
                .await
            }
            Command::Put {
                endpoint,
                stream,
                count,
                start,
                keys,
                size,
            } => put(&endpoint, &stream, start, count, keys, size).await,
            Command::Get { endpoint, stream } => get(&endpoint, &stream).await,
        }
    });
    std::process::exit(code);
}

async fn serve(
    port: u16,
    enforce_limits: bool,
    iterator_ttl_seconds: u64,
    shard_limit: u32,
    ignore_stdin: bool,
) -> i32 {
    let options = StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        shard_limit,
        iterator_ttl_seconds,
        enforce_limits,
        ..StoreOptions::default()
    };
    let (app, _store) = ferrokinesis::create_app(options);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("convoy_local: cannot bind {addr}: {e}");
            return 1;
        }
    };
    let bound = listener.local_addr().expect("bound address");
    println!("convoy_local listening on http://{bound}");

    let shutdown = async move {
        if ignore_stdin {
            let _ = tokio::signal::ctrl_c().await;
        } else {
            // EOF on stdin: the owning port closed, or its VM died.
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    read = stdin.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
    };
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("convoy_local: server error: {e}");
            1
        }
    }
}

fn client(endpoint: &str) -> aws_sdk_kinesis::Client {
    use aws_sdk_kinesis::config::{Credentials, Region};
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "local",
            "local",
            None,
            None,
            "convoy_local",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

async fn get(endpoint: &str, stream: &str) -> i32 {
    use aws_sdk_kinesis::types::ShardIteratorType;
    let client = client(endpoint);
    let shards = match client.list_shards().stream_name(stream).send().await {
        Ok(out) => out.shards().to_vec(),
        Err(e) => {
            eprintln!("convoy_local get: {e}");
            return 1;
        }
    };
    for shard in shards {
        let iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await;
        let mut iterator = match iterator {
            Ok(out) => out.shard_iterator().map(str::to_owned),
            Err(e) => {
                eprintln!("convoy_local get: {e}");
                return 1;
            }
        };
        while let Some(it) = iterator {
            let out = match client.get_records().shard_iterator(it).send().await {
                Ok(out) => out,
                Err(e) => {
                    eprintln!("convoy_local get: {e}");
                    return 1;
                }
            };
            for r in out.records() {
                let key = r.partition_key().unwrap_or_default();
                println!(
                    "{}\t{}\t{}\t{}",
                    shard.shard_id(),
                    r.sequence_number(),
                    hex(key.as_bytes()),
                    hex(r.data().as_ref())
                );
            }
            // An open shard has no end: stop once a read comes back empty.
            iterator = if out.records().is_empty() {
                None
            } else {
                out.next_shard_iterator().map(str::to_owned)
            };
        }
    }
    0
}

async fn put(
    endpoint: &str,
    stream: &str,
    start: usize,
    count: usize,
    keys: usize,
    size: usize,
) -> i32 {
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;

    let client = client(endpoint);
    let records: Vec<usize> = (start..start + count).collect();
    for chunk in records.chunks(500) {
        let mut pending: Vec<usize> = chunk.to_vec();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            let entries = pending
                .iter()
                .map(|i| {
                    let mut data = format!("record-{i}").into_bytes();
                    if data.len() < size {
                        data.resize(size, b'.');
                    }
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("key-{}", i % keys.max(1)))
                        .data(Blob::new(data))
                        .build()
                        .expect("entry")
                })
                .collect();
            match client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    pending = pending
                        .iter()
                        .zip(out.records())
                        .filter(|(_, r)| r.error_code().is_some())
                        .map(|(i, _)| *i)
                        .collect();
                }
                Err(e) if attempts < 20 => {
                    eprintln!("convoy_local put: {e}, retrying");
                }
                Err(e) => {
                    eprintln!("convoy_local put: giving up: {e}");
                    return 1;
                }
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!("put {count}");
    0
}
