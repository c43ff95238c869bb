defmodule Convoy.OrderingTest do
  # Records of one partition key reach the stream in put order, also when
  # the shard's write limit makes Kinesis reject a large record of a request
  # and store a smaller one of the same key behind it. The embedded emulator
  # enforces the per-shard limits (1 MiB/s, 1,000 records/s) record by
  # record, which is how Kinesis does it.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @moduletag :embedded_only

  @pairs 15
  @large 200_000

  setup do
    {:ok, local} = Convoy.Local.start(port: 0, enforce_limits: true)
    on_exit(fn -> Convoy.Local.stop(local) end)
    endpoint = Convoy.Local.endpoint(local)
    %{endpoint: endpoint, stream: create_stream!(unique_stream("order"), 1, endpoint)}
  end

  for {name, options} <- [
        plain: [],
        aggregated: [aggregation: true, aggregation_max_bytes: 600_000]
      ] do
    @tag timeout: 180_000
    test "#{name}: a key mixing large and small records keeps its put order through throttling",
         %{endpoint: endpoint, stream: stream} do
      start_supervised!(
        {Convoy.Queue,
         [
           stream: stream,
           kinesis: kinesis(endpoint),
           batch_timeout: 60_000,
           max_retries: 1_000,
           retry_deadline: 150_000,
           retry_backoff: 20,
           max_backoff: 200
         ] ++ unquote(options)}
      )

      # Buffered together, so requests would mix the key's large and small
      # records; 3 MB on a shard that takes 1 MiB/s, so some are throttled.
      expected = put_mixed(stream)
      assert :ok = Convoy.Queue.flush(stream, await: 150_000)

      stats = Convoy.Queue.stats(stream)
      assert stats.throttled > 0
      assert %{failed: 0} = stats

      stored = read_all(stream, endpoint)
      for key <- ["k", "j"], do: assert(order_of(stored, key) == expected[key])
    end
  end

  # What per-key order prevents, on the same puts: the first request
  # carries all of them, the shard stores its first megabyte, then rejects
  # each large record and stores each small one behind it.
  @tag timeout: 180_000
  test "relaxed: the same puts are stored out of order", %{endpoint: endpoint, stream: stream} do
    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(endpoint),
       ordering: :relaxed,
       batch_timeout: 60_000,
       max_retries: 1_000,
       retry_deadline: 150_000,
       retry_backoff: 20,
       max_backoff: 200}
    )

    expected = put_mixed(stream)
    assert :ok = Convoy.Queue.flush(stream, await: 150_000)
    assert %{failed: 0} = Convoy.Queue.stats(stream)

    order = stream |> read_all(endpoint) |> order_of("k")
    assert Enum.sort(order) == expected["k"]
    assert order != expected["k"]
  end

  # Two keys; "k" alternates large and small records, "j" is small.
  defp put_mixed(stream) do
    puts =
      for i <- 1..(2 * @pairs) do
        size = if rem(i, 2) == 1, do: @large, else: 10
        :ok = Convoy.Queue.put(stream, "k", "#{i}:" <> :binary.copy("x", size))
        :ok = Convoy.Queue.put(stream, "j", "#{i}:")
        i
      end

    %{"k" => puts, "j" => puts}
  end

  defp order_of(records, key) do
    for %{partition_key: ^key, data: data} <- records do
      [n, _] = String.split(data, ":", parts: 2)
      String.to_integer(n)
    end
  end
end
