defmodule Convoy.Queue.Topology do
  @moduledoc false
  # The supervision tree of one queue, started by `Convoy.Queue.start_link/1`:
  #
  #     Convoy.Queue.Topology                 rest_for_one, {Convoy.Queue, id}
  #     ├── Convoy.Queue.Reporter             failure reports: log, telemetry, on_failure
  #     └── the service's tree, for Kinesis:
  #         Convoy.Services.Kinesis           one_for_one, holds the Kinesis client
  #         ├── Convoy.Services.Kinesis.Producer   owns the native producer, registers the handle
  #         └── Convoy.Consumer.Supervisor    rest_for_one
  #             ├── Convoy.Consumer.Handlers  the attached handlers, kept across restarts
  #             ├── DynamicSupervisor         one Convoy.Consumer.ShardDispatcher per shard
  #             └── Convoy.Consumer           shards, polling, checkpoints
  #
  # The reporter comes first so it outlives everything that reports to it.
  # Processes are named through `Convoy.Registry` by `{kind, stream_id}`; an
  # entry goes with the process that holds it.

  use Supervisor

  @doc "Starts the tree of one queue from validated options."
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(options) do
    Supervisor.start_link(__MODULE__, options, name: name(Convoy.Queue, options[:stream_id]))
  end

  @doc "The `Convoy.Registry` name of a queue's process of the given kind."
  @spec name(term, term) :: {:via, Registry, {Convoy.Registry, {term, term}}}
  def name(kind, stream_id), do: {:via, Registry, {Convoy.Registry, {kind, stream_id}}}

  @doc "The pid of a queue's process of the given kind, or nil."
  @spec whereis(term, term) :: pid | nil
  def whereis(kind, stream_id) do
    case Registry.lookup(Convoy.Registry, {kind, stream_id}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  @impl true
  def init(options) do
    children = [
      {Convoy.Queue.Reporter, options},
      options[:service].child_spec(options)
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end
end
