defmodule Convoy.BatchTimeoutTest do
  # batch_timeout is the configured value, not the default, and `await:`
  # gives up without losing the record. No test here measures time: each
  # compares queues that hold records for very different times.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  defp start_queue!(stream, opts) do
    start_supervised!({Convoy.Queue, [stream: stream, kinesis: kinesis()] ++ opts},
      id: Keyword.fetch!(opts, :stream_id)
    )

    Keyword.fetch!(opts, :stream_id)
  end

  setup do
    stream = create_stream!(unique_stream("timeout"), 1)
    # One queue with the default batch_timeout (5 s), one that holds for a minute.
    default = start_queue!(stream, stream_id: {:default, stream})
    slow = start_queue!(stream, stream_id: {:slow, stream}, batch_timeout: 60_000)
    %{stream: stream, default: default, slow: slow}
  end

  for timeout <- [0, 200] do
    test "batch_timeout: #{timeout} sends without a flush, before the default would", ctx do
      fast =
        start_queue!(ctx.stream, stream_id: {:fast, ctx.stream}, batch_timeout: unquote(timeout))

      :ok = Convoy.Queue.put(ctx.default, "k", "default")
      # Waits for Kinesis' answer however long it takes: no flush is ever sent.
      assert {:ok, %{sequence_number: _}} = Convoy.Queue.put(fast, "k", "fast", await: :infinity)
      # The record put earlier into the default queue is still waiting.
      assert %{buffered: 1, sent: 0} = Convoy.Queue.stats(ctx.default)
      assert Enum.map(read_all(ctx.stream), & &1.data) == ["fast"]
    end
  end

  test "the default batch_timeout sends without a flush, before a longer one", ctx do
    :ok = Convoy.Queue.put(ctx.slow, "k", "slow")
    assert {:ok, _} = Convoy.Queue.put(ctx.default, "k", "default", await: :infinity)
    assert %{buffered: 1, sent: 0} = Convoy.Queue.stats(ctx.slow)
  end

  test "await: a put that times out answers {:error, :timeout}, and the record is still sent",
       ctx do
    assert {:error, :timeout} = Convoy.Queue.put(ctx.slow, "k", "late", await: 100)
    assert %{buffered: 1} = Convoy.Queue.stats(ctx.slow)
    assert :ok = Convoy.Queue.flush(ctx.slow, await: 10_000)
    assert Enum.map(read_all(ctx.stream), & &1.data) == ["late"]
    # The outcome still reaches the caller's mailbox, as documented.
    assert_receive {ref, {:ok, %{sequence_number: _}}} when is_reference(ref), 5_000
  end
end
