defmodule Convoy.Leases.QueueTest do
  # One node (this VM) with `leases:`: checkpoints in the KCL table, which an
  # independent client (boto3) reads with the KCL's names, types and values.
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  alias Convoy.TestSupport.Moto

  @moduletag :leases
  @moduletag :capture_log

  @middle_hash_key "170141183460469231731687303715884105728"

  setup_all do
    %{moto: Moto.endpoint!()}
  end

  defp start_queue(stream, table, moto, extra \\ []) do
    test = self()

    options =
      Keyword.merge(
        [
          stream: stream,
          kinesis: kinesis(),
          poll_interval: 100,
          iterator_type: :trim_horizon,
          leases: [table: table, worker_id: "node-one", failover: 3_000] ++ Moto.connection(moto),
          handlers: [{:fwd, fn record, _ -> send(test, {:record, record}) end, nil}]
        ],
        extra
      )

    id = make_ref()
    start_supervised!({Convoy.Queue, options}, id: id, restart: :temporary)
    id
  end

  defp receive_records(count), do: receive_records(count, 60_000)

  defp refute_more_records do
    refute_receive {:record, _}, 1_500
  end

  test "checkpoints go to the lease table with KCL names, types and values", %{moto: moto} do
    stream = create_stream!(unique_stream("leases"), 2)
    table = "convoy-#{System.unique_integer([:positive])}"
    :ok = raw_put!(stream, 40)

    queue = start_queue(stream, table, moto)
    records = receive_records(40)
    refute_more_records()
    assert length(Enum.uniq_by(records, & &1.data)) == 40

    assert Convoy.Leases.held(stream) == ["shardId-000000000000", "shardId-000000000001"]

    last =
      records
      |> Enum.group_by(& &1.shard_id)
      |> Map.new(fn {shard, rs} -> {shard, List.last(rs).sequence_number} end)

    # The dispatcher stored the checkpoint right after the batch.
    eventually(fn ->
      scan(table, moto) |> Enum.map(&{&1["leaseKey"]["S"], &1["checkpoint"]["S"]}) |> Map.new() ==
        last
    end)

    for item <- scan(table, moto) do
      assert %{"S" => "shardId-" <> _} = item["leaseKey"]
      assert %{"S" => "node-one"} = item["leaseOwner"]
      assert %{"N" => counter} = item["leaseCounter"]
      assert String.to_integer(counter) >= 2
      assert %{"S" => sequence} = item["checkpoint"]
      assert sequence =~ ~r/^\d+$/
      assert %{"N" => "0"} = item["checkpointSubSequenceNumber"]
      assert %{"N" => "0"} = item["ownerSwitchesSinceCheckpoint"]
      refute Map.has_key?(item, "parentShardId")
    end

    # Stopped gracefully: leases given up (no owner), checkpoints kept.
    stop_supervised!(queue)
    assert Enum.all?(scan(table, moto), &(not Map.has_key?(&1, "leaseOwner")))

    # A new run (same table) resumes after the checkpoints: only new records.
    :ok = raw_put!(stream, 10, start: 40)
    start_queue(stream, table, moto)
    records = receive_records(10)
    refute_more_records()

    assert Enum.sort(Enum.map(records, & &1.data)) ==
             Enum.sort(for i <- 40..49, do: "record-#{i}")
  end

  test "a KCL checkpoint inside an aggregated record: the rest of it comes, and the sub-sequence number is stored",
       %{moto: moto} do
    stream = create_stream!(unique_stream("leases-agg"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    producer = {:producer, stream}

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       stream_id: producer,
       kinesis: kinesis(),
       aggregation: true,
       batch_timeout: 60_000},
      id: producer
    )

    # Two aggregated Kinesis records of 5 user records each.
    for batch <- ["a", "b"] do
      for i <- 0..4, do: :ok = Convoy.Queue.put(producer, "k", "#{batch}#{i}")
      :ok = Convoy.Queue.flush(producer, await: 30_000)
    end

    assert [%{sequence_number: first}, %{sequence_number: second}] = raw_get!(stream)

    # A KCL worker handled a0..a2 and checkpointed there (sub-sequence
    # number 2), then let its lease go.
    Moto.boto3!(
      """
      ddb.create_table(TableName=#{inspect(table)},
          KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
          AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
          BillingMode="PAY_PER_REQUEST")
      ddb.put_item(TableName=#{inspect(table)}, Item={
          "leaseKey": {"S": "shardId-000000000000"},
          "leaseCounter": {"N": "7"},
          "checkpoint": {"S": #{inspect(first)}},
          "checkpointSubSequenceNumber": {"N": "2"},
          "ownerSwitchesSinceCheckpoint": {"N": "0"}})
      """,
      moto
    )

    start_queue(stream, table, moto)
    records = receive_records(7)
    refute_more_records()
    assert Enum.map(records, & &1.data) == ~w(a3 a4 b0 b1 b2 b3 b4)

    # Convoy's checkpoint at the end of the second record names its last
    # user record, as a KCL worker's would.
    eventually(fn ->
      [item] = scan(table, moto)

      item["checkpoint"] == %{"S" => second} and
        item["checkpointSubSequenceNumber"] == %{"N" => "4"}
    end)
  end

  test "self-fencing: records wait while renewals fail, then flow again", %{moto: moto} do
    "http://127.0.0.1:" <> moto_port = moto
    {:ok, proxy} = Convoy.TestSupport.TcpProxy.start_link(String.to_integer(moto_port))
    via_proxy = Moto.connection("http://127.0.0.1:#{Convoy.TestSupport.TcpProxy.port(proxy)}")
    stream = create_stream!(unique_stream("fence"), 2)
    table = "convoy-#{System.unique_integer([:positive])}"
    shards = ["shardId-000000000000", "shardId-000000000001"]
    test = self()

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(),
       poll_interval: 100,
       iterator_type: :trim_horizon,
       leases: [table: table, failover: 10_000] ++ via_proxy,
       handlers: [{:fwd, fn record, _ -> send(test, {:record, record}) end, nil}]}
    )

    eventually(fn -> Convoy.Leases.held(stream) == shards end)
    :ok = raw_put!(stream, 10)
    records = receive_records(10)

    # Every checkpoint stored before DynamoDB goes away.
    for {shard, rs} <- Enum.group_by(records, & &1.shard_id) do
      last = List.last(rs).sequence_number
      # A plain record: sub-sequence number 0, as the KCL writes it.
      eventually(fn -> Convoy.Leases.Checkpoint.fetch(nil, stream, shard) == {:ok, {last, 0}} end)
    end

    # DynamoDB unreachable: within failover / 2 the shards are fenced (still
    # held, not yet expired), and records read meanwhile wait.
    Convoy.TestTelemetry.subscribe()
    :ok = Convoy.TestSupport.TcpProxy.block(proxy)
    eventually(fn -> not Enum.any?(shards, &Convoy.Leases.may_dispatch?(stream, &1)) end)
    # ...while still held: fenced before the lease could expire.
    assert Convoy.Leases.held(stream) == shards
    :ok = raw_put!(stream, 10, start: 10)
    refute_receive {:record, _}, 2_000

    # The failed DynamoDB calls were logged and emitted as telemetry.
    assert_receive {:telemetry_event, [:convoy, :lease, :error], %{count: 1},
                    %{stream_id: ^stream} = error},
                   10_000

    assert error.stream == stream
    assert error.operation in [:renew, :take]
    assert error.shard_id in [:all | shards]

    # Back: the leases are renewed or taken again, and the records flow.
    :ok = Convoy.TestSupport.TcpProxy.unblock(proxy)
    records = receive_records(10)
    refute_more_records()

    assert Enum.sort(Enum.map(records, & &1.data)) ==
             Enum.sort(for i <- 10..19, do: "record-#{i}")
  end

  test "a SHARD_END that could not be stored: the parent is read again once its lease is back, and its children follow",
       %{moto: moto} do
    # 1: DynamoDB unreachable now; 2: the outage was started.
    outage = :atomics.new(2, signed: false)

    # DynamoDB goes away as the first SHARD_END write reaches it (the write
    # with it), and stays away until the test says.
    via_proxy =
      moto_proxy(moto, fn client, server, headers, request ->
        if headers["x-amz-target"] == "DynamoDB_20120810.UpdateItem" and
             request =~ "SHARD_END" and :atomics.compare_exchange(outage, 2, 0, 1) == :ok,
           do: :atomics.put(outage, 1, 1)

        if :atomics.get(outage, 1) == 1,
          do: :gen_tcp.close(client),
          else: :gen_tcp.send(server, request)
      end)

    stream = create_stream!(unique_stream("lost-end"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    parent = "shardId-000000000000"
    start_queue(stream, table, moto, leases: [table: table, failover: 2_000] ++ via_proxy)

    :ok = raw_put!(stream, 5)
    records = receive_records(5)
    last = List.last(records).sequence_number
    eventually(fn -> Convoy.Leases.Checkpoint.fetch(nil, stream, parent) == {:ok, {last, 0}} end)

    [{_, dispatcher, _, _}] =
      DynamicSupervisor.which_children(
        Convoy.Queue.Topology.whereis(Convoy.Consumer.ShardDispatcher, stream)
      )

    dispatcher_ref = Process.monitor(dispatcher)

    # The shard splits; its end is read, and its SHARD_END is retried until
    # the lease expires (DynamoDB unreachable), then abandoned.
    Convoy.TestTelemetry.subscribe()
    :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle_hash_key)

    assert_receive {:telemetry_event, [:convoy, :lease, :error], %{count: 1},
                    %{operation: :checkpoint, shard_id: ^parent} = error},
                   30_000

    assert error.stream == stream
    assert error.stream_id == stream
    eventually(fn -> Convoy.Leases.held(stream) == [] end)
    # The parent's dispatcher gives up on its SHARD_END only now, at its next
    # attempt, and stops.
    assert_receive {:DOWN, ^dispatcher_ref, :process, _, :normal}, 10_000

    # Back: the parent's lease is taken again, the parent read again from
    # its checkpoint (nothing left in it), its end stored, and its children
    # read.
    :atomics.put(outage, 1, 0)
    :ok = raw_put!(stream, 10, start: 5)
    children = receive_records(10)
    refute_more_records()
    assert Enum.all?(children, &(&1.shard_id != parent))

    assert Enum.sort(Enum.map(children, & &1.data)) ==
             Enum.sort(for i <- 5..14, do: "record-#{i}")
  end

  test "from a map of sequence numbers, on a stream that split: the parent from its position, then its children",
       %{moto: moto} do
    stream = create_stream!(unique_stream("leased-from"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    :ok = raw_put!(stream, 10)
    [%{shard_id: parent} | _] = before = read_all(stream)
    :ok = Convoy.Local.split_shard(endpoint(), stream, parent, @middle_hash_key)
    :ok = raw_put!(stream, 10, start: 10)

    from = Enum.at(before, 4).sequence_number
    start_queue(stream, table, moto, iterator_type: {:after_sequence_number, %{parent => from}})

    records = receive_records(15)
    refute_more_records()
    {from_parent, from_children} = Enum.split_while(records, &(&1.shard_id == parent))
    assert Enum.map(from_parent, & &1.data) == for(i <- 5..9, do: "record-#{i}")

    assert Enum.sort(Enum.map(from_children, & &1.data)) ==
             Enum.sort(for i <- 10..19, do: "record-#{i}")
  end

  test "a checkpoint DynamoDB stored but whose answer was lost: the lease is still held, nothing handed twice",
       %{moto: moto} do
    # 1: the answer was dropped; 2: GetItem requests (the lease read back).
    dropped = :atomics.new(2, signed: false)

    # The first checkpoint write reaches DynamoDB, and its connection closes
    # before the answer comes back.
    via_proxy =
      moto_proxy(moto, fn client, server, headers, request ->
        :gen_tcp.send(server, request)

        if headers["x-amz-target"] == "DynamoDB_20120810.GetItem",
          do: :atomics.add(dropped, 2, 1)

        if headers["x-amz-target"] == "DynamoDB_20120810.UpdateItem" and
             request =~ ~s("checkpoint") and :atomics.compare_exchange(dropped, 1, 0, 1) == :ok,
           do: :gen_tcp.close(client)
      end)

    stream = create_stream!(unique_stream("lost-answer"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    shard = "shardId-000000000000"
    Convoy.TestTelemetry.subscribe()
    start_queue(stream, table, moto, leases: [table: table, failover: 3_000] ++ via_proxy)
    eventually(fn -> Convoy.Leases.held(stream) == [shard] end)

    :ok = raw_put!(stream, 5)
    first = receive_records(5)

    # The write failed for the writer (and was retried), though stored.
    assert_receive {:telemetry_event, [:convoy, :lease, :error], _, %{operation: :checkpoint}},
                   10_000

    assert :atomics.get(dropped, 1) == 1
    last = List.last(first).sequence_number
    eventually(fn -> Convoy.Leases.Checkpoint.fetch(nil, stream, shard) == {:ok, {last, 0}} end)

    # The shard goes on: later records come once, and the lease never left.
    :ok = raw_put!(stream, 5, start: 5)
    second = receive_records(5)
    refute_more_records()

    assert Enum.map(first ++ second, & &1.data) == for(i <- 0..9, do: "record-#{i}")
    refute_received {:telemetry_event, [:convoy, :lease, :lost], _, _}
    assert Convoy.Leases.held(stream) == [shard]
    # Kept by reading the lease back, not by a retry that came first.
    assert :atomics.get(dropped, 2) >= 1
  end

  test "after two splits, the cleaned-up ancestors get no lease again: nothing is read twice",
       %{moto: moto} do
    stream = create_stream!(unique_stream("two-splits"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    quarter = Integer.pow(2, 126)
    split = &(:ok = Convoy.Local.split_shard(endpoint(), stream, &1, Integer.to_string(&2)))

    # A splits into B and C, then B and C each into two: records at every level.
    :ok = raw_put!(stream, 10, keys: 64)
    {:ok, [%{shard_id: a}]} = Convoy.Local.list_shards(endpoint(), stream)
    split.(a, 2 * quarter)
    :ok = raw_put!(stream, 20, start: 10, keys: 64)
    {:ok, shards} = Convoy.Local.list_shards(endpoint(), stream)
    [b, c] = for %{parent_shard_id: ^a, shard_id: id} <- shards, do: id
    split.(b, quarter)
    split.(c, 3 * quarter)
    :ok = raw_put!(stream, 60, start: 30, keys: 64)
    {:ok, shards} = Convoy.Local.list_shards(endpoint(), stream)
    grandchildren = for %{shard_id: id} <- shards, id not in [a, b, c], do: id

    start_queue(stream, table, moto, shard_refresh_interval: 500)
    records = receive_records(90)
    assert Enum.sort(Enum.map(records, & &1.data)) == Enum.sort(for i <- 0..89, do: "record-#{i}")

    # The finished leases are deleted, A's first (its children have
    # checkpoints), then B's and C's.
    leases = fn -> scan(table, moto) |> Enum.map(& &1["leaseKey"]["S"]) |> Enum.sort() end
    eventually(fn -> leases.() == Enum.sort(grandchildren) end)

    # Later syncs (every take round, 3 s here) create no lease for A again.
    refute_receive {:record, _}, 7_000
    assert leases.() == Enum.sort(grandchildren)
  end

  test "DynamoDB unreachable at start: the queue starts, and leases come once it is back",
       %{moto: moto} do
    "http://127.0.0.1:" <> moto_port = moto
    {:ok, proxy} = Convoy.TestSupport.TcpProxy.start_link(String.to_integer(moto_port))
    :ok = Convoy.TestSupport.TcpProxy.block(proxy)
    via_proxy = Moto.connection("http://127.0.0.1:#{Convoy.TestSupport.TcpProxy.port(proxy)}")
    stream = create_stream!(unique_stream("late"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"
    test = self()
    :ok = raw_put!(stream, 5)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(),
       poll_interval: 100,
       iterator_type: :trim_horizon,
       leases: [table: table, failover: 3_000] ++ via_proxy,
       handlers: [{:fwd, fn record, _ -> send(test, {:record, record}) end, nil}]}
    )

    refute_receive {:record, _}, 1_000
    :ok = Convoy.TestSupport.TcpProxy.unblock(proxy)
    assert length(receive_records(5)) == 5
    refute_more_records()
    assert Convoy.Leases.held(stream) == ["shardId-000000000000"]
  end

  test "leases are taken only while handlers read, and given up when the last one detaches",
       %{moto: moto} do
    stream = create_stream!(unique_stream("idle"), 2)
    table = "convoy-#{System.unique_integer([:positive])}"
    test = self()
    # An id other than the stream's name: the lease events carry both.
    id = {:idle, stream}
    :ok = raw_put!(stream, 6)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       stream_id: id,
       kinesis: kinesis(),
       poll_interval: 100,
       iterator_type: :trim_horizon,
       leases: [table: table, failover: 1_000] ++ Moto.connection(moto)}
    )

    # No handler: several take rounds go by, and nothing is taken.
    Process.sleep(3_000)
    assert Convoy.Leases.held(id) == []
    # So a pull read would hold no shard: it is refused, not answered empty.
    assert Convoy.Queue.get(id, 10) == {:error, :leases}

    Convoy.TestTelemetry.subscribe()
    :ok = Convoy.Queue.attach_handler(id, :fwd, fn r, _ -> send(test, {:record, r}) end, nil)
    assert length(receive_records(6)) == 6
    assert Convoy.Leases.held(id) == ["shardId-000000000000", "shardId-000000000001"]

    for shard <- ["shardId-000000000000", "shardId-000000000001"] do
      assert_receive {:telemetry_event, [:convoy, :lease, :taken], %{count: 1},
                      %{stream: ^stream, stream_id: ^id, shard_id: ^shard}}
    end

    # Detached: the leases go back to the table, owner removed.
    :ok = Convoy.Queue.detach_handler(id, :fwd)
    eventually(fn -> Enum.all?(scan(table, moto), &(not Map.has_key?(&1, "leaseOwner"))) end)
    assert Convoy.Leases.held(id) == []
  end

  test ":latest with leases: the start is pinned on the node, the table keeps KCL's LATEST",
       %{moto: moto} do
    # (Records put before the start are not used here: the embedded
    # emulator's AT_TIMESTAMP reads whole seconds, with or without leases.)
    stream = create_stream!(unique_stream("latest"), 2)
    table = "convoy-#{System.unique_integer([:positive])}"
    start_queue(stream, table, moto, iterator_type: :latest)
    eventually(fn -> length(Convoy.Leases.held(stream)) == 2 end)

    # Pinned to the consumer's start (a {:at_timestamp, ms} kept on this
    # node); the table still says LATEST.
    eventually(fn ->
      Enum.all?(Convoy.Leases.held(stream), fn shard ->
        match?({:ok, {:at_timestamp, _}}, Convoy.Leases.Checkpoint.fetch(nil, stream, shard))
      end)
    end)

    assert Enum.all?(scan(table, moto), &(&1["checkpoint"]["S"] == "LATEST"))

    :ok = raw_put!(stream, 5)
    records = receive_records(5)
    refute_more_records()
    assert Enum.sort(Enum.map(records, & &1.data)) == Enum.sort(for i <- 0..4, do: "record-#{i}")
  end

  test "a table migrated to KCL 3.x refuses the queue with a clear error", %{moto: moto} do
    stream = create_stream!(unique_stream("leases"), 1)
    table = "convoy-#{System.unique_integer([:positive])}"

    Moto.boto3!(
      """
      t = #{inspect(table <> "-CoordinatorState")}
      ddb.create_table(TableName=t, KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                       AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
      ddb.put_item(TableName=t, Item={"key": {"S": "Migration3.0"}, "cv": {"S": "CLIENT_VERSION_3X_WITH_ROLLBACK"}})
      """,
      moto
    )

    Process.flag(:trap_exit, true)

    {result, log} =
      ExUnit.CaptureLog.with_log(fn ->
        Convoy.Queue.start_link(
          stream: stream,
          kinesis: kinesis(),
          leases: [table: table] ++ Moto.connection(moto)
        )
      end)

    assert {:error, reason} = result
    assert inspect(reason) =~ "kcl3_table"
    assert log =~ "migrated to KCL 3.x"
  end

  test "bad lease options are refused at start" do
    for {leases, message} <- [
          {[], "`:table` is required"},
          {[table: "ab"], "DynamoDB table name"},
          {[table: "orders", failover: 10], "at least 300"},
          {[table: "orders", worker_id: ""], "non-empty string"},
          {[table: "orders", endpoint_url: 5], "non-empty string"},
          {[table: "orders", nope: 1], "unknown keys [:nope]"},
          {:yes, "expected"}
        ] do
      error =
        assert_raise ArgumentError, fn ->
          Convoy.Queue.child_spec(stream: "s", leases: leases)
        end

      assert error.message =~ ":leases"
      assert error.message =~ message
    end

    assert %{} = Convoy.Queue.child_spec(stream: "s", leases: [table: "orders", failover: 5_000])
  end

  # DynamoDB settings through a proxy in front of moto that hands each
  # request to `on_request.(client, server, headers, request)`.
  defp moto_proxy(moto, on_request) do
    alias Convoy.TestSupport.TcpProxy
    "http://127.0.0.1:" <> port = moto

    from_client = fn client, server, buffer ->
      TcpProxy.each_http_request(buffer, &on_request.(client, server, &1, &2))
    end

    {:ok, proxy} = TcpProxy.start_link(String.to_integer(port), from_client: from_client)
    Moto.connection("http://127.0.0.1:#{TcpProxy.port(proxy)}")
  end

  defp scan(table, moto) do
    out =
      Moto.boto3!(
        "print(json.dumps(ddb.scan(TableName=#{inspect(table)}, ConsistentRead=True)['Items']))",
        moto
      )

    out |> String.split("\n", trim: true) |> List.last() |> decode_json()
  end

  # The scan printed by Python's json module: objects of strings only.
  defp decode_json(text) do
    {value, ""} = json_value(String.trim(text))
    value
  end

  defp json_value("[" <> rest), do: json_list(String.trim_leading(rest), [])
  defp json_value("{" <> rest), do: json_object(String.trim_leading(rest), %{})
  defp json_value("\"" <> rest), do: json_string(rest, "")

  defp json_list("]" <> rest, acc), do: {Enum.reverse(acc), rest}

  defp json_list(text, acc) do
    {value, rest} = json_value(text)

    case String.trim_leading(rest) do
      "," <> rest -> json_list(String.trim_leading(rest), [value | acc])
      "]" <> rest -> {Enum.reverse([value | acc]), rest}
    end
  end

  defp json_object("}" <> rest, acc), do: {acc, rest}

  defp json_object(text, acc) do
    {key, rest} = json_value(text)
    ":" <> rest = String.trim_leading(rest)
    {value, rest} = json_value(String.trim_leading(rest))
    acc = Map.put(acc, key, value)

    case String.trim_leading(rest) do
      "," <> rest -> json_object(String.trim_leading(rest), acc)
      "}" <> rest -> {acc, rest}
    end
  end

  defp json_string("\\\"" <> rest, acc), do: json_string(rest, acc <> "\"")
  defp json_string("\"" <> rest, acc), do: {acc, rest}

  defp json_string(<<c::utf8, rest::binary>>, acc),
    do: json_string(rest, <<acc::binary, c::utf8>>)
end
