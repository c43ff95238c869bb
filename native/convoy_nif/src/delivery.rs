//! Sending terms from runtime threads to BEAM processes.
//!
//! `OwnedEnv::send_and_clear` may only run on a thread the VM does not manage:
//! `send` is for tokio workers (`ReplyTo::send_anywhere` also serves scheduler
//! threads). A failed send means the receiver is gone, which callers treat as
//! "nobody is listening".

use rustler::{Env, LocalPid, OwnedEnv, Term};

/// A term kept outside any env (a caller's reference, a queue's
/// `stream_id`), in the external term format, and rebuilt in the env of
/// each message that carries it.
pub struct KeptTerm(Box<[u8]>);

impl KeptTerm {
    pub fn new(term: Term) -> Self {
        KeptTerm(term.to_binary().as_slice().into())
    }

    pub fn load<'a>(&self, env: Env<'a>) -> Term<'a> {
        env.binary_to_term(&self.0)
            .map(|(term, _)| term)
            .expect("a term encoded by the VM decodes")
    }
}

/// Builds a message in a fresh process-independent env and sends it.
/// Returns false when the receiver no longer exists.
pub fn send<F>(pid: &LocalPid, build: F) -> bool
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    let mut env = OwnedEnv::new();
    env.send_and_clear(pid, build).is_ok()
}
