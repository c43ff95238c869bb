defmodule Convoy.FanOutTest do
  # Enhanced fan-out (`consumer: {:fan_out, name}`): records pushed over
  # SubscribeToShard. The embedded emulator and kinesis-mock serve it;
  # kinesalite does not (the tag :fan_out is excluded there).
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  alias Convoy.TestSupport.TcpProxy

  @moduletag :fan_out
  @moduletag timeout: 600_000

  @middle_hash_key "170141183460469231731687303715884105728"

  defp start_queue!(stream, opts) do
    opts =
      Keyword.merge(
        [
          stream: stream,
          kinesis: kinesis(),
          iterator_type: :trim_horizon,
          consumer: {:fan_out, "convoy-test"}
        ],
        opts
      )

    start_supervised!({Convoy.Queue, opts}, id: stream)
    stream
  end

  defp forward(tag) do
    me = self()
    fn record, _config -> send(me, {tag, record}) end
  end

  defp collect(tag, count, acc \\ []) do
    if count == 0 do
      Enum.reverse(acc)
    else
      receive do
        {^tag, record} -> collect(tag, count - 1, [record | acc])
      after
        30_000 -> flunk("received #{length(acc)} records, #{count} missing")
      end
    end
  end

  defp assert_shard_order(records) do
    for {_shard, group} <- Enum.group_by(records, & &1.shard_id) do
      seqs = Enum.map(group, &String.to_integer(&1.sequence_number))
      assert seqs == Enum.sort(seqs)
    end
  end

  test "20,000 records on 4 shards reach a handler exactly once, in shard order, without polling" do
    stream = create_stream!(unique_stream("fan-out"), 4)
    count = volume(20_000)
    raw_put!(stream, count, keys: 64)
    # No :poll_interval: a pushed consumer reads as soon as a handler is attached.
    id = start_queue!(stream, [])
    :ok = Convoy.Queue.attach_handler(id, :all, forward(:rec), nil)

    records = collect(:rec, count)
    refute_receive {:rec, _}, 1_000

    assert Enum.map(records, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..(count - 1), do: "record-#{i}")

    assert_shard_order(records)
    assert records |> Enum.map(& &1.shard_id) |> Enum.uniq() |> length() == 4
  end

  test "a batch held by a pid handler holds the subscription back; nothing is lost" do
    stream = create_stream!(unique_stream("fan-out-slow"), 1)
    id = start_queue!(stream, [])
    :ok = Convoy.Queue.attach_handler(id, :slow, self(), nil)

    raw_put!(stream, 10)
    assert_receive {:convoy_batch, first}, 30_000
    raw_put!(stream, 10, start: 10)
    # While the first batch is unacknowledged, no second one comes.
    refute_receive {:convoy_batch, _}, 1_500
    Convoy.Queue.ack(first)

    rest = receive_batches(20 - length(first.records))
    datas = Enum.map(first.records ++ rest, & &1.data)
    assert datas == for(i <- 0..19, do: "record-#{i}")
    refute_receive {:convoy_batch, _}, 1_000
  end

  defp receive_batches(0), do: []

  defp receive_batches(missing) do
    assert_receive {:convoy_batch, batch}, 30_000
    Convoy.Queue.ack(batch)
    batch.records ++ receive_batches(missing - length(batch.records))
  end

  @tag :fan_out_lifecycle
  test "from :latest, only records written after the start arrive; after a detach, only new ones" do
    stream = create_stream!(unique_stream("fan-out-latest"), 1)
    raw_put!(stream, 10)
    # Arrival times may be kept in whole seconds: start in a later second.
    Process.sleep(1_100)
    id = start_queue!(stream, iterator_type: :latest)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)
    Process.sleep(1_000)
    raw_put!(stream, 10, start: 10)
    assert Enum.map(collect(:rec, 10), & &1.data) == for(i <- 10..19, do: "record-#{i}")
    refute_receive {:rec, _}, 1_000

    # Re-attaching resumes after the checkpoint: nothing read twice.
    :ok = Convoy.Queue.detach_handler(id, :h)
    raw_put!(stream, 10, start: 20)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)
    assert Enum.map(collect(:rec, 10), & &1.data) == for(i <- 20..29, do: "record-#{i}")
    refute_receive {:rec, _}, 1_500
  end

  @tag :embedded_only
  test "a batch held past the end of its subscription: the next one resumes without a gap" do
    {:ok, local} = Convoy.Local.start(subscription_seconds: 1)
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("fan-out-held"), 1, endpoint)
    id = start_queue!(stream, kinesis: kinesis(endpoint))
    :ok = Convoy.Queue.attach_handler(id, :slow, self(), nil)

    raw_put!(stream, 10, endpoint: endpoint)
    assert_receive {:convoy_batch, first}, 30_000
    raw_put!(stream, 10, start: 10, endpoint: endpoint)
    # Held for three subscription lifetimes.
    Process.sleep(3_000)
    Convoy.Queue.ack(first)

    rest = receive_batches(20 - length(first.records))
    assert Enum.map(first.records ++ rest, & &1.data) == for(i <- 0..19, do: "record-#{i}")
    refute_receive {:convoy_batch, _}, 1_500
    Convoy.Local.stop(local)
  end

  @tag :fan_out_lifecycle
  test "a split during a subscription: the parent's records before its children's, nothing lost" do
    stream = create_stream!(unique_stream("fan-out-split"), 1)
    id = start_queue!(stream, shard_refresh_interval: 500)
    :ok = Convoy.Queue.attach_handler(id, :h, self(), nil)

    raw_put!(stream, 100)
    # Every batch of the parent is acknowledged but the last, which is held:
    # the parent cannot be read to its end while it is.
    {held, before_split} = hold_last(100, 30_000)
    parent = held.shard_id

    {:ok, [%{shard_id: ^parent}]} = Convoy.Local.list_shards(endpoint(), stream)
    :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle_hash_key)
    raw_put!(stream, 200, start: 100)
    # The children hold records and are known (listed every 500 ms, or
    # named by the parent's last event), yet nothing of theirs comes.
    refute_receive {:convoy_batch, _}, 2_000
    :ok = Convoy.Queue.ack(held)

    after_split = receive_batches(200)
    refute_receive {:convoy_batch, _}, 1_000

    assert Enum.all?(after_split, &(&1.shard_id != parent))
    assert after_split |> Enum.map(& &1.shard_id) |> Enum.uniq() |> length() == 2

    assert Enum.map(before_split ++ after_split, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..299, do: "record-#{i}")

    assert_shard_order(after_split)
  end

  # kinesis-mock names no ChildShards in its events (the consumer lists the
  # shards there); the embedded emulator and AWS do.
  @tag :fan_out_lifecycle
  @tag :embedded_only
  test "after a split the children start from the last event's ChildShards, without listing shards" do
    stream = create_stream!(unique_stream("fan-out-children"), 1)
    # No periodic listing during the test: only the start's.
    id = start_queue!(stream, shard_refresh_interval: 600_000)
    listings = trace_listings(id)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)

    raw_put!(stream, 50)
    before_split = collect(:h, 50)
    assert_receive {:trace, _, :call, {Convoy.Services.Kinesis.Source, :list_shards, _}}

    {:ok, [%{shard_id: parent}]} = Convoy.Local.list_shards(endpoint(), stream)
    :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle_hash_key)
    raw_put!(stream, 100, start: 50)
    after_split = collect(:h, 100)
    refute_receive {:h, _}, 1_000

    children = after_split |> Enum.map(& &1.shard_id) |> Enum.uniq()
    assert length(children) == 2 and parent not in children

    assert Enum.map(before_split ++ after_split, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..149, do: "record-#{i}")

    assert_shard_order(after_split)
    # The parent's end named its children: no ListShards after the start.
    refute_received {:trace, _, :call, {Convoy.Services.Kinesis.Source, :list_shards, _}}
    :erlang.trace(listings, false, [:call])
  end

  # Traces the queue's consumer process (and the tasks it starts) calling
  # ListShards: each call arrives as a trace message. Returns the pid.
  defp trace_listings(id) do
    consumer = GenServer.whereis(Convoy.Consumer.name(id))
    # A pattern applies to loaded modules only.
    Code.ensure_loaded!(Convoy.Services.Kinesis.Source)
    1 = :erlang.trace_pattern({Convoy.Services.Kinesis.Source, :list_shards, 1}, true, [:global])
    :erlang.trace(consumer, true, [:call, :set_on_spawn, {:tracer, self()}])
    consumer
  end

  @tag :fan_out_lifecycle
  test "the stream consumer is registered once, reused by the next queue, and deregistered on request" do
    stream = create_stream!(unique_stream("fan-out-reuse"), 1)
    name = "reuse-#{System.unique_integer([:positive])}"

    for round <- 0..1 do
      id = start_queue!(stream, consumer: {:fan_out, name})
      :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)
      raw_put!(stream, 5, start: round * 5)
      # The second queue resumes from the first one's checkpoint.
      records = collect(:rec, 5)
      refute_receive {:rec, _}, 1_000

      assert Enum.map(records, & &1.data) ==
               for(i <- (round * 5)..(round * 5 + 4), do: "record-#{i}")

      stop_supervised!(stream)
    end

    assert :ok = Convoy.Services.Kinesis.deregister_consumer(stream, name, kinesis())
    assert :ok = Convoy.Services.Kinesis.deregister_consumer(stream, name, kinesis())
  end

  @tag :embedded_only
  test "subscriptions that end every second are renewed from the last record: nothing lost or repeated" do
    {:ok, local} = Convoy.Local.start(subscription_seconds: 1)
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("fan-out-renew"), 2, endpoint)
    id = start_queue!(stream, kinesis: kinesis(endpoint))
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)

    # Six waves over three seconds: at least two subscriptions per shard
    # end and are renewed while records keep coming.
    for wave <- 0..5 do
      raw_put!(stream, 50, start: wave * 50, endpoint: endpoint)
      Process.sleep(500)
    end

    records = collect(:rec, 300)
    refute_receive {:rec, _}, 1_500

    assert Enum.map(records, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..299, do: "record-#{i}")

    assert_shard_order(records)

    # Renewals did happen: each shard was subscribed to more than once.
    opened = for {shard, :opened} <- Convoy.Local.subscriptions(local), do: shard
    assert opened |> Enum.frequencies() |> Map.values() |> Enum.all?(&(&1 >= 2))
    assert opened |> Enum.uniq() |> length() == 2
    Convoy.Local.stop(local)
  end

  @tag :embedded_only
  test "a dropped connection: the reader subscribes again and the records written meanwhile arrive" do
    {:ok, local} = Convoy.Local.start()
    endpoint = Convoy.Local.endpoint(local)
    {:ok, proxy} = TcpProxy.start_link(URI.parse(endpoint).port)
    via_proxy = "http://127.0.0.1:#{TcpProxy.port(proxy)}"
    stream = create_stream!(unique_stream("fan-out-cut"), 1, endpoint)

    id = start_queue!(stream, kinesis: kinesis(via_proxy), retry_backoff: 50, max_backoff: 500)

    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)
    raw_put!(stream, 20, endpoint: endpoint)
    assert Enum.map(collect(:rec, 20), & &1.data) == for(i <- 0..19, do: "record-#{i}")

    # Every connection through the proxy is closed, the subscription's too,
    # and new ones are refused for a while; records keep coming meanwhile.
    :ok = TcpProxy.block(proxy)
    raw_put!(stream, 20, start: 20, endpoint: endpoint)
    Process.sleep(1_500)
    :ok = TcpProxy.unblock(proxy)
    raw_put!(stream, 20, start: 40, endpoint: endpoint)

    records = collect(:rec, 40)
    refute_receive {:rec, _}, 1_500
    assert Enum.map(records, & &1.data) == for(i <- 20..59, do: "record-#{i}")
    opened = for {_shard, :opened} <- Convoy.Local.subscriptions(local), do: 1
    assert length(opened) >= 2
    Convoy.Local.stop(local)
  end

  @tag :embedded_only
  test "two queues racing for one consumer's subscription (ResourceInUse) each get every record once" do
    {:ok, local} = Convoy.Local.start()
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("fan-out-race"), 1, endpoint)
    name = "race-#{System.unique_integer([:positive])}"
    me = self()

    for queue <- [:a, :b] do
      start_supervised!(
        {Convoy.Queue,
         stream: stream,
         stream_id: "#{stream}-#{queue}",
         kinesis: kinesis(endpoint),
         iterator_type: :trim_horizon,
         consumer: {:fan_out, name},
         retry_backoff: 100,
         max_backoff: 1_000},
        id: queue
      )

      :ok =
        Convoy.Queue.attach_handler(
          "#{stream}-#{queue}",
          :h,
          fn r, _ -> send(me, {queue, r}) end,
          nil
        )
    end

    raw_put!(stream, 20, endpoint: endpoint)
    # One queue's subscription is refused while the other's lives (less
    # than 5 s); after that the refused one takes the shard over, the other
    # is cut off and takes it back 5 s later, and so on.
    Process.sleep(6_000)
    raw_put!(stream, 20, start: 20, endpoint: endpoint)

    for queue <- [:a, :b] do
      records = collect(queue, 40)
      assert Enum.map(records, & &1.data) == for(i <- 0..39, do: "record-#{i}")
    end

    refute_receive {_queue, %Convoy.Record{}}, 1_500
    assert {_, :in_use} = List.keyfind(Convoy.Local.subscriptions(local), :in_use, 1)
    Convoy.Local.stop(local)
  end

  @tag :embedded_only
  test "a dropped connection: the emulator restarts, the consumer registers again, new records arrive" do
    {:ok, local} = Convoy.Local.start()
    endpoint = Convoy.Local.endpoint(local)
    port = URI.parse(endpoint).port
    stream = create_stream!(unique_stream("fan-out-drop"), 1, endpoint)
    id = start_queue!(stream, kinesis: kinesis(endpoint), retry_backoff: 50, max_backoff: 500)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)

    raw_put!(stream, 20, endpoint: endpoint)
    assert length(collect(:rec, 20)) == 20

    # The emulator dies with its streams and consumers; a fresh one comes
    # back on the same port and the stream is created again.
    Convoy.Local.stop(local)
    {:ok, local} = Convoy.Local.start(port: port)
    create_stream!(stream, 1, endpoint)
    raw_put!(stream, 20, start: 100, endpoint: endpoint)

    records = collect(:rec, 20)
    refute_receive {:rec, _}, 1_000
    assert Enum.map(records, & &1.data) == for(i <- 100..119, do: "record-#{i}")
    Convoy.Local.stop(local)
  end

  test "every pushed event reaches telemetry with millis_behind_latest, empty ones included" do
    Convoy.TestTelemetry.subscribe()
    stream = create_stream!(unique_stream("fan-out-telemetry"), 1)
    id = start_queue!(stream, [])
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:rec), nil)
    raw_put!(stream, 10)
    assert length(collect(:rec, 10)) == 10

    events = telemetry_until(stream, 10)
    stops = for {[:convoy, :get_records, :stop], m, _} <- events, do: m
    assert Enum.all?(stops, &is_integer(&1.millis_behind_latest))
    # Empty events are reported too, not only those that carried records.
    assert Enum.any?(stops, &(&1.count == 0))

    received = for {[:convoy, :queue, :records_received], m, _} <- events, do: m.count
    assert Enum.sum(received) == 10
  end

  # Telemetry events of `stream` until `count` records were reported
  # received and an empty event came after them.
  defp telemetry_until(stream, count, acc \\ []) do
    receive do
      {:telemetry_event, event, measurements, %{stream: ^stream}} ->
        acc = [{event, measurements, nil} | acc]
        received = for {[:convoy, :queue, :records_received], m, _} <- acc, do: m.count

        case acc do
          [{[:convoy, :queue, :records_received], %{count: 0}, _} | _]
          when length(received) > 1 ->
            if Enum.sum(received) >= count,
              do: Enum.reverse(acc),
              else: telemetry_until(stream, count, acc)

          _ ->
            telemetry_until(stream, count, acc)
        end
    after
      30_000 -> flunk("telemetry so far: #{inspect(Enum.reverse(acc))}")
    end
  end

  test "fan-out is refused for a service that cannot do it" do
    assert_raise ArgumentError, ~r/enhanced fan-out needs service Convoy.Services.Kinesis/, fn ->
      Convoy.Queue.child_spec(
        stream: "x",
        service: Convoy.Services.Memory,
        consumer: {:fan_out, "billing"}
      )
    end

    assert_raise ArgumentError, ~r/invalid Convoy.Queue option :consumer/, fn ->
      Convoy.Queue.child_spec(stream: "x", consumer: {:fan_out, "no spaces"})
    end
  end
end
