# Soak: 1,000,000 records produced and consumed at once, with a slow handler.
# Samples BEAM memory, the producer's buffer and the dispatchers' mailboxes
# every second, and appends the figures to bench/RESULTS.md.
#
#   MIX_ENV=prod mix run bench/soak.exs        (or SOAK_RECORDS=200000 for a short one)

require Logger
Logger.configure(level: :warning)

total = String.to_integer(System.get_env("SOAK_RECORDS", "1000000"))
{:ok, local} = Convoy.Local.start_link()
endpoint = Convoy.Local.endpoint(local)
stream = "soak-#{System.unique_integer([:positive])}"
:ok = Convoy.Local.create_stream(endpoint, stream, 4)

counter = :counters.new(1, [:write_concurrency])
me = self()

# Slow: a pause of 1 ms after every 100 records of a shard.
slow = fn _record, _ ->
  :counters.add(counter, 1, 1)
  n = :counters.get(counter, 1)
  if rem(n, 100) == 0, do: Process.sleep(1)
  if n == total, do: send(me, :done)
end

{:ok, _} =
  Convoy.Queue.start_link(
    stream: stream,
    kinesis: Convoy.Local.kinesis_options(endpoint),
    batch_timeout: 100,
    poll_interval: 100,
    iterator_type: :trim_horizon,
    max_buffered_records: 50_000,
    handlers: [{:slow, slow, nil}]
  )

rss_kb = fn ->
  "/proc/self/status"
  |> File.read!()
  |> then(&Regex.run(~r/VmRSS:\s+(\d+)/, &1, capture: :all_but_first))
  |> hd()
  |> String.to_integer()
end

mailboxes = fn ->
  Process.list()
  |> Enum.filter(fn pid ->
    match?({:dictionary, d} when is_list(d), Process.info(pid, :dictionary)) and
      match?(
        {_, {Convoy.Consumer.ShardDispatcher, :init, 1}},
        Process.info(pid, :dictionary) |> elem(1) |> List.keyfind(:"$initial_call", 0)
      )
  end)
  |> Enum.map(fn pid -> elem(Process.info(pid, :message_queue_len) || {:x, 0}, 1) end)
  |> Enum.max(fn -> 0 end)
end

sampler =
  spawn_link(fn ->
    sample = fn sample, second, acc ->
      stats = Convoy.Queue.stats(stream)

      row =
        {second, div(rss_kb.(), 1024), stats.buffered + stats.in_flight,
         :counters.get(counter, 1), mailboxes.()}

      receive do
        :stop -> send(me, {:samples, Enum.reverse([row | acc])})
      after
        1_000 -> sample.(sample, second + 1, [row | acc])
      end
    end

    sample.(sample, 0, [])
  end)

started = System.monotonic_time(:millisecond)

1..2
|> Task.async_stream(
  fn p ->
    data = String.duplicate("x", 100)

    for i <- p..total//2 do
      put = fn put ->
        case Convoy.Queue.put(stream, "key-#{rem(i, 64)}", data) do
          :ok -> :ok
          {:error, :overloaded} -> Process.sleep(1) && put.(put)
        end
      end

      put.(put)
    end
  end,
  timeout: :infinity
)
|> Stream.run()

receive do
  :done -> :ok
after
  1_800_000 -> raise "soak: only #{:counters.get(counter, 1)} of #{total} consumed"
end

seconds = (System.monotonic_time(:millisecond) - started) / 1000
send(sampler, :stop)
samples = receive do: ({:samples, s} -> s)
stats = Convoy.Queue.stats(stream)
peak_rss = samples |> Enum.map(&elem(&1, 1)) |> Enum.max()
peak_held = samples |> Enum.map(&elem(&1, 2)) |> Enum.max()
peak_mailbox = samples |> Enum.map(&elem(&1, 4)) |> Enum.max()

every = max(div(length(samples), 12), 1)

table =
  samples
  |> Enum.take_every(every)
  |> Enum.map_join("\n", fn {s, rss, held, consumed, mailbox} ->
    "| #{s} | #{rss} | #{held} | #{consumed} | #{mailbox} |"
  end)

report = """

## Soak: #{total} records produced and consumed at once, slow handler

`MIX_ENV=prod mix run bench/soak.exs`, #{DateTime.utc_now() |> DateTime.truncate(:second)}: #{total} records of 100 bytes
put from 2 processes into 4 shards while a handler that pauses 1 ms every 100 records consumes them
(`max_buffered_records: 50_000`). Took #{Float.round(seconds, 1)} s; sent #{stats.sent}, failed #{stats.failed},
consumed #{:counters.get(counter, 1)}. Peak BEAM RSS #{peak_rss} MiB, peak records held by the producer
#{peak_held} (bound 50,000), peak dispatcher mailbox #{peak_mailbox} messages.

| second | BEAM RSS (MiB) | records held by the producer | consumed | largest dispatcher mailbox |
|---:|---:|---:|---:|---:|
#{table}
"""

IO.puts(report)
File.write!(Path.join(Path.expand("..", __DIR__), "bench/RESULTS.md"), report, [:append])
