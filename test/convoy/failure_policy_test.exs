defmodule Convoy.FailurePolicyTest do
  # on_error: what happens to a record a handler fails on, and where the
  # checkpoint stands afterwards. On the Memory service: the policy lives in
  # Convoy.Consumer, the same for every service.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Convoy.TestSupport, only: [eventually: 1]

  @moduletag :capture_log

  defp start_queue!(opts \\ []) do
    stream = "policy-#{System.unique_integer([:positive])}"

    options =
      [
        stream: stream,
        service: Convoy.Services.Memory,
        iterator_type: :trim_horizon,
        poll_interval: 10
      ] ++ opts

    start_supervised!({Convoy.Queue, options}, id: {:queue, stream})
    stream
  end

  # Puts in order; returns the sequence numbers by data.
  defp put_all!(id, datas) do
    Map.new(datas, fn data ->
      {:ok, %{sequence_number: seq}} = Convoy.Queue.put(id, "k", data, await: 5_000)
      {data, String.to_integer(seq)}
    end)
  end

  defp checkpoint(id),
    do: Convoy.Checkpoint.Memory.fetch(Convoy.Checkpoint.Memory, id, "shardId-000000000000")

  defp sequence_of(record), do: String.to_integer(record.sequence_number)

  # A handler that fails on "bad" while the flag is up, and tells the test
  # about every call.
  defp flaky(tag, flag) do
    me = self()

    fn record, _ ->
      send(me, {tag, record.data})

      if record.data == "bad" and :persistent_term.get(flag),
        do: raise("cannot take #{record.data}")

      :ok
    end
  end

  defp datas(tag, acc \\ []) do
    receive do
      {^tag, data} -> datas(tag, [data | acc])
    after
      300 -> Enum.reverse(acc)
    end
  end

  test ":halt stops the shard at the record, with no checkpoint past it, until the handlers change" do
    flag = {__MODULE__, make_ref()}
    :persistent_term.put(flag, true)
    id = start_queue!()
    Convoy.TestTelemetry.subscribe()

    log =
      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :h, flaky(:h, flag), nil, on_error: :halt)
        seqs = put_all!(id, ["a", "bad", "c"])
        assert_receive {:h, "a"}, 5_000
        assert_receive {:h, "bad"}, 5_000
        # Halted: "c" is not handed out, however long we wait, and the
        # checkpoint is not past "bad".
        refute_receive {:h, _}, 800

        case checkpoint(id) do
          :error -> :ok
          {:ok, seq} -> assert String.to_integer(seq) < seqs["bad"]
        end

        # Telemetry says so, once, naming the record.
        assert_received {:telemetry_event, [:convoy, :shard, :halted], %{count: 1},
                         %{stream_id: ^id} = halted}

        assert %{shard_id: "shardId-000000000000", handler_id: :h} = halted
        assert %RuntimeError{message: "cannot take bad"} = halted.reason
        assert String.to_integer(halted.sequence_number) == seqs["bad"]
        refute_received {:telemetry_event, [:convoy, :shard, :halted], _, %{stream_id: ^id}}
      end)

    assert log =~ "handler :h failed on shardId-000000000000 at sequence number"
    assert log =~ "halted"

    # The handlers change: the record is tried again, and the shard goes on.
    :persistent_term.put(flag, false)
    :ok = Convoy.Queue.attach_handler(id, :other, fn _, _ -> :ok end, nil)
    assert_receive {:h, "bad"}, 5_000
    assert_receive {:h, "c"}, 5_000
    refute_receive {:h, _}, 300
    {:ok, seq} = eventually_checkpoint(id)
    assert seq != nil
    refute_received {:telemetry_event, [:convoy, :shard, :halted], _, %{stream_id: ^id}}
  end

  test "{:dead_letter, fun} hands the record over and the shard goes on past it" do
    me = self()
    flag = {__MODULE__, make_ref()}
    :persistent_term.put(flag, true)
    id = start_queue!()
    dead = fn record, info -> send(me, {:dead, record.data, info}) end

    capture_log(fn ->
      :ok =
        Convoy.Queue.attach_handler(id, :h, flaky(:h, flag), nil, on_error: {:dead_letter, dead})

      put_all!(id, ["a", "bad", "c"])
      assert_receive {:dead, "bad", %{handler_id: :h, kind: :error, attempts: 1}}, 5_000
      assert datas(:h) == ["a", "bad", "c"]
    end)

    # Still attached, and the checkpoint is past "c".
    put_all!(id, ["d"])
    assert_receive {:h, "d"}, 5_000
    refute_receive {:dead, _, _}, 200
  end

  test "{:retry, n, :halt} tries n times, then halts" do
    flag = {__MODULE__, make_ref()}
    :persistent_term.put(flag, true)
    id = start_queue!()

    capture_log(fn ->
      :ok =
        Convoy.Queue.attach_handler(id, :h, flaky(:h, flag), nil, on_error: {:retry, 3, :halt})

      put_all!(id, ["bad", "c"])
      for _ <- 1..3, do: assert_receive({:h, "bad"}, 5_000)
      refute_receive {:h, _}, 1_000
      assert checkpoint(id) == :error
    end)
  end

  test "{:retry, n} detaches after n attempts, as before" do
    flag = {__MODULE__, make_ref()}
    :persistent_term.put(flag, true)
    id = start_queue!()

    log =
      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :h, flaky(:h, flag), nil, on_error: {:retry, 2})
        put_all!(id, ["bad"])
        for _ <- 1..2, do: assert_receive({:h, "bad"}, 5_000)
        refute_receive {:h, _}, 500
      end)

    assert log =~ "is detached"
    # The dispatcher logs the detach, then tells the consumer: the id is
    # free once a strict attach under it succeeds.
    eventually(fn -> Convoy.Queue.attach_handler(id, :h, fn _, _ -> :ok end, nil, []) == :ok end)
  end

  test ":retry retries without bound until the handler succeeds" do
    me = self()
    id = start_queue!()
    counter = :counters.new(1, [])

    # Fails 6 times: more than the 5 attempts :retry used to stop at.
    handler = fn record, _ ->
      :counters.add(counter, 1, 1)
      if :counters.get(counter, 1) <= 6, do: raise("not yet")
      send(me, {:h, record.data})
    end

    capture_log(fn ->
      :ok = Convoy.Queue.attach_handler(id, :h, handler, nil, on_error: :retry)
      put_all!(id, ["x"])
      assert_receive {:h, "x"}, 15_000
    end)

    assert :counters.get(counter, 1) == 7
  end

  describe "a pid handler" do
    test "acks part of a batch: the rest fails, and its policy (retry) sends the rest again" do
      id = start_queue!()
      put_all!(id, ["a", "b", "c"])
      :ok = Convoy.Queue.attach_handler(id, :p, self(), nil, on_error: {:retry, 2, :halt})
      assert_receive {:convoy_batch, batch}, 5_000
      assert Enum.map(batch.records, & &1.data) == ["a", "b", "c"]
      :ok = Convoy.Queue.ack(batch, 1)

      # Checkpointed only up to "a" meanwhile? Not even: the batch is not done.
      assert_receive {:convoy_batch, again}, 5_000
      assert Enum.map(again.records, & &1.data) == ["b", "c"]
      :ok = Convoy.Queue.ack(again)

      {:ok, seq} = eventually_checkpoint(id)
      assert String.to_integer(seq) == sequence_of(List.last(batch.records))
    end

    test "nacks a batch: with :halt the shard stops and nothing is checkpointed" do
      id = start_queue!()
      put_all!(id, ["a", "b"])

      log =
        capture_log(fn ->
          :ok = Convoy.Queue.attach_handler(id, :p, self(), nil, on_error: :halt)
          assert_receive {:convoy_batch, batch}, 5_000
          :ok = Convoy.Queue.nack(batch, :db_down)
          refute_receive {:convoy_batch, _}, 500
          assert checkpoint(id) == :error
        end)

      assert log =~ "halted"
      assert log =~ ":db_down"
    end

    test "nacks a batch: with {:dead_letter, fun} every record goes to fun and the shard goes on" do
      me = self()
      id = start_queue!()
      put_all!(id, ["a", "b"])
      dead = fn record, info -> send(me, {:dead, record.data, info.reason}) end

      :ok = Convoy.Queue.attach_handler(id, :p, self(), nil, on_error: {:dead_letter, dead})
      assert_receive {:convoy_batch, batch}, 5_000

      capture_log(fn ->
        :ok = Convoy.Queue.nack(batch, :no)
        assert_receive {:dead, "a", {:nack, :no}}, 5_000
        assert_receive {:dead, "b", {:nack, :no}}, 5_000
      end)

      {:ok, seq} = eventually_checkpoint(id)
      assert String.to_integer(seq) == sequence_of(List.last(batch.records))
      put_all!(id, ["c"])
      assert_receive {:convoy_batch, %{records: [%{data: "c"}]}}, 5_000
    end

    test "that misses its ack timeout with on_error: :retry gets the batch again" do
      id = start_queue!()
      put_all!(id, ["a"])

      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :p, self(), nil, ack_timeout: 200, on_error: :retry)

        assert_receive {:convoy_batch, %{records: [%{data: "a"}]}}, 5_000
        assert_receive {:convoy_batch, %{records: [%{data: "a"}]} = again}, 5_000
        :ok = Convoy.Queue.ack(again)
      end)

      {:ok, _} = eventually_checkpoint(id)
      # Still attached.
      assert :ok = Convoy.Queue.detach_handler(id, :p)
    end
  end

  test "bad on_error values are refused" do
    id = start_queue!()

    for bad <- [:nope, {:retry, 0}, {:retry, 2, :retry}, {:dead_letter, fn _ -> :ok end}] do
      assert {:error, {:invalid_on_error, ^bad}} =
               Convoy.Queue.attach_handler(id, :h, fn _, _ -> :ok end, nil, on_error: bad)
    end
  end

  defp eventually_checkpoint(id) do
    Convoy.TestSupport.eventually(fn ->
      case checkpoint(id) do
        {:ok, seq} when is_binary(seq) -> {:ok, seq}
        _ -> nil
      end
    end)
  end
end
