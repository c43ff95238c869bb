defmodule Convoy.Compat.TelemetryTest do
  # The events, seen through the test-only stand-in `:telemetry`
  # (test/support/telemetry.ex). Turning emission off is global, so the
  # module runs alone.
  use ExUnit.Case, async: false

  import Convoy.TestSupport

  setup do
    Convoy.TestTelemetry.subscribe()
    :ok
  end

  # Events of one stream, in arrival order, until `done` says enough.
  defp events_of(stream, done, acc \\ []) do
    receive do
      {:telemetry_event, event, measurements, %{stream: ^stream} = metadata} ->
        acc = [{event, measurements, metadata} | acc]
        if done.(acc), do: Enum.reverse(acc), else: events_of(stream, done, acc)
    after
      30_000 -> flunk("events so far: #{inspect(Enum.reverse(acc), pretty: true)}")
    end
  end

  # Events of one stream that arrive within the next `ms` ms, in order.
  defp events_during(stream, ms) do
    deadline = System.monotonic_time(:millisecond) + ms

    Stream.repeatedly(fn ->
      receive do
        {:telemetry_event, event, measurements, %{stream: ^stream} = metadata} ->
          {event, measurements, metadata}
      after
        max(deadline - System.monotonic_time(:millisecond), 0) -> :done
      end
    end)
    |> Enum.take_while(&(&1 != :done))
  end

  defp count(events, name), do: Enum.count(events, &(elem(&1, 0) == name))

  defp sum(events, name, key),
    do: events |> Enum.filter(&(elem(&1, 0) == name)) |> Enum.map(&elem(&1, 1)[key]) |> Enum.sum()

  defp spans_paired(events, prefix) do
    starts = for {e, _, m} <- events, e == prefix ++ [:start], do: m.telemetry_span_context

    ends =
      for {e, _, m} <- events,
          e in [prefix ++ [:stop], prefix ++ [:exception]],
          do: m.telemetry_span_context

    assert starts != []
    assert Enum.sort(starts) == Enum.sort(ends)
    assert length(Enum.uniq(starts)) == length(starts)
  end

  test "Kinesis: the original four events and the spans, with their measurements and metadata" do
    stream = create_stream!(unique_stream("telemetry"), 2)
    me = self()

    start_supervised!(
      {Convoy.Queue,
       stream: String.to_atom(stream),
       kinesis: kinesis(),
       iterator_type: :trim_horizon,
       poll_interval: 50,
       batch_timeout: 20}
    )

    :ok = Convoy.Queue.attach(stream, :h, fn record, _ -> send(me, {:got, record.data}) end, nil)

    assert [{[:convoy, :queue, :attach], %{handler_count: 1}, %{stream: ^stream, handler_id: :h}}] =
             events_of(stream, &(length(&1) == 1))

    for i <- 1..30, do: :ok = Convoy.Queue.put(stream, "key-#{rem(i, 5)}", "r#{i}")
    for _ <- 1..30, do: assert_receive({:got, _}, 10_000)

    events =
      events_of(stream, fn events ->
        # Some polls after the records: empty ones report their lag too.
        sum(events, [:convoy, :queue, :records_sent], :count) >= 30 and
          sum(events, [:convoy, :queue, :records_received], :count) >= 30 and
          count(events, [:convoy, :handler, :stop]) >= 2 and
          Enum.count(events, &match?({[:convoy, :get_records, :stop], %{count: 0}, _}, &1)) >= 4
      end)

    # Then a second more, so that a late duplicate would be counted too.
    events = events ++ events_during(stream, 1_000)

    assert sum(events, [:convoy, :queue, :records_sent], :count) == 30
    assert sum(events, [:convoy, :queue, :records_received], :count) == 30

    for {[:convoy, :queue, :records_sent], m, md} <- events do
      assert %{count: n} = m
      assert n > 0
      assert %{stream: ^stream} = md
    end

    for {[:convoy, :queue, :records_received], %{count: _}, md} <- events do
      assert %{stream: ^stream, shard_id: "shardId-" <> _, next_iterator: it} = md
      assert is_binary(it)
    end

    for {[:convoy, :get_records, :stop], m, md} <- events do
      assert %{duration: d, count: _, millis_behind_latest: lag} = m
      assert is_integer(d) and d >= 0
      # kinesalite gives no MillisBehindLatest: the key is there, nil.
      assert is_integer(lag) or (is_nil(lag) and not embedded?())
      assert %{shard_id: _, stream_id: _} = md
    end

    for {[:convoy, :put_records, :stop], m, _} <- events do
      assert %{records: n, acknowledged: n, retried: 0, failed: 0, entries: n, bytes: b} = m
      assert b > 0
    end

    for {[:convoy, :handler, :stop], m, md} <- events do
      assert %{duration: _, count: c} = m
      assert c > 0
      assert %{handler_id: :h, shard_id: _} = md
    end

    for {_, m, _} = e <- events, elem(e, 0) |> List.last() == :start do
      assert %{monotonic_time: _, system_time: _} = m
    end

    spans_paired(events, [:convoy, :put_records])
    spans_paired(events, [:convoy, :handler])

    :ok = Convoy.Queue.detach(stream, :h)

    assert [{[:convoy, :queue, :detach], %{handler_count: 0}, %{handler_id: :h}}] =
             events_of(stream, &match?([{[:convoy, :queue, :detach], _, _} | _], &1))
             |> Enum.filter(&(elem(&1, 0) == [:convoy, :queue, :detach]))
  end

  test "a reporter restarted alone gets the producer's reports, and puts go on" do
    stream = create_stream!(unique_stream("reporter-restart"), 1)
    start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 0})
    [{owner, _}] = Registry.lookup(Convoy.Registry, {:handle, stream})

    old = Convoy.Queue.Reporter.whereis(stream)
    ref = Process.monitor(old)
    Process.exit(old, :kill)
    assert_receive {:DOWN, ^ref, :process, ^old, :killed}

    new =
      eventually(fn ->
        pid = Convoy.Queue.Reporter.whereis(stream)
        pid != old && :sys.get_state(owner).reporter == pid && pid
      end)

    :erlang.trace(new, true, [:receive, {:tracer, self()}])
    assert {:ok, _} = Convoy.Queue.put(stream, "k", "after", await: 10_000)
    assert_receive {:trace, ^new, :receive, {:convoy_put_records, %{acknowledged: 1}}}, 5_000

    assert [{[:convoy, :put_records, :stop], %{acknowledged: 1}, _}] =
             events_of(stream, &match?([{[:convoy, :put_records, :stop], _, _} | _], &1))
             |> Enum.filter(&(elem(&1, 0) == [:convoy, :put_records, :stop]))
  end

  test "each GetRecords call of a pull read is a span" do
    stream = create_stream!(unique_stream("telemetry-get"), 2)

    start_supervised!(
      {Convoy.Queue, stream: stream, kinesis: kinesis(), iterator_type: :trim_horizon}
    )

    {:ok, _} = Convoy.Queue.put(stream, "k", "v", await: 10_000)
    assert [%{data: "v"}] = Convoy.Queue.get(stream, 5)

    events = events_of(stream, &(count(&1, [:convoy, :get_records, :stop]) == 2))
    spans_paired(events, [:convoy, :get_records])

    shards =
      for {[:convoy, :get_records, :stop], %{count: n, millis_behind_latest: lag}, md} <- events do
        assert is_integer(lag) or (is_nil(lag) and not embedded?())
        {md.shard_id, n}
      end

    assert shards |> Enum.map(&elem(&1, 0)) |> Enum.sort() ==
             ["shardId-000000000000", "shardId-000000000001"]

    assert shards |> Enum.map(&elem(&1, 1)) |> Enum.sum() == 1
    refute Enum.any?(events, &(elem(&1, 0) == [:convoy, :queue, :records_received]))
  end

  test "a handler that raises ends its span with :exception" do
    stream = "telemetry-exc-#{System.unique_integer([:positive])}"

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       service: Convoy.Services.Memory,
       poll_interval: 10,
       iterator_type: :trim_horizon}
    )

    ExUnit.CaptureLog.capture_log(fn ->
      :ok = Convoy.Queue.attach(stream, :bad, fn _, _ -> raise "boom" end, nil)
      :ok = Convoy.Queue.put(stream, "k", "v")

      events = events_of(stream, &match?([{[:convoy, :queue, :detach], _, _} | _], &1))

      assert {[:convoy, :handler, :exception], %{duration: _},
              %{
                kind: :error,
                reason: %RuntimeError{message: "boom"},
                stacktrace: [_ | _],
                handler_id: :bad,
                detached: true
              }} = Enum.find(events, &(elem(&1, 0) == [:convoy, :handler, :exception]))

      spans_paired(events, [:convoy, :handler])
      assert sum(events, [:convoy, :queue, :records_sent], :count) == 1
    end)
  end

  test "a pid handler's span runs from the batch sent to its ack, or to its ack timeout" do
    stream = "telemetry-pid-#{System.unique_integer([:positive])}"

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       service: Convoy.Services.Memory,
       poll_interval: 10,
       iterator_type: :trim_horizon}
    )

    :ok = Convoy.Queue.attach_handler(stream, :worker, self(), nil)
    :ok = Convoy.Queue.put(stream, "k", "v")
    assert_receive {:convoy_batch, batch}, 5_000

    assert {[:convoy, :handler, :start], _, %{handler_id: :worker, telemetry_span_context: ctx}} =
             stream
             |> events_of(&match?([{[:convoy, :handler, :start], _, _} | _], &1))
             |> List.last()

    refute_received {:telemetry_event, [:convoy, :handler, :stop], _, _}
    :ok = Convoy.Queue.ack(batch)

    assert {[:convoy, :handler, :stop], %{count: 1}, %{telemetry_span_context: ^ctx}} =
             stream
             |> events_of(&match?([{[:convoy, :handler, :stop], _, _} | _], &1))
             |> List.last()

    ExUnit.CaptureLog.capture_log(fn ->
      :ok = Convoy.Queue.attach_handler(stream, :slow, self(), nil, ack_timeout: 50)
      :ok = Convoy.Queue.put(stream, "k", "w")
      assert_receive {:convoy_batch, %{handler_id: :worker} = batch}, 5_000
      :ok = Convoy.Queue.ack(batch)
      assert_receive {:convoy_batch, %{handler_id: :slow}}, 5_000

      assert {[:convoy, :handler, :exception], %{duration: _},
              %{kind: :exit, reason: :ack_timeout, handler_id: :slow, detached: true}} =
               stream
               |> events_of(&match?([{[:convoy, :handler, :exception], _, _} | _], &1))
               |> List.last()
    end)
  end

  test "with telemetry off, Rust sends no per-request report at all" do
    Convoy.Telemetry.put_enabled(false)
    on_exit(fn -> Convoy.Telemetry.setup() end)

    stream = create_stream!(unique_stream("telemetry-off"), 1)
    me = self()

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(),
       iterator_type: :trim_horizon,
       poll_interval: 50,
       batch_timeout: 0}
    )

    reporter = Convoy.Queue.Reporter.whereis(stream)
    :erlang.trace(reporter, true, [:receive, {:tracer, me}])
    :ok = Convoy.Queue.attach(stream, :h, fn record, _ -> send(me, {:got, record.data}) end, nil)

    dispatcher = only_dispatcher(stream)

    :erlang.trace(dispatcher, true, [:receive, {:tracer, me}])
    for i <- 1..5, do: assert({:ok, _} = Convoy.Queue.put(stream, "k", "r#{i}", await: 10_000))
    for i <- 1..5, do: assert_receive({:got, "r" <> _}, 10_000) && i

    # The dispatcher got its batches, and polls went on meanwhile.
    assert_received {:trace, ^dispatcher, :receive, {:convoy_records_ready, _, _, _}}
    refute_received {:trace, _, :receive, {:convoy_put_records, _}}
    refute_received {:trace, _, :receive, {:convoy_get_records, _, _}}
    refute_received {:telemetry_event, _, _, %{stream: ^stream}}
  end
end
