defmodule Convoy.Checkpoint.Memory do
  @moduledoc """
  Checkpoints in an ETS table that lives as long as the `:convoy`
  application: they survive detaching and re-attaching handlers and a restart
  of the queue (even a killed one), not a restart of the VM. The default
  store; use `Convoy.Checkpoint.File` to survive the VM too.

  ## Example

      {Convoy.Queue, stream: "events", checkpoint: Convoy.Checkpoint.Memory}
  """
  @behaviour Convoy.Checkpoint

  @table __MODULE__

  @impl true
  @doc """
  Returns the application's table. It is owned by a process of the
  application, not by the queue, so a killed queue's checkpoints remain.

  ## Example

      {:ok, table} = Convoy.Checkpoint.Memory.init([])
  """
  @spec init(keyword) :: {:ok, atom}
  def init(_options), do: {:ok, @table}

  @impl true
  @doc """
  Reads a shard's checkpoint.

  ## Example

      case Convoy.Checkpoint.Memory.fetch(Convoy.Checkpoint.Memory, "events", "shardId-000000000000") do
        {:ok, :shard_end} -> :done
        # inside an aggregated record: read it again, skipping user records through `sub`
        {:ok, {sequence_number, _sub}} -> {:at_sequence_number, sequence_number}
        {:ok, sequence_number} -> {:after_sequence_number, sequence_number}
        :error -> :trim_horizon
      end
  """
  @spec fetch(atom | :ets.tid(), term, String.t()) :: {:ok, Convoy.Checkpoint.position()} | :error
  def fetch(table, stream_id, shard_id) do
    case :ets.lookup(table, {Convoy.Queue.Topology.key(stream_id), shard_id}) do
      [{_, position}] -> {:ok, position}
      [] -> :error
    end
  end

  @impl true
  @doc """
  Stores a shard's checkpoint.

  ## Example

      :ok =
        Convoy.Checkpoint.Memory.store(Convoy.Checkpoint.Memory, "events", "shardId-000000000000",
          "49590338271490256608559692538361571095921575989136588898")
  """
  @spec store(atom | :ets.tid(), term, String.t(), Convoy.Checkpoint.position()) :: :ok
  def store(table, stream_id, shard_id, position) do
    true = :ets.insert(table, {{Convoy.Queue.Topology.key(stream_id), shard_id}, position})
    :ok
  end

  @doc false
  # Started by Convoy.Application: creates the table and owns it.
  def child_spec(_), do: %{id: __MODULE__, start: {Agent, :start_link, [&create_table/0]}}

  defp create_table do
    :ets.new(@table, [
      :set,
      :public,
      :named_table,
      read_concurrency: true,
      write_concurrency: true
    ])
  end
end
