defmodule Convoy.Leases.Checkpoint do
  @moduledoc """
  The checkpoint store of a queue with `:leases`: checkpoints live in the
  lease items of the KCL table, where every node (and KCL workers) finds
  them. A queue with `:leases` uses it in place of its `:checkpoint` option.

  A store is a conditional write on the lease counter, so a node that lost a
  lease can never move its checkpoint. While DynamoDB fails, the write is
  retried with backoff (holding up the shard, which reads nothing more) for
  as long as the lease is held; once the lease is lost the checkpoint is
  abandoned, and the shard's next holder starts after the previous
  checkpoint.

  `fetch/3` reads the checkpoints of the last lease-table scan (or this
  node's own writes): `"SHARD_END"` is `:shard_end`, a sequence number is
  `{sequence_number, checkpointSubSequenceNumber}`, and `TRIM_HORIZON`,
  `LATEST` and `AT_TIMESTAMP` mean "no checkpoint yet", so the queue's
  `:iterator_type` applies.

  Sub-sequence numbers follow the KCL: a checkpoint `(s, n)` means the user
  records of Kinesis record `s` up to and including sub-sequence number `n`
  were processed (a record that is not aggregated counts as sub-sequence
  number 0). A shard resumes at `s` and skips those, so a checkpoint a KCL
  worker stored in the middle of an aggregated record loses none of its
  remaining user records. A batch ending with an aggregated record is
  stored with its last user record's sub-sequence number, so a KCL worker
  taking over does not hand that record's user records again.

  ## Example

      {Convoy.Queue, stream: "orders", leases: [table: "orders-consumer"]}
      # checkpoints go to the lease table; no :checkpoint option needed
  """
  @behaviour Convoy.Checkpoint

  require Logger

  alias Convoy.{Leases, Native, Telemetry}

  @impl true
  @doc """
  The store's state is the queue's stream name (`:stream`, or `:stream_id`
  when none is given), for the metadata of its telemetry events.

  ## Example

      {:ok, "orders"} = Convoy.Leases.Checkpoint.init(stream: "orders", stream_id: "orders")
  """
  @spec init(keyword) :: {:ok, term}
  def init(options), do: {:ok, Keyword.get_lazy(options, :stream, fn -> options[:stream_id] end)}

  @impl true
  @doc """
  The checkpoint of a shard as last seen in the lease table.

  ## Example

      Convoy.Leases.Checkpoint.fetch("orders", "orders", "shardId-000000000000")
      #=> {:ok, {"49590338271490256608559692538361571095921575989136588898", 0}}
  """
  @spec fetch(term, term, String.t()) :: {:ok, Convoy.Checkpoint.position()} | :error
  def fetch(_state, stream_id, shard_id) do
    case Leases.checkpoint(stream_id, shard_id) do
      "SHARD_END" -> {:ok, :shard_end}
      {:at_timestamp, ms} -> {:ok, {:at_timestamp, ms}}
      sentinel when sentinel in [nil, "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] -> :error
      sequence -> {:ok, {sequence, Leases.checkpoint_sub_sequence_number(stream_id, shard_id)}}
    end
  end

  @impl true
  @doc """
  Writes a shard's checkpoint into its lease; `:ok` also when the lease was
  lost meanwhile (the checkpoint is then abandoned, and logged).

  ## Example

      :ok = Convoy.Leases.Checkpoint.store("orders", "orders", "shardId-000000000000", "4959...")
  """
  @spec store(term, term, String.t(), Convoy.Checkpoint.position()) :: :ok
  def store(_state, stream_id, shard_id, {:at_timestamp, ms}) do
    # `:latest` pinned to the consumer's start: kept on this node only. The
    # KCL table has no place for it (its `LATEST` means "now" to whichever
    # worker reads next), so a lease that moves before its first checkpoint
    # starts at the next holder's own start.
    case Leases.checkpoint(stream_id, shard_id) do
      sentinel when sentinel in [nil, "LATEST", "AT_TIMESTAMP", "TRIM_HORIZON"] ->
        Leases.put_checkpoint(stream_id, shard_id, {:at_timestamp, ms})

      _ ->
        :ok
    end

    :ok
  end

  def store(stream, stream_id, shard_id, position) do
    case position do
      :shard_end -> write(stream, stream_id, shard_id, {"SHARD_END", 0}, 1)
      {sequence, sub} -> write(stream, stream_id, shard_id, {sequence, sub}, 1)
      sequence -> write(stream, stream_id, shard_id, {sequence, 0}, 1)
    end
  end

  defp write(stream, stream_id, shard_id, {value, sub} = checkpoint, attempt) do
    with {:ok, client, coordinator} <- Leases.client(stream_id),
         true <- Leases.holding?(stream_id, shard_id) do
      case Native.call(&Native.lease_checkpoint(client, shard_id, value, sub, &1)) do
        {:ok, :ok} ->
          Leases.put_checkpoint(stream_id, shard_id, value, sub)
          if value == "SHARD_END", do: send(coordinator, {:finished, shard_id})
          :ok

        {:error, :lease_lost} ->
          # No more records of this shard go to handlers from here on.
          Leases.drop(stream_id, shard_id)
          send(coordinator, {:lost, shard_id})
          abandoned(stream_id, shard_id, value, :lease_lost)

        {:error, reason} ->
          Logger.warning(
            "Convoy #{inspect(stream_id)}: checkpoint of #{shard_id} failed (attempt #{attempt}): " <>
              "#{inspect(reason)}; retrying while the lease is held"
          )

          Telemetry.execute([:convoy, :lease, :error], %{count: 1}, %{
            stream: stream,
            stream_id: stream_id,
            shard_id: shard_id,
            operation: :checkpoint,
            reason: reason
          })

          Process.sleep(min(100 * Integer.pow(2, min(attempt, 5)), 2_000))
          write(stream, stream_id, shard_id, checkpoint, attempt + 1)
      end
    else
      _ -> abandoned(stream_id, shard_id, value, :not_held)
    end
  end

  defp abandoned(stream_id, shard_id, value, why) do
    Logger.warning(
      "Convoy #{inspect(stream_id)}: checkpoint #{value} of #{shard_id} not stored (#{why}); " <>
        "the shard's next holder resumes after the previous checkpoint"
    )

    :ok
  end
end
