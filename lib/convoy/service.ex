defmodule Convoy.Service do
  @moduledoc """
  The behaviour `Convoy.Queue` drives. A service connects one queue to a
  stream or queue system: `Convoy.Services.Kinesis` is the default,
  `Convoy.Services.Memory` runs in memory for tests.

  A service has two halves:

    * producing - `c:put/4` (with outcomes when `await:` is given),
      `c:flush/2` and `c:stats/1`; the queue calls these with the handle the
      service registered, so the hot path needs no process hop unless the
      service wants one;
    * consuming - a service usually starts a `Convoy.Consumer` and hands it a
      `Convoy.Consumer.Source` (list shards, start and stop a reader per
      shard, acknowledge a batch, pull reads). The consumer does the rest the
      same way for every service: handlers, polling on attach and off on the
      last detach, flow control by acknowledgement, checkpoints, resharding
      order. `c:get/2`, `c:attach_handler/5` and `c:detach_handler/2` then
      delegate to it.

  The service is started from `c:child_spec/1` with the options
  `Convoy.Queue.start_link/1` validated (service-specific ones arrive in
  `:service_options`). Once ready it registers its handle with
  `Convoy.Queue.register/3`, and on stop calls `Convoy.Queue.unregister/1`.

  ## Example

  A complete service over an Agent that keeps one shard in a list:

      defmodule MyApp.ListService do
        @behaviour Convoy.Service
        @behaviour Convoy.Consumer.Source

        def child_spec(options), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [options]}}

        def start_link(options) do
          {:ok, agent} = Agent.start_link(fn -> [] end)
          consumer_options = Keyword.take(options, [:stream_id, :checkpoint, :iterator_type, :poll_interval])
          {:ok, consumer} = Convoy.Consumer.start_link([source: {__MODULE__, agent}] ++ consumer_options)
          Convoy.Queue.register(options[:stream_id], __MODULE__, %{agent: agent, consumer: consumer})
          {:ok, agent}
        end

        # producing
        def put(%{agent: agent}, key, data, _opts) when is_binary(data) do
          Agent.update(agent, fn records ->
            seq = Integer.to_string(length(records) + 1)
            records ++ [{data, key, seq, System.system_time(:millisecond), nil, nil}]
          end)
        end

        def flush(_handle, _opts), do: :ok
        def stats(%{agent: agent}), do: %{sent: Agent.get(agent, &length/1)}

        # consuming, through Convoy.Consumer
        def get(%{consumer: c}, limit), do: Convoy.Consumer.get(c, limit)
        def attach_handler(%{consumer: c}, id, h, config, opts), do: Convoy.Consumer.attach(c, id, h, config, opts)
        def detach_handler(%{consumer: c}, id), do: Convoy.Consumer.detach(c, id)

        # Convoy.Consumer.Source
        def list_shards(_agent), do: {:ok, [%{shard_id: "only", parent_shard_id: nil, adjacent_parent_shard_id: nil}]}
        def fetch(agent, [{"only", position}], limit), do: {:ok, [{"only", after_position(agent, position, limit)}]}
        def start_reader(agent, "only", position, dispatcher, options),
          do: spawn_link(fn -> read(agent, position, dispatcher, options) end)
        def ack(reader), do: send(reader, :ack) && :ok
        def stop_reader(reader), do: Process.exit(reader, :shutdown) && :ok

        defp read(agent, position, dispatcher, options) do
          case after_position(agent, position, 100) do
            [] ->
              Process.sleep(options.poll_interval)
              read(agent, position, dispatcher, options)

            records ->
              send(dispatcher, {:convoy_records, "only", records, 0})
              receive do: (:ack -> read(agent, {:after_sequence_number, elem(List.last(records), 2)}, dispatcher, options))
          end
        end

        defp after_position(agent, {:after_sequence_number, seq}, limit),
          do: Agent.get(agent, &Enum.take(Enum.drop(&1, String.to_integer(seq)), limit))
        defp after_position(agent, _from_start, limit), do: Agent.get(agent, &Enum.take(&1, limit))
      end

      {Convoy.Queue, stream: "list", service: MyApp.ListService, poll_interval: 50, iterator_type: :trim_horizon}
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
