defmodule Convoy.Service do
  @moduledoc """
  The behaviour `Convoy.Queue` drives. A service connects one queue to a
  stream or queue system; `Convoy.Services.Kinesis` is the default.

  A service is started through `c:child_spec/1` with the options that
  `Convoy.Queue.start_link/1` validated. Once ready it registers a *handle*
  with `Convoy.Queue.register/3`; every later call receives that handle, so the
  hot path (`put`) needs no process hop unless the service wants one.

  ## Example

  A service that keeps records in the calling node's memory, for tests:

      defmodule MyApp.ListService do
        @behaviour Convoy.Service
        use Agent

        @impl true
        def child_spec(options), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [options]}}

        def start_link(options) do
          Agent.start_link(fn ->
            Convoy.Queue.register(options[:stream_id], __MODULE__, self())
            []
          end)
        end

        @impl true
        def put(agent, key, data, _opts), do: Agent.update(agent, &[{key, data} | &1])
        @impl true
        def flush(_agent, _opts), do: :ok
        @impl true
        def get(agent, limit), do: Agent.get(agent, &Enum.take(&1, limit))
        @impl true
        def attach_handler(_agent, _id, _handler, _config, _opts), do: {:error, :not_supported}
        @impl true
        def detach_handler(_agent, _id), do: {:error, :not_found}
        @impl true
        def stats(agent), do: %{buffered: Agent.get(agent, &length/1)}
      end
  """

  @typedoc "Whatever the service registered with `Convoy.Queue.register/3`."
  @type handle :: term

  @doc "A child spec that starts the service for one queue."
  @callback child_spec(options :: keyword) :: Supervisor.child_spec()

  @doc "Accepts one record; see `Convoy.Queue.put/4` for the options and results."
  @callback put(handle, partition_key :: String.t(), data :: term, opts :: keyword) ::
              :ok | {:ok, map} | {:error, term}

  @doc "Transmits buffered records now; see `Convoy.Queue.flush/2`."
  @callback flush(handle, opts :: keyword) :: :ok | {:error, term}

  @doc "Reads up to `limit` records, advancing the queue's positions."
  @callback get(handle, limit :: pos_integer) :: [Convoy.Record.t()] | {:error, term}

  @doc "Adds a handler; see `Convoy.Queue.attach_handler/5`."
  @callback attach_handler(
              handle,
              id :: term,
              handler :: Convoy.Queue.handler(),
              config :: term,
              opts :: keyword
            ) ::
              :ok | {:error, term}

  @doc "Removes a handler."
  @callback detach_handler(handle, id :: term) :: :ok | {:error, :not_found}

  @doc "Counters describing the service's state."
  @callback stats(handle) :: map
end
