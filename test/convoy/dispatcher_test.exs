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

  # Batches for the test process under `handler_id`, acked one by one, until
  # `count` records came.
  defp receive_batches(handler_id, count, acc \\ [])
  defp receive_batches(_handler_id, count, acc) when length(acc) >= count, do: acc

  defp receive_batches(handler_id, count, acc) do
    assert_receive {:convoy_batch, %Convoy.Batch{handler_id: ^handler_id} = batch}, 15_000
    Convoy.Queue.ack(batch)
    receive_batches(handler_id, count, acc ++ Enum.map(batch.records, & &1.data))
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
          eventually(fn -> Convoy.Queue.detach_handler(id, :slow) == {:error, :not_found} end)
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
    test "gets the records of every shard, including those where it failed" do
      id = start_queue!(2)
      me = self()

      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)

        :ok =
          Convoy.Queue.attach_handler(
            id,
            :bad,
            fn record, _ ->
              send(me, {:failing, record.shard_id})
              raise "boom"
            end,
            nil
          )

        put!(id, "k", "fail-low", @low)
        put!(id, "k", "fail-high", @high)
        assert_receive {:failing, shard_a}, 15_000
        assert_receive {:failing, shard_b}, 15_000
        assert shard_a != shard_b
        assert Enum.sort(collect(:good, 2)) == ["fail-high", "fail-low"]

        eventually(fn ->
          Convoy.Queue.attach_handler(id, :bad, forward(:bad), nil) == :ok
        end)
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

      old = fn record, _ ->
        case record.data do
          "hold" ->
            # Fails only once the test says so: after the id was attached again.
            send(me, {:holding, self()})

            receive do
              :go -> raise "late boom"
            end

          _ ->
            raise "boom"
        end
      end

      log =
        capture_log(fn ->
          :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)
          :ok = Convoy.Queue.attach_handler(id, :bad, old, nil)
          put!(id, "k", "fail", @low)
          put!(id, "k", "hold", @high)
          assert_receive {:holding, dispatcher}, 15_000

          # The failure on the other shard detached :bad; attach it again.
          new = fn record, _ ->
            if String.starts_with?(record.data, "after"), do: send(me, {:bad, record.data})
          end

          eventually(fn -> Convoy.Queue.attach_handler(id, :bad, new, nil) == :ok end)
          send(dispatcher, :go)

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

      :ok = Convoy.Queue.attach_handler(id, :again, self(), nil)
      put!(id, "k", "b1")
      assert receive_batches(:again, 4) == ["a1", "a2", "a3", "b1"]
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
        eventually(fn -> Convoy.Queue.detach_handler(id, :bad) == {:error, :not_found} end)
      end)

      :ok = Convoy.Queue.attach_handler(id, :fixed, forward(:fixed), nil)
      put!(id, "k", "b1")
      assert collect(:fixed, 4) == ["a1", "a2", "a3", "b1"]
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
