# Section 2b of bench/run.exs alone: producer throughput and CPU per record
# on the null endpoint, for before/after comparisons of the NIF.
#
#   MIX_ENV=prod mix run bench/null.exs [records] [which...]
#
# `which` is any of relaxed, aggregation, raw (default: all three). Runs
# BENCH_RUNS times (default 3) in this VM and prints each run: records/s
# and CPU per record by thread kind (callers, NIF runtime); for the raw
# client, the CPU per record it reports (its work, not its start).
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :warning)

{count, which} =
  case System.argv() do
    [] -> {Bench.null_count(), ~w(relaxed aggregation raw)}
    [n] -> {String.to_integer(n), ~w(relaxed aggregation raw)}
    [n | which] -> {String.to_integer(n), which}
  end

null = Bench.Null.start!()
{_, endpoint} = null
procs = System.schedulers_online()

convoy = fn label, opts ->
  for run <- 1..Bench.runs() do
    {id, pid} = Bench.queue!(Bench.stream!(endpoint, "produce"), endpoint, opts)

    {seconds, threads} =
      Bench.threads_per(count, fn -> Bench.produce_acknowledged(id, count, procs) end)

    %{sent: ^count} = Convoy.Queue.stats(id)
    Bench.stop_queue(pid)

    IO.puts(
      "  #{label} run #{run}: #{round(count / seconds)} records/s, ns per record: " <>
        Bench.threads_line(threads)
    )
  end
end

raw_args = ["put", endpoint, "null", "#{count}", "#{Bench.size()}", "8"]

for w <- which do
  case w do
    "relaxed" ->
      convoy.("convoy, relaxed order", batch_timeout: 100, ordering: :relaxed)

    "aggregation" ->
      convoy.("convoy aggregated", batch_timeout: 100, aggregation: true)

    "raw" ->
      for run <- 1..Bench.runs() do
        {seconds, cpu_seconds} = Bench.raw_measured(raw_args)
        {rate, cpu} = {count / seconds, cpu_seconds / count * 1.0e9}

        IO.puts(
          "  raw Rust SDK put run #{run}: #{round(rate)} records/s, #{round(cpu)} ns per record"
        )
      end
  end
end

Bench.Null.stop(null)
