defmodule Convoy.Leases do
  @moduledoc """
  Shard leases shared by many nodes through a KCL 2.x lease table in
  DynamoDB, so that every record of a stream is handled by one node, and a
  node that starts (or a shard that moves) resumes at the checkpoint the
  previous holder stored.

  Enabled per queue with the `:leases` option; without it a queue reads
  every shard itself, as before:

      {Convoy.Queue,
       stream: "orders",
       poll_interval: 1_000,
       iterator_type: :trim_horizon,
       leases: [table: "orders-consumer"]}

  The table follows the KCL 2.x schema and write rules, so Java, Python or
  Node KCL 2.x workers of the same application can share it (see
  `Convoy.Leases.Lease` for the attributes). Each queue runs a
  `Convoy.Leases.Coordinator` that renews the leases it holds every
  `failover / 3` ms, takes expired or free leases (and steals at most one
  per round from the most loaded worker) to reach `ceil(leases / workers)`,
  and stores checkpoints in the lease items (`Convoy.Leases.Checkpoint`).

  This module holds what the consumer asks at run time: which shards this
  node holds, and whether a shard's records may be handed to handlers now.
  Both are ETS reads in one public table owned by the `:convoy` application.

  ## Example

      Convoy.Leases.held("orders")
      #=> ["shardId-000000000001", "shardId-000000000004"]
  """

  @table __MODULE__

  @doc false
  def child_spec(_),
    do: %{id: __MODULE__, start: {Agent, :start_link, [&create_table/0]}}

  defp create_table do
    :ets.new(@table, [:set, :public, :named_table, read_concurrency: true])
  end

  @doc """
  True when the queue `stream_id` uses leases.

  ## Example

      Convoy.Leases.enabled?("orders")
  """
  @spec enabled?(term) :: boolean
  def enabled?(stream_id), do: :ets.member(@table, {stream_id, :client})

  @doc """
  The shard ids this node holds for `stream_id`, sorted.

  ## Example

      Convoy.Leases.held("orders")
  """
  @spec held(term) :: [String.t()]
  def held(stream_id) do
    :ets.select(@table, [{{{stream_id, :held, :"$1"}, :_, :active}, [], [:"$1"]}]) |> Enum.sort()
  end

  @doc """
  True when this node holds the lease of `shard_id`.

  ## Example

      Convoy.Leases.held?("orders", "shardId-000000000001")
  """
  @spec held?(term, String.t()) :: boolean
  def held?(stream_id, shard_id) do
    match?([{_, _, :active}], :ets.lookup(@table, {stream_id, :held, shard_id}))
  end

  @doc """
  True when records of `shard_id` may be handed to handlers now: the lease
  is held and was renewed less than `failover / 2` ms ago (self-fencing: a
  node that cannot renew stops before any other node may take the lease).

  ## Example

      if Convoy.Leases.may_dispatch?("orders", shard_id), do: :dispatch, else: :wait
  """
  @spec may_dispatch?(term, String.t()) :: boolean
  def may_dispatch?(stream_id, shard_id) do
    case :ets.lookup(@table, {stream_id, :held, shard_id}) do
      [{_, fence_at, :active}] -> System.monotonic_time(:millisecond) < fence_at
      _ -> false
    end
  end

  @doc """
  True while the queue `stream_id` reads its shards (a handler is attached
  and polling is on): only then does its coordinator take leases.

  ## Example

      Convoy.Leases.consuming?("orders")
  """
  @spec consuming?(term) :: boolean
  def consuming?(stream_id) do
    match?([{_, true}], :ets.lookup(@table, {stream_id, :consuming}))
  end

  @doc false
  # Set by the consumer; the coordinator is told at once.
  def set_consuming(stream_id, consuming?) do
    :ets.insert(@table, {{stream_id, :consuming}, consuming?})

    case client(stream_id) do
      {:ok, _client, coordinator} -> send(coordinator, :take)
      :error -> :ok
    end

    :ok
  end

  @doc false
  def put_client(stream_id, client, coordinator),
    do: :ets.insert(@table, {{stream_id, :client}, client, coordinator})

  @doc false
  def client(stream_id) do
    case :ets.lookup(@table, {stream_id, :client}) do
      [{_, client, coordinator}] -> {:ok, client, coordinator}
      [] -> :error
    end
  end

  @doc false
  def hold(stream_id, shard_id, fence_at),
    do: :ets.insert(@table, {{stream_id, :held, shard_id}, fence_at, :active})

  @doc false
  # A renewal moves the fence, whatever the lease's mode.
  def renew(stream_id, shard_id, fence_at),
    do: :ets.update_element(@table, {stream_id, :held, shard_id}, {2, fence_at})

  @doc false
  # Being handed over: no new batch, but its last checkpoint may be stored.
  def releasing(stream_id, shard_id),
    do: :ets.update_element(@table, {stream_id, :held, shard_id}, {3, :releasing})

  @doc false
  # Held, active or being handed over: checkpoints may still be stored.
  def holding?(stream_id, shard_id), do: :ets.member(@table, {stream_id, :held, shard_id})

  @doc false
  def drop(stream_id, shard_id), do: :ets.delete(@table, {stream_id, :held, shard_id})

  @doc false
  # With its checkpointSubSequenceNumber (0 for a sentinel or a whole record).
  def put_checkpoint(stream_id, shard_id, checkpoint, sub_sequence_number \\ 0),
    do: :ets.insert(@table, {{stream_id, :checkpoint, shard_id}, checkpoint, sub_sequence_number})

  @doc false
  def checkpoint(stream_id, shard_id) do
    case :ets.lookup(@table, {stream_id, :checkpoint, shard_id}) do
      [{_, checkpoint, _sub}] -> checkpoint
      [] -> nil
    end
  end

  @doc false
  def checkpoint_sub_sequence_number(stream_id, shard_id) do
    case :ets.lookup(@table, {stream_id, :checkpoint, shard_id}) do
      [{_, _checkpoint, sub}] -> sub
      [] -> 0
    end
  end

  @doc false
  # Everything a queue's coordinator published, removed when it starts or stops.
  def clear(stream_id) do
    :ets.match_delete(@table, {{stream_id, :client}, :_, :_})
    :ets.match_delete(@table, {{stream_id, :_, :_}, :_, :_})
    :ets.match_delete(@table, {{stream_id, :_, :_}, :_})
    :ok
  end
end
