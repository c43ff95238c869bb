# Section 3 of bench/run.exs alone, its CPU figures: Convoy with a function
# handler against the raw SDK's GetRecords loop, both reading the same
# pre-filled stream on the embedded emulator.
#
#   MIX_ENV=prod mix run bench/consume.exs [records]
#
# bench/run sets ELIXIR_ERL_OPTIONS="+sbwt none +sbwtdcpu none +sbwtdio none"
# (schedulers that run out of work sleep instead of spinning); set it the
# same for comparable figures. Each side runs BENCH_RUNS times (default 3).
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :warning)

count =
  case System.argv() do
    [n] -> String.to_integer(n)
    [] -> Bench.count()
  end

{:ok, local} = Convoy.Local.start_link()
endpoint = Convoy.Local.endpoint(local)
filled = Bench.stream!(endpoint, "filled")
Bench.raw(["put", endpoint, filled, "#{count}", "#{Bench.size()}", "8"])

# The VM's first consume pays one-time costs (the runtime's and the
# dispatchers' memory growing from nothing): a warm-up, not measured, as
# the raw loop reads the stream once before its measured read.
Bench.consume(filled, endpoint, count)

runs =
  for _ <- 1..Bench.runs() do
    {run, threads} = Bench.threads_per(count, fn -> Bench.consume(filled, endpoint, count) end)
    IO.puts("  convoy ns per record by thread: " <> Bench.threads_line(threads))

    run
  end

IO.puts("  convoy {seconds, peak RSS KiB, CPU seconds}: #{inspect(runs)}")
convoy = Bench.median(Enum.map(runs, &elem(&1, 2))) / count * 1.0e6

raw =
  Bench.repeat("raw Rust GetRecords loop, CPU seconds", fn ->
    filled |> Bench.raw_get(endpoint, count) |> elem(1)
  end) / count * 1.0e6

IO.puts(
  "CPU per record: Convoy #{Float.round(convoy, 2)} µs, raw SDK loop #{Float.round(raw, 2)} µs: " <>
    "#{:erlang.float_to_binary(convoy / raw, decimals: 2)}x"
)

Convoy.Local.stop(local)
