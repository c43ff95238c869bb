defmodule Convoy.DispatcherRestartTest do
  # How long the consumer waits before it starts a dead shard dispatcher
  # again: longer for each death in a row, and from the start again once a
  # dispatcher lived `restart_reset_after`. The delays are read from the
  # consumer's log line for each death (no clock is asserted); a scripted
  # source tells the test each time a dispatcher starts reading the shard.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  defmodule Source do
    @moduledoc false
    @behaviour Convoy.Consumer.Source

    @impl true
    def list_shards(_test) do
      {:ok,
       [
         %{
           shard_id: "shardId-0",
           parent_shard_id: nil,
           adjacent_parent_shard_id: nil,
           starting_hash_key: "0",
           ending_hash_key: Integer.to_string(Integer.pow(2, 128) - 1),
           ending_sequence_number: nil
         }
       ]}
    end

    # A reader that never reads anything; it goes with its dispatcher.
    @impl true
    def start_reader(test, shard_id, _position, dispatcher, _options) do
      reader = spawn_link(fn -> Process.sleep(:infinity) end)
      send(test, {:reading, shard_id, dispatcher})
      reader
    end

    @impl true
    def ack(_reader), do: :ok

    @impl true
    def stop_reader(reader) do
      Process.unlink(reader)
      Process.exit(reader, :kill)
      :ok
    end

    @impl true
    def read(_test, _shard_id, position, _limit), do: {:ok, [], position, 0}
  end

  defp start_consumer!(options) do
    stream_id = "restart-#{System.unique_integer([:positive])}"

    start_supervised!(
      {Convoy.Consumer,
       [
         stream_id: stream_id,
         source: {Source, self()},
         checkpoint: {Convoy.Checkpoint.Memory, []},
         iterator_type: :trim_horizon,
         poll_interval: 100,
         shard_refresh_interval: 600_000
       ] ++ options}
    )

    consumer = Convoy.Consumer.name(stream_id)
    :ok = Convoy.Consumer.attach(consumer, :h, fn _record, _config -> :ok end, nil, [])
    stream_id
  end

  # The dispatcher that starts reading the shard next.
  defp next_dispatcher do
    assert_receive {:reading, "shardId-0", dispatcher}, 90_000
    dispatcher
  end

  defp kill(dispatcher) do
    ref = Process.monitor(dispatcher)
    Process.exit(dispatcher, :kill)
    assert_receive {:DOWN, ^ref, :process, ^dispatcher, :killed}
  end

  # The delays the consumer chose, in ms, in the order of the deaths.
  defp delays(log, stream_id) do
    ~r/Convoy #{Regex.escape(inspect(stream_id))}: dispatcher of shardId-0 exited: .*; restarting it from its checkpoint in (\d+) ms/
    |> Regex.scan(log)
    |> Enum.map(fn [_, ms] -> String.to_integer(ms) end)
  end

  test "a dispatcher that dies young is started again later each time" do
    me = self()

    log =
      capture_log(fn ->
        stream_id = start_consumer!([])
        send(me, {:stream_id, stream_id})
        kill(next_dispatcher())
        kill(next_dispatcher())
        kill(next_dispatcher())
        next_dispatcher()
      end)

    assert_received {:stream_id, stream_id}
    assert delays(log, stream_id) == [1_000, 2_000, 4_000]
  end

  test "a dispatcher that lived restart_reset_after is started again as after a first death" do
    me = self()

    log =
      capture_log(fn ->
        stream_id = start_consumer!(restart_reset_after: 500)
        send(me, {:stream_id, stream_id})
        kill(next_dispatcher())
        kill(next_dispatcher())
        # This one runs longer than restart_reset_after before it dies.
        healthy = next_dispatcher()
        Process.sleep(600)
        kill(healthy)
        next_dispatcher()
      end)

    assert_received {:stream_id, stream_id}
    assert delays(log, stream_id) == [1_000, 2_000, 1_000]
  end
end
