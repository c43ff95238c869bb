//! A lane: one ordered pipeline of PutRecords requests. It buffers the
//! records routed to it, cuts a request when one is due, and sends it
//! (retries included) before cutting the next; in per-key order a request
//! holds each partition key in one Kinesis record at most. So records of one
//! partition key never overtake each other.
//!
//! A lane that ends abnormally (a panic in a task is contained by the
//! runtime, which then drops the lane) closes the producer so no put is
//! routed to it, and reports every record it held as failed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::inbox::Inbox;
use super::order::{KeySlots, Scan};
use super::send::{deliver, fail, Outgoing};
use super::{aggregate, Command, Entry, Shared, Waiter, MAX_REQUEST_BYTES, MAX_REQUEST_RECORDS};
use crate::error::Error;

pub(super) struct Lane {
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    buffer: VecDeque<Entry>,
    buffer_bytes: usize,
    /// Flush waiters and how many buffered records stand before each.
    flushes: Vec<(usize, Option<Arc<Waiter>>)>,
    /// Told to close (its deadline is the producer's, `Shared::close_deadline`),
    /// and who hears when it is done.
    closing: bool,
    close_waiter: Option<Arc<Waiter>>,
    disconnected: bool,
    /// The request being sent, kept here across its awaits so a lane that
    /// dies mid-request still accounts for it.
    sending: Vec<Outgoing>,
    /// Set when `run` returns normally; a lane dropped without it ended abnormally.
    finished: bool,
    /// Set as the lane is dropped: a test's panic command is ignored then.
    #[cfg(feature = "test-hooks")]
    dropping: bool,
    /// With aggregation: the hash keys of the partition keys seen.
    key_hashes: aggregate::KeyHashes,
    /// Which Kinesis record of the request being cut holds each key.
    key_slots: KeySlots,
    #[cfg(feature = "test-hooks")]
    panic_mid_cut: bool,
}

impl Lane {
    pub(super) fn new(shared: Arc<Shared>, inbox: Arc<Inbox>) -> Self {
        Lane {
            shared,
            inbox,
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            flushes: Vec::new(),
            closing: false,
            close_waiter: None,
            disconnected: false,
            sending: Vec::new(),
            finished: false,
            key_hashes: aggregate::KeyHashes::default(),
            key_slots: KeySlots::default(),
            #[cfg(feature = "test-hooks")]
            panic_mid_cut: false,
            #[cfg(feature = "test-hooks")]
            dropping: false,
        }
    }

    pub(super) async fn run(mut self) {
        if let Some(aggregation) = self.shared.aggregation.clone() {
            aggregation.await_first_load().await;
        }
        loop {
            self.drain_commands();
            if self.closing || self.disconnected {
                // Puts are refused now; take in those that were mid-push.
                self.inbox.settle().await;
                self.drain_commands();
            }
            if self.closing_overdue() {
                self.fail_buffered(&Error::Shutdown);
                continue;
            }
            if self.due() {
                let (request, taken) = self.cut();
                self.sending = request;
                deliver(&self.shared, &mut self.sending).await;
                self.completed(&taken);
                continue;
            }
            self.answer_flushes();
            if self.buffer.is_empty() && (self.closing || self.disconnected) {
                break;
            }
            let timer = self.buffer.front().map(|e| {
                self.shared
                    .clock
                    .deadline(e.enqueued(), self.shared.batch_timeout)
            });
            // Register for a wake-up before the last look at the inbox, so a
            // put landing in between is never missed.
            let inbox = self.inbox.clone();
            let woken = inbox.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !inbox.is_empty() || inbox.dropped() {
                continue;
            }
            tokio::select! {
                _ = woken => {}
                _ = sleep_until_opt(timer) => {}
            }
        }
        self.answer_close();
        self.finished = true;
    }

    fn drain_commands(&mut self) {
        if self.inbox.dropped() {
            self.disconnected = true;
        }
        while let Some(command) = self.inbox.pop() {
            self.accept(command);
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Put(entry) => {
                self.buffer_bytes += entry.size();
                self.buffer.push_back(entry);
            }
            Command::Flush(waiter) => self.flushes.push((self.buffer.len(), waiter)),
            Command::Close(waiter) => {
                self.closing = true;
                self.close_waiter = waiter;
            }
            #[cfg(feature = "test-hooks")]
            // Not while the lane is being dropped: after a panic a second
            // one would abort the VM, and any panic in Drop would leave the
            // lane uncounted.
            Command::Panic { mid_cut: false } if !self.dropping => {
                panic!("convoy: deliberate panic in a producer lane (test)")
            }
            #[cfg(feature = "test-hooks")]
            Command::Panic { mid_cut: false } => {}
            #[cfg(feature = "test-hooks")]
            Command::Panic { mid_cut: true } => self.panic_mid_cut = true,
        }
    }

    fn due(&self) -> bool {
        let Some(oldest) = self.buffer.front() else {
            return false;
        };
        self.closing
            || self.disconnected
            || self.flushes.iter().any(|(ahead, _)| *ahead > 0)
            || self.full()
            || self.shared.clock.age(oldest.enqueued()) >= self.shared.batch_timeout
    }

    /// The close deadline passed with records still buffered: they fail at
    /// once, not a request's worth at a time (in per-key order a busy key
    /// would otherwise take a cut per record). The producer's deadline, set
    /// by a close and also when the owner is gone (`down`).
    fn closing_overdue(&self) -> bool {
        !self.buffer.is_empty()
            && self
                .shared
                .close_deadline
                .borrow()
                .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Every buffered record takes the failure path; flushes are answered.
    fn fail_buffered(&mut self, reason: &Error) {
        // They join the in-flight count that `fail` pays back.
        let count = self.buffer.len() as u64;
        self.shared
            .stats
            .in_flight
            .fetch_add(count, Ordering::Relaxed);
        let lost: Vec<Outgoing> = self.buffer.drain(..).map(Outgoing::single).collect();
        self.buffer_bytes = 0;
        fail(&self.shared, lost, reason);
        for (ahead, _) in &mut self.flushes {
            *ahead = 0;
        }
        self.answer_flushes();
    }

    /// Whether a full request is ready. With aggregation many records share
    /// one Kinesis record, so only the byte limit says "full".
    fn full(&self) -> bool {
        let by_count =
            self.shared.aggregation.is_none() && self.buffer.len() >= MAX_REQUEST_RECORDS;
        by_count || self.buffer_bytes >= MAX_REQUEST_BYTES
    }

    /// Takes a request's worth from the front of the buffer (in per-key
    /// order, records of a key already in the request wait for the next);
    /// returns it and the buffer positions of the user records it holds.
    fn cut(&mut self) -> (Vec<Outgoing>, Vec<u32>) {
        let mut scan = Scan::new(&mut self.buffer, self.shared.ordering, &mut self.key_slots);
        #[cfg(feature = "test-hooks")]
        if self.panic_mid_cut {
            scan.panic_at_take = Some(1);
        }
        let request = match &self.shared.aggregation {
            Some(aggregation) => aggregate::cut(&mut scan, aggregation, &mut self.key_hashes),
            None => cut_plain(&mut scan),
        };
        let taken = scan.finish();
        let bytes: usize = request.iter().map(|o| o.member_bytes()).sum();
        self.buffer_bytes -= bytes;
        (request, taken)
    }

    /// A request has its outcome: each flush waits for fewer records, by
    /// those of the request that stood before it in the buffer.
    fn completed(&mut self, taken: &[u32]) {
        for (ahead, _) in &mut self.flushes {
            *ahead -= taken.partition_point(|&position| (position as usize) < *ahead);
        }
        self.answer_flushes();
    }

    fn answer_flushes(&mut self) {
        self.flushes.retain(|(ahead, waiter)| {
            if *ahead == 0 {
                if let Some(waiter) = waiter {
                    waiter.done();
                }
                false
            } else {
                true
            }
        });
    }
}

/// One Kinesis record per user record, up to the PutRecords limits.
fn cut_plain(scan: &mut Scan) -> Vec<Outgoing> {
    let mut request = Vec::with_capacity(scan.len().min(MAX_REQUEST_RECORDS));
    let mut bytes = 0;
    while let Some(entry) = scan.next() {
        let size = entry.size();
        if request.len() == MAX_REQUEST_RECORDS
            || (!request.is_empty() && bytes + size > MAX_REQUEST_BYTES)
        {
            break;
        }
        let slot = request.len() as u32;
        if !scan.admits(slot) {
            scan.set_aside();
            continue;
        }
        bytes += size;
        request.push(Outgoing::single(scan.take(slot)));
    }
    request
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Drop for Lane {
    /// Nothing reads the inbox from here on: it refuses control commands
    /// (see `Inbox::push_close`), and those already in are answered. Then
    /// the lane counts itself out, whatever it held having its outcome.
    fn drop(&mut self) {
        #[cfg(feature = "test-hooks")]
        {
            self.dropping = true;
        }
        if !self.finished {
            // Puts are refused before the last drain (a lane that finished
            // did so closed already, or with no producer left to put).
            self.shared.closed.store(true, Ordering::SeqCst);
        }
        self.inbox.lane_gone();
        self.inbox.settle_blocking();
        if self.finished {
            // A close or flush that came after the lane's last look.
            self.drain_commands();
            self.fail_buffered(&Error::Closed);
            self.answer_close();
        } else {
            self.end_abnormally();
        }
        if self.shared.lanes_running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.lane_ended.notify_waiters();
        }
    }
}

impl Lane {
    /// A lane dropped before `run` finished ended abnormally. The producer
    /// is closed by now (see `Drop`), so puts answer `{:error, :closed}`
    /// instead of reaching this lane: every record it held, or that reached
    /// its inbox before the close, is reported as failed, and waiting
    /// callers are answered.
    fn end_abnormally(&mut self) {
        self.drain_commands();
        let reason = Error::Panic("the producer lane ended abnormally".into());
        // The request being sent is counted in flight already.
        fail(&self.shared, std::mem::take(&mut self.sending), &reason);
        self.fail_buffered(&reason);
        self.answer_close();
    }

    fn answer_close(&mut self) {
        if let Some(waiter) = self.close_waiter.take() {
            waiter.done();
        }
    }
}
