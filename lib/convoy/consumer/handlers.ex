defmodule Convoy.Consumer.Handlers do
  @moduledoc false
  # Holds a queue's attached handlers outside the consumer's tree, so a
  # consumer that crashes or is killed comes back with the same handlers.
  # The consumer writes every change here; it reads the list back only when
  # it starts, and fills a restarted store again. A consumer started on its
  # own, outside a queue, has no store and keeps its handlers to itself.

  use Agent

  alias Convoy.Queue.Topology

  @spec start_link(term) :: Agent.on_start()
  def start_link(stream_id),
    do: Agent.start_link(fn -> nil end, name: Topology.name(__MODULE__, stream_id))

  @doc "The stored handlers and counter, or nil before the first consumer stored any."
  @spec fetch(term) :: {map, non_neg_integer} | nil
  def fetch(stream_id) do
    case Topology.whereis(__MODULE__, stream_id) do
      nil -> nil
      pid -> Agent.get(pid, & &1)
    end
  catch
    :exit, _ -> nil
  end

  @doc "Replaces the stored handlers; a no-op when there is no store."
  @spec store(term, map, non_neg_integer) :: :ok
  def store(stream_id, handlers, next_order) do
    case Topology.whereis(__MODULE__, stream_id) do
      nil -> :ok
      pid -> Agent.update(pid, fn _ -> {handlers, next_order} end)
    end
  catch
    # Gone meanwhile: the consumer fills the next one when it hears of it.
    :exit, _ -> :ok
  end
end
