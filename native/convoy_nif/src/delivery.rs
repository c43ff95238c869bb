//! Sending terms from runtime threads to BEAM processes.
//!
//! `OwnedEnv::send_and_clear` may only run on a thread the VM does not manage:
//! `send` is for tokio workers, `send_anywhere` for any thread. A failed send
//! means the receiver is gone, which callers treat as "nobody is listening".

use rustler::{Encoder, Env, LocalPid, OwnedEnv, Term};

use crate::atoms;
use crate::error::Error;

/// Builds a message in a fresh process-independent env and sends it.
/// Returns false when the receiver no longer exists.
pub fn send<F>(pid: &LocalPid, build: F) -> bool
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    let mut env = OwnedEnv::new();
    env.send_and_clear(pid, build).is_ok()
}

/// Like `send`, from any thread: on a scheduler thread (a NIF or a resource
/// callback such as `down`) the send is handed to a runtime thread.
pub fn send_anywhere<F>(pid: LocalPid, build: F)
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a> + Send + 'static,
{
    if rustler::thread::is_scheduler_thread() {
        crate::runtime::handle().spawn(async move {
            send(&pid, build);
        });
    } else {
        send(&pid, build);
    }
}

/// The reply to an asynchronous NIF call: `{:convoy_reply, id, {:ok, value} | {:error, reason}}`.
pub fn reply<T: Encoder>(pid: &LocalPid, id: u64, result: Result<T, Error>) -> bool {
    send(pid, |env| {
        (
            atoms::convoy_reply(),
            id,
            crate::error::encode_result(env, result),
        )
            .encode(env)
    })
}
