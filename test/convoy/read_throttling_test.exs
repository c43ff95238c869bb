defmodule Convoy.ReadThrottlingTest do
  # Consumer-side throttling: polling GetRecords calls answered with
  # ProvisionedThroughputExceededException, by a proxy in front of the
  # emulator (test/support/throttle_proxy.ex; the embedded emulator never
  # throttles reads itself). The pollers back off and read on from where
  # they stood: every record exactly once, in order per shard, nothing else.
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog
  alias Convoy.TestSupport.ThrottleProxy

  @throttled {:aws, "ProvisionedThroughputExceededException", "Rate exceeded"}

  defp receive_records(count), do: receive_records(count, 30_000)

  test "polling reads throttled (every third GetRecords, then all for a while): every record once, in order" do
    "http://127.0.0.1:" <> port = endpoint()
    {:ok, proxy} = ThrottleProxy.start_link(String.to_integer(port), every: 3)
    stream = create_stream!(unique_stream("read-throttle"), 2)
    half = volume(200)
    :ok = raw_put!(stream, half)
    Convoy.TestTelemetry.subscribe()
    me = self()

    options = [
      stream: stream,
      kinesis: kinesis(ThrottleProxy.endpoint(proxy)),
      iterator_type: :trim_horizon,
      # Small reads, so that many calls are made and some throttled.
      poll_limit: 10,
      poll_interval: 50,
      retry_backoff: 20,
      max_backoff: 200,
      handlers: [{:fwd, fn record, _ -> send(me, {:record, record}) end, nil}]
    ]

    log =
      capture_log(fn ->
        start_supervised!({Convoy.Queue, options})
        first = receive_records(half)

        # Every read refused: nothing is delivered, however long it lasts
        # (the pollers retry, then ask for fresh iterators, again and again).
        ThrottleProxy.set_every(proxy, 1)
        :ok = raw_put!(stream, half, start: half)
        refute_receive {:record, _}, 2_000
        ThrottleProxy.set_every(proxy, 3)

        second = receive_records(half)
        refute_receive {:record, _}, 1_500
        send(me, {:records, first ++ second})
      end)

    assert_received {:records, records}
    datas = Enum.map(records, & &1.data)
    assert Enum.sort(datas) == Enum.sort(for i <- 0..(2 * half - 1), do: "record-#{i}")

    for {_shard, rs} <- Enum.group_by(records, & &1.shard_id) do
      seqs = Enum.map(rs, &String.to_integer(&1.sequence_number))
      assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
    end

    # The throttling was met, and reported.
    assert %{throttled: throttled} = ThrottleProxy.counts(proxy)
    assert throttled > 0

    assert_received {:telemetry_event, [:convoy, :poller, :error], %{count: 1},
                     %{stream_id: ^stream, reason: @throttled}}

    assert log =~ "ProvisionedThroughputExceededException"
  end
end
