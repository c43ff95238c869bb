defmodule Convoy.ProducerFaultsTest do
  # Each test runs its own emulator, started and stopped here.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @moduletag :embedded_only

  test "an emulator outage loses nothing: records before and during it arrive once it is back" do
    {:ok, local} = Convoy.Local.start(port: 0)
    endpoint = Convoy.Local.endpoint(local)
    port = URI.parse(endpoint).port
    stream = create_stream!(unique_stream("outage"), 2, endpoint)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(endpoint),
       batch_timeout: 60_000,
       max_retries: 1_000,
       retry_deadline: 120_000,
       retry_backoff: 50,
       max_backoff: 500}
    )

    # Buffered, not yet sent, when the emulator goes away.
    for i <- 1..500, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 5)}", "before-#{i}")
    Convoy.Local.stop(local)

    for i <- 1..500, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 5)}", "during-#{i}")
    :ok = Convoy.Queue.flush(stream)
    # Attempts now fail to connect and are retried.
    eventually(fn -> Convoy.Queue.stats(stream).retried > 0 end)
    Process.sleep(2_000)

    {:ok, local} = Convoy.Local.start(port: port)
    create_stream!(stream, 2, endpoint)
    assert :ok = Convoy.Queue.flush(stream, await: 120_000)

    datas = read_all(stream, endpoint) |> Enum.map(& &1.data) |> Enum.sort()

    expected =
      Enum.sort(for(i <- 1..500, do: "before-#{i}") ++ for(i <- 1..500, do: "during-#{i}"))

    assert datas == expected
    assert %{failed: 0, sent: 1000} = Convoy.Queue.stats(stream)
    Convoy.Local.stop(local)
  end

  test "throttling: a burst beyond one shard's write limit is delivered completely through retries" do
    {:ok, local} = Convoy.Local.start(port: 0, enforce_limits: true)
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("throttle"), 1, endpoint)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(endpoint),
       batch_timeout: 10,
       max_retries: 100,
       retry_deadline: 120_000}
    )

    for i <- 1..4_000,
        do:
          :ok =
            Convoy.Queue.put(stream, "k#{rem(i, 50)}", "burst-#{i}-" <> :binary.copy("x", 100))

    assert :ok = Convoy.Queue.flush(stream, await: 120_000)

    stats = Convoy.Queue.stats(stream)
    assert stats.throttled > 0
    assert %{sent: 4_000, failed: 0} = stats
    assert length(read_all(stream, endpoint)) == 4_000
    Convoy.Local.stop(local)
  end
end
