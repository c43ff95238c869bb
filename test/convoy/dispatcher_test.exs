defmodule Convoy.DispatcherTest do
  # How a shard's dispatcher hands a batch from handler to handler while it
  # keeps answering handler changes, acks, timeouts and failures.
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  # Explicit hash keys at both ends of the hash range: the first and the last
  # shard of a stream, whatever its shard count.
  @low "0"
  @high "340282366920938463463374607431768211455"

  defp start_queue!(shards, opts \\ []) do
    stream = create_stream!(unique_stream("dispatch"), shards)

    opts =
      Keyword.merge(
        [
          stream: stream,
          kinesis: kinesis(),
          iterator_type: :trim_horizon,
          poll_interval: 50,
          batch_timeout: 10
        ],
        opts
      )

    start_supervised!({Convoy.Queue, opts})
    stream
  end

  defp put!(id, key, data, hash \\ @low) do
    assert {:ok, _} = Convoy.Queue.put(id, key, data, explicit_hash_key: hash, await: 10_000)
  end

  defp forward(tag) do
    me = self()
    fn record, _config -> send(me, {tag, record.data}) end
  end

  # Every `tag` message until `count` came, in arrival order.
  defp collect(tag, count) do
    for _ <- 1..count//1 do
      assert_receive {^tag, data}, 15_000
      data
    end
  end

  # Every `tag` message up to the one with `last`, in arrival order.
  defp collect_until(tag, last, acc \\ []) do
    assert_receive {^tag, data}, 15_000
    acc = acc ++ [data]
    if data == last, do: acc, else: collect_until(tag, last, acc)
  end

  # The data of the batches sent to the test process under `handler_id`,
  # each acked, up to the batch that holds `last`.
  defp receive_batches(handler_id, last, acc \\ []) do
    assert_receive {:convoy_batch, %Convoy.Batch{handler_id: ^handler_id} = batch}, 15_000
    Convoy.Queue.ack(batch)
    acc = acc ++ Enum.map(batch.records, & &1.data)
    if last in acc, do: acc, else: receive_batches(handler_id, last, acc)
  end

  describe "a pid handler holding a batch" do
    test "when detached, releases the batch to the handlers after it and the shard reads on" do
      id = start_queue!(1)
      for i <- 1..3, do: put!(id, "k", "a#{i}")
      :ok = Convoy.Queue.attach_handler(id, :holder, self(), nil)
      :ok = Convoy.Queue.attach_handler(id, :after, forward(:after), nil)

      assert_receive {:convoy_batch, %Convoy.Batch{handler_id: :holder} = held}, 15_000
      assert Enum.map(held.records, & &1.data) == ["a1", "a2", "a3"]
      # A handler later in attach order sees the batch only after the holder.
      refute_receive {:after, _}, 300

      :ok = Convoy.Queue.detach_handler(id, :holder)
      assert collect(:after, 3) == ["a1", "a2", "a3"]

      # The shard reads on: records written afterwards come, once each.
      for i <- 1..3, do: put!(id, "k", "b#{i}")
      assert collect(:after, 3) == ["b1", "b2", "b3"]
      # The holder's late ack changes nothing, and nothing comes twice.
      Convoy.Queue.ack(held)
      refute_receive {:after, _}, 500
      refute_received {:convoy_batch, _}
    end

    test "when it was the last handler, a handler attached later gets the shard's records" do
      id = start_queue!(1)
      put!(id, "k", "a1")
      :ok = Convoy.Queue.attach_handler(id, :holder, self(), nil)
      assert_receive {:convoy_batch, %Convoy.Batch{handler_id: :holder}}, 15_000
      :ok = Convoy.Queue.detach_handler(id, :holder)

      :ok = Convoy.Queue.attach_handler(id, :next, forward(:next), nil)
      put!(id, "k", "b1")
      # The held batch was never finished, so it comes again, then the new record.
      assert collect(:next, 2) == ["a1", "b1"]
      refute_receive {:next, _}, 500
    end

    test "that times out is detached and the batch goes on to the next handler" do
      id = start_queue!(1)
      for i <- 1..2, do: put!(id, "k", "a#{i}")

      log =
        capture_log(fn ->
          :ok = Convoy.Queue.attach_handler(id, :slow, self(), nil, ack_timeout: 200)
          :ok = Convoy.Queue.attach_handler(id, :after, forward(:after), nil)
          assert_receive {:convoy_batch, %Convoy.Batch{handler_id: :slow} = held}, 15_000
          assert collect(:after, 2) == ["a1", "a2"]
          # Detached: a second attach under the same id works.
          eventually(fn ->
            Convoy.Queue.detach_handler(id, :slow, strict: true) == {:error, :not_found}
          end)

          Convoy.Queue.ack(held)
        end)

      assert log =~ "handler :slow failed"
      assert log =~ "ack_timeout"
      put!(id, "k", "b1")
      assert collect(:after, 1) == ["b1"]
      refute_receive {:after, _}, 500
      refute_received {:convoy_batch, _}
    end

    test "that dies releases the batch to the next handler" do
      id = start_queue!(1)
      put!(id, "k", "a1")
      me = self()

      holder =
        spawn(fn ->
          receive do
            {:convoy_batch, batch} -> send(me, {:holding, batch.records})
          end

          receive do
            :die -> exit(:boom)
          end
        end)

      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :holder, holder, nil)
        :ok = Convoy.Queue.attach_handler(id, :after, forward(:after), nil)
        assert_receive {:holding, [%Convoy.Record{data: "a1"}]}, 15_000
        refute_receive {:after, _}, 200
        send(holder, :die)
        assert collect(:after, 1) == ["a1"]
      end)

      put!(id, "k", "b1")
      assert collect(:after, 1) == ["b1"]
      refute_receive {:after, _}, 500
    end
  end

  describe "a failed handler attached again under its id" do
    # A handler that reports each call and raises only when told to, so that
    # it is in the middle of a batch on every shard before it fails on any.
    defp raise_when_told(tag) do
      me = self()

      fn record, _ ->
        send(me, {tag, record.data, self()})

        receive do
          {:raise, message} -> raise message
        end
      end
    end

    test "gets the records of every shard, including those where it failed" do
      id = start_queue!(2)
      put!(id, "k", "fail-low", @low)
      put!(id, "k", "fail-high", @high)

      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)
        :ok = Convoy.Queue.attach_handler(id, :bad, raise_when_told(:calling), nil)
        assert_receive {:calling, "fail-low", dispatcher_low}, 15_000
        assert_receive {:calling, "fail-high", dispatcher_high}, 15_000
        # It fails on both shards.
        send(dispatcher_low, {:raise, "boom"})
        send(dispatcher_high, {:raise, "boom"})
        assert Enum.sort(collect(:good, 2)) == ["fail-high", "fail-low"]

        # Attached again while a shard may still hold its failed batch, the
        # new handler may get that batch too (at least once): only later
        # records are counted.
        me = self()

        new = fn record, _ ->
          unless String.starts_with?(record.data, "fail"), do: send(me, {:bad, record.data})
        end

        # The strict form answers :ok only once the failure detached :bad
        # (attach_handler/4 would replace it without waiting).
        eventually(fn -> Convoy.Queue.attach_handler(id, :bad, new, nil, []) == :ok end)
      end)

      for i <- 1..5, hash <- [@low, @high], do: put!(id, "k", "#{hash}-#{i}", hash)
      expected = Enum.sort(for i <- 1..5, hash <- [@low, @high], do: "#{hash}-#{i}")

      assert Enum.sort(collect(:bad, 10)) == expected
      assert Enum.sort(collect(:good, 10)) == expected
      refute_receive {:bad, _}, 500
      refute_received {:good, _}
    end

    test "is not removed by a late failure notice about the old one" do
      id = start_queue!(2)
      me = self()
      put!(id, "k", "fail", @low)
      put!(id, "k", "hold", @high)

      log =
        capture_log(fn ->
          :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)
          :ok = Convoy.Queue.attach_handler(id, :bad, raise_when_told(:calling), nil)
          assert_receive {:calling, "fail", dispatcher_low}, 15_000
          assert_receive {:calling, "hold", dispatcher_high}, 15_000

          # The failure on one shard detaches :bad; it is attached again
          # (the strict form: :ok only once the detach happened)...
          send(dispatcher_low, {:raise, "boom"})

          new = fn record, _ ->
            if String.starts_with?(record.data, "after"), do: send(me, {:bad, record.data})
          end

          eventually(fn -> Convoy.Queue.attach_handler(id, :bad, new, nil, []) == :ok end)
          # ...before the old one fails on the other shard.
          send(dispatcher_high, {:raise, "late boom"})

          for i <- 1..5, hash <- [@low, @high], do: put!(id, "k", "after-#{hash}-#{i}", hash)

          expected = Enum.sort(for i <- 1..5, hash <- [@low, @high], do: "after-#{hash}-#{i}")
          assert Enum.sort(collect(:bad, 10)) == expected
          refute_receive {:bad, _}, 500
        end)

      assert log =~ "late boom"
      # Still attached: the notice about the old handler was ignored.
      assert Convoy.Queue.detach_handler(id, :bad) == :ok
    end
  end

  describe "a batch no handler finished" do
    test "is not checkpointed when the last handler is detached, even if it acks late" do
      id = start_queue!(1)
      for i <- 1..3, do: put!(id, "k", "a#{i}")
      :ok = Convoy.Queue.attach_handler(id, :holder, self(), nil)
      assert_receive {:convoy_batch, %Convoy.Batch{handler_id: :holder} = held}, 15_000
      assert Enum.map(held.records, & &1.data) == ["a1", "a2", "a3"]

      :ok = Convoy.Queue.detach_handler(id, :holder)
      # Acked by a handler no longer attached: it does not count.
      Convoy.Queue.ack(held)

      put!(id, "k", "b1")
      :ok = Convoy.Queue.attach_handler(id, :again, self(), nil)
      assert receive_batches(:again, "b1") == ["a1", "a2", "a3", "b1"]
      refute_receive {:convoy_batch, _}, 500
    end

    test "because its only handler failed is delivered again to the next handler" do
      id = start_queue!(1)
      for i <- 1..3, do: put!(id, "k", "a#{i}")
      me = self()

      capture_log(fn ->
        :ok =
          Convoy.Queue.attach_handler(
            id,
            :bad,
            fn record, _ ->
              send(me, {:failing, record.data})
              raise "boom"
            end,
            nil
          )

        assert_receive {:failing, "a1"}, 15_000

        eventually(fn ->
          Convoy.Queue.detach_handler(id, :bad, strict: true) == {:error, :not_found}
        end)
      end)

      put!(id, "k", "b1")
      :ok = Convoy.Queue.attach_handler(id, :fixed, forward(:fixed), nil)
      assert collect_until(:fixed, "b1") == ["a1", "a2", "a3", "b1"]
      refute_receive {:fixed, _}, 500
      refute_received {:failing, _}
    end
  end

  test "a handler detached while it waits to be retried releases the batch" do
    id = start_queue!(1)
    put!(id, "k", "a1")
    me = self()

    failing = fn record, _ ->
      send(me, {:attempt, record.data})
      raise "still failing"
    end

    capture_log(fn ->
      # Up to 50 attempts, each after a longer pause: minutes in all.
      :ok = Convoy.Queue.attach_handler(id, :failing, failing, nil, on_error: {:retry, 50})
      :ok = Convoy.Queue.attach_handler(id, :after, forward(:after), nil)
      assert_receive {:attempt, "a1"}, 15_000
      :ok = Convoy.Queue.detach_handler(id, :failing)
      assert collect(:after, 1) == ["a1"]
    end)

    put!(id, "k", "b1")
    assert collect(:after, 1) == ["b1"]
    refute_receive {:after, _}, 500
  end
end
