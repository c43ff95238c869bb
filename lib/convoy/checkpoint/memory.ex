defmodule Convoy.Checkpoint.Memory do
  @moduledoc """
  Checkpoints in an ETS table owned by the queue: they survive detaching and
  re-attaching handlers, not a restart of the queue. The default store.

  ## Example

      {Convoy.Queue, stream: "events", checkpoint: Convoy.Checkpoint.Memory}
  """
  @behaviour Convoy.Checkpoint

  @impl true
  @doc "Creates the table. The calling process (the queue) owns it."
  @spec init(keyword) :: {:ok, :ets.tid()}
  def init(_options) do
    {:ok, :ets.new(__MODULE__, [:set, :public, read_concurrency: true])}
  end

  @impl true
  @doc "Reads a shard's checkpoint."
  @spec fetch(:ets.tid(), term, String.t()) :: {:ok, Convoy.Checkpoint.position()} | :error
  def fetch(table, stream_id, shard_id) do
    case :ets.lookup(table, {stream_id, shard_id}) do
      [{_, position}] -> {:ok, position}
      [] -> :error
    end
  end

  @impl true
  @doc "Stores a shard's checkpoint."
  @spec store(:ets.tid(), term, String.t(), Convoy.Checkpoint.position()) :: :ok
  def store(table, stream_id, shard_id, position) do
    true = :ets.insert(table, {{stream_id, shard_id}, position})
    :ok
  end
end
