# The producer alone on the null endpoint, for a profiler:
#
#   MIX_ENV=prod mix run bench/profile.exs [records] [processes] [aggregation]
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

[count, procs, aggregation] =
  case System.argv() do
    [c, p, a] -> [String.to_integer(c), String.to_integer(p), a == "aggregation"]
    [c, p] -> [String.to_integer(c), String.to_integer(p), false]
    [c] -> [String.to_integer(c), 2, false]
    [] -> [400_000, 2, false]
  end

null = Bench.Null.start!()
{_, endpoint} = null
{id, pid} = Bench.queue!("profile", endpoint, batch_timeout: 100, aggregation: aggregation)
# A warm-up: connections open, shard map loaded, allocators grown.
Bench.put_all(id, 50_000, procs)
:ok = Convoy.Queue.flush(id, await: 60_000)

cpu = Bench.cpu_seconds()
threads = Bench.thread_ns()

seconds =
  Bench.seconds(fn ->
    Bench.produce_all(id, count, procs)
    :ok = Convoy.Queue.flush(id, await: 300_000)
  end)

cpu = Bench.cpu_seconds() - cpu
threads = Map.merge(Bench.thread_ns(), threads, fn _, a, b -> a - b end)
Bench.stop_queue(pid)
Bench.Null.stop(null)

IO.puts(
  "#{count} records, #{procs} processes, aggregation #{aggregation}: #{Float.round(seconds, 3)} s, " <>
    "#{round(count / seconds)} records/s, VM CPU #{Float.round(cpu, 2)} s " <>
    "(#{Float.round(cpu / count * 1.0e6, 2)} µs per record; " <>
    Enum.map_join(threads, ", ", fn {k, ns} -> "#{k} #{round(ns / count)} ns" end) <> ")"
)
