defmodule Convoy.TopologyTest do
  # Each process of a queue's tree is killed in turn: no record that was
  # acknowledged or buffered is lost, and the queue serves puts and handlers
  # again. Handlers attached at run time survive every restart short of the
  # whole queue's; the queue's own restart re-attaches the `handlers:` option.
  #
  # How soon it serves again is measured, not asserted: for each process,
  # the time from the kill to the first put accepted and to the first record
  # put after the kill reaching the handler is appended to
  # _build/recovery_figures.txt (and printed).
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  alias Convoy.Queue.Topology

  @figures Path.expand("../../_build/recovery_figures.txt", __DIR__)

  @kinds [
    :queue,
    :reporter,
    :handler_store,
    :service,
    :producer,
    :consumer_tree,
    :dispatcher_supervisor,
    :consumer,
    :dispatcher
  ]

  test "the tree has the documented shape" do
    stream = create_stream!(unique_stream("shape"), 1)
    start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis()})

    queue = Topology.whereis(Convoy.Queue, stream)

    assert [
             {Convoy.Queue.Reporter, _, :worker, _},
             {Convoy.Consumer.Handlers, _, :worker, _},
             {Convoy.Services.Kinesis, service, :supervisor, _}
           ] = queue |> Supervisor.which_children() |> Enum.reverse()

    assert [
             {Convoy.Services.Kinesis.Producer, _, :worker, _},
             {Convoy.Consumer, consumer_tree, :supervisor, _}
           ] = service |> Supervisor.which_children() |> Enum.reverse()

    assert [{:dispatchers, _, :supervisor, _}, {Convoy.Consumer, _, :worker, _}] =
             consumer_tree |> Supervisor.which_children() |> Enum.reverse()
  end

  for kind <- @kinds do
    test "killing the #{kind} loses no record and the queue serves again" do
      kind = unquote(kind)
      stream = create_stream!(unique_stream("kill-#{kind}"), 2)
      me = self()
      # With the time it was handled, for the recovery figures.
      forward = fn record, _ -> send(me, {:got, record.data, now()}) end

      options = [
        stream: stream,
        kinesis: kinesis(),
        iterator_type: :trim_horizon,
        poll_interval: 50,
        # Records put before the kill stay buffered until a flush.
        batch_timeout: 600_000,
        # Only a restart of the whole queue needs this; the others keep the
        # handler attached below.
        handlers: if(kind == :queue, do: [{:fwd, forward, nil}], else: [])
      ]

      start_supervised!({Convoy.Queue, options})
      if kind != :queue, do: :ok = Convoy.Queue.attach_handler(stream, :fwd, forward, nil)

      # Acknowledged and handled before the kill.
      handled = for i <- 1..50, do: "handled-#{i}"
      Enum.each(handled, &(:ok = Convoy.Queue.put(stream, "k#{rem(byte_size(&1), 7)}", &1)))
      :ok = Convoy.Queue.flush(stream, await: 10_000)
      Enum.each(handled, &assert_receive({:got, ^&1, _}, 10_000))

      # Buffered, not yet sent, when the process is killed.
      buffered = for i <- 1..50, do: "buffered-#{i}"
      Enum.each(buffered, &(:ok = Convoy.Queue.put(stream, "k#{rem(byte_size(&1), 7)}", &1)))

      victim = find(kind, stream)
      ref = Process.monitor(victim)
      killed_at = now()
      Process.exit(victim, :kill)
      assert_receive {:DOWN, ^ref, :process, ^victim, :killed}

      # Puts are accepted again once the tree has restarted what it must.
      [first | _] = after_kill = for i <- 1..50, do: "after-#{i}"
      put_eventually(stream, first)
      put_accepted = now() - killed_at
      Enum.each(tl(after_kill), &put_eventually(stream, &1))
      eventually(fn -> Convoy.Queue.flush(stream, await: 10_000) == :ok end, 30_000)

      # Every record reaches the handler; a restarted consumer may hand over
      # again what its predecessor had not checkpointed, never fewer.
      expected = MapSet.new(handled ++ buffered ++ after_kill)
      handled_at = receive_until(MapSet.new(buffered ++ after_kill), %{})
      received = MapSet.new(Map.keys(handled_at))
      assert MapSet.subset?(MapSet.new(buffered ++ after_kill), received)
      assert MapSet.subset?(received, expected)

      first_handled = Enum.min(for data <- after_kill, do: handled_at[data]) - killed_at

      figure(
        "kill #{kind}: first put accepted after #{put_accepted} ms, " <>
          "first record put after the kill handled after #{first_handled} ms"
      )

      # Kinesis holds each record exactly once: nothing was put twice.
      stored = read_all(stream) |> Enum.map(& &1.data) |> Enum.sort()
      assert stored == Enum.sort(MapSet.to_list(expected))
    end
  end

  test "a producer lane that panics reports its records as failed, and the queue restarts its producer" do
    stream = create_stream!(unique_stream("lane-panic"), 1)
    {old_owner, producer} = start_held_queue!(stream)
    ref = Process.monitor(old_owner)

    lost = for i <- 1..20, do: "lost-#{i}"
    Enum.each(lost, &(:ok = Convoy.Queue.put(stream, "k", &1)))

    {probe, _log} =
      ExUnit.CaptureLog.with_log(fn ->
        :ok = Convoy.Native.debug_lane_panic(producer, false)

        failed =
          for _ <- lost do
            assert_receive {:failed, %{data: data, reason: {:panic, _}}}, 10_000
            data
          end

        assert Enum.sort(failed) == Enum.sort(lost)
        refute_receive {:failed, _}, 200
        # The dead lane takes no record: a put is refused while the producer
        # is closed, or taken by the producer that replaced it (and then sent).
        probe =
          case Convoy.Queue.put(stream, "k", "probe") do
            :ok -> ["probe"]
            {:error, reason} when reason in [:closed, :unknown_stream] -> []
          end

        # ...and its owner is replaced by the supervisor.
        assert_receive {:DOWN, ^ref, :process, ^old_owner, {:producer_panic, _}}, 10_000
        probe
      end)

    put_eventually(stream, "after")
    :ok = Convoy.Queue.flush(stream, await: 10_000)
    assert Enum.sort(["after" | probe]) == Enum.sort(Enum.map(read_all(stream), & &1.data))
  end

  for aggregation <- [false, true] do
    test "a lane that panics while it cuts a request still answers every awaiting caller (aggregation: #{aggregation})" do
      stream = create_stream!(unique_stream("cut-panic"), 1)
      {owner, producer} = start_held_queue!(stream, aggregation: unquote(aggregation))
      ref = Process.monitor(owner)

      # One key each: in per-key order a second record of a key would wait
      # for the next request, and the cut would not take a second record.
      records = for i <- 1..5, do: {"key-#{i}", "awaited-#{i}"}

      callers =
        for {key, data} <- records do
          {data, Task.async(fn -> Convoy.Queue.put(stream, key, data, await: 60_000) end)}
        end

      eventually(fn -> Convoy.Queue.stats(stream).buffered == length(records) end)

      {outcomes, _log} =
        ExUnit.CaptureLog.with_log(fn ->
          # The cut takes one record into the request, then panics.
          :ok = Convoy.Native.debug_lane_panic(producer, true)
          :ok = Convoy.Queue.flush(stream)

          outcomes = for {data, task} <- callers, into: %{}, do: {data, Task.await(task, 70_000)}
          assert_receive {:DOWN, ^ref, :process, ^owner, {:producer_panic, _}}, 10_000
          outcomes
        end)

      # Every caller hears of the panic; none waits out its timeout.
      assert Enum.all?(Map.values(outcomes), &match?({:error, {:panic, _}}, &1)),
             inspect(outcomes)

      # The record in the request being cut is lost (no on_failure); the
      # rest, still buffered, are reported, each once.
      dropped =
        for {data, {:error, {:panic, "the record was dropped without an outcome"}}} <- outcomes,
            do: data

      assert length(dropped) == 1

      reported =
        for _ <- 2..length(records) do
          assert_receive {:failed, %{data: data, reason: {:panic, _}}}, 10_000
          data
        end

      refute_receive {:failed, _}, 200
      assert Enum.sort(dropped ++ reported) == Enum.sort(Map.keys(outcomes))
    end
  end

  # A queue whose records wait in their lane (one unless `opts` say) until
  # flushed, its failures sent here as {:failed, failure}; returns the
  # producer's owner and the producer.
  defp start_held_queue!(stream, opts \\ []) do
    me = self()

    defaults = [
      stream: stream,
      kinesis: kinesis(),
      batch_timeout: 600_000,
      max_in_flight: 1,
      on_failure: fn failure -> send(me, {:failed, failure}) end
    ]

    start_supervised!({Convoy.Queue, Keyword.merge(defaults, opts)})

    [{owner, {_, %{producer: producer}}}] = Registry.lookup(Convoy.Registry, {:handle, stream})
    {owner, producer}
  end

  test "a lane that panics: the other lanes send what they hold before the producer is replaced" do
    stream = create_stream!(unique_stream("lane-panic-others"), 1)
    {owner, producer} = start_held_queue!(stream, max_in_flight: 2, kinesis: slow_puts())
    ref = Process.monitor(owner)

    held = for i <- 1..40, do: "held-#{i}"
    Enum.each(held, &(:ok = Convoy.Queue.put(stream, "key-#{&1}", &1)))

    {_, _log} =
      ExUnit.CaptureLog.with_log(fn ->
        :ok = Convoy.Native.debug_lane_panic(producer, false)
        assert_receive {:DOWN, ^ref, :process, ^owner, {:producer_panic, _}}, 20_000
      end)

    # The owner ended (and its successor started) only once the lane that
    # lived had sent all it held.
    assert %{buffered: 0, in_flight: 0} = Convoy.Native.producer_stats(producer)

    failed = for {:failed, %{data: data}} <- drain_mailbox(), do: data
    stored = Enum.map(read_all(stream), & &1.data)
    assert failed != [] and stored != []
    assert Enum.sort(failed ++ stored) == Enum.sort(held)
  end

  test "a killed producer's lanes finish before its successor takes puts: a key keeps its order" do
    stream = create_stream!(unique_stream("kill-order"), 1)
    # In per-key order one key's records go one request (a second) each.
    {owner, _producer} = start_held_queue!(stream, batch_timeout: 0, kinesis: slow_puts())

    before = for i <- 1..4, do: "before-#{i}"
    Enum.each(before, &(:ok = Convoy.Queue.put(stream, "k", &1)))
    Process.exit(owner, :kill)

    # The first put the successor takes comes after all of them.
    put_eventually(stream, "after", "k")
    :ok = Convoy.Queue.flush(stream, await: 30_000)
    assert Enum.map(read_all(stream), & &1.data) == before ++ ["after"]
  end

  test "a killed producer's lanes fail what they still hold at :shutdown, all at once" do
    # Nothing listens there: every PutRecords fails to connect and is retried.
    {:ok, socket} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(socket)
    :ok = :gen_tcp.close(socket)
    stream = unique_stream("kill-deadline")
    Convoy.TestTelemetry.subscribe()

    {owner, _producer} =
      start_held_queue!(stream,
        batch_timeout: 0,
        shutdown: 1_000,
        kinesis: kinesis("http://127.0.0.1:#{port}")
      )

    # One key, per-key order: one record a request, the rest buffered.
    held = for i <- 1..30, do: "held-#{i}"
    Enum.each(held, &(:ok = Convoy.Queue.put(stream, "k", &1)))
    Process.exit(owner, :kill)

    failed =
      for _ <- held do
        assert_receive {:failed, %{data: data}}, 20_000
        data
      end

    assert Enum.sort(failed) == Enum.sort(held)
    refute_receive {:failed, _}, 300

    reports =
      for {:telemetry_event, [:convoy, :put, :failed], %{count: n}, %{stream_id: ^stream}} <-
            drain_mailbox(),
          do: n

    # The request in flight, then the rest together: not a report a record.
    assert Enum.sum(reports) == 30
    assert length(reports) <= 3, inspect(reports)
  end

  # Kinesis settings through a proxy that holds every PutRecords a second.
  defp slow_puts do
    alias Convoy.TestSupport.TcpProxy
    "http://127.0.0.1:" <> port = endpoint()

    slow = fn _client, server, buffer ->
      TcpProxy.each_http_request(buffer, fn headers, request ->
        if headers["x-amz-target"] == "Kinesis_20131202.PutRecords", do: Process.sleep(1_000)
        :gen_tcp.send(server, request)
      end)
    end

    {:ok, proxy} = TcpProxy.start_link(String.to_integer(port), from_client: slow)
    kinesis("http://127.0.0.1:#{TcpProxy.port(proxy)}")
  end

  defp drain_mailbox(acc \\ []) do
    receive do
      message -> drain_mailbox([message | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp find(:queue, stream), do: Topology.whereis(Convoy.Queue, stream)
  defp find(:reporter, stream), do: Topology.whereis(Convoy.Queue.Reporter, stream)
  defp find(:handler_store, stream), do: Topology.whereis(Convoy.Consumer.Handlers, stream)
  defp find(:service, stream), do: child(find(:queue, stream), Convoy.Services.Kinesis)
  defp find(:consumer_tree, stream), do: child(find(:service, stream), Convoy.Consumer)
  defp find(:consumer, stream), do: Topology.whereis(Convoy.Consumer, stream)

  defp find(:dispatcher_supervisor, stream),
    do: Topology.whereis(Convoy.Consumer.ShardDispatcher, stream)

  defp find(:producer, stream) do
    [{owner, _handle}] = Registry.lookup(Convoy.Registry, {:handle, stream})
    owner
  end

  defp find(:dispatcher, stream) do
    sup = find(:dispatcher_supervisor, stream)
    [{_, pid, _, _} | _] = DynamicSupervisor.which_children(sup)
    pid
  end

  defp child(sup, id) do
    {^id, pid, _, _} = List.keyfind(Supervisor.which_children(sup), id, 0)
    pid
  end

  # While the tree restarts, a put may answer :closed or :unknown_stream.
  defp put_eventually(stream, data, key \\ nil) do
    key = key || "k#{rem(byte_size(data), 7)}"
    eventually(fn -> Convoy.Queue.put(stream, key, data) == :ok end)
  end

  # The records handled (data => when first), until every wanted one was.
  defp receive_until(wanted, received) do
    if MapSet.subset?(wanted, MapSet.new(Map.keys(received))) do
      # Whatever else is still coming (redeliveries) arrives within a poll.
      drain(received)
    else
      receive do
        {:got, data, at} -> receive_until(wanted, Map.put_new(received, data, at))
      after
        30_000 ->
          flunk("missing: #{inspect(MapSet.difference(wanted, MapSet.new(Map.keys(received))))}")
      end
    end
  end

  defp drain(received) do
    receive do
      {:got, data, at} -> drain(Map.put_new(received, data, at))
    after
      500 -> received
    end
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp figure(line) do
    IO.puts("recovery figures: " <> line)
    File.mkdir_p!(Path.dirname(@figures))
    File.write!(@figures, line <> "\n", [:append])
  end
end
