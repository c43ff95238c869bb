defmodule Convoy.PullTest do
  # get/2: progress, fairness, resharding, aggregation; on Kinesis and on the
  # Memory service.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @middle "170141183460469231731687303715884105728"

  # Calls get(id, limit) until it answers [] `calls` times at most; returns
  # every record and the number of calls that returned some.
  defp drain(id, limit, calls, acc \\ [], used \\ 0) do
    case Convoy.Queue.get(id, limit) do
      [] ->
        {acc, used}

      records when is_list(records) ->
        assert length(records) <= limit
        assert used < calls, "more than #{calls} calls returned records"
        drain(id, limit, calls, acc ++ records, used + 1)
    end
  end

  defp datas(records), do: records |> Enum.map(& &1.data) |> Enum.sort()
  defp range(first, last), do: Enum.sort(for i <- first..last, do: "record-#{i}")

  describe "on Kinesis" do
    defp start_kinesis!(stream, opts \\ []) do
      opts = [stream: stream, kinesis: kinesis(), iterator_type: :trim_horizon] ++ opts
      start_supervised!({Convoy.Queue, opts}, id: stream)
      stream
    end

    test "300 records on 2 shards come back exactly once, both shards from the first call" do
      stream = create_stream!(unique_stream("pull"), 2)
      raw_put!(stream, 300)
      start_kinesis!(stream)

      [first | _] =
        calls =
        Stream.repeatedly(fn -> Convoy.Queue.get(stream, 50) end)
        |> Enum.take(6)

      # Fair: the first call reads both shards instead of draining one.
      assert first |> Enum.map(& &1.shard_id) |> Enum.uniq() |> length() == 2
      records = List.flatten(calls)
      assert Enum.all?(calls, &(length(&1) == 50))
      assert datas(records) == range(0, 299)
      assert Convoy.Queue.get(stream, 50) == []
    end

    test "after a split, the parent is read to its end, then the children's records come" do
      stream = create_stream!(unique_stream("pull-split"), 1)
      raw_put!(stream, 50)
      start_kinesis!(stream)
      {:ok, [%{shard_id: parent}]} = Convoy.Local.list_shards(endpoint(), stream)
      first = Convoy.Queue.get(stream, 20)
      :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle)
      raw_put!(stream, 50, start: 50)

      {rest, _} = drain(stream, 20, 10)
      records = first ++ rest
      assert datas(records) == range(0, 99)
      {from_parent, from_children} = Enum.split_while(records, &(&1.shard_id == parent))
      assert length(from_parent) == 50
      assert Enum.all?(from_children, &(&1.shard_id != parent))
    end

    test "with aggregation, limit counts user records and none is lost or repeated" do
      stream = create_stream!(unique_stream("pull-agg"), 2)

      start_kinesis!(stream,
        aggregation: true,
        batch_timeout: 0
      )

      for i <- 0..299 do
        :ok = put_until_accepted(stream, "key-#{rem(i, 16)}", "record-#{i}")
      end

      :ok = Convoy.Queue.flush(stream, await: 30_000)
      # Few Kinesis records hold the 300 user records.
      assert length(raw_get!(stream)) < 100

      {records, _} = drain(stream, 7, 60)
      assert datas(records) == range(0, 299)
    end

    test "a restart in the middle of an aggregated record: get/2 goes on with its next user record" do
      stream = create_stream!(unique_stream("pull-agg-restart"), 1)
      start_kinesis!(stream, aggregation: true, batch_timeout: 60_000)
      for i <- 0..9, do: :ok = Convoy.Queue.put(stream, "k", "record-#{i}")
      :ok = Convoy.Queue.flush(stream, await: 30_000)
      # One Kinesis record holds the 10 user records.
      assert [_] = raw_get!(stream)

      first = Convoy.Queue.get(stream, 4)
      assert Enum.map(first, & &1.data) == for(i <- 0..3, do: "record-#{i}")
      assert Enum.map(first, & &1.sub_sequence_number) == [0, 1, 2, 3]

      # The queue starts again: it resumes after the fourth user record, from
      # the checkpoint (sequence number and sub-sequence number 3).
      stop_supervised!(stream)
      start_kinesis!(stream)
      {rest, _} = drain(stream, 100, 2)
      assert Enum.map(rest, & &1.data) == for(i <- 4..9, do: "record-#{i}")
    end
  end

  describe "on the Memory service" do
    defp start_memory!(shards) do
      stream = "pull-memory-#{System.unique_integer([:positive])}"

      start_supervised!(
        {Convoy.Queue,
         stream: stream,
         service: Convoy.Services.Memory,
         service_options: [shards: shards],
         iterator_type: :trim_horizon},
        id: stream
      )

      stream
    end

    test "300 records on 2 shards come back exactly once, fairly" do
      id = start_memory!(2)
      for i <- 0..299, do: :ok = Convoy.Queue.put(id, "key-#{rem(i, 16)}", "record-#{i}")
      first = Convoy.Queue.get(id, 50)
      assert first |> Enum.map(& &1.shard_id) |> Enum.uniq() |> length() == 2
      {rest, _} = drain(id, 50, 5)
      assert datas(first ++ rest) == range(0, 299)
    end

    test "after a split, records written to the children come back too" do
      id = start_memory!(1)
      for i <- 0..49, do: :ok = Convoy.Queue.put(id, "key-#{rem(i, 16)}", "record-#{i}")
      first = Convoy.Queue.get(id, 20)
      {:ok, _children} = Convoy.Services.Memory.split_shard(id, "shardId-000000000000")
      for i <- 50..99, do: :ok = Convoy.Queue.put(id, "key-#{rem(i, 16)}", "record-#{i}")
      {rest, _} = drain(id, 20, 10)
      records = first ++ rest
      assert datas(records) == range(0, 99)

      {from_parent, from_children} =
        Enum.split_while(records, &(&1.shard_id == "shardId-000000000000"))

      assert length(from_parent) == 50
      assert length(from_children) == 50
    end
  end
end
