//! The batcher: `put` validates a record and hands it to one of the queue's
//! lanes; each lane buffers, cuts PutRecords requests and retries what
//! Kinesis rejects.
//!
//! A record's lane is chosen by hashing its partition key, and a lane has one
//! request in flight at a time, retrying failed entries before it sends
//! anything newer; and (by default) a request carries each key in one
//! Kinesis record at most (see `order`). So records of one key keep their
//! order, even when Kinesis rejects some entries of a request and stores
//! later ones, while `max_in_flight` lanes run side by side.
//!
//! Memory is bounded by a budget of records and bytes shared by the lanes and
//! charged on `put`; it is paid back only when a record's outcome is final, so
//! the bound holds while Kinesis is unreachable.
//!
//! The producer watches the process that owns it: when the owner stops
//! (closing it first) or is killed (`down`, with the `shutdown` deadline),
//! or when the resource is dropped, the lanes send what they hold, then end,
//! each counting itself out (`producer_await_lanes`, which the owner's
//! successor waits on). Records that finally fail are reported to the
//! queue's reporter process, which outlives the owner; a lane that panics
//! reports its records as failed and closes the producer, so no put is
//! routed to a dead lane. A caller awaiting a record
//! is answered once, whatever becomes of the record (see `entry::Extras`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustler::{Encoder, Env, LocalPid, ResourceArc, Term, TermType};

use crate::atoms;
use crate::client::ClientResource;
use crate::error::{Error, Reason};
use crate::put_record::PutRecord;
use crate::reply::ReplyTo;
use crate::runtime;
use convoy_core::lanes::lane_of;
use convoy_core::retry::RetryPolicy;

mod aggregate;
mod entry;
mod inbox;
mod lane;
mod order;
mod send;

use aggregate::Aggregation;
use entry::{Clock, Entry, Packed};
use inbox::Inbox;
use lane::Lane;
use order::KeyOrder;

/// PutRecords accepts at most this many records per request...
pub const MAX_REQUEST_RECORDS: usize = 500;
/// ...and at most this many bytes of data and partition keys.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;

/// The producer's share of the queue options, under their `Convoy.Queue`
/// names (times in ms, sizes in bytes).
#[derive(rustler::NifMap)]
pub struct ProducerOptions {
    pub stream: String,
    pub batch_timeout: u64,
    pub max_in_flight: usize,
    /// Whether records of one partition key keep their order through
    /// rejections (see `order`).
    pub ordering: KeyOrder,
    pub max_buffered_records: u64,
    pub max_buffered_bytes: u64,
    pub max_record_bytes: u64,
    pub max_retries: u32,
    pub retry_deadline: u64,
    pub retry_backoff: u64,
    pub max_backoff: u64,
    /// Pack user records into KPL aggregated records...
    pub aggregation: bool,
    /// ...of at most this many bytes.
    pub aggregation_max_bytes: u64,
    pub shard_refresh_interval: u64,
    /// Report each PutRecords request to the reporter (see `crate::telemetry`).
    pub telemetry: bool,
    /// How long the lanes may go on sending once the owner is gone (ms).
    pub shutdown: u64,
}

pub struct Producer {
    lanes: Vec<Arc<Inbox>>,
    shared: Arc<Shared>,
}

impl Drop for Producer {
    /// Nobody can put any more: the lanes send what they hold, then end.
    fn drop(&mut self) {
        for inbox in &self.lanes {
            inbox.drop_producer();
        }
    }
}

#[rustler::resource_impl]
impl rustler::Resource for Producer {
    /// The owner is gone. Its Registry entry went with it, but a caller may
    /// still hold the handle (`Convoy.Queue` keeps the last one it found):
    /// close the producer so such a put answers `{:error, :closed}` and the
    /// caller looks again, and let the lanes send what they hold and end,
    /// as when the resource is dropped.
    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: rustler::Monitor) {
        self.shared.closed.store(true, Ordering::SeqCst);
        // Within `shutdown`, as a close would: the owner's successor waits
        // for these lanes before it takes puts.
        self.shared
            .set_close_deadline(Instant::now() + self.shared.shutdown);
        for inbox in &self.lanes {
            inbox.drop_producer();
        }
    }
}

struct Shared {
    client: aws_sdk_kinesis::Client,
    stream_name: String,
    batch_timeout: Duration,
    ordering: KeyOrder,
    max_buffered_records: u64,
    max_buffered_bytes: u64,
    max_record_bytes: usize,
    policy: RetryPolicy,
    /// Receives `{:convoy_put_failed, [{key, data, reason}]}` for records
    /// that finally failed, and the requests' telemetry: the queue's
    /// reporter (its successor once it restarted, see
    /// `producer_set_reporter`)...
    reporter: Mutex<LocalPid>,
    /// ...or, while that process is down, the owner (the process that
    /// started the producer).
    owner: LocalPid,
    closed: AtomicBool,
    /// Set by `close`: when the lanes give up sending. A request in flight
    /// or a retry waiting then ends at once (see `send::deliver`).
    close_deadline: tokio::sync::watch::Sender<Option<Instant>>,
    /// Lanes not ended yet, and the signal of each end (see
    /// `producer_await_lanes`).
    lanes_running: AtomicUsize,
    lane_ended: tokio::sync::Notify,
    /// See `ProducerOptions::shutdown`.
    shutdown: Duration,
    stats: Stats,
    aggregation: Option<Arc<Aggregation>>,
    /// Stamps records as they are put.
    clock: Clock,
    /// Whether each request is reported to `reporter` for telemetry.
    telemetry: bool,
}

#[derive(Default)]
struct Stats {
    buffered: AtomicU64,
    buffered_bytes: AtomicU64,
    in_flight: AtomicU64,
    sent: AtomicU64,
    retried: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
}

enum Command {
    Put(Entry),
    Flush(Option<Arc<Waiter>>),
    Close(Option<Arc<Waiter>>),
    /// Makes the lane panic (tests of what a failing lane does): at once,
    /// or in its next cut, once it has taken one record into the request.
    #[cfg(feature = "test-hooks")]
    Panic {
        mid_cut: bool,
    },
}

/// Counts down the lanes that still have to answer a flush or close; the last
/// one answers the waiting caller with `{ref, :ok}`.
struct Waiter {
    remaining: AtomicUsize,
    reply: Mutex<Option<ReplyTo>>,
}

impl Waiter {
    fn new(lanes: usize, reply: ReplyTo) -> Arc<Self> {
        Arc::new(Waiter {
            remaining: AtomicUsize::new(lanes),
            reply: Mutex::new(Some(reply)),
        })
    }

    fn done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let reply = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
            // The last lane may answer from a NIF: a scheduler thread.
            if let Some(reply) = reply {
                reply.send_anywhere(atoms::ok());
            }
        }
    }
}

impl Shared {
    /// The queue's reporter, as last set.
    fn reporter(&self) -> LocalPid {
        *self.reporter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets when the lanes give up sending, unless it is set already;
    /// whether it was set now.
    fn set_close_deadline(&self, deadline: Instant) -> bool {
        self.close_deadline.send_if_modified(|at| {
            let unset = at.is_none();
            if unset {
                *at = Some(deadline);
            }
            unset
        })
    }

    /// Pays back the budget of records whose outcome is final.
    fn release(&self, records: u64, bytes: u64) {
        self.stats.buffered.fetch_sub(records, Ordering::Relaxed);
        self.stats
            .buffered_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Producer {
    /// Stops taking records and has every lane send what it holds within
    /// `timeout`; the waiter hears when all are done (at once if closed before).
    ///
    /// A lane's panic closes the producer too (no put may reach the dead
    /// lane) but tells no other lane: the first close with a deadline is
    /// still this one, and the live lanes finish within it, so the owner's
    /// successor starts after them and keeps each key's order.
    fn close(&self, timeout: Duration, waiter: Option<Arc<Waiter>>) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let first = self.shared.set_close_deadline(deadline);
        for inbox in &self.lanes {
            let told = first && inbox.push_close(Command::Close(waiter.clone())).is_ok();
            if let (false, Some(waiter)) = (told, &waiter) {
                waiter.done();
            }
        }
    }

    fn put<'a>(
        &self,
        key: Term<'a>,
        data: Term<'a>,
        explicit_hash_key: Term<'a>,
        reply: Term<'a>,
    ) -> Result<(), Error> {
        // Checked again, race-free, when the record is pushed.
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let PutRecord {
            key,
            data,
            size,
            explicit_hash_key,
        } = PutRecord::decode(key, data, explicit_hash_key, self.shared.max_record_bytes)?;
        let reply = decode_reply(reply)?;

        self.charge(size as u64)?;
        let lane = lane_of(key, self.lanes.len());
        let entry = Entry::new(
            Packed::new(key, &data),
            explicit_hash_key.map(String::into_boxed_str),
            reply,
            self.shared.clock.now(),
        );
        if let Err(refused) = self.lanes[lane].push(Command::Put(entry), &self.shared.closed) {
            // The caller hears `:closed` from this call, not from the reply.
            if let Command::Put(mut entry) = refused {
                entry.extras.as_mut().and_then(|x| x.take_reply());
            }
            self.shared.release(1, size as u64);
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Reserves room for one record, or answers `:overloaded` at once.
    fn charge(&self, size: u64) -> Result<(), Error> {
        let stats = &self.shared.stats;
        let records = stats.buffered.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = stats.buffered_bytes.fetch_add(size, Ordering::Relaxed) + size;
        if records > self.shared.max_buffered_records || bytes > self.shared.max_buffered_bytes {
            self.shared.release(1, size);
            return Err(Error::Overloaded);
        }
        Ok(())
    }
}

fn decode_reply(term: Term) -> Result<Option<ReplyTo>, Error> {
    if term.get_type() == TermType::Atom {
        return Ok(None);
    }
    term.decode::<ReplyTo>()
        .map(Some)
        .map_err(|_| Error::InvalidArgument("reply must be nil or {pid, ref}".into()))
}

// ---------------------------------------------------------------------------
// NIFs

/// Starts a producer. Failure reports go to `reporter`; a panicking task is
/// reported to the calling process, its owner. Returns the producer as a
/// term: the SDK client inside is not `RefUnwindSafe`, which rustler asks
/// of typed return values.
#[rustler::nif]
fn producer_start(
    env: Env,
    client: ResourceArc<ClientResource>,
    options: ProducerOptions,
    reporter: LocalPid,
) -> Term {
    let owner = env.pid();
    let lane_count = options.max_in_flight.max(1);
    let shared = Arc::new(Shared {
        client: client.client.clone(),
        stream_name: options.stream,
        batch_timeout: Duration::from_millis(options.batch_timeout),
        ordering: options.ordering,
        max_buffered_records: options.max_buffered_records,
        max_buffered_bytes: options.max_buffered_bytes,
        max_record_bytes: options.max_record_bytes as usize,
        policy: RetryPolicy {
            max_retries: options.max_retries,
            base: Duration::from_millis(options.retry_backoff),
            max_backoff: Duration::from_millis(options.max_backoff),
            deadline: Duration::from_millis(options.retry_deadline),
        },
        reporter: Mutex::new(reporter),
        owner,
        closed: AtomicBool::new(false),
        close_deadline: tokio::sync::watch::Sender::new(None),
        lanes_running: AtomicUsize::new(lane_count),
        lane_ended: tokio::sync::Notify::new(),
        shutdown: Duration::from_millis(options.shutdown),
        stats: Stats::default(),
        aggregation: options
            .aggregation
            .then(|| Arc::new(Aggregation::new(options.aggregation_max_bytes as usize))),
        clock: Clock::new(),
        telemetry: options.telemetry,
    });
    if let Some(aggregation) = &shared.aggregation {
        runtime::spawn_guarded(
            "shard map refresh",
            Some(owner),
            aggregate::refresh_shard_map(
                Arc::downgrade(&shared),
                aggregation.clone(),
                Duration::from_millis(options.shard_refresh_interval.max(1_000)),
            ),
        );
    }
    let lanes = (0..lane_count)
        .map(|_| {
            let inbox = Arc::new(Inbox::default());
            let lane = Lane::new(shared.clone(), inbox.clone());
            runtime::spawn_guarded("producer lane", Some(owner), lane.run());
            inbox
        })
        .collect();
    let producer = ResourceArc::new(Producer { lanes, shared });
    // Closes it when the owner ends (see `down`); the owner is this live
    // caller, so the monitor is always set.
    producer.monitor(Some(env), &owner);
    producer.encode(env)
}

/// The hot path: validate, charge the budget, enqueue, return. Binary data
/// only copies bytes, so this runs on a normal scheduler.
#[rustler::nif]
fn producer_put<'a>(
    env: Env<'a>,
    producer: ResourceArc<Producer>,
    key: Term<'a>,
    data: Term<'a>,
    explicit_hash_key: Term<'a>,
    reply: Term<'a>,
) -> Term<'a> {
    put_result(env, producer.put(key, data, explicit_hash_key, reply))
}

/// Same as `producer_put` for data that must be encoded as JSON: a large term
/// can take longer than a scheduler slice, so it runs on a dirty scheduler.
#[rustler::nif(schedule = "DirtyCpu")]
fn producer_put_term<'a>(
    env: Env<'a>,
    producer: ResourceArc<Producer>,
    key: Term<'a>,
    data: Term<'a>,
    explicit_hash_key: Term<'a>,
    reply: Term<'a>,
) -> Term<'a> {
    put_result(env, producer.put(key, data, explicit_hash_key, reply))
}

fn put_result(env: Env, result: Result<(), Error>) -> Term {
    match result {
        Ok(()) => atoms::ok().encode(env),
        Err(error) => (atoms::error(), Reason(&error)).encode(env),
    }
}

/// Sends everything buffered now. With `{pid, ref}`, `{ref, :ok}` follows
/// once every record buffered before the call has an outcome.
#[rustler::nif]
fn producer_flush(producer: ResourceArc<Producer>, reply: Option<ReplyTo>) -> rustler::Atom {
    let waiter = reply.map(|reply| Waiter::new(producer.lanes.len(), reply));
    for inbox in &producer.lanes {
        let refused = inbox
            .push(Command::Flush(waiter.clone()), &producer.shared.closed)
            .is_err();
        // A closed lane has sent (or failed) everything already.
        if let (true, Some(waiter)) = (refused, &waiter) {
            waiter.done();
        }
    }
    atoms::ok()
}

/// Stops taking records and sends what is buffered, giving up at the
/// deadline: records still unsent then go through the failure path with
/// reason `:shutdown`, and are reported to the reporter as ever (or to the
/// owner while the reporter is down). `{ref, :ok}` follows when every lane
/// is done.
#[rustler::nif]
fn producer_close(
    producer: ResourceArc<Producer>,
    timeout_ms: u64,
    reply: ReplyTo,
) -> rustler::Atom {
    let waiter = Waiter::new(producer.lanes.len(), reply);
    producer.close(Duration::from_millis(timeout_ms), Some(waiter));
    atoms::ok()
}

/// Replies `{ref, {:ok, true}}` once every lane of the producer has ended
/// (sent or failed all it held), or `{ref, {:ok, false}}` after
/// `timeout_ms`. A producer whose owner was killed goes on sending what it
/// held; its successor waits for it, so a key's records keep their order.
#[rustler::nif]
fn producer_await_lanes(
    producer: ResourceArc<Producer>,
    timeout_ms: u64,
    reply: ReplyTo,
) -> rustler::Atom {
    let shared = producer.shared.clone();
    runtime::spawn_reply(reply, async move {
        let all_ended = async {
            loop {
                // Registered before the count is read, so no end is missed.
                let ended = shared.lane_ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if shared.lanes_running.load(Ordering::SeqCst) == 0 {
                    return;
                }
                ended.await;
            }
        };
        let timeout = Duration::from_millis(timeout_ms);
        Ok(tokio::time::timeout(timeout, all_ended).await.is_ok())
    });
    atoms::ok()
}

/// The queue's reporter restarted: reports go to the new one. (Until then
/// they went to the owner, as whenever the reporter is down.)
#[rustler::nif]
fn producer_set_reporter(producer: ResourceArc<Producer>, reporter: LocalPid) -> rustler::Atom {
    *producer
        .shared
        .reporter
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = reporter;
    atoms::ok()
}

/// Makes the first lane panic as it takes its next command or, with
/// `mid_cut`, in the middle of its next cut.
#[cfg(feature = "test-hooks")]
#[rustler::nif]
fn debug_lane_panic(producer: ResourceArc<Producer>, mid_cut: bool) -> rustler::Atom {
    let _ = producer.lanes[0].push_close(Command::Panic { mid_cut });
    atoms::ok()
}

#[rustler::nif]
fn producer_stats(env: Env, producer: ResourceArc<Producer>) -> Term {
    let s = &producer.shared.stats;
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let keys = [
        atoms::buffered(),
        atoms::buffered_bytes(),
        atoms::in_flight(),
        atoms::sent(),
        atoms::retried(),
        atoms::throttled(),
        atoms::failed(),
    ];
    // `buffered` counts every record not yet final; in-flight ones are part of it.
    let in_flight = read(&s.in_flight);
    let values = [
        read(&s.buffered).saturating_sub(in_flight),
        read(&s.buffered_bytes),
        in_flight,
        read(&s.sent),
        read(&s.retried),
        read(&s.throttled),
        read(&s.failed),
    ];
    Term::map_from_arrays(env, &keys, &values).expect("distinct keys")
}
