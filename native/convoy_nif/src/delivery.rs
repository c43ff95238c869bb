//! Sending terms from runtime threads to BEAM processes.
//!
//! `OwnedEnv::send_and_clear` may only run on a thread the VM does not manage:
//! `send` is for tokio workers (`ReplyTo::send_anywhere` also serves
//! scheduler threads). A failed send
//! means the receiver is gone, which callers treat as "nobody is listening".

use rustler::{Env, LocalPid, OwnedEnv, Term};

/// Builds a message in a fresh process-independent env and sends it.
/// Returns false when the receiver no longer exists.
pub fn send<F>(pid: &LocalPid, build: F) -> bool
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    let mut env = OwnedEnv::new();
    env.send_and_clear(pid, build).is_ok()
}
