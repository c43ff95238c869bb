# The CPU cost of one `put/3` call, from the CPU time of the VM's scheduler
# threads (`/proc/self/task/*/schedstat`, in ns): unlike a clock, it does
# not count the time the callers wait for a core on a busy machine, nor the
# lanes' work (runtime threads). Also run by bench/run.
#
#   MIX_ENV=prod mix run bench/put_cost.exs [calls] [endpoint]
#
# Without an endpoint the queue points at a closed port and waits in
# backoff, so the figure is the caller's share alone; with one (the null
# endpoint) its lanes send meanwhile, the steady state.
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :none)

{count, endpoint} =
  case System.argv() do
    [c, e] -> {String.to_integer(c), e}
    [c] -> {String.to_integer(c), nil}
    [] -> {400_000, nil}
  end

{id, pid} =
  case endpoint do
    nil ->
      Bench.queue!("put-cost", "http://127.0.0.1:9",
        batch_timeout: 600_000,
        max_retries: 1_000,
        retry_deadline: 3_600_000,
        retry_backoff: 60_000,
        max_backoff: 60_000,
        shutdown: 1_000
      )

    endpoint ->
      Bench.queue!("put-cost", endpoint, batch_timeout: 100)
  end

# Warm: the handle is looked up (and kept), allocators grown.
Bench.put_all(id, 20_000, 1)

for procs <- [1, System.schedulers_online()] do
  wall = Bench.put_all(id, count, procs)
  cpu_ns = Bench.last_scheduler_ns()

  IO.puts(
    "#{procs} process(es): #{round(cpu_ns / count)} ns of scheduler CPU per call, " <>
      "#{round(wall / count * 1.0e9)} ns of wall clock per call"
  )
end

Bench.stop_queue(pid)
