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

  The service's tree is started from `c:child_spec/1`, with the options
  `Convoy.Queue.start_link/1` validated (service-specific ones arrive in
  `:service_options`), as a child of the queue's supervisor, after the
  queue's failure reporter. Once ready, the process that owns what the
  handle refers to registers it with `Convoy.Queue.register/3`; the entry
  goes when that process ends, and `put/4` answers `{:error, :closed}`
  until a new one registers.

  ## Services written for Convoy 0.1

  A module written for the original behaviour, with the four callbacks
  `c:describe_stream/1`, `c:get_iterator/3`, `c:get_records/2` and
  `c:put_records/2`, still works as a queue's `service:`: it runs through
  `Convoy.Services.Legacy`, which describes what it expects of them. Every
  callback of this behaviour is optional so that such a module compiles
  without warnings; a service must implement either the current callbacks
  or the four old ones, which `Convoy.Queue.start_link/1` checks.

  ## Example

  A complete service over an Agent that keeps one shard in a list. Its tree
  is the Agent (which registers the queue's handle) and the consumer:

      defmodule MyApp.ListService do
        @behaviour Convoy.Service
        @behaviour Convoy.Consumer.Source

        def child_spec(options) do
          id = options[:stream_id]
          agent = Module.concat(__MODULE__, to_string(id))
          consumer_options = Keyword.take(options, [:stream_id, :checkpoint, :iterator_type, :poll_interval])

          children = [
            %{id: :records, start: {Agent, :start_link, [fn -> register(id, agent) end, [name: agent]]}},
            {Convoy.Consumer, [source: {__MODULE__, agent}] ++ consumer_options}
          ]

          %{id: __MODULE__, type: :supervisor, start: {Supervisor, :start_link, [children, [strategy: :rest_for_one]]}}
        end

        defp register(id, agent) do
          :ok = Convoy.Queue.register(id, __MODULE__, %{agent: agent, stream_id: id, consumer: Convoy.Consumer.name(id)})
          []
        end

        # producing
        def put(%{agent: agent, stream_id: id}, key, data, _opts) when is_binary(data) do
          Agent.update(agent, fn records ->
            seq = Integer.to_string(length(records) + 1)
            records ++ [%Convoy.Record{data: data, partition_key: key, sequence_number: seq, shard_id: "only", stream_id: id}]
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
        def read(agent, "only", position, limit) do
          records = after_position(agent, position, limit)
          next = if last = List.last(records), do: {:after_sequence_number, last.sequence_number}, else: position
          {:ok, records, next, 0}
        end
        def start_reader(agent, "only", position, dispatcher, options),
          do: spawn_link(fn -> read_loop(agent, position, dispatcher, options) end)
        def ack(reader), do: send(reader, :ack) && :ok
        def stop_reader(reader), do: Process.exit(reader, :shutdown) && :ok

        defp read_loop(agent, position, dispatcher, options) do
          case after_position(agent, position, 100) do
            [] ->
              Process.sleep(options.poll_interval)
              read_loop(agent, position, dispatcher, options)

            records ->
              send(dispatcher, {:convoy_records, "only", records, 0})
              receive do: (:ack -> read_loop(agent, {:after_sequence_number, List.last(records).sequence_number}, dispatcher, options))
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

  @optional_callbacks child_spec: 1,
                      put: 4,
                      flush: 2,
                      get: 2,
                      attach_handler: 5,
                      detach_handler: 2,
                      stats: 1,
                      describe_stream: 1,
                      get_iterator: 3,
                      get_records: 2,
                      put_records: 2

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

  # Convoy 0.1's callbacks, run through Convoy.Services.Legacy.

  @doc "Convoy 0.1: describes the stream, `%{\"StreamDescription\" => %{\"Shards\" => [...]}}`."
  @callback describe_stream(stream :: String.t()) :: map | {:ok, map} | {:error, term}

  @doc "Convoy 0.1: a shard iterator for `iterator_type`."
  @callback get_iterator(stream :: String.t(), shard_id :: String.t(), iterator_type :: term) ::
              String.t() | map | {:ok, String.t() | map} | {:error, term}

  @doc "Convoy 0.1: reads records, `{records, next_iterator}`."
  @callback get_records(iterator :: String.t(), opts :: keyword) ::
              {[map], String.t() | nil} | {:error, term}

  @doc "Convoy 0.1: sends `[%{data: binary, partition_key: String.t()}]`."
  @callback put_records(stream :: String.t(), records :: [map]) :: term
end
