//! Fault injection for Convoy's own test suite: proves that a panic in a NIF
//! or in a runtime task is contained, and that tasks can reach BEAM processes.
//! Not part of the public API (`Convoy.Native` is `@moduledoc false`).

use rustler::{Encoder, LocalPid, Term};

use crate::{atoms, delivery, runtime};

#[rustler::nif]
fn debug_nif_panic() -> rustler::Atom {
    panic!("convoy: deliberate panic in a NIF (test)");
}

#[rustler::nif]
fn debug_task_panic(report_to: LocalPid) -> rustler::Atom {
    runtime::spawn_guarded("debug task", Some(report_to), async {
        panic!("convoy: deliberate panic in a task (test)");
    });
    atoms::ok()
}

/// Sends `{:convoy_echo, thread_name, payload}` to `pid` from a runtime task.
#[rustler::nif]
fn debug_echo_from_task(pid: LocalPid, payload: String) -> rustler::Atom {
    runtime::spawn_guarded("debug echo", Some(pid), async move {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        delivery::send(&pid, |env| {
            let tag = rustler::Atom::from_str(env, "convoy_echo").expect("atom");
            let message: Term = (tag, thread.as_str(), payload.as_str()).encode(env);
            message
        });
    });
    atoms::ok()
}
