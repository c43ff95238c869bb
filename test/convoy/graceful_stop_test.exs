defmodule Convoy.GracefulStopTest do
  # A queue stopped while a shard's batch is in hand finishes the batch and
  # stores its checkpoint: with leases, the shard's next holder (another
  # node) then starts after it, with no duplicate.
  use ExUnit.Case, async: true

  test "the batch in flight is finished and checkpointed when the queue stops" do
    stream = "graceful-#{System.unique_integer([:positive])}"
    test = self()

    handler = fn record, _ ->
      send(test, {:handling, record})
      # Long enough for the stop to arrive while the batch is in hand.
      Process.sleep(300)
    end

    {:ok, queue} =
      Convoy.Queue.start_link(
        stream: stream,
        service: Convoy.Services.Memory,
        service_options: [shards: 1],
        poll_interval: 10,
        iterator_type: :trim_horizon,
        batch_timeout: 0
      )

    for i <- 1..3, do: :ok = Convoy.Queue.put(stream, "k", "r#{i}")
    :ok = Convoy.Queue.attach_handler(stream, :slow, handler, nil)
    assert_receive {:handling, first}, 10_000

    Process.unlink(queue)
    :ok = Supervisor.stop(queue, :normal, 30_000)

    # Every record of the batch was handled, and the checkpoint is the last.
    handled = [first | for(_ <- 2..3, do: assert_receive({:handling, r}, 5_000) && r)]
    last = List.last(handled)
    assert Enum.map(handled, & &1.data) == ["r1", "r2", "r3"]

    assert {:ok, last.sequence_number} ==
             Convoy.Checkpoint.Memory.fetch(Convoy.Checkpoint.Memory, stream, last.shard_id)
  end
end
