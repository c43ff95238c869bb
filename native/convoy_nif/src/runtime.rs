//! The process-wide tokio runtime, created on first use, and the guarded
//! spawn every task goes through: a panicking task is reported, never fatal.

use std::any::Any;
use std::future::Future;
use std::sync::OnceLock;

use rustler::LocalPid;

use crate::delivery;
use crate::reply::ReplyTo;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The shared runtime. Its worker threads are named `convoy-worker` so they
/// are easy to spot in `top -H`, perf and gdb.
pub fn handle() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        crate::allocator::configure();
        let workers = std::env::var("CONVOY_RUNTIME_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("convoy-worker")
            .enable_all()
            .build()
            .expect("convoy: cannot build the tokio runtime")
    })
}

/// Spawns `future` on the runtime. If it panics, `{:convoy_task_panic, what,
/// message}` is sent to `report_to` (when given) and the panic goes no further.
pub fn spawn_guarded<F>(what: &'static str, report_to: Option<LocalPid>, future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let rt = handle();
    let task = rt.spawn(future);
    rt.spawn(async move {
        if let Err(join_error) = task.await {
            if join_error.is_panic() {
                let message = panic_message(join_error.into_panic());
                eprintln!("convoy: task {what} panicked: {message}");
                if let Some(pid) = report_to {
                    delivery::send(&pid, |env| {
                        use rustler::Encoder;
                        (crate::atoms::convoy_task_panic(), what, message.as_str()).encode(env)
                    });
                }
            }
        }
    });
}

pub fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `future` on the runtime and answers the caller with `{ref, {:ok,
/// value} | {:error, reason}}`. A panic becomes `{:error, {:panic, msg}}`,
/// so the caller waiting for the reply is never left hanging.
pub fn spawn_reply<F, T>(reply: ReplyTo, future: F)
where
    F: Future<Output = Result<T, crate::error::Error>> + Send + 'static,
    T: rustler::Encoder + Send + 'static,
{
    let rt = handle();
    let task = rt.spawn(future);
    rt.spawn(async move {
        let result = match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => {
                Err(crate::error::Error::Panic(panic_message(e.into_panic())))
            }
            Err(_) => Err(crate::error::Error::Shutdown),
        };
        reply.send_with(&mut rustler::OwnedEnv::new(), |env| {
            crate::error::encode_result(env, result)
        });
    });
}
