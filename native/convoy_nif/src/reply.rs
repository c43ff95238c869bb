//! The one request/reply path between Elixir and the runtime: a caller
//! passes `{self(), ref}` with `ref = make_ref()`, and is answered later
//! with `{ref, result}`, the shape of a GenServer reply. The caller's
//! `receive` matches on the fresh reference, so the VM skips every message
//! that was already in its mailbox.

use rustler::{Decoder, Encoder, Env, LocalPid, NifResult, OwnedEnv, Term};

use crate::delivery::KeptTerm;

/// Where and under which reference to answer.
pub struct ReplyTo {
    pid: LocalPid,
    tag: KeptTerm,
}

impl<'a> Decoder<'a> for ReplyTo {
    fn decode(term: Term<'a>) -> NifResult<Self> {
        let (pid, tag): (LocalPid, Term<'a>) = term.decode()?;
        if !tag.is_ref() {
            return Err(rustler::Error::BadArg);
        }
        Ok(ReplyTo {
            pid,
            tag: KeptTerm::new(tag),
        })
    }
}

impl ReplyTo {
    /// The process that will be answered.
    pub fn pid(&self) -> LocalPid {
        self.pid
    }

    /// Sends `{ref, value}`, building the value in `env`. False when the
    /// caller no longer exists.
    pub fn send_with<F>(&self, env: &mut OwnedEnv, build: F) -> bool
    where
        F: for<'b> FnOnce(Env<'b>) -> Term<'b>,
    {
        env.send_and_clear(&self.pid, |env| {
            (self.tag.load(env), build(env)).encode(env)
        })
        .is_ok()
    }

    /// Sends `{ref, value}` from a runtime thread.
    pub fn send<T: Encoder>(&self, value: T) -> bool {
        self.send_with(&mut OwnedEnv::new(), |env| value.encode(env))
    }

    /// Like `send`, from any thread: on a scheduler thread (a NIF, or a
    /// resource callback) the send is handed to a runtime thread.
    pub fn send_anywhere<T: Encoder + Send + 'static>(self, value: T) {
        if rustler::thread::is_scheduler_thread() {
            crate::runtime::handle().spawn(async move {
                self.send(value);
            });
        } else {
            self.send(value);
        }
    }
}
