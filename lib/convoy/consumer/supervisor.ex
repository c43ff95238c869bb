defmodule Convoy.Consumer.Supervisor do
  @moduledoc false
  # The consumer's tree (one_for_one):
  #
  #   DynamicSupervisor          one Convoy.Consumer.ShardDispatcher per shard being read
  #   Convoy.Consumer            shards, polling, checkpoints; starts the dispatchers
  #
  # Each restarts alone. A consumer that restarts finds its handlers in the
  # queue's Convoy.Consumer.Handlers store and stops the dispatchers of its
  # predecessor before it starts its own; they resume from their
  # checkpoints. Dispatchers that die with their supervisor are started
  # again by the consumer, as after any dispatcher failure.

  use Supervisor

  alias Convoy.Queue.Topology

  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(options), do: Supervisor.start_link(__MODULE__, options)

  @doc "The DynamicSupervisor of a queue's shard dispatchers."
  @spec dispatchers(term) :: GenServer.name()
  def dispatchers(stream_id), do: Topology.name(Convoy.Consumer.ShardDispatcher, stream_id)

  @impl true
  def init(options) do
    stream_id = Keyword.fetch!(options, :stream_id)
    Topology.await_free(Convoy.Consumer, stream_id)
    Topology.await_free(Convoy.Consumer.ShardDispatcher, stream_id)

    options =
      if options[:leases],
        do:
          Keyword.put(
            options,
            :checkpoint,
            {Convoy.Leases.Checkpoint, Keyword.take(options, [:stream])}
          ),
        else: options

    children = [
      Supervisor.child_spec(
        {DynamicSupervisor, name: dispatchers(stream_id), strategy: :one_for_one},
        id: :dispatchers
      ),
      %{
        id: Convoy.Consumer,
        start: {Convoy.Consumer, :start_server, [options]},
        shutdown: 30_000
      }
    ]

    # With leases, the coordinator starts before the consumer and stops after
    # it, so the shards' last checkpoints are stored before their leases go.
    children =
      if options[:leases] do
        Topology.await_free(Convoy.Leases.Coordinator, stream_id)

        coordinator =
          {Convoy.Leases.Coordinator,
           Keyword.take(options, [
             :stream,
             :stream_id,
             :leases,
             :kinesis,
             :source,
             :iterator_type,
             :shard_refresh_interval
           ]) ++ [consumer: Convoy.Consumer.name(stream_id)]}

        List.insert_at(children, 1, coordinator)
      else
        children
      end

    Supervisor.init(children, strategy: :one_for_one)
  end
end
