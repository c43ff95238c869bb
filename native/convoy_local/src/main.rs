//! `convoy_local`: the embedded Kinesis emulator (ferrokinesis) for Convoy's
//! demo and tests.
//!
//! `serve` binds 127.0.0.1 only, prints `convoy_local listening on
//! http://127.0.0.1:PORT` once it accepts connections, and exits when its
//! standard input closes, so it never outlives the Elixir port that started it.
//!
//! `null` serves an endpoint that stores nothing and acknowledges every
//! record at once (see [`null`]), for the benchmarks: it measures the
//! client, not an emulator. It prints `convoy_local null listening on URL`
//! and stops the same way.

mod null;
mod subscribe;

use std::net::SocketAddr;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::{Parser, Subcommand};
use ferrokinesis::store::StoreOptions;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

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
    Serve(ServeArgs),
    /// Serve a null Kinesis on 127.0.0.1: every PutRecords entry is
    /// acknowledged at once and nothing is stored (for benchmarks).
    Null(NullArgs),
}

#[derive(clap::Args)]
struct NullArgs {
    /// Port to bind; 0 picks a free one (printed on start).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Shards every stream appears to have.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 7)]
    max_request_body_mb: usize,
    /// Keep running when standard input closes (for use from a shell).
    #[arg(long)]
    ignore_stdin: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
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
    /// Largest request body in MiB. 7 fits a full PutRecords (5 MiB of
    /// data, base64 in JSON), as ferrokinesis' own server allows.
    #[arg(long, default_value_t = 7)]
    max_request_body_mb: usize,
    /// How long one SubscribeToShard subscription lasts (AWS: 300), so
    /// tests can force renewals.
    #[arg(long, default_value_t = 300)]
    subscription_seconds: u64,
    /// Keep running when standard input closes (for use from a shell).
    #[arg(long)]
    ignore_stdin: bool,
    /// Print `convoy_local put_records ENTRIES BYTES` for every PutRecords
    /// request (BYTES: data plus partition keys), so tests can check how
    /// producers cut their requests.
    #[arg(long)]
    log_put_records: bool,
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
            Command::Serve(args) => serve(args).await,
            Command::Null(args) => serve_null(args).await,
        }
    });
    std::process::exit(code);
}

async fn serve(args: ServeArgs) -> i32 {
    let ServeArgs {
        port,
        enforce_limits,
        iterator_ttl_seconds,
        shard_limit,
        max_request_body_mb,
        subscription_seconds,
        ignore_stdin,
        log_put_records,
    } = args;
    let options = StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        shard_limit,
        iterator_ttl_seconds,
        enforce_limits,
        subscribe_to_shard_session_ms: subscription_seconds * 1000,
        ..StoreOptions::default()
    };
    let (app, store) = ferrokinesis::create_app(options);
    let app = app.layer(DefaultBodyLimit::max(max_request_body_mb * 1024 * 1024));
    // One request at a time. ferrokinesis 0.7.0 deadlocks under concurrent
    // PutRecords and GetRecords on one stream: GetRecords keeps a DashMap
    // read guard across an await while PutRecords blocks its worker thread
    // waiting for that shard exclusively. Each request is short, so
    // serving them in turn costs little and cannot deadlock.
    let gate = Arc::new(Semaphore::new(1));
    // Inside the gate: a subscription's opening reads run in their turn;
    // its later reads take the gate themselves.
    let subscriptions = subscribe::Subscriptions::new(store, gate.clone());
    let app = app.layer(axum::middleware::from_fn_with_state(
        subscriptions,
        subscribe::middleware,
    ));
    let app = app.layer(axum::middleware::from_fn(move |request, next: Next| {
        let gate = gate.clone();
        async move {
            let _turn = gate.acquire_owned().await.expect("never closed");
            next.run(request).await
        }
    }));
    let app = if log_put_records {
        app.layer(axum::middleware::from_fn(log_put_records_request))
    } else {
        app
    };
    run(app, port, "convoy_local", ignore_stdin).await
}

async fn serve_null(args: NullArgs) -> i32 {
    let null = null::NullKinesis::new(args.shards);
    let state = null.clone();
    let app = axum::Router::new()
        .fallback(move |headers, body| null::handle(state.clone(), headers, body))
        .layer(DefaultBodyLimit::max(
            args.max_request_body_mb * 1024 * 1024,
        ));
    let code = run(app, args.port, "convoy_local null", args.ignore_stdin).await;
    eprintln!(
        "convoy_local null: {} requests, {} entries acknowledged",
        null.requests.load(Ordering::Relaxed),
        null.entries.load(Ordering::Relaxed)
    );
    code
}

/// Binds 127.0.0.1:`port`, prints `NAME listening on URL`, and serves until
/// standard input closes (or Ctrl-C with `ignore_stdin`).
async fn run(app: axum::Router, port: u16, name: &str, ignore_stdin: bool) -> i32 {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{name}: cannot bind {addr}: {e}");
            return 1;
        }
    };
    let bound = listener.local_addr().expect("bound address");
    println!("{name} listening on http://{bound}");

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
            eprintln!("{name}: server error: {e}");
            1
        }
    }
}

/// Prints the entry count and size of a PutRecords request, then serves it.
async fn log_put_records_request(request: axum::extract::Request, next: Next) -> Response {
    let put_records = request
        .headers()
        .get("x-amz-target")
        .and_then(|target| target.to_str().ok())
        .is_some_and(|target| target.ends_with(".PutRecords"));
    if !put_records {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Some(records) = value["Records"].as_array() {
            let size: usize = records
                .iter()
                .map(|r| {
                    let data = r["Data"].as_str().unwrap_or("");
                    let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
                    data.len() / 4 * 3 - padding + r["PartitionKey"].as_str().map_or(0, str::len)
                })
                .sum();
            println!("convoy_local put_records {} {}", records.len(), size);
        }
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}
