# Convoy benchmarks. Run with `bench/run` (it installs the peers first).
#
# Every figure is the median of BENCH_RUNS runs (default 3), and every
# comparison is a ratio of figures measured in this same run, on the same
# embedded emulator: these machines are noisy. Results go to bench/RESULTS.md.

Code.require_file("support.exs", __DIR__)

require Logger
Logger.configure(level: :warning)

{:ok, local} = Convoy.Local.start_link()
endpoint = Convoy.Local.endpoint(local)
null = Bench.Null.start!()

load_at_start =
  "/proc/loadavg" |> File.read!() |> String.split() |> Enum.take(3) |> Enum.join(" ")

{_, null_endpoint} = null
count = Bench.count()
null_count = Bench.null_count()
schedulers = System.schedulers_online()
results = %{}

IO.puts(
  "Convoy benchmarks: #{count} records of #{Bench.size()} bytes (#{null_count} on the null endpoint), " <>
    "#{Bench.runs()} runs each, emulator #{endpoint}, null endpoint #{null_endpoint}"
)

# 0. Memory held per buffered record (first, before other sections free memory
# the allocators would then reuse) -------------------------------------------
IO.puts("\n0. memory per buffered record")
Logger.configure(level: :none)
held = 200_000
payload_bytes = Bench.payload_bytes(0, held)

# Each run in a fresh VM (`bench/held.exs`): a second run in one VM reuses
# memory the first freed (mimalloc keeps it a while), so its RSS barely
# grows; and RSS moves by whole pages, so one run alone can read high or low.
# The median of the fresh runs.
per_record =
  Bench.repeat("bytes per buffered record, fresh VM", fn ->
    {out, 0} =
      System.cmd("mix", ["run", "--no-compile", "bench/held.exs", "#{held}"],
        env: [{"MIX_ENV", "prod"}, {"BENCH_RUNS", "1"}],
        stderr_to_stdout: true
      )

    [_, bytes] = Regex.run(~r/: ([0-9.]+) bytes per record/, out)
    String.to_float(bytes)
  end)

results =
  Map.merge(results, %{
    held_per_record: per_record,
    held_payload: payload_bytes / held
  })

# 1. The cost of put/3 ----------------------------------------------------------
IO.puts("\n1. put/3 from Elixir")
Logger.configure(level: :none)
calls = Bench.put_calls()

# Steady state: the calls come in bursts of `put_burst` records per process,
# and the queue is flushed between bursts outside the clock, so its buffer is
# sent and reused rather than only growing (`Bench.put_bursts/4`). The clock
# covers the put calls alone (payloads are built before it starts); the lanes
# and the null endpoint send each burst's full requests on the same cores
# meanwhile. `ordering: :relaxed` fills requests as in section 2b (with 64
# keys, per-key order sends 8 records a request, so sending would take far
# more of the cores); the call does the same work in both orders.
put_burst = 20_000

put_ns = fn procs ->
  {id, pid} =
    Bench.queue!(Bench.stream!(null_endpoint, "put-cost"), null_endpoint,
      batch_timeout: 100,
      ordering: :relaxed
    )

  seconds = Bench.put_bursts(id, calls, procs, put_burst)
  cpu_ns = Bench.last_scheduler_ns()
  :ok = Convoy.Queue.flush(id, await: 60_000)
  Bench.stop_queue(pid)
  {seconds, cpu_ns}
end

baseline = fn procs ->
  {:ok, server} = Bench.Baseline.start_link()
  casting = Bench.Baseline.cast_all(server, calls, procs)
  # Counted once the server has taken every record in.
  draining = Bench.seconds(fn -> ^calls = Bench.Baseline.size(server) end)
  GenServer.stop(server)
  casting + draining
end

{single, single_cpu} = Bench.repeat("convoy put, 1 process", fn -> put_ns.(1) end)

{many, many_cpu} =
  Bench.repeat("convoy put, #{schedulers} processes", fn -> put_ns.(schedulers) end)

base_single = Bench.repeat("GenServer cast, 1 process", fn -> baseline.(1) end)

base_many =
  Bench.repeat("GenServer cast, #{schedulers} processes", fn -> baseline.(schedulers) end)

results =
  Map.merge(results, %{
    put_ns_single: single / calls * 1.0e9,
    put_cpu_single: single_cpu / calls,
    put_cpu_many: many_cpu / calls,
    put_rate_single: calls / single,
    put_rate_many: calls / many,
    base_ns_single: base_single / calls * 1.0e9,
    base_rate_single: calls / base_single,
    base_rate_many: calls / base_many
  })

# 2. Producer throughput ---------------------------------------------------------
Logger.configure(level: :warning)
IO.puts("\n2. producer throughput")

produce_on = fn endpoint, count, opts ->
  stream = Bench.stream!(endpoint, "produce")
  {id, pid} = Bench.queue!(stream, endpoint, opts)

  # Records are built inside the clock here, as every peer builds its own.
  # CPU per record by thread kind: the callers (building records, put/3)
  # and the NIF's runtime (lanes, SDK, HTTP).
  {{seconds, rss}, threads} =
    Bench.threads_per(count, fn ->
      Bench.peak_rss(fn -> Bench.produce_acknowledged(id, count, schedulers) end)
    end)

  Process.put(:last_threads, threads)
  %{sent: sent} = Convoy.Queue.stats(id)
  if sent != count, do: raise("only #{sent} of #{count} acknowledged")
  Bench.stop_queue(pid)
  {seconds, rss}
end

convoy_produce = fn opts -> produce_on.(endpoint, count, opts) end

# The raw clients send in arrival order: `ordering: :relaxed` is Convoy's
# like-for-like; the default, per-key order, is measured beside it.
runs = for _ <- 1..Bench.runs(), do: convoy_produce.(batch_timeout: 100, ordering: :relaxed)
convoy_put_s = Bench.median(Enum.map(runs, &elem(&1, 0)))
convoy_put_rss = Enum.max(Enum.map(runs, &elem(&1, 1)))
IO.puts("  convoy, relaxed order: #{inspect(runs)}")
runs = for _ <- 1..Bench.runs(), do: convoy_produce.(batch_timeout: 100)
convoy_per_key_s = Bench.median(Enum.map(runs, &elem(&1, 0)))
IO.puts("  convoy, per-key order: #{inspect(runs)}")
runs = for _ <- 1..Bench.runs(), do: convoy_produce.(batch_timeout: 100, aggregation: true)
convoy_agg_s = Bench.median(Enum.map(runs, &elem(&1, 0)))
IO.puts("  convoy aggregated: #{inspect(runs)}")

raw_put_s =
  Bench.repeat("raw Rust SDK put", fn ->
    Bench.raw([
      "put",
      endpoint,
      Bench.stream!(endpoint, "raw"),
      "#{count}",
      "#{Bench.size()}",
      "8"
    ])
  end)

boto3_put_s =
  Bench.repeat("boto3 put_records", fn ->
    Bench.python(
      "boto3_bench.py",
      ~w(put --endpoint #{endpoint} --stream #{Bench.stream!(endpoint, "boto3")} --count #{count} --size #{Bench.size()})
    )
  end)

aiokpl_put_s =
  Bench.repeat("aiokpl (aggregated)", fn ->
    Bench.python(
      "aiokpl_bench.py",
      ~w(put --endpoint #{endpoint} --stream #{Bench.stream!(endpoint, "aiokpl")} --count #{count} --size #{Bench.size()})
    )
  end)

results =
  Map.merge(results, %{
    convoy_put: count / convoy_put_s,
    convoy_per_key: count / convoy_per_key_s,
    convoy_agg: count / convoy_agg_s,
    raw_put: count / raw_put_s,
    boto3_put: count / boto3_put_s,
    aiokpl_put: count / aiokpl_put_s,
    convoy_put_rss: convoy_put_rss
  })

# 2b. Producer throughput on the null endpoint -----------------------------------
IO.puts("\n2b. producer throughput on the null endpoint")

null_runs = fn label, fun ->
  Bench.repeat(label, fn -> null_count / fun.() end)
end

null_produce = fn opts ->
  seconds = elem(produce_on.(null_endpoint, null_count, [batch_timeout: 100] ++ opts), 0)
  {null_count / seconds, Process.get(:last_threads)}
end

raw_args = ["put", null_endpoint, "null", "#{null_count}", "#{Bench.size()}", "8"]

# The ratios of the targets come from rounds: each round measures Convoy
# (relaxed order, then aggregation) and the raw client one after the other,
# and a ratio is the median of the rounds' own ratios. On shared cores the
# machine's speed drifts over minutes; figures a few seconds apart see the
# same machine.
rounds =
  for round <- 1..Bench.runs() do
    {relaxed, relaxed_cpu} = null_produce.(ordering: :relaxed)
    {agg, agg_cpu} = null_produce.(aggregation: true)
    {raw_s, raw_cpu_s} = Bench.raw_measured(raw_args)
    raw = null_count / raw_s

    IO.puts(
      "  round #{round}: convoy relaxed #{round(relaxed)}/s, aggregated #{round(agg)}/s, " <>
        "raw #{round(raw)}/s (#{round(raw_cpu_s / null_count * 1.0e9)} ns CPU per record)"
    )

    %{
      relaxed: relaxed,
      agg: agg,
      raw: raw,
      relaxed_cpu: relaxed_cpu,
      agg_cpu: agg_cpu,
      raw_cpu: raw_cpu_s / null_count * 1.0e9
    }
  end

median_of = fn f -> rounds |> Enum.map(f) |> Bench.median() end
# The round whose relaxed/raw ratio is the median gives the CPU table.
middle = Enum.at(Enum.sort_by(rounds, &(&1.relaxed / &1.raw)), div(length(rounds), 2))

null_per_key =
  null_runs.("convoy, per-key order", fn ->
    elem(produce_on.(null_endpoint, null_count, batch_timeout: 100), 0)
  end)

null_boto3 =
  null_runs.("boto3 put_records", fn ->
    Bench.python(
      "boto3_bench.py",
      ~w(put --endpoint #{null_endpoint} --stream null --count #{null_count} --size #{Bench.size()})
    )
  end)

results =
  Map.merge(results, %{
    null_convoy: median_of.(& &1.relaxed),
    null_per_key: null_per_key,
    null_agg: median_of.(& &1.agg),
    null_raw: median_of.(& &1.raw),
    null_boto3: null_boto3,
    null_relaxed_vs_raw: median_of.(&(&1.relaxed / &1.raw)),
    null_agg_vs_relaxed: median_of.(&(&1.agg / &1.relaxed)),
    null_round_ratios: Enum.map(rounds, fn r -> {r.relaxed / r.raw, r.agg / r.relaxed} end),
    null_convoy_cpu: middle.relaxed_cpu,
    null_agg_cpu: middle.agg_cpu,
    null_raw_cpu: middle.raw_cpu
  })

# 2c. The cost of per-key order against the number of keys ------------------------
IO.puts("\n2c. per-key order against the number of keys (null endpoint)")
order_count = div(null_count, 2)

order_cost =
  for keys <- [64, 4_096], ordering <- [:relaxed, :per_key] do
    rate =
      Bench.repeat("#{keys} keys, #{ordering}", fn ->
        stream = Bench.stream!(null_endpoint, "order")
        {id, pid} = Bench.queue!(stream, null_endpoint, batch_timeout: 100, ordering: ordering)

        seconds =
          Bench.seconds(fn ->
            Bench.produce_all(id, order_count, schedulers, keys)
            :ok = Convoy.Queue.flush(id, await: 300_000)
          end)

        %{sent: ^order_count} = Convoy.Queue.stats(id)
        Bench.stop_queue(pid)
        order_count / seconds
      end)

    {{keys, ordering}, rate}
  end
  |> Map.new()

results = Map.put(results, :order_cost, order_cost)

# 3. Consumer throughput ---------------------------------------------------------
IO.puts("\n3. consumer throughput")
filled = Bench.stream!(endpoint, "filled")
Bench.raw(["put", endpoint, filled, "#{count}", "#{Bench.size()}", "8"])

convoy_consume = fn -> Bench.consume(filled, endpoint, count) end

# In rounds, as section 2b: Convoy then the raw loop, each round's CPU ratio
# its own, the median of them the target's figure. Steady state on both
# sides: each reads the stream once, unmeasured, right before its measured
# read (the raw loop in the same process). Convoy's read comes after the
# previous round's raw run, long enough for its memory to go back to the
# system, and the VM's first one pays one-time costs.
rounds =
  for round <- 1..Bench.runs() do
    convoy_consume.()
    {seconds, rss, cpu} = convoy_consume.()
    {raw_s, raw_cpu} = Bench.raw_get(filled, endpoint, count)

    IO.puts(
      "  round #{round}: convoy #{Float.round(seconds, 3)} s, #{Float.round(cpu, 2)} CPU s, " <>
        "peak RSS #{div(rss, 1024)} MiB; raw #{Float.round(raw_s, 3)} s, #{Float.round(raw_cpu, 2)} CPU s"
    )

    %{seconds: seconds, rss: rss, cpu: cpu, raw_s: raw_s, raw_cpu: raw_cpu}
  end

median_of = fn f -> rounds |> Enum.map(f) |> Bench.median() end
convoy_get_s = median_of.(& &1.seconds)
convoy_get_rss = rounds |> Enum.map(& &1.rss) |> Enum.max()
convoy_get_cpu = median_of.(& &1.cpu)
raw_get_s = median_of.(& &1.raw_s)
raw_get_cpu = median_of.(& &1.raw_cpu)

boto3_get_s =
  Bench.repeat("boto3 get_records loop", fn ->
    Bench.python(
      "boto3_bench.py",
      ~w(get --endpoint #{endpoint} --stream #{filled} --count #{count})
    )
  end)

results =
  Map.merge(results, %{
    convoy_get: count / convoy_get_s,
    raw_get: count / raw_get_s,
    boto3_get: count / boto3_get_s,
    convoy_get_rss: convoy_get_rss,
    convoy_get_cpu_us: convoy_get_cpu / count * 1.0e6,
    raw_get_cpu_us: raw_get_cpu / count * 1.0e6,
    get_cpu_vs_raw: median_of.(&(&1.cpu / &1.raw_cpu)),
    get_round_ratios: Enum.map(rounds, &(&1.cpu / &1.raw_cpu))
  })

# 4. Latency from put to handler -------------------------------------------------
IO.puts("\n4. latency")

# `read` is the queue's reading options: polling, or enhanced fan-out.
latency = fn read ->
  stream = Bench.stream!(endpoint, "latency")

  {id, pid} = Bench.queue!(stream, endpoint, [batch_timeout: 0, iterator_type: :latest] ++ read)

  me = self()

  :ok =
    Convoy.Queue.attach_handler(
      id,
      :lat,
      fn r, _ -> send(me, {:got, r.data, System.monotonic_time(:microsecond)}) end,
      nil
    )

  Process.sleep(500)

  sent =
    for i <- 1..1_000 do
      t = System.monotonic_time(:microsecond)
      :ok = Convoy.Queue.put(id, "k#{rem(i, 16)}", Integer.to_string(i))
      Process.sleep(2)
      {Integer.to_string(i), t}
    end
    |> Map.new()

  latencies =
    for _ <- 1..1_000 do
      receive do
        {:got, data, at} -> at - Map.fetch!(sent, data)
      after
        30_000 -> raise "latency: record missing"
      end
    end
    |> Enum.sort()

  Bench.stop_queue(pid)
  {Enum.at(latencies, 499) / 1000, Enum.at(latencies, 989) / 1000}
end

lat = for _ <- 1..Bench.runs(), do: latency.(poll_interval: 10)
IO.puts("  polling runs: #{inspect(lat)}")
fan = for _ <- 1..Bench.runs(), do: latency.(consumer: {:fan_out, "bench"})
IO.puts("  fan-out runs: #{inspect(fan)}")

results =
  Map.merge(results, %{
    p50: Bench.median(Enum.map(lat, &elem(&1, 0))),
    p99: Bench.median(Enum.map(lat, &elem(&1, 1))),
    fan_p50: Bench.median(Enum.map(fan, &elem(&1, 0))),
    fan_p99: Bench.median(Enum.map(fan, &elem(&1, 1)))
  })

# 5. Memory while Kinesis is unreachable ----------------------------------------
IO.puts("\n5. memory with Kinesis unreachable")
:erlang.garbage_collect()
before = Bench.rss_kb()

{id, pid} =
  Bench.queue!("unreachable", "http://127.0.0.1:9",
    batch_timeout: 50,
    max_buffered_records: 100_000,
    max_buffered_bytes: 64 * 1024 * 1024,
    max_retries: 1_000_000,
    retry_deadline: 3_600_000
  )

Logger.configure(level: :none)

samples =
  for second <- 1..10 do
    deadline = System.monotonic_time(:millisecond) + 1_000

    overloaded =
      Stream.repeatedly(fn -> Convoy.Queue.put(id, "k", Bench.data(1)) end)
      |> Enum.reduce_while(0, fn result, n ->
        cond do
          System.monotonic_time(:millisecond) > deadline -> {:halt, n}
          result == {:error, :overloaded} -> {:cont, n + 1}
          true -> {:cont, n}
        end
      end)

    stats = Convoy.Queue.stats(id)
    rss = Bench.rss_kb()
    {second, rss, rss - before, stats.buffered + stats.in_flight, overloaded}
  end

Process.unlink(pid)
Process.exit(pid, :kill)
IO.puts("  #{inspect(samples)}")
results = Map.put(results, :unreachable, samples)

# Report ---------------------------------------------------------------------------
cpu =
  case File.read("/proc/cpuinfo") do
    {:ok, info} ->
      Regex.run(~r/model name\s*:\s*(.+)/, info, capture: :all_but_first) |> List.first()

    _ ->
      "unknown"
  end

mem_gb =
  case File.read("/proc/meminfo") do
    {:ok, info} ->
      String.to_integer(hd(Regex.run(~r/MemTotal:\s*(\d+)/, info, capture: :all_but_first))) /
        1.0e6

    _ ->
      0.0
  end

r = results
fmt = fn x -> :erlang.float_to_binary(x * 1.0, decimals: 0) end
ratio = fn a, b -> :erlang.float_to_binary(a / b, decimals: 2) <> "x" end
check = fn ok -> if ok, do: "met", else: "missed" end

report = """
# Convoy benchmark results

Last run: #{DateTime.utc_now() |> DateTime.truncate(:second)} on #{System.schedulers_online()} schedulers,
#{cpu}, #{Float.round(mem_gb, 1)} GB RAM; #{System.otp_release() |> then(&"OTP #{&1}")}, Elixir #{System.version()}.
Load average when the run started: #{load_at_start} (1, 5, 15 min); VM flags `#{System.get_env("ELIXIR_ERL_OPTIONS", "")}`.
Embedded emulator (ferrokinesis) and null endpoint (`convoy_local null`) on 127.0.0.1, sharing the machine with the clients.
Every figure is the median of #{Bench.runs()} runs; ratios compare figures of this same run.
Command: `bench/run` (environment: `BENCH_RUNS`, `BENCH_RECORDS`).

## Targets (issue 16), each a ratio of figures of this run

| target | measured | |
|---|---:|---|
| Convoy ≥ 0.8x the raw SDK client (null endpoint; `ordering: :relaxed`, as the raw client) | #{ratio.(r.null_relaxed_vs_raw, 1)} | #{check.(r.null_relaxed_vs_raw >= 0.8)} |
| aggregation ≥ 1.5x Convoy without it (null endpoint; aggregation in per-key order, without it relaxed) | #{ratio.(r.null_agg_vs_relaxed, 1)} | #{check.(r.null_agg_vs_relaxed >= 1.5)} |
| aggregation ≥ 1,000,000 user records/s (null endpoint) | #{fmt.(r.null_agg)} | #{check.(r.null_agg >= 1.0e6)} |
| `put/3` ≤ 500 ns per call, 1 process, steady state (wall clock) | #{fmt.(r.put_ns_single)} ns | #{check.(r.put_ns_single <= 500)} |
| the same in scheduler CPU per call | #{fmt.(r.put_cpu_single)} ns | #{check.(r.put_cpu_single <= 500)} |
| `put/3` with #{schedulers} processes ≥ 1.8x 1 process | #{ratio.(r.put_rate_many, r.put_rate_single)} | #{check.(r.put_rate_many / r.put_rate_single >= 1.8)} |
| memory per buffered record ≤ 2x payload + key | #{ratio.(r.held_per_record, r.held_payload)} | #{check.(r.held_per_record / r.held_payload <= 2)} |
| consumer CPU per record ≤ 1.2x the raw SDK read loop | #{ratio.(r.get_cpu_vs_raw, 1)} | #{check.(r.get_cpu_vs_raw <= 1.2)} |

The ratios of Convoy against the raw clients (the first two rows and the last) are medians of
rounds: each round runs Convoy and the raw client one after the other, and its ratio compares
those two runs only (the machine's speed drifts over minutes on shared cores). Per round:
relaxed vs raw #{Enum.map_join(r.null_round_ratios, ", ", &ratio.(elem(&1, 0), 1))}; aggregation vs relaxed
#{Enum.map_join(r.null_round_ratios, ", ", &ratio.(elem(&1, 1), 1))}; consumer CPU vs the raw loop #{Enum.map_join(r.get_round_ratios, ", ", &ratio.(&1, 1))}.

## 0. Memory held per buffered record

#{Bench.fmt_int(200_000)} records of #{Bench.size()} bytes with 5-6 byte keys (#{Float.round(r.held_payload, 1)} bytes of payload and key each) put
into a queue whose Kinesis is unreachable, so all stay buffered: the VM's resident memory grew by
#{fmt.(r.held_per_record)} bytes per record, #{ratio.(r.held_per_record, r.held_payload)} the payload and key. 20,000 records are put first,
outside the measure: they fill the lanes' first requests (in flight, retried) and grow the
allocators past their first segments, which a queue pays once, not per record held. The figure is
the median of #{Bench.runs()} runs, each in a fresh VM (`bench/held.exs`), in memory the VM never used before: a
later run in the same VM would reuse memory the earlier one freed (mimalloc keeps freed memory a
while), so its RSS would grow less. Records
are built as they are put, so no list of them is copied by garbage collections meanwhile
(`bench/held.exs` runs this section alone).

## 1. `put/3` from Elixir (#{calls} calls, records of #{Bench.size()} bytes, steady state)

The calls come in bursts of #{Bench.fmt_int(put_burst)} records per process, all processes together, and the queue is
flushed between bursts outside the clock: its buffer is sent and reused, never growing for the
whole measure, and a caller never waits for the sending to catch up (section 2b measures that
pace). The queue fills its requests in arrival order (`ordering: :relaxed`, as in section 2b; a
call does the same work in per-key order, but with 64 keys the lanes would send 8 records a
request and take far more of the cores meanwhile). The clock covers the bursts' calls alone (keys
and payloads are built before it starts).
The lanes and the null endpoint share the cores with the callers meanwhile. "Scheduler CPU" is the
CPU time of the VM's scheduler threads during the calls (`/proc/self/task/*/schedstat`) divided by
the calls: what a put costs its caller, not counting time spent waiting for a core on a busy
machine, nor the lanes' work on the runtime's threads. The GenServer cast (Convoy 0.1's design) is
timed until its server has taken every record in; it sends nothing meanwhile, so its calls have the
cores to themselves.

| | Convoy `put/3` | GenServer cast (original design) | ratio |
|---|---:|---:|---:|
| scheduler CPU ns per call, 1 process | #{fmt.(r.put_cpu_single)} | | |
| scheduler CPU ns per call, #{schedulers} processes | #{fmt.(r.put_cpu_many)} | | |
| ns per call (wall clock), 1 process | #{fmt.(r.put_ns_single)} | #{fmt.(r.base_ns_single)} | #{ratio.(r.base_ns_single, r.put_ns_single)} the cast's rate |
| calls/s, 1 process | #{fmt.(r.put_rate_single)} | #{fmt.(r.base_rate_single)} | |
| calls/s, #{schedulers} processes | #{fmt.(r.put_rate_many)} | #{fmt.(r.base_rate_many)} | #{ratio.(r.put_rate_many, r.base_rate_many)} |
| scaling 1 -> #{schedulers} processes | #{ratio.(r.put_rate_many, r.put_rate_single)} | #{ratio.(r.base_rate_many, r.base_rate_single)} | |

## 2. Producer throughput (#{count} records of #{Bench.size()} bytes, 4 shards, acknowledged)

| producer | records/s | vs raw Rust SDK | vs boto3 |
|---|---:|---:|---:|
| raw aws-sdk-kinesis, PutRecords of 500, 8 in flight (ceiling) | #{fmt.(r.raw_put)} | 1.00x | #{ratio.(r.raw_put, r.boto3_put)} |
| Convoy, `ordering: :relaxed` | #{fmt.(r.convoy_put)} | #{ratio.(r.convoy_put, r.raw_put)} | #{ratio.(r.convoy_put, r.boto3_put)} |
| Convoy, per-key order (the default) | #{fmt.(r.convoy_per_key)} | #{ratio.(r.convoy_per_key, r.raw_put)} | #{ratio.(r.convoy_per_key, r.boto3_put)} |
| Convoy, aggregation | #{fmt.(r.convoy_agg)} | #{ratio.(r.convoy_agg, r.raw_put)} | #{ratio.(r.convoy_agg, r.boto3_put)} |
| boto3 `put_records` of 500 | #{fmt.(r.boto3_put)} | #{ratio.(r.boto3_put, r.raw_put)} | 1.00x |
| aiokpl, aggregation, confirmed outcomes | #{fmt.(r.aiokpl_put)} | #{ratio.(r.aiokpl_put, r.raw_put)} | #{ratio.(r.aiokpl_put, r.boto3_put)} |

Convoy with aggregation vs aiokpl: #{ratio.(r.convoy_agg, r.aiokpl_put)}. Peak BEAM RSS while producing: #{div(r.convoy_put_rss, 1024)} MiB.

## 2b. Producer throughput on the null endpoint (#{null_count} records of #{Bench.size()} bytes, 64 keys, #{schedulers} putting processes)

`convoy_local null` acknowledges every entry at once and stores nothing (4 shards, records placed
by the MD5 of their key as Kinesis does), so these figures measure the clients, not an emulator.
It runs on the same cores as the client.

| producer | records/s | vs raw Rust SDK | vs boto3 |
|---|---:|---:|---:|
| raw aws-sdk-kinesis, PutRecords of 500, 8 in flight (ceiling) | #{fmt.(r.null_raw)} | 1.00x | #{ratio.(r.null_raw, r.null_boto3)} |
| Convoy, `ordering: :relaxed` | #{fmt.(r.null_convoy)} | #{ratio.(r.null_convoy, r.null_raw)} | #{ratio.(r.null_convoy, r.null_boto3)} |
| Convoy, per-key order (the default) | #{fmt.(r.null_per_key)} | #{ratio.(r.null_per_key, r.null_raw)} | #{ratio.(r.null_per_key, r.null_boto3)} |
| Convoy, aggregation | #{fmt.(r.null_agg)} | #{ratio.(r.null_agg, r.null_raw)} | #{ratio.(r.null_agg, r.null_boto3)} |
| boto3 `put_records` of 500 | #{fmt.(r.null_boto3)} | #{ratio.(r.null_boto3, r.null_raw)} | 1.00x |

Convoy with aggregation vs without: #{ratio.(r.null_agg, r.null_convoy)} (relaxed order), #{ratio.(r.null_agg, r.null_per_key)} (per-key order).

Per-key order costs what the key count allows: a request carries each partition key once (see
"Ordering" in the README), so with 64 keys spread over 8 lanes a plain request holds about 8 records.
Aggregation keeps a key's records of a request in one aggregated record, so it keeps per-key order
at no cost. Section 2c measures the cost against the number of keys.

CPU per record (ns, of the round whose relaxed/raw ratio is the median; the raw client's is its own measure of its work, every thread, user + system):

| | callers (records built, `put/3`) | NIF runtime (lanes, SDK, HTTP) | total | vs raw |
|---|---:|---:|---:|---:|
| raw aws-sdk-kinesis | | | #{fmt.(r.null_raw_cpu)} | 1.00x |
| Convoy, `ordering: :relaxed` | #{fmt.(r.null_convoy_cpu.schedulers)} | #{fmt.(r.null_convoy_cpu.runtime)} | #{fmt.(r.null_convoy_cpu.schedulers + r.null_convoy_cpu.runtime + r.null_convoy_cpu.other)} | #{ratio.(r.null_convoy_cpu.schedulers + r.null_convoy_cpu.runtime + r.null_convoy_cpu.other, r.null_raw_cpu)} |
| Convoy, aggregation | #{fmt.(r.null_agg_cpu.schedulers)} | #{fmt.(r.null_agg_cpu.runtime)} | #{fmt.(r.null_agg_cpu.schedulers + r.null_agg_cpu.runtime + r.null_agg_cpu.other)} | #{ratio.(r.null_agg_cpu.schedulers + r.null_agg_cpu.runtime + r.null_agg_cpu.other, r.null_raw_cpu)} |

## 2c. What per-key order costs (null endpoint, #{div(null_count, 2)} records of #{Bench.size()} bytes, #{schedulers} putting processes)

| keys | `ordering: :relaxed` (records/s) | per-key order (records/s) | per-key vs relaxed |
|---:|---:|---:|---:|
#{Enum.map_join([64, 4_096], "\n", fn k -> "| #{Bench.fmt_int(k)} | #{fmt.(r.order_cost[{k, :relaxed}])} | #{fmt.(r.order_cost[{k, :per_key}])} | #{ratio.(r.order_cost[{k, :per_key}], r.order_cost[{k, :relaxed}])} |" end)}

A plain request carries each key once in per-key order, so its cost falls as keys grow; on
Kinesis, where a request takes tens of milliseconds, a key gets at most one record per request
round trip without aggregation.

#{File.read!(Path.join(__DIR__, "PROFILE.md"))}

## 3. Consumer throughput (#{count} records, 4 shards, from `:trim_horizon`)

| consumer | records/s | vs raw Rust loop |
|---|---:|---:|
| raw aws-sdk-kinesis GetRecords loop, one task per shard | #{fmt.(r.raw_get)} | 1.00x |
| Convoy, function handler | #{fmt.(r.convoy_get)} | #{ratio.(r.convoy_get, r.raw_get)} |
| boto3 `get_records` loop | #{fmt.(r.boto3_get)} | #{ratio.(r.boto3_get, r.raw_get)} |

Peak BEAM RSS while consuming: #{div(r.convoy_get_rss, 1024)} MiB.

CPU per record (user + system, every thread of the process, in steady state): Convoy with a
function handler that counts the records (one atomic add each) #{Float.round(r.convoy_get_cpu_us, 2)} µs (the whole VM:
dispatchers, handler calls, checkpoints; from the handler's attach until the last record, right
after an unmeasured consume of the stream), the raw SDK loop, which deserializes the same
records into SDK structs, #{Float.round(r.raw_get_cpu_us, 2)} µs (its own measure of its read, after one read of the stream
in the same process); medians of the runs, #{ratio.(r.get_cpu_vs_raw, 1)} by the median of the rounds' own ratios.
The emulator's CPU counts in neither.

## 4. Latency from `put/3` to handler (`batch_timeout: 0`)

1,000 records at about 500/s, measured in the same run for both ways of reading:

| reading | p50 (ms) | p99 (ms) |
|---|---:|---:|
| polling (`poll_interval: 10`) | #{Float.round(r.p50, 1)} | #{Float.round(r.p99, 1)} |
| enhanced fan-out (`consumer: {:fan_out, "bench"}`) | #{Float.round(r.fan_p50, 1)} | #{Float.round(r.fan_p99, 1)} |

Polling: GetRecords is spaced at least 200 ms apart per shard (the Kinesis limit of 5 reads per second), which bounds
the latency floor. Fan-out: the embedded emulator's SubscribeToShard (`convoy_local`'s own handler) pushes records
as soon as the put that wrote them has been served, as Kinesis pushes them (AWS quotes about 70 ms on average there), so the figure is
mostly Convoy's: the put's request, the event's decoding, the dispatcher and the handler.

## 5. Memory while Kinesis is unreachable (puts continue at full speed)

| second | BEAM RSS (MiB) | growth since the queue started (MiB) | records held | puts answered `:overloaded` |
|---:|---:|---:|---:|---:|
#{Enum.map_join(r.unreachable, "\n", fn {s, kb, grown, held, over} -> "| #{s} | #{Float.round(kb / 1024, 1)} | #{Float.round(grown / 1024, 1)} | #{held} | #{over} |" end)}

The buffer bound (`max_buffered_records: 100_000`) holds: memory levels off once it is reached.

#{File.read!(Path.join(__DIR__, "LEASES.md")) |> String.replace(~r/\A<!--.*?-->\n+/s, "")}
"""

File.write!(Path.join(Path.expand("..", __DIR__), "bench/RESULTS.md"), report)
IO.puts("\n" <> report)
Convoy.Local.stop(local)
Bench.Null.stop(null)
