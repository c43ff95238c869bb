defmodule Convoy.Leases.ClusterTest do
  # Several Convoy nodes, each its own OS process (test/leases/node.exs),
  # sharing an 8-shard stream through one KCL lease table in moto, while a
  # writer in this VM puts records at a steady rate. Each node prints every
  # record its handler sees; the test checks what was lost or doubled.
  #
  # Run alone: MIX_ENV=test mix test --only leases_cluster
  use ExUnit.Case, async: false

  import Convoy.TestSupport
  alias Convoy.TestSupport.{LeaseNode, Moto, TcpProxy}

  @moduletag :leases_cluster
  # The embedded run only: the nodes use the same Kinesis whatever the
  # emulator, so the compatibility runs would only repeat this.
  @moduletag :embedded_only
  @moduletag timeout: 600_000

  @failover 5_000
  # The split tests' backlog on the parent shard: records, and ms each.
  @backlog 400
  @backlog_ms 50
  @shards 8
  @figures Path.expand("../../../_build/lease_figures.txt", __DIR__)

  setup_all do
    %{moto: Moto.endpoint!()}
  end

  # ---------------------------------------------------------------------------

  test "two nodes share the shards; a third joins; one hands over on stop; one is killed",
       %{moto: moto} do
    stream = create_stream!(unique_stream("cluster"), @shards)
    table = "cluster-#{System.unique_integer([:positive])}"
    writer = start_writer(stream)

    # Two nodes start together: 4 ± 1 leases each, every record exactly once.
    a = start_node("node-a", stream, table, Moto.connection(moto))
    b = start_node("node-b", stream, table, Moto.connection(moto))
    started = now()
    eventually(fn -> balanced?([a, b], 3..5) end, 180_000)
    figure("two nodes balanced after #{now() - started} ms: #{inspect(counts([a, b]))}")
    await_all([a, b], written(writer))
    assert duplicates([a, b]) == %{}

    figure(
      calls_per_minute(a, "two nodes, records flowing (#{50} records/s on #{@shards} shards)")
    )

    # A third joins: leases move (one steal, then graceful handovers).
    c = start_node("node-c", stream, table, Moto.connection(moto))
    joined = now()
    eventually(fn -> balanced?([a, b, c], 2..3) end, 240_000)
    figure("third node: balanced after #{now() - joined} ms: #{inspect(counts([a, b, c]))}")
    await_all([a, b, c], written(writer))
    after_join = duplicates([a, b, c])
    assert_moved_only(after_join, [a, b, c])
    figure("third node: #{map_size(after_join)} records handled twice while leases moved")

    # A graceful stop hands its leases over with no duplicate at all.
    :ok = LeaseNode.stop(c)
    stopped = now()
    eventually(fn -> balanced?([a, b], 3..5) end, 180_000)
    figure("graceful stop: leases taken over after #{now() - stopped} ms")
    await_all([a, b, c], written(writer))
    assert duplicates([a, b, c]) == after_join

    # SIGKILL, while `b` is in the middle of a burst (some 50 records a
    # shard, 5 ms each): the survivor takes every shard once the leases
    # expire; nothing is lost, and what is handled again is, on each shard
    # the killed node held, what it handled after its last checkpoint there.
    before_kill = handled_counts([a, b, c])
    burst = for i <- 0..399, do: "b-#{i}"
    in_burst = MapSet.new(burst)
    for data <- burst, do: :ok = put_until_accepted(writer.id, "burst-" <> data, data)
    :ok = Convoy.Queue.flush(writer.id, await: 60_000)

    eventually(
      fn -> Enum.count(LeaseNode.records(b), &MapSet.member?(in_burst, &1.data)) >= 10 end,
      60_000
    )

    :ok = LeaseNode.kill(b)
    killed = now()
    eventually(fn -> length(LeaseNode.held(a)) == @shards end, 180_000)
    failover_ms = now() - killed
    total = stop_writer(writer)
    await_all([a, b, c], total, burst)
    refute_extra([a, b, c], total, burst)
    figure(calls_per_minute(a, "one node, #{@shards} idle shards"))
    after_kill = duplicates([a, b, c])
    assert_moved_only(after_kill, [a, b, c])
    again = handled_again(before_kill, [a, b, c])
    assert_replayed_after_checkpoint(again, b, a)

    moved =
      LeaseNode.records(b)
      |> Enum.filter(&(&1.data in again))
      |> Enum.map(& &1.shard_id)
      |> Enum.uniq()
      |> length()

    figure(
      "SIGKILL: all #{@shards} shards held by the survivor #{failover_ms} ms after the kill " <>
        "(failover #{@failover} ms); #{length(again)} records handled twice over #{moved} " <>
        "moved shards; #{total + length(burst)} records, none lost"
    )

    :ok = LeaseNode.stop(a)
  end

  test "a shard split while three nodes consume: parents before children, nothing lost",
       %{moto: moto} do
    split_while_consuming(moto, ~w(split-a split-b split-c), 2..3, [], "")
  end

  # The children come from the parent's last event (ChildShards); their
  # leases from the coordinators' listings, as with polling.
  @tag :fan_out
  test "a shard split while two nodes consume by enhanced fan-out: parents before children",
       %{moto: moto} do
    fan_out = [consumer: {:fan_out, "convoy-split"}, poll_interval: nil]
    split_while_consuming(moto, ~w(fan-split-a fan-split-b), 3..5, fan_out, " (fan-out)")
  end

  test "DynamoDB unreachable for a while: nodes fence themselves, then recover, nothing lost",
       %{moto: moto} do
    "http://127.0.0.1:" <> moto_port = moto
    {:ok, proxy} = TcpProxy.start_link(String.to_integer(moto_port))
    via_proxy = Moto.connection("http://127.0.0.1:#{TcpProxy.port(proxy)}")

    stream = create_stream!(unique_stream("fence"), @shards)
    table = "fence-#{System.unique_integer([:positive])}"
    writer = start_writer(stream)
    nodes = for name <- ~w(fence-a fence-b), do: start_node(name, stream, table, via_proxy)
    eventually(fn -> balanced?(nodes, 3..5) end, 180_000)
    await_all(nodes, written(writer))
    before = duplicates(nodes)

    :ok = TcpProxy.block(proxy)
    blocked = now()
    # Past failover / 2 every node has fenced itself: no record reaches a
    # handler while DynamoDB stays unreachable.
    Process.sleep(@failover)
    handled = length(all_records(nodes))
    Process.sleep(2 * @failover)
    assert length(all_records(nodes)) == handled
    :ok = TcpProxy.unblock(proxy)
    unblocked = now()

    eventually(fn -> balanced?(nodes, 3..5) end, 180_000)
    total = stop_writer(writer)
    await_all(nodes, total)
    refute_extra(nodes, total)
    doubled = map_size(duplicates(nodes)) - map_size(before)

    figure(
      "DynamoDB unreachable #{unblocked - blocked} ms: handlers idle from failover/2 on; " <>
        "recovered; #{doubled} records handled twice; #{total} records, none lost"
    )

    Enum.each(nodes, &LeaseNode.stop/1)
  end

  @tag :fan_out
  test "enhanced fan-out with leases: two nodes share one consumer name; stop and SIGKILL hand over",
       %{moto: moto} do
    stream = create_stream!(unique_stream("fan-lease"), @shards)
    table = "fan-lease-#{System.unique_integer([:positive])}"
    writer = start_writer(stream)
    # Every node reads through the same registered consumer: with leases a
    # shard has one reader, so one subscription per shard and consumer. No
    # poll_interval: only the subscriptions can hand records over.
    fan_out = [consumer: {:fan_out, "convoy-cluster"}, poll_interval: nil]

    a = start_node("fan-a", stream, table, Moto.connection(moto), fan_out)
    b = start_node("fan-b", stream, table, Moto.connection(moto), fan_out)
    eventually(fn -> balanced?([a, b], 3..5) end, 180_000)
    await_all([a, b], written(writer))
    assert duplicates([a, b]) == %{}
    assert Enum.all?([a, b], &(LeaseNode.records(&1) != []))

    # A graceful stop: the other node subscribes to the shards it gave up,
    # from their checkpoints, and nothing is handled twice.
    :ok = LeaseNode.stop(b)
    stopped = now()
    eventually(fn -> length(LeaseNode.held(a)) == @shards end, 180_000)
    handoff_ms = now() - stopped
    await_all([a, b], written(writer))
    assert duplicates([a, b]) == %{}

    # A third node joins, then is killed: its shards come back to `a`, which
    # handles again at most what followed their last checkpoints.
    c = start_node("fan-c", stream, table, Moto.connection(moto), fan_out)
    eventually(fn -> balanced?([a, c], 3..5) end, 240_000)
    await_all([a, b, c], written(writer))
    before_kill = handled_counts([a, b, c])
    :ok = LeaseNode.kill(c)
    killed = now()
    eventually(fn -> length(LeaseNode.held(a)) == @shards end, 180_000)
    failover_ms = now() - killed
    total = stop_writer(writer)
    await_all([a, b, c], total)
    refute_extra([a, b, c], total)
    doubled = duplicates([a, b, c])
    assert_moved_only(doubled, [a, b, c])
    assert_replayed_after_checkpoint(handled_again(before_kill, [a, b, c]), c, a)

    figure(
      "fan-out with leases: graceful stop, all shards held by the other node after " <>
        "#{handoff_ms} ms, no duplicate; SIGKILL, all held after #{failover_ms} ms, " <>
        "#{map_size(doubled)} records handled twice; #{total} records, none lost"
    )

    :ok = LeaseNode.stop(a)
  end

  # ---------------------------------------------------------------------------
  # Nodes

  # Nodes named `names` (with `extra` queue options), once each holds a
  # number of leases in `balanced`, consume while shard 0 splits: the
  # parent's records come before its children's, nothing is lost, the
  # children's leases name the parent, which is deleted later.
  #
  # Just before the split, a burst of @backlog records goes to the parent,
  # whose handler takes @backlog_ms per record: the parent's last record is
  # handled some 20 s after the split, while the writer's records reach the
  # children from the split on. A node that read a child before its parent
  # ended would handle a child's record before the parent's last.
  defp split_while_consuming(moto, names, balanced, extra, what) do
    parent = "shardId-000000000000"
    stream = create_stream!(unique_stream("split"), @shards)
    table = "split-#{System.unique_integer([:positive])}"
    writer = start_writer(stream)
    slow = [slow_shards: %{parent => @backlog_ms}]

    nodes =
      for name <- names, do: start_node(name, stream, table, Moto.connection(moto), extra, slow)

    eventually(fn -> balanced?(nodes, balanced) end, 240_000)
    await_all(nodes, written(writer))

    backlog = for {key, i} <- Enum.with_index(parent_keys(@backlog)), do: {key, "p-#{i}"}
    for {key, data} <- backlog, do: :ok = put_until_accepted(writer.id, key, data)
    :ok = Convoy.Queue.flush(writer.id, await: 60_000)
    backlog = Enum.map(backlog, &elem(&1, 1))

    # The middle of shard 0's hash range (the first eighth of 2^128).
    middle = div(Integer.pow(2, 128), 16) |> Integer.to_string()
    assert :ok = Convoy.Local.split_shard(endpoint(), stream, parent, middle)

    children = ["shardId-000000000008", "shardId-000000000009"]

    eventually(
      fn ->
        seen = all_records(nodes) |> Enum.map(& &1.shard_id) |> MapSet.new()
        Enum.all?(children, &MapSet.member?(seen, &1))
      end,
      240_000
    )

    total = stop_writer(writer)
    await_all(nodes, total, backlog)
    refute_extra(nodes, total, backlog)

    records = all_records(nodes)

    last_parent =
      records |> Enum.filter(&(&1.shard_id == parent)) |> Enum.map(& &1.at) |> Enum.max()

    first_child =
      records |> Enum.filter(&(&1.shard_id in children)) |> Enum.map(& &1.at) |> Enum.min()

    # All nodes run on this machine: their OS clocks are one clock.
    assert last_parent < first_child
    # The premise: the backlog was on the parent.
    assert Enum.all?(records, &(&1.data not in backlog or &1.shard_id == parent))

    # The child leases name their parent as the KCL does (parentShardId, SS).
    out =
      Moto.boto3!(
        """
        items = ddb.scan(TableName=#{inspect(table)}, ConsistentRead=True)["Items"]
        for i in items:
            print(i["leaseKey"]["S"], ",".join(i.get("parentShardId", {}).get("SS", [])), i["checkpoint"]["S"])
        """,
        moto
      )

    for child <- children, do: assert(out =~ "#{child} #{parent} ")

    # Once both children have checkpoints, the finished parent's lease is
    # deleted (by whichever node's take round sees it first).
    eventually(
      fn ->
        keys =
          Moto.boto3!(
            "print([i['leaseKey']['S'] for i in ddb.scan(TableName=#{inspect(table)}, ConsistentRead=True)['Items']])",
            moto
          )

        not String.contains?(keys, parent)
      end,
      120_000
    )

    figure(
      "split#{what}: parent #{parent} (a backlog of #{@backlog} records at #{@backlog_ms} ms " <>
        "each) finished #{div(first_child - last_parent, 1000)} ms before its children " <>
        "started; #{total + @backlog} records, none lost"
    )

    Enum.each(nodes, &LeaseNode.stop/1)
  end

  defp start_node(name, stream, table, connection, extra \\ [], node_options \\ []) do
    options =
      Keyword.merge(
        [
          stream: stream,
          kinesis: kinesis(),
          poll_interval: 200,
          shard_refresh_interval: 5_000,
          iterator_type: :trim_horizon,
          leases: [table: table, worker_id: name, failover: @failover] ++ connection
        ],
        extra
      )

    # 5 ms per record: batches are in hand when a stop or a lease move comes.
    {:ok, node} = LeaseNode.start(name, options, Keyword.merge([handler_ms: 5], node_options))

    on_exit(fn -> if Process.alive?(node) and LeaseNode.alive?(node), do: LeaseNode.kill(node) end)

    node
  end

  # DynamoDB requests one node makes per minute, per lease it holds, over 20 s.
  defp calls_per_minute(node, what) do
    first = LeaseNode.info(node)
    started = now()
    Process.sleep(20_000)
    last = LeaseNode.info(node)
    minutes = (now() - started) / 60_000
    per_minute = (last.calls - first.calls) / minutes
    leases = length(last.held)

    "DynamoDB calls, #{what}: #{round(per_minute)}/min for #{leases} leases " <>
      "(#{Float.round(per_minute / max(leases, 1), 1)} per lease per minute; failover #{@failover} ms)"
  end

  defp counts(nodes), do: Map.new(nodes, &{LeaseNode.name(&1), length(LeaseNode.held(&1))})

  # Every open shard held by exactly one of `nodes`, each holding a count in `range`.
  defp balanced?(nodes, range) do
    held = Enum.map(nodes, &LeaseNode.held/1)
    all = List.flatten(held)

    length(all) == @shards and length(Enum.uniq(all)) == @shards and
      Enum.all?(held, &(length(&1) in range))
  end

  defp all_records(nodes), do: Enum.flat_map(nodes, &LeaseNode.records/1)

  # data => times handled, for records handled more than once
  defp duplicates(nodes) do
    nodes
    |> all_records()
    |> Enum.frequencies_by(& &1.data)
    |> Map.filter(fn {_, n} -> n > 1 end)
  end

  # A record handled twice was handled by two nodes: the lease moved.
  defp assert_moved_only(duplicates, nodes) do
    by_node = Map.new(nodes, &{&1, MapSet.new(LeaseNode.records(&1), fn r -> r.data end)})

    for {data, _} <- duplicates do
      holders = Enum.count(nodes, &MapSet.member?(by_node[&1], data))
      assert holders >= 2, "#{data} handled twice by one node"
    end
  end

  # data => times handled
  defp handled_counts(nodes), do: nodes |> all_records() |> Enum.frequencies_by(& &1.data)

  # The data of the records handled once more (and so more than once) since
  # `before` (handled_counts/1).
  defp handled_again(before, nodes) do
    for {data, n} <- handled_counts(nodes), n > 1 and n > Map.get(before, data, 0), do: data
  end

  # The records in `again` (data) were handled by `from`, whose leases moved
  # to `to`, and again by `to`. On each shard they all follow the last
  # checkpoint `from` reported there (at most the one `to` started from), and
  # they are all that `from` handled after the first of them: only records
  # after the last checkpoint came again.
  defp assert_replayed_after_checkpoint(again, from, to) do
    again = MapSet.new(again)
    seen_by_to = MapSet.new(LeaseNode.records(to), & &1.data)
    from_records = LeaseNode.records(from)
    from_data = MapSet.new(from_records, & &1.data)
    checkpoints = LeaseNode.checkpoints(from)

    for data <- again do
      assert MapSet.member?(from_data, data), "#{data} handled again, not after a lease moved"
      assert MapSet.member?(seen_by_to, data), "#{data} handled again, but not by the new holder"
    end

    for {shard, records} <- Enum.group_by(from_records, & &1.shard_id) do
      records = Enum.sort_by(records, &String.to_integer(&1.sequence_number))
      replayed = Enum.drop_while(records, &(not MapSet.member?(again, &1.data)))

      assert Enum.all?(replayed, &MapSet.member?(again, &1.data)),
             "#{shard}: records handled again are not all that followed a checkpoint"

      case {replayed, Integer.parse(Map.get(checkpoints, shard, ""))} do
        {[first | _], {checkpoint, ""}} ->
          assert String.to_integer(first.sequence_number) > checkpoint,
                 "#{shard}: #{first.data} handled again, though at or before the checkpoint " <>
                   "#{LeaseNode.name(from)} stored"

        _ ->
          :ok
      end
    end

    :ok
  end

  # The writer's `count` records and `also` (data) were all handled.
  defp await_all(nodes, count, also \\ []) do
    expected = expected(count, also)

    eventually(
      fn ->
        seen = MapSet.new(all_records(nodes), & &1.data)
        MapSet.subset?(expected, seen)
      end,
      240_000
    )
  end

  # Nothing but the records written, after a quiet moment.
  defp refute_extra(nodes, count, also \\ []) do
    Process.sleep(2_000)
    expected = expected(count, also)
    extra = all_records(nodes) |> MapSet.new(& &1.data) |> MapSet.difference(expected)
    assert MapSet.size(extra) == 0, "unexpected records: #{inspect(Enum.take(extra, 5))}"
  end

  defp expected(count, also),
    do: MapSet.new(0..(count - 1)//1, &"c-#{&1}") |> MapSet.union(MapSet.new(also))

  # `n` partition keys whose MD5 falls in shard 0's hash range, the first
  # eighth of 2^128 (its top three bits are 0).
  defp parent_keys(n) do
    Stream.iterate(0, &(&1 + 1))
    |> Stream.map(&"p-#{&1}")
    |> Stream.filter(&match?(<<0::3, _::bits>>, :crypto.hash(:md5, &1)))
    |> Enum.take(n)
  end

  # ---------------------------------------------------------------------------
  # The writer: one record every 20 ms ("c-<i>", 64 partition keys) through a
  # producer-only queue in this VM.

  defp start_writer(stream) do
    id = "writer-#{System.unique_integer([:positive])}"

    start_supervised!(
      {Convoy.Queue, stream: stream, stream_id: id, kinesis: kinesis(), batch_timeout: 50},
      id: id
    )

    counter = :counters.new(1, [])
    pid = spawn_link(fn -> write_loop(id, counter, 0) end)
    %{id: id, counter: counter, pid: pid}
  end

  defp write_loop(id, counter, i) do
    receive do
      {:stop, from} -> send(from, {:stopped, i})
    after
      0 ->
        :ok = put_until_accepted(id, "k-#{rem(i, 64)}", "c-#{i}")
        :counters.put(counter, 1, i + 1)
        Process.sleep(20)
        write_loop(id, counter, i + 1)
    end
  end

  defp written(writer), do: :counters.get(writer.counter, 1)

  defp stop_writer(writer) do
    send(writer.pid, {:stop, self()})

    count =
      receive do
        {:stopped, count} -> count
      end

    :ok = Convoy.Queue.flush(writer.id, await: 60_000)
    count
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp figure(line) do
    IO.puts("lease figures: " <> line)
    File.mkdir_p!(Path.dirname(@figures))
    File.write!(@figures, line <> "\n", [:append])
  end
end
