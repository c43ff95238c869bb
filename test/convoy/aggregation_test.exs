defmodule Convoy.AggregationTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @moduletag timeout: 600_000
  @magic <<0xF3, 0x89, 0x9A, 0xC2>>

  defp start_queue!(stream, opts) do
    opts = Keyword.merge([stream: stream, kinesis: kinesis()], opts)
    id = Keyword.get(opts, :stream_id, stream)
    start_supervised!({Convoy.Queue, opts}, id: id)
    id
  end

  defp consume!(stream, count) do
    id =
      start_queue!(stream,
        stream_id: {:reader, stream},
        iterator_type: :trim_horizon,
        poll_interval: 100
      )

    me = self()

    :ok =
      Convoy.Queue.attach_handler(
        id,
        :collect,
        fn record, _ -> send(me, {:record, record}) end,
        nil
      )

    for _ <- 1..count do
      assert_receive {:record, record}, 30_000
      record
    end
    |> tap(fn _ -> refute_receive {:record, _}, 500 end)
  end

  # The shard a partition key maps to: MD5 of the key against the hash ranges.
  defp expected_shard(shards, key) do
    <<hash::unsigned-big-128>> = :erlang.md5(key)

    Enum.find_value(shards, fn s ->
      if String.to_integer(s.starting_hash_key) <= hash and
           hash <= String.to_integer(s.ending_hash_key),
         do: s.shard_id
    end)
  end

  test "user records are packed per shard, unpacked transparently, with an outcome each" do
    stream = create_stream!(unique_stream("agg"), 4)
    id = start_queue!(stream, aggregation: true, batch_timeout: 100)

    awaited =
      1..200
      |> Task.async_stream(
        fn i ->
          for j <- 1..25 do
            data = "user-#{i}-#{j}-" <> :binary.copy("x", rem(j, 40))
            opts = if j == 25, do: [await: 30_000], else: []
            {data, Convoy.Queue.put(id, "key-#{i}", data, opts)}
          end
        end,
        max_concurrency: 200
      )
      |> Enum.flat_map(fn {:ok, results} -> results end)

    assert :ok = Convoy.Queue.flush(id, await: 30_000)
    assert Enum.all?(awaited, fn {_, result} -> result == :ok or match?({:ok, _}, result) end)

    raw = raw_get!(stream)
    # 5,000 user records travel in far fewer Kinesis records, all aggregated.
    assert length(raw) < 100
    assert Enum.all?(raw, &String.starts_with?(&1.data, @magic))

    records = consume!(stream, 5_000)

    assert records |> Enum.map(& &1.data) |> Enum.sort() ==
             awaited |> Enum.map(&elem(&1, 0)) |> Enum.sort()

    assert Enum.all?(records, &is_integer(&1.sub_sequence_number))

    {:ok, shards} = Convoy.Local.list_shards(endpoint(), stream)
    assert Enum.all?(records, &(&1.shard_id == expected_shard(shards, &1.partition_key)))

    # Per key, order holds: sequence numbers, then sub-sequence numbers, grow with j.
    for {_key, group} <- Enum.group_by(records, & &1.partition_key) do
      ordered =
        Enum.sort_by(group, &{String.to_integer(&1.sequence_number), &1.sub_sequence_number})

      js =
        Enum.map(ordered, fn r ->
          r.data |> String.split("-") |> Enum.at(2) |> String.to_integer()
        end)

      assert js == Enum.sort(js)
    end

    # An awaited put names the aggregated record and the user record's place in it.
    by_data = Map.new(records, &{&1.data, &1})

    for {data, {:ok, outcome}} <- awaited do
      record = Map.fetch!(by_data, data)

      assert outcome == %{
               shard_id: record.shard_id,
               sequence_number: record.sequence_number,
               sub_sequence_number: record.sub_sequence_number
             }
    end
  end

  test "aws-kinesis-agg de-aggregates Convoy's aggregated records byte-exact, keys included" do
    stream = create_stream!(unique_stream("agg-out"), 2)
    id = start_queue!(stream, aggregation: true, batch_timeout: 100)

    users =
      for i <- 1..300 do
        data = :crypto.strong_rand_bytes(rem(i * 7, 300))
        hash_key = if rem(i, 3) == 0, do: Integer.to_string(i * 1_000_003), else: nil
        {"k#{rem(i, 11)}-é", hash_key, data}
      end

    for {key, hash_key, data} <- users,
        do: :ok = Convoy.Queue.put(id, key, data, explicit_hash_key: hash_key)

    assert :ok = Convoy.Queue.flush(id, await: 30_000)

    raw = raw_get!(stream)
    assert length(raw) < 300

    input =
      Enum.map_join(
        raw,
        &(Base.encode16(&1.partition_key, case: :lower) <>
            "\t" <> Base.encode16(&1.data, case: :lower) <> "\n")
      )

    unpacked =
      for line <- interop!("deaggregate", input) do
        [key, hash_key, data, sub] = String.split(line, "\t")
        assert sub =~ ~r/^\d+$/
        [key, hash_key, data] = Enum.map([key, hash_key, data], &Base.decode16!(&1, case: :lower))
        {key, if(hash_key == "", do: nil, else: hash_key), data}
      end

    assert length(unpacked) == length(users)
    assert unpacked -- users == []
    assert Enum.sort(unpacked) == Enum.sort(users)
  end

  test "Convoy de-aggregates records aggregated by aws-kinesis-agg byte-exact, keys included" do
    stream = create_stream!(unique_stream("agg-in"), 2)

    users =
      for i <- 1..300 do
        data = :crypto.strong_rand_bytes(rem(i * 13, 500))
        hash_key = if rem(i, 4) == 0, do: Integer.to_string(i * 7_000_001), else: nil
        {"pk-#{rem(i, 17)}", hash_key, data}
      end

    input =
      Enum.map_join(users, fn {key, hash_key, data} ->
        Enum.map_join([key, hash_key || "", data], "\t", &Base.encode16(&1, case: :lower)) <> "\n"
      end)

    aggregated = interop!("aggregate", input)
    assert length(aggregated) >= 1

    # Put the aggregated blobs as they are, through a queue that does not aggregate.
    id = start_queue!(stream, batch_timeout: 0)

    for line <- aggregated do
      [key, hash_key, data] =
        line |> String.split("\t") |> Enum.map(&Base.decode16!(&1, case: :lower))

      hash_key = if hash_key == "", do: nil, else: hash_key

      assert {:ok, _} =
               Convoy.Queue.put(id, key, data, explicit_hash_key: hash_key, await: 10_000)
    end

    records = consume!(stream, 300)

    assert Enum.sort(Enum.map(records, &{&1.partition_key, &1.explicit_hash_key, &1.data})) ==
             Enum.sort(users)
  end

  test "a record that only looks aggregated is delivered as it is" do
    stream = create_stream!(unique_stream("agg-fake"), 1)
    id = start_queue!(stream, batch_timeout: 0)
    fake = @magic <> :binary.copy(<<1>>, 40)
    assert {:ok, _} = Convoy.Queue.put(id, "k", fake, await: 10_000)
    assert [%Convoy.Record{data: ^fake, sub_sequence_number: nil}] = consume!(stream, 1)
  end

  @tag :tmp_dir
  test "a restart never loses the tail of an aggregated record", %{tmp_dir: dir} do
    stream = create_stream!(unique_stream("agg-checkpoint"), 1)

    producer =
      start_queue!(stream,
        stream_id: {:producer, stream},
        aggregation: true,
        batch_timeout: 10_000,
        max_in_flight: 1
      )

    for i <- 1..300, do: :ok = Convoy.Queue.put(producer, "k#{rem(i, 5)}", "u#{i}")
    :ok = Convoy.Queue.flush(producer, await: 30_000)
    for i <- 301..600, do: :ok = Convoy.Queue.put(producer, "k#{rem(i, 5)}", "u#{i}")
    :ok = Convoy.Queue.flush(producer, await: 30_000)
    assert length(raw_get!(stream)) == 2

    consumer = [
      stream: stream,
      stream_id: {:consumer, stream},
      kinesis: kinesis(),
      iterator_type: :trim_horizon,
      poll_interval: 50,
      poll_limit: 1,
      checkpoint: {Convoy.Checkpoint.File, dir: dir}
    ]

    # One Kinesis record per batch: the first aggregated record, unpacked.
    {:ok, pid} = Convoy.Queue.start_link(consumer)
    :ok = Convoy.Queue.attach_handler(consumer[:stream_id], :pid, self(), nil)
    assert_receive {:convoy_batch, first}, 10_000
    assert length(first.records) == 300
    # Stopped before the batch is acknowledged: nothing is checkpointed inside it.
    Process.unlink(pid)
    GenServer.stop(pid)

    {:ok, pid} = Convoy.Queue.start_link(consumer)
    :ok = Convoy.Queue.attach_handler(consumer[:stream_id], :pid, self(), nil)
    assert_receive {:convoy_batch, again}, 10_000
    assert Enum.map(again.records, & &1.data) == Enum.map(first.records, & &1.data)
    Convoy.Queue.ack(again)
    assert_receive {:convoy_batch, second}, 10_000

    assert Enum.map(again.records ++ second.records, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 1..600, do: "u#{i}")

    # Its checkpoint names the last user record of the second aggregated
    # record (sub-sequence number 299): a restart reads nothing again.
    Convoy.Queue.ack(second)
    [_, %{sequence_number: last}] = raw_get!(stream)
    shard = second.shard_id
    stream_id = consumer[:stream_id]

    eventually(fn -> Convoy.Checkpoint.File.fetch(dir, stream_id, shard) == {:ok, {last, 299}} end)

    Process.unlink(pid)
    GenServer.stop(pid)

    {:ok, pid} = Convoy.Queue.start_link(consumer)
    :ok = Convoy.Queue.attach_handler(consumer[:stream_id], :pid, self(), nil)
    refute_receive {:convoy_batch, _}, 2_000
    Process.unlink(pid)
    GenServer.stop(pid)
  end

  test "a stopped queue's shard map is no longer refreshed, though a caller keeps its handle" do
    alias Convoy.TestSupport.ThrottleProxy
    "http://127.0.0.1:" <> port = endpoint()
    # Counts ListShards calls, throttles none.
    {:ok, proxy} =
      ThrottleProxy.start_link(String.to_integer(port), operation: "ListShards", every: 1_000_000)

    stream = create_stream!(unique_stream("agg-stop"), 1)

    id =
      start_queue!(stream,
        kinesis: kinesis(ThrottleProxy.endpoint(proxy)),
        aggregation: true,
        shard_refresh_interval: 1_000
      )

    # This process keeps the producer's handle (Convoy.Queue.HandleCache).
    assert {:ok, _} = Convoy.Queue.put(id, "k", "v", await: 10_000)
    # Refreshed while the queue runs.
    calls = ThrottleProxy.counts(proxy).seen
    eventually(fn -> ThrottleProxy.counts(proxy).seen > calls end)

    stop_supervised!(id)
    Process.sleep(1_500)
    calls = ThrottleProxy.counts(proxy).seen
    Process.sleep(3_000)
    assert ThrottleProxy.counts(proxy).seen == calls
  end
end
