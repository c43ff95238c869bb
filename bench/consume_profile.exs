# The consumer alone, for a profiler attached once the stream is filled:
#
#   MIX_ENV=prod mix run bench/consume_profile.exs [records] [runs]
#
# Prints "filled <os pid>" when the stream is filled, waits 2 s (attach
# `perf record -p <os pid>` then), consumes it `runs` times and prints the
# VM's CPU per record by thread kind.
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :warning)

{count, runs} =
  case System.argv() do
    [n, r] -> {String.to_integer(n), String.to_integer(r)}
    [n] -> {String.to_integer(n), 2}
    [] -> {Bench.count(), 2}
  end

{:ok, local} = Convoy.Local.start_link()
endpoint = Convoy.Local.endpoint(local)
filled = Bench.stream!(endpoint, "filled")
Bench.raw(["put", endpoint, filled, "#{count}", "#{Bench.size()}", "8"])
IO.puts("filled #{System.pid()}")
Process.sleep(2_000)

{_, threads} =
  Bench.threads_per(count * runs, fn ->
    for _ <- 1..runs, do: Bench.consume(filled, endpoint, count)
  end)

IO.puts("ns per record by thread kind: " <> Bench.threads_line(threads))
Convoy.Local.stop(local)
