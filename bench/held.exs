# Section 0 of bench/run.exs alone: memory held per buffered record.
#
#   MIX_ENV=prod mix run bench/held.exs [records]
#
# Runs BENCH_RUNS times (default 3) in this VM and prints each run and the
# largest, the first, in memory the VM never used before: later runs reuse
# what earlier ones freed (mimalloc keeps freed memory a while), so their
# RSS grows less.
Code.require_file("support.exs", __DIR__)
require Logger
Logger.configure(level: :none)

held =
  case System.argv() do
    [n] -> String.to_integer(n)
    [] -> 200_000
  end

payload = Bench.payload_bytes(0, held) / held

per_record =
  Bench.repeat_max("bytes per buffered record", fn -> Bench.held_per_record(held, 20_000) end)

IO.puts(
  "#{held} records of #{Float.round(payload, 1)} bytes of payload and key: " <>
    "#{Float.round(per_record * 1.0, 1)} bytes per record (the largest run), " <>
    "#{:erlang.float_to_binary(per_record / payload, decimals: 2)}x"
)
