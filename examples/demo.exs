# Convoy demo: the path from put/3 to a handler, on a real (local) Kinesis.
#
#   script/demo                 # embedded emulator
#   CONVOY_KINESIS_ENDPOINT=http://127.0.0.1:4567 script/demo
#
# Starts the emulator, creates a 4-shard stream, starts a Convoy.Queue under a
# supervisor, attaches a handler, puts a few thousand records from many
# processes and prints what arrived.

count = 5_000
stream = "convoy-demo-#{System.system_time(:second)}"

endpoint =
  case System.get_env("CONVOY_KINESIS_ENDPOINT") do
    url when is_binary(url) and url != "" ->
      url

    _ ->
      {:ok, local} = Convoy.Local.start_link()
      Convoy.Local.endpoint(local)
  end

IO.puts("Kinesis endpoint:  #{endpoint}")
:ok = Convoy.Local.create_stream(endpoint, stream, 4)
IO.puts("stream:            #{stream} (4 shards)")

{:ok, _sup} =
  Supervisor.start_link(
    [
      {Convoy.Queue,
       stream: stream,
       kinesis: Convoy.Local.kinesis_options(endpoint),
       batch_timeout: 50,
       poll_interval: 100,
       iterator_type: :latest}
    ],
    strategy: :one_for_one
  )

demo = self()

handler = fn record, :demo ->
  # The data is JSON that Convoy encoded from a map; take the timestamp back out.
  [sent_at] = Regex.run(~r/"sent_at":(\d+)/, record.data, capture: :all_but_first)
  latency_us = System.system_time(:microsecond) - String.to_integer(sent_at)
  send(demo, {:arrived, record, latency_us})
end

:ok = Convoy.Queue.attach_handler(stream, :demo, handler, :demo)
Process.sleep(500)

started = System.monotonic_time(:millisecond)

1..50
|> Task.async_stream(
  fn producer ->
    for i <- 1..div(count, 50) do
      data = %{producer: producer, seq: i, sent_at: System.system_time(:microsecond)}
      :ok = Convoy.Queue.put(stream, "device-#{producer}", data)
    end
  end,
  max_concurrency: 50
)
|> Stream.run()

put_ms = System.monotonic_time(:millisecond) - started
IO.puts("put:               #{count} records from 50 processes in #{put_ms} ms")

arrived =
  Enum.reduce_while(1..count, [], fn _, acc ->
    receive do
      {:arrived, record, latency} -> {:cont, [{record, latency} | acc]}
    after
      30_000 -> {:halt, acc}
    end
  end)

total_ms = System.monotonic_time(:millisecond) - started
IO.puts("arrived:           #{length(arrived)} of #{count} in #{total_ms} ms")

IO.puts("per shard:")

arrived
|> Enum.frequencies_by(fn {record, _} -> record.shard_id end)
|> Enum.sort()
|> Enum.each(fn {shard, n} -> IO.puts("  #{shard}  #{n}") end)

latencies = arrived |> Enum.map(&elem(&1, 1)) |> Enum.sort()

if latencies != [] do
  pick = fn q -> Enum.at(latencies, min(length(latencies) - 1, trunc(q * length(latencies)))) end

  IO.puts(
    "latency put->handler: p50 #{div(pick.(0.5), 1000)} ms, p99 #{div(pick.(0.99), 1000)} ms"
  )
end

{sample, _} = List.last(arrived)
IO.puts("sample record:")
IO.inspect(sample)
IO.puts("producer stats:    #{inspect(Convoy.Queue.stats(stream))}")

if length(arrived) != count do
  IO.puts(:stderr, "demo: #{count - length(arrived)} records did not arrive")
  System.halt(1)
end
