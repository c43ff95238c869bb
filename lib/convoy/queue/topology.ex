defmodule Convoy.Queue.Topology do
  @moduledoc false
  # The supervision tree of one queue, started by `Convoy.Queue.start_link/1`:
  #
  #     Convoy.Queue.Topology                 one_for_one, {Convoy.Queue, id}
  #     ├── Convoy.Queue.Reporter             failure reports: log, telemetry, on_failure;
  #     │                                     per-request telemetry reports from Rust
  #     ├── Convoy.Consumer.Handlers          the attached handlers, kept across restarts
  #     └── the service's tree, for Kinesis:
  #         Convoy.Services.Kinesis           one_for_one, holds the Kinesis client
  #         ├── Convoy.Services.Kinesis.Producer   owns the native producer, registers the handle
  #         └── Convoy.Consumer.Supervisor    one_for_one
  #             ├── DynamicSupervisor         one Convoy.Consumer.ShardDispatcher per shard
  #             ├── Convoy.Leases.Coordinator only with `leases:`: renews, takes, hands over leases
  #             └── Convoy.Consumer           shards, polling, checkpoints
  #
  # Every process restarts alone. The native producer reports failures to
  # the reporter, or to its owner while the reporter is down, so a report
  # reaches a live process unless both are gone. The consumer keeps the
  # handler store filled, so handlers survive a restart of either.
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
  def name(kind, stream_id), do: {:via, Registry, {Convoy.Registry, {kind, key(stream_id)}}}

  @doc """
  The key a `stream_id` is known by: an atom and the string of the same name
  name the same queue, as in the original Convoy (whose process was
  registered as `:"stream_\#{stream_id}"`).
  """
  @spec key(term) :: term
  def key(stream_id) when is_atom(stream_id) and stream_id not in [nil, true, false],
    do: Atom.to_string(stream_id)

  def key(stream_id), do: stream_id

  @doc """
  The pid of a queue's live process of the given kind, or nil. The Registry
  drops a dead process's entry a moment after it died; until then it is
  not reported here.
  """
  @spec whereis(term, term) :: pid | nil
  def whereis(kind, stream_id) do
    case Registry.lookup(Convoy.Registry, {kind, key(stream_id)}) do
      [{pid, _}] -> if Process.alive?(pid), do: pid
      [] -> nil
    end
  end

  @doc """
  Waits, up to `timeout` ms, until no live process holds the name of the
  given kind. A supervisor killed with `:kill` leaves its children to stop
  on their own; their replacements wait here for the names they need.
  """
  @spec await_free(term, term, timeout) :: :ok
  def await_free(kind, stream_id, timeout \\ 5_000) do
    with pid when is_pid(pid) <- whereis(kind, stream_id) do
      ref = Process.monitor(pid)

      receive do
        {:DOWN, ^ref, :process, _, _} -> :ok
      after
        timeout -> Process.demonitor(ref, [:flush])
      end
    end

    :ok
  end

  @impl true
  def init(options) do
    children = [
      {Convoy.Queue.Reporter, options},
      {Convoy.Consumer.Handlers, options[:stream_id]},
      options[:service].child_spec(options)
    ]

    Supervisor.init(children, strategy: :one_for_one)
  end
end
