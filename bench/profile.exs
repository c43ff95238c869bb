# The producer alone on the null endpoint, for a profiler:
#
#   MIX_ENV=prod mix run bench/profile.exs [records] [processes] [aggregation | relaxed]
#
# The queue keeps per-key order (the default) unless `relaxed` is given;
# `aggregation` aggregates in per-key order.
#
# Under perf (software clock; the JIT writes a perf map with +JPperf true):
#
#   ELIXIR_ERL_OPTIONS="+JPperf true +sbwt none" MIX_ENV=prod \
#     perf record -e cpu-clock -F 2000 -g -o /tmp/convoy.perf -- \
#     mix run bench/profile.exs 400000 2
#
# Prints the seconds from the first put to the last acknowledgement, and
# the CPU seconds the VM used (all threads, the NIF's runtime included).
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :warning)

[count, procs, mode] =
  case System.argv() do
    [c, p, m] -> [String.to_integer(c), String.to_integer(p), m]
    [c, p] -> [String.to_integer(c), String.to_integer(p), "per_key"]
    [c] -> [String.to_integer(c), 2, "per_key"]
    [] -> [400_000, 2, "per_key"]
  end

aggregation = mode == "aggregation"
ordering = if mode == "relaxed", do: :relaxed, else: :per_key

null = Bench.Null.start!()
{_, endpoint} = null

{id, pid} =
  Bench.queue!("profile", endpoint,
    batch_timeout: 100,
    aggregation: aggregation,
    ordering: ordering
  )

# A warm-up: connections open, shard map loaded, allocators grown.
Bench.put_all(id, 50_000, procs)
:ok = Convoy.Queue.flush(id, await: 60_000)

cpu = Bench.cpu_seconds()

{seconds, threads} =
  Bench.threads_per(count, fn -> Bench.produce_acknowledged(id, count, procs) end)

cpu = Bench.cpu_seconds() - cpu
Bench.stop_queue(pid)
Bench.Null.stop(null)

IO.puts(
  "#{count} records, #{procs} processes, #{mode}: #{Float.round(seconds, 3)} s, " <>
    "#{round(count / seconds)} records/s, VM CPU #{Float.round(cpu, 2)} s " <>
    "(#{Float.round(cpu / count * 1.0e6, 2)} µs per record; " <>
    Bench.threads_line(threads) <> " ns)"
)
