defmodule Convoy.PositionsTest do
  # Where shards start: every iterator type, proven by the exact records
  # received; children of resharding; a restarted queue.
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  @middle "170141183460469231731687303715884105728"

  defp start_queue!(stream, opts) do
    opts = Keyword.merge([stream: stream, kinesis: kinesis(), poll_interval: 100], opts)
    start_supervised!({Convoy.Queue, opts}, id: stream)
    stream
  end

  defp forward do
    me = self()
    fn record, _ -> send(me, {:got, record}) end
  end

  # Every record that arrives until none came for `quiet` ms (the first may
  # take longer: kinesalite holds an AT_TIMESTAMP request with nothing after
  # the timestamp until it times out).
  defp received(quiet \\ 1_500) do
    receive do
      {:got, record} -> received(quiet, [record])
    after
      30_000 -> []
    end
  end

  defp received(quiet, acc) do
    receive do
      {:got, record} -> received(quiet, [record | acc])
    after
      quiet -> Enum.reverse(acc)
    end
  end

  defp datas(records), do: records |> Enum.map(& &1.data) |> Enum.sort()
  defp range(first, last), do: Enum.sort(for i <- first..last, do: "record-#{i}")

  # The embedded emulator stores arrival times in whole seconds (and answers
  # AT_TIMESTAMP past its last record with the shard's start): records are
  # kept apart from an instant by a second boundary. Returns the next whole
  # second, once it has passed.
  defp instant do
    now = System.system_time(:millisecond)
    at = (div(now, 1000) + 1) * 1000
    Process.sleep(at - now + 50)
    DateTime.from_unix!(at, :millisecond)
  end

  # The embedded emulator dates the children's first records up to a second
  # after the split: the split is followed by a pause.
  defp split!(stream) do
    {:ok, [%{shard_id: parent}]} = Convoy.Local.list_shards(endpoint(), stream)
    :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle)
    Process.sleep(1_500)
    parent
  end

  test ":trim_horizon starts at every shard's oldest record" do
    stream = create_stream!(unique_stream("pos-trim"), 2)
    raw_put!(stream, 20)
    start_queue!(stream, iterator_type: :trim_horizon)
    :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
    assert datas(received()) == range(0, 19)
  end

  test ":latest starts at the queue's start: records before it never come" do
    stream = create_stream!(unique_stream("pos-latest"), 2)
    raw_put!(stream, 20)
    instant()
    start_queue!(stream, iterator_type: :latest)
    instant()
    raw_put!(stream, 20, start: 20)
    :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
    assert datas(received()) == range(20, 39)
  end

  test "{:at_timestamp, dt} starts at the first record that arrived at dt or later" do
    stream = create_stream!(unique_stream("pos-ts"), 2)
    raw_put!(stream, 20)
    at = instant()
    raw_put!(stream, 20, start: 20)
    start_queue!(stream, iterator_type: {:at_timestamp, at})
    :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
    assert datas(received()) == range(20, 39)
  end

  describe "sequence numbers per shard" do
    setup do
      stream = create_stream!(unique_stream("pos-seq"), 2)
      raw_put!(stream, 40)
      by_shard = stream |> read_all() |> Enum.group_by(& &1.shard_id)
      assert map_size(by_shard) == 2
      [{a, a_records}, {b, b_records}] = Enum.sort(by_shard)
      %{stream: stream, a: a, a_records: a_records, b: b, b_records: b_records}
    end

    test "{:at_sequence_number, %{shard => s}}: that shard from s, the others from their start",
         ctx do
      s = Enum.at(ctx.a_records, 3).sequence_number
      start_queue!(ctx.stream, iterator_type: {:at_sequence_number, %{ctx.a => s}})
      :ok = Convoy.Queue.attach_handler(ctx.stream, :h, forward(), nil)
      expected = Enum.drop(ctx.a_records, 3) ++ ctx.b_records
      assert datas(received()) == datas(expected)
    end

    test "{:after_sequence_number, %{shard => s}}: that shard after s, the others from their start",
         ctx do
      s = Enum.at(ctx.a_records, 3).sequence_number
      start_queue!(ctx.stream, iterator_type: {:after_sequence_number, %{ctx.a => s}})
      :ok = Convoy.Queue.attach_handler(ctx.stream, :h, forward(), nil)
      expected = Enum.drop(ctx.a_records, 4) ++ ctx.b_records
      assert datas(received()) == datas(expected)
    end

    # kinesis-mock accepts a sequence number of another shard (Kinesis refuses it).
    @tag unsupported_by: :"kinesis-mock"
    test "{:after_sequence_number, s}: the shard s belongs to after s, the others from their start",
         ctx do
      s = Enum.at(ctx.b_records, 5).sequence_number

      capture_log(fn ->
        start_queue!(ctx.stream, iterator_type: {:after_sequence_number, s})
        :ok = Convoy.Queue.attach_handler(ctx.stream, :h, forward(), nil)
        expected = ctx.a_records ++ Enum.drop(ctx.b_records, 6)
        assert datas(received()) == datas(expected)
      end)
    end
  end

  describe "shards born from resharding" do
    test "under :latest, children of a parent this queue never read start at the queue's start" do
      stream = create_stream!(unique_stream("pos-child-latest"), 1)
      raw_put!(stream, 10)
      split!(stream)
      # Written to the children before the queue starts: not for :latest.
      raw_put!(stream, 10, start: 10)
      instant()
      start_queue!(stream, iterator_type: :latest)
      instant()
      raw_put!(stream, 10, start: 20)
      :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
      assert datas(received()) == range(20, 29)
    end

    # kinesalite never answers AT_TIMESTAMP on a closed shard past its end.
    @tag unsupported_by: :kinesalite
    test "{:at_timestamp, dt} applies to the children too" do
      stream = create_stream!(unique_stream("pos-child-ts"), 1)
      raw_put!(stream, 10)
      parent = split!(stream)
      raw_put!(stream, 10, start: 10)
      at = instant()
      # Keys 4..13: both children get some of them.
      raw_put!(stream, 10, start: 20)
      start_queue!(stream, iterator_type: {:at_timestamp, at})
      :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
      {from_parent, from_children} = Enum.split_with(received(), &(&1.shard_id == parent))
      # Kinesis has nothing for the parent, closed before dt; the embedded
      # emulator answers AT_TIMESTAMP past a shard's last record with the
      # shard's start, so there the parent comes whole.
      assert datas(from_parent) in [[], range(0, 9)]
      assert datas(from_children) == range(20, 29)
    end

    test "children of a parent this queue read start at their oldest record, under :latest too" do
      stream = create_stream!(unique_stream("pos-child-read"), 1)
      start_queue!(stream, iterator_type: :latest, shard_refresh_interval: 300)
      :ok = Convoy.Queue.attach_handler(stream, :h, forward(), nil)
      raw_put!(stream, 10)
      assert datas(received()) == range(0, 9)
      split!(stream)
      # Written to the children before the queue noticed them: all of it comes.
      raw_put!(stream, 10, start: 10)
      assert datas(received()) == range(10, 19)
    end
  end

  test "a handler holding its ack across a split sees no child record before it acks the parent" do
    stream = create_stream!(unique_stream("pos-hold"), 1)
    start_queue!(stream, iterator_type: :trim_horizon, shard_refresh_interval: 200)
    :ok = Convoy.Queue.attach_handler(stream, :p, self(), nil)
    raw_put!(stream, 10)
    # Every parent batch is acked but the last one, which is held.
    {held, parent_records} = hold_last(10, 10_000)
    parent = held.shard_id
    assert datas(parent_records) == range(0, 9)

    split!(stream)
    raw_put!(stream, 10, start: 10)
    # The children are listed (every 200 ms) and hold records, but the
    # parent has not ended while its batch is held: nothing comes.
    refute_receive {:convoy_batch, _}, 2_000
    :ok = Convoy.Queue.ack(held)

    children = receive_batches(10)
    assert Enum.all?(children, &(&1.shard_id != parent))
    assert datas(children) == range(10, 19)
    refute_receive {:convoy_batch, _}, 500
  end

  defp receive_batches(count, acc \\ []) do
    if length(acc) >= count do
      acc
    else
      assert_receive {:convoy_batch, batch}, 10_000
      :ok = Convoy.Queue.ack(batch)
      receive_batches(count, acc ++ batch.records)
    end
  end

  describe "a killed queue started with :latest" do
    test "resumes at the first queue's start: what arrived before the kill is delivered" do
      stream = create_stream!(unique_stream("pos-kill"), 2)
      me = self()

      queue =
        {Convoy.Queue,
         stream: stream,
         kinesis: kinesis(),
         iterator_type: :latest,
         poll_interval: 100,
         checkpoint: Convoy.Checkpoint.Memory}

      {:ok, sup} = Supervisor.start_link([queue], strategy: :one_for_one)
      {:ok, shards} = Convoy.Local.list_shards(endpoint(), stream)

      # The first queue resolves :latest for its shards as it starts.
      eventually(fn ->
        Enum.all?(shards, fn %{shard_id: shard_id} ->
          match?(
            {:ok, {:at_timestamp, _}},
            Convoy.Checkpoint.Memory.fetch(Convoy.Checkpoint.Memory, stream, shard_id)
          )
        end)
      end)

      # Acknowledged by Kinesis while no handler reads them, then the kill.
      instant()
      raw_put!(stream, 20)
      [{_, pid, _, _}] = Supervisor.which_children(sup)

      capture_log(fn ->
        Process.exit(pid, :kill)

        eventually(fn ->
          match?([{_, new, _, _}] when is_pid(new) and new != pid, Supervisor.which_children(sup))
        end)

        Process.sleep(200)
      end)

      :ok = Convoy.Queue.attach_handler(stream, :h, fn r, _ -> send(me, {:got, r}) end, nil)
      assert datas(received()) == range(0, 19)
      Supervisor.stop(sup)
    end
  end

  test "a shard halted by a handler resumes at its record when the queue restarts" do
    stream = create_stream!(unique_stream("pos-halt"), 1)
    me = self()
    flag = {__MODULE__, make_ref()}
    :persistent_term.put(flag, true)

    handler = fn record, _ ->
      send(me, {:got, record})
      if record.data == "record-5" and :persistent_term.get(flag), do: raise("no")
    end

    queue =
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(),
       iterator_type: :trim_horizon,
       poll_interval: 100,
       poll_limit: 3,
       handlers: [{:h, handler, nil, on_error: :halt}]}

    {:ok, sup} = Supervisor.start_link([queue], strategy: :one_for_one)

    capture_log(fn ->
      raw_put!(stream, 10)
      # Batches of 3: records 0..2 are checkpointed, 3..5 halt at 5.
      assert datas(received()) == range(0, 5)
      [{_, pid, _, _}] = Supervisor.which_children(sup)
      :persistent_term.put(flag, false)
      Process.exit(pid, :kill)
      # From the checkpoint: the halted batch again, then the rest.
      assert datas(received(3_000)) == range(3, 9)
    end)

    Supervisor.stop(sup)
  end
end
