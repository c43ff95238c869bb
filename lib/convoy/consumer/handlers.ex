defmodule Convoy.Consumer.Handlers do
  @moduledoc false
  # Holds a queue's attached handlers outside the consumer process, so a
  # consumer that crashes or is killed comes back with the same handlers.
  # The consumer writes every change here; it reads the list back only when
  # it starts.

  use Agent

  alias Convoy.Queue.Topology

  @spec start_link(term) :: Agent.on_start()
  def start_link(stream_id),
    do: Agent.start_link(fn -> nil end, name: Topology.name(__MODULE__, stream_id))

  @doc "The stored handlers and counter, or nil before the first consumer stored any."
  @spec fetch(term) :: {map, non_neg_integer} | nil
  def fetch(stream_id), do: Agent.get(Topology.name(__MODULE__, stream_id), & &1)

  @doc "Replaces the stored handlers."
  @spec store(term, map, non_neg_integer) :: :ok
  def store(stream_id, handlers, next_order),
    do: Agent.update(Topology.name(__MODULE__, stream_id), fn _ -> {handlers, next_order} end)
end
