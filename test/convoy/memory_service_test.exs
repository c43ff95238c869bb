defmodule Convoy.MemoryServiceTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  defp open!(opts \\ []) do
    stream = "memory-#{System.unique_integer([:positive])}"
    me = self()

    options =
      [stream: stream, service: Convoy.Services.Memory, service_options: [shards: 2]]
      |> Keyword.merge(on_failure: fn failure -> send(me, {:failed, failure}) end)
      |> Keyword.merge(opts)

    start_supervised!({Convoy.Queue, options})
    Keyword.get(options, :stream_id, options[:stream])
  end

  # Queue options whose handler sends {:got, data} to the test process.
  defp forwarding(stream) do
    me = self()

    [
      stream: stream,
      service: Convoy.Services.Memory,
      iterator_type: :trim_horizon,
      poll_interval: 10,
      handlers: [{:h, fn record, _ -> send(me, {:got, record.data}) end, nil}]
    ]
  end

  test "a queue started again under the same stream_id gets its new records despite old checkpoints" do
    stream = "memory-again-#{System.unique_integer([:positive])}"
    options = forwarding(stream)

    for round <- 1..2 do
      start_supervised!({Convoy.Queue, options}, id: {:queue, round})
      for i <- 1..20, do: :ok = Convoy.Queue.put(stream, "k", "#{round}-#{i}")
      # In order, and only this round's: the memory stream starts empty again.
      for i <- 1..20, do: assert_receive({:got, data}, 5_000) && assert(data == "#{round}-#{i}")
      refute_receive {:got, _}, 200
      stop_supervised!({:queue, round})
    end
  end

  test "a stale :shard_end checkpoint from an earlier queue does not hide an open shard" do
    stream = "memory-split-#{System.unique_integer([:positive])}"
    options = forwarding(stream)

    # The first queue splits its only shard and reads it to its end.
    start_supervised!({Convoy.Queue, options}, id: :first)
    :ok = Convoy.Queue.put(stream, "k", "before-split")
    assert_receive {:got, "before-split"}, 5_000
    {:ok, _children} = Convoy.Services.Memory.split_shard(stream, "shardId-000000000000")
    :ok = Convoy.Queue.put(stream, "k", "after-split")
    assert_receive {:got, "after-split"}, 5_000
    stop_supervised!(:first)

    # A new memory stream under the same stream_id: its shard 0 is open.
    start_supervised!({Convoy.Queue, options}, id: :second)
    :ok = Convoy.Queue.put(stream, "k", "new-stream")
    assert_receive {:got, "new-stream"}, 5_000
  end

  test "fail_next_puts: the next N puts fail through the failure path, then puts work again" do
    stream = "memory-failing-#{System.unique_integer([:positive])}"
    id = open!(stream: stream, stream_id: {:failing, stream})
    Convoy.TestTelemetry.subscribe()
    :ok = Convoy.Services.Memory.fail_next_puts(id, 2)

    log =
      capture_log(fn ->
        assert Convoy.Queue.put(id, "k", "a") ==
                 {:error, {:aws, "InternalFailure", "injected failure"}}

        assert Convoy.Queue.put(id, "k", "b") ==
                 {:error, {:aws, "InternalFailure", "injected failure"}}
      end)

    assert log =~ "failed"

    assert_received {:failed,
                     %{partition_key: "k", data: "a", reason: {:aws, "InternalFailure", _}}}

    assert_received {:failed, %{data: "b"}}

    for _ <- 1..2 do
      assert_received {:telemetry_event, [:convoy, :put, :failed], %{count: 1},
                       %{stream: ^stream, stream_id: ^id, reason: {:aws, "InternalFailure", _}}}
    end

    assert :ok = Convoy.Queue.put(id, "k", "c")
    assert %{failed: 2, sent: 1} = Convoy.Queue.stats(id)
    refute_received {:telemetry_event, [:convoy, :put, :failed], _, %{stream_id: ^id}}
  end

  test "throttle: puts fail as throttled until it is turned off" do
    id = open!()
    :ok = Convoy.Services.Memory.throttle(id, true)

    capture_log(fn ->
      assert {:error, {:aws, "ProvisionedThroughputExceededException", _}} =
               Convoy.Queue.put(id, "k", "x")
    end)

    :ok = Convoy.Services.Memory.throttle(id, false)
    assert :ok = Convoy.Queue.put(id, "k", "y")
    assert %{throttled: 1, failed: 1, sent: 1} = Convoy.Queue.stats(id)
  end

  test "records spread over shards by partition key hash, and explicit hash keys pick the shard" do
    id = open!()
    max = Integer.to_string(Bitwise.bsl(1, 128) - 1)

    assert {:ok, %{shard_id: "shardId-000000000000"}} =
             Convoy.Queue.put(id, "k", "low", explicit_hash_key: "0", await: 1_000)

    assert {:ok, %{shard_id: "shardId-000000000001"}} =
             Convoy.Queue.put(id, "k", "high", explicit_hash_key: max, await: 1_000)

    shards =
      for i <- 1..100,
          into: MapSet.new(),
          do: elem(Convoy.Queue.put(id, "key-#{i}", "v", await: 1_000), 1).shard_id

    assert MapSet.size(shards) == 2
  end

  test "bad service options raise ArgumentError" do
    assert_raise ArgumentError, ~r/:shards/, fn ->
      Convoy.Services.Memory.start_link(
        Convoy.Queue.Options.validate!(
          stream: "x",
          service: Convoy.Services.Memory,
          service_options: [shards: 0]
        )
      )
    end
  end
end
