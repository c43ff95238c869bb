//! A lane's inbox: puts leave records here without waking the lane for each
//! one. Waking a parked runtime thread costs a system call, several times
//! the rest of a put, so a put wakes its lane only when the lane has
//! something to start on: the first record after the inbox went empty
//! (which starts the batch timer), every `WAKE_EVERY` records (a request
//! may be full), a large record, or a control command.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use crossbeam_queue::SegQueue;
use tokio::sync::Notify;

use super::{Command, Entry};

const WAKE_EVERY: i64 = 128;
const LARGE_RECORD: usize = 64 * 1024;

/// A command as the inbox keeps it: a record as it is, anything else (rare)
/// boxed. A `Command` is 40 bytes (an entry and its tag), a `Slot`
/// as small as an entry, 32, and the queue's blocks hold 31 of them: a
/// record waiting here costs 41 bytes of block rather than 49.
enum Slot {
    Put(Entry),
    Control(Box<Command>),
}

const _: () = assert!(std::mem::size_of::<Slot>() == std::mem::size_of::<Entry>());

impl From<Command> for Slot {
    fn from(command: Command) -> Self {
        match command {
            Command::Put(entry) => Slot::Put(entry),
            other => Slot::Control(Box::new(other)),
        }
    }
}

impl From<Slot> for Command {
    fn from(slot: Slot) -> Self {
        match slot {
            Slot::Put(entry) => Command::Put(entry),
            Slot::Control(command) => *command,
        }
    }
}

#[derive(Default)]
pub(super) struct Inbox {
    queue: SegQueue<Slot>,
    /// Commands pushed minus commands taken. Only the lane decreases it, so
    /// while the lane sleeps it only grows, and the push that brings it to 1
    /// is the one that wakes the lane: no record is left behind unseen.
    pending: AtomicI64,
    /// Puts between their check of `closed` and their push; a closing lane
    /// waits for none to remain before its last drain.
    active: AtomicUsize,
    /// Set when the producer resource is gone: no put can come any more.
    dropped: AtomicBool,
    /// Set when the lane is dropped: nothing drains this inbox any more.
    lane_gone: AtomicBool,
    pub wake: Notify,
}

impl Inbox {
    /// Leaves a record, or a flush, unless the producer is closed. `closed`
    /// is checked inside the `active` window (see `settle`), so whatever is
    /// accepted here is seen by the lane before it finishes.
    pub fn push(&self, command: Command, closed: &AtomicBool) -> Result<(), Command> {
        self.active.fetch_add(1, Ordering::SeqCst);
        if closed.load(Ordering::SeqCst) {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(command);
        }
        let urgent = match &command {
            Command::Put(entry) => entry.size() >= LARGE_RECORD,
            _ => true,
        };
        self.queue.push(command.into());
        let pending = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        self.active.fetch_sub(1, Ordering::SeqCst);
        if pending == 1 || pending % WAKE_EVERY == 0 || urgent {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// A control command that goes in even when the producer is closed (the
    /// close itself, sent once `closed` is set), unless the lane is gone.
    /// Like `push`, inside the `active` window: the dying lane settles
    /// before its last drain, so an accepted command is always seen.
    pub fn push_close(&self, command: Command) -> Result<(), Command> {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.lane_gone.load(Ordering::SeqCst) {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(command);
        }
        self.queue.push(command.into());
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.wake.notify_one();
        Ok(())
    }

    /// The lane is being dropped; it settles and drains once more after this.
    pub fn lane_gone(&self) {
        self.lane_gone.store(true, Ordering::SeqCst);
    }

    pub fn pop(&self) -> Option<Command> {
        let slot = self.queue.pop()?;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        Some(slot.into())
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Once `closed` is set, waits for the puts that may still push.
    pub async fn settle(&self) {
        while self.active.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
    }

    /// `settle` for a thread that cannot await (a lane being dropped). Puts
    /// hold the window for a few instructions only.
    pub fn settle_blocking(&self) {
        while self.active.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
    }

    pub fn drop_producer(&self) {
        self.dropped.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}
