defmodule Convoy.Leases.LeaseClientTest do
  # The NIF's lease client against moto's DynamoDB: the KCL 2.x schema, and
  # the counter condition on every write.
  use ExUnit.Case, async: true

  alias Convoy.Leases.Lease
  alias Convoy.Native
  alias Convoy.TestSupport.Moto

  @moduletag :leases
  @moduletag :capture_log

  setup_all do
    %{endpoint: Moto.endpoint!()}
  end

  defp client(endpoint, table, worker) do
    config = Convoy.KinesisConfig.resolve(Moto.connection(endpoint))

    {:ok, client} =
      Native.call(
        &Native.lease_client_new(Convoy.KinesisConfig.to_native(config), table, worker, &1)
      )

    client
  end

  defp call(fun), do: Native.call(fun, 30_000)

  defp table, do: "leases-#{System.unique_integer([:positive])}"

  test "creates the table on demand, then finds it", %{endpoint: endpoint} do
    table = table()
    a = client(endpoint, table, "a")
    assert {:ok, :created} = call(&Native.lease_prepare(a, &1))
    assert {:ok, :exists} = call(&Native.lease_prepare(a, &1))
    assert {:ok, []} = call(&Native.lease_list(a, &1))

    out =
      Moto.boto3!(
        "print(json.dumps(ddb.describe_table(TableName=#{inspect(table)})['Table']['KeySchema']))",
        endpoint
      )

    assert out =~ ~s("AttributeName": "leaseKey")
    assert out =~ ~s("KeyType": "HASH")
  end

  test "take, renew, checkpoint and release are conditional on the counter", %{endpoint: endpoint} do
    table = table()
    a = client(endpoint, table, "worker-a")
    b = client(endpoint, table, "worker-b")
    {:ok, _} = call(&Native.lease_prepare(a, &1))

    lease = %Lease{key: "shardId-000000000000", checkpoint: "TRIM_HORIZON", parent_shard_ids: []}
    assert {:ok, true} = call(&Native.lease_create(a, lease, &1))
    assert {:ok, false} = call(&Native.lease_create(b, lease, &1))

    # a takes it at counter 0; b, with the same stale view, cannot.
    assert {:ok, 1} = call(&Native.lease_take(a, lease.key, 0, nil, &1))
    assert {:error, :lease_lost} = call(&Native.lease_take(b, lease.key, 0, nil, &1))

    assert {:ok, [{"shardId-000000000000", :ok}]} = call(&Native.lease_renew_all(a, &1))
    assert {:ok, :ok} = call(&Native.lease_checkpoint(a, lease.key, "4959000000000001", 0, &1))

    assert {:ok, [%Lease{owner: "worker-a", counter: 3, checkpoint: "4959000000000001"}]} =
             call(&Native.lease_list(b, &1))

    # b steals it (as after expiry), with the counter it saw: a's next
    # checkpoint and renewal fail, and a holds nothing any more.
    assert {:ok, 4} = call(&Native.lease_take(b, lease.key, 3, "worker-a", &1))

    assert {:error, :lease_lost} =
             call(&Native.lease_checkpoint(a, lease.key, "4959000000000009", 0, &1))

    assert Native.lease_held(a) == []
    assert {:ok, []} = call(&Native.lease_renew_all(a, &1))

    assert {:ok,
            [
              %Lease{
                owner: "worker-b",
                checkpoint: "4959000000000001",
                owner_switches_since_checkpoint: 1
              }
            ]} = call(&Native.lease_list(a, &1))

    # Released: no owner, counter moved; b's checkpoint now fails too.
    assert {:ok, :ok} = call(&Native.lease_release(b, lease.key, &1))
    assert {:ok, [%Lease{owner: nil, counter: 5}]} = call(&Native.lease_list(a, &1))

    assert {:error, :lease_lost} =
             call(&Native.lease_checkpoint(b, lease.key, "4959000000000009", 0, &1))
  end

  test "a finished lease can be deleted, an unfinished one cannot", %{endpoint: endpoint} do
    table = table()
    a = client(endpoint, table, "a")
    {:ok, _} = call(&Native.lease_prepare(a, &1))

    assert {:ok, true} =
             call(&Native.lease_create(a, %Lease{key: "p", checkpoint: "TRIM_HORIZON"}, &1))

    assert {:ok, false} = call(&Native.lease_delete(a, "p", &1))
    assert {:ok, 1} = call(&Native.lease_take(a, "p", 0, nil, &1))
    assert {:ok, :ok} = call(&Native.lease_checkpoint(a, "p", "SHARD_END", 0, &1))
    assert {:ok, true} = call(&Native.lease_delete(a, "p", &1))
    assert {:ok, []} = call(&Native.lease_list(a, &1))
  end

  test "items that are not shard leases are ignored, paging is followed", %{endpoint: endpoint} do
    table = table()
    a = client(endpoint, table, "a")
    {:ok, _} = call(&Native.lease_prepare(a, &1))

    # A KCL 3.x worker-metrics entity, an item without a counter, and enough
    # leases of ~1 KB to take more than one 1 MB scan page... kept small here:
    # moto pages at 1 MB too, so 1,200 items of 1 KB need two pages.
    Moto.boto3!(
      """
      t = #{inspect(table)}
      ddb.put_item(TableName=t, Item={"leaseKey": {"S": "worker-1"}, "entityType": {"S": "WORKER_METRICS_STATS"}, "leaseCounter": {"N": "1"}})
      ddb.put_item(TableName=t, Item={"leaseKey": {"S": "junk"}, "note": {"S": "no counter"}})
      pad = "x" * 1000
      for i in range(1200):
          ddb.put_item(TableName=t, Item={"leaseKey": {"S": "shardId-%012d" % i}, "leaseCounter": {"N": "7"},
                                          "checkpoint": {"S": "TRIM_HORIZON"}, "checkpointSubSequenceNumber": {"N": "0"},
                                          "ownerSwitchesSinceCheckpoint": {"N": "0"}, "pad": {"S": pad}})
      """,
      endpoint
    )

    {:ok, leases} = call(&Native.lease_list(a, &1))
    assert length(leases) == 1200

    assert Enum.all?(
             leases,
             &match?(%Lease{counter: 7, owner: nil, checkpoint: "TRIM_HORIZON"}, &1)
           )

    assert Native.lease_calls(a) >= 3
  end

  test "a table migrated to KCL 3.x is refused", %{endpoint: endpoint} do
    table = table()

    Moto.boto3!(
      """
      t = #{inspect(table <> "-CoordinatorState")}
      ddb.create_table(TableName=t, KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                       AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
      ddb.put_item(TableName=t, Item={"key": {"S": "Migration3.0"}, "cv": {"S": "CLIENT_VERSION_3X"}})
      """,
      endpoint
    )

    a = client(endpoint, table, "a")
    state_table = table <> "-CoordinatorState"

    assert {:error, {:kcl3_table, ^state_table, "CLIENT_VERSION_3X"}} =
             call(&Native.lease_prepare(a, &1))

    # Rolled back to 2.x: accepted.
    Moto.boto3!(
      "ddb.put_item(TableName=#{inspect(state_table)}, Item={\"key\": {\"S\": \"Migration3.0\"}, \"cv\": {\"S\": \"CLIENT_VERSION_2X\"}})",
      endpoint
    )

    assert {:ok, :created} = call(&Native.lease_prepare(a, &1))
  end

  test "DynamoDB unreachable: an error, not a hang or a crash" do
    port = Moto.free_port()
    a = client("http://127.0.0.1:#{port}", table(), "a")
    assert {:error, {:aws, "DispatchFailure", _}} = call(&Native.lease_list(a, &1))
    assert {:error, :lease_lost} = call(&Native.lease_checkpoint(a, "s", "1", 0, &1))
  end

  # How many shards one node can hold: a node must renew all its leases
  # within failover / 3. The times go to _build/lease_figures.txt (for
  # bench/LEASES.md), never into an assertion.
  @figures Path.expand("../../../_build/lease_figures.txt", __DIR__)

  test "one node holds 500 leases: every one renewed in one round, and the table scanned",
       %{endpoint: endpoint} do
    table = table()
    a = client(endpoint, table, "a")
    {:ok, _} = call(&Native.lease_prepare(a, &1))

    Moto.boto3!(
      """
      t = #{inspect(table)}
      for i in range(500):
          ddb.put_item(TableName=t, Item={"leaseKey": {"S": "shardId-%012d" % i}, "leaseCounter": {"N": "1"},
                                          "checkpoint": {"S": "TRIM_HORIZON"}, "checkpointSubSequenceNumber": {"N": "0"},
                                          "ownerSwitchesSinceCheckpoint": {"N": "0"}})
      """,
      endpoint
    )

    {scan_us, {:ok, leases}} = :timer.tc(fn -> call(&Native.lease_list(a, &1)) end)
    assert length(leases) == 500

    for lease <- leases do
      assert {:ok, 2} = call(&Native.lease_take(a, lease.key, lease.counter, nil, &1))
    end

    rounds =
      for _ <- 1..3 do
        {us, {:ok, outcomes}} = :timer.tc(fn -> call(&Native.lease_renew_all(a, &1)) end)
        assert length(outcomes) == 500 and Enum.all?(outcomes, &match?({_, :ok}, &1))
        div(us, 1000)
      end

    # Every renewal moved the counter: take (2), then three rounds.
    {:ok, after_rounds} = call(&Native.lease_list(a, &1))
    assert Enum.all?(after_rounds, &match?(%Lease{counter: 5, owner: "a"}, &1))

    File.mkdir_p!(Path.dirname(@figures))

    File.write!(
      @figures,
      "one node, 500 leases in moto: renewal rounds took #{Enum.join(rounds, ", ")} ms; " <>
        "a scan of the table #{div(scan_us, 1000)} ms\n",
      [:append]
    )
  end
end
