defmodule Convoy.Services.Legacy do
  @moduledoc """
  Runs a service written for Convoy 0.1's `Convoy.Service` behaviour: a
  module with the four callbacks

    * `describe_stream(stream)` - `%{"StreamDescription" => %{"Shards" =>
      [%{"ShardId" => id}, ...]}}` (or that in `{:ok, _}`),
    * `get_iterator(stream, shard_id, iterator_type)` - a shard iterator: a
      string, `%{"ShardIterator" => it}`, or either in `{:ok, _}`,
    * `get_records(iterator, limit: n)` - `{records, next_iterator}`, each
      record a map with `:data` and `:partition_key` (and, if known,
      `:sequence_number`), or as Kinesis returns it (`"Data"`,
      `"PartitionKey"`, `"SequenceNumber"`); `next_iterator` is nil once a
      closed shard is read to its end,
    * `put_records(stream, records)` - sends `[%{data: binary, partition_key:
      key}]`; `{:error, reason}` or an exception fails them.

  You do not name this module: give the old one as `service:` and
  `Convoy.Queue` runs it through here.

      {Convoy.Queue, stream: :events, service: MyApp.OldKinesisService}

  Producing: `put/4` encodes and validates the record as every service does
  and buffers it; every `batch_timeout` ms (at once with `0`, or at 500
  records or 5 MiB of keys and data) the buffer goes out in one
  `put_records/2` call. With `await:`, `put/4` answers once that call
  returned, with its own record's outcome: `{:ok, %{shard_id: id,
  sequence_number: seq}}` when the service's answer names them (ExAws'
  `"Records"`), `{:ok, %{}}` when it does not, or `{:error, reason}`.
  Failed records take the usual failure path (log, telemetry,
  `on_failure`); they are not retried.

  Consuming goes through `Convoy.Consumer`, as for every service: a reader
  process per shard calls `get_records/2` and waits for each batch to be
  handled. Handlers, checkpoints and `get/2` work as with Kinesis, with these
  limits of the old callbacks:

    * positions: a shard is opened with `get_iterator(stream, shard_id,
      position)`, where `position` is `:latest` or `:trim_horizon` as before,
      but also `{:after_sequence_number, s}` when resuming from a checkpoint
      (and `{:at_timestamp, unix_ms}` for `:latest`, pinned to the queue's
      start). A service that raises or answers `{:error, _}` for those tuples
      is asked for `:trim_horizon` instead and records up to the checkpoint
      are skipped (for `:at_timestamp`, for `:latest`, so records put while
      no handler was attached are missed);
    * checkpoints need the records' sequence numbers: with a service that
      gives none, keep the default `Convoy.Checkpoint.Memory`, and a
      restarted queue reads such a shard from `iterator_type` again;
    * `millis_behind_latest` is unknown: `nil` in telemetry.

  ## Example

      defmodule MyApp.OldKinesisService do
        @behaviour Convoy.Service
        def describe_stream(stream), do: ExAws.Kinesis.describe_stream(stream) |> ExAws.request!()
        def get_iterator(stream, shard, type), do: ExAws.Kinesis.get_shard_iterator(stream, shard, type) |> ExAws.request!()
        def get_records(iterator, opts) do
          %{"Records" => records, "NextShardIterator" => next} =
            ExAws.Kinesis.get_records(iterator, opts) |> ExAws.request!()
          {records, next}
        end
        def put_records(stream, records), do: ExAws.Kinesis.put_records(stream, records) |> ExAws.request()
      end
  """
  @behaviour Convoy.Service
  use GenServer

  require Logger

  alias Convoy.Queue.Reporter

  @callbacks [describe_stream: 1, get_iterator: 3, get_records: 2, put_records: 2]
  # PutRecords' limits: 500 records and 5 MiB (keys and data) a request.
  @max_batch 500
  @max_batch_bytes 5 * 1024 * 1024

  @doc """
  Whether `module` has Convoy 0.1's service callbacks.

  ## Example

      Convoy.Services.Legacy.legacy?(MyApp.OldKinesisService)
      #=> true
  """
  @spec legacy?(term) :: boolean
  def legacy?(module) do
    is_atom(module) and Code.ensure_loaded?(module) and
      Enum.all?(@callbacks, fn {name, arity} -> function_exported?(module, name, arity) end)
  end

  # ---------------------------------------------------------------------------
  # Convoy.Service

  @impl Convoy.Service
  def child_spec(options) do
    module = Keyword.fetch!(options[:service_options], :module)

    source =
      {Convoy.Services.Legacy.Source,
       %{module: module, stream: options[:stream], stream_id: options[:stream_id]}}

    children = [
      # Its terminate sends what is buffered, within :shutdown.
      %{
        id: __MODULE__,
        start: {__MODULE__, :start_link, [options]},
        shutdown: options[:shutdown] + 1_000
      },
      {Convoy.Consumer, Convoy.Consumer.queue_options(options) ++ [source: source]}
    ]

    %{
      id: __MODULE__,
      start: {Supervisor, :start_link, [children, [strategy: :rest_for_one]]},
      type: :supervisor
    }
  end

  @doc """
  Starts the producing half for one queue; `Convoy.Queue.start_link/1` calls
  this.

  ## Example

      Convoy.Queue.start_link(stream: "events", service: MyApp.OldKinesisService)
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options), do: GenServer.start_link(__MODULE__, options)

  @impl Convoy.Service
  def put(%{server: server, max_record_bytes: max}, key, data, opts) do
    # The checks and encoding every service applies (Convoy.Native).
    with {:ok, hash_key, await} <- Convoy.Queue.PutOptions.parse(opts),
         {:ok, data} <- Convoy.Native.put_record_check(key, data, hash_key, max) do
      record = %{data: data, partition_key: key}
      record = if hash_key, do: Map.put(record, :explicit_hash_key, hash_key), else: record
      call(server, {:put, record, await != nil}, await || 5_000)
    end
  end

  @impl Convoy.Service
  def flush(%{server: server}, opts) do
    case Convoy.Queue.PutOptions.parse(opts) do
      {:ok, nil, await} -> call(server, :flush, await || 5_000)
      {:ok, _, _} -> {:error, {:unknown_options, [:explicit_hash_key]}}
      error -> error
    end
  end

  @impl Convoy.Service
  def get(%{consumer: consumer}, limit), do: Convoy.Consumer.get(consumer, limit)

  @impl Convoy.Service
  def attach_handler(%{consumer: consumer}, id, handler, config, opts),
    do: Convoy.Consumer.attach(consumer, id, handler, config, opts)

  @impl Convoy.Service
  def detach_handler(%{consumer: consumer}, id), do: Convoy.Consumer.detach(consumer, id)

  @impl Convoy.Service
  def stats(%{server: server}) do
    case call(server, :stats, 5_000) do
      {:error, _} = error -> error
      stats -> stats
    end
  end

  defp call(server, request, timeout) do
    GenServer.call(server, request, timeout)
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, _ -> {:error, :closed}
  end

  # ---------------------------------------------------------------------------
  # The producer: a buffer sent with put_records/2

  @impl GenServer
  def init(options) do
    Process.flag(:trap_exit, true)
    stream_id = options[:stream_id]

    state = %{
      module: Keyword.fetch!(options[:service_options], :module),
      stream: options[:stream],
      stream_id: stream_id,
      on_failure: options[:on_failure],
      batch_timeout: options[:batch_timeout],
      # Newest first; `bytes` of keys and data, `count` records.
      buffer: [],
      bytes: 0,
      count: 0,
      # {from, the index of its record in the batch}.
      waiting: [],
      timer: nil,
      stats: %{buffered: 0, sent: 0, failed: 0}
    }

    handle = %{
      server: self(),
      consumer: Convoy.Consumer.name(stream_id),
      max_record_bytes: options[:max_record_bytes]
    }

    :ok = Convoy.Queue.register(stream_id, __MODULE__, handle)
    {:ok, state}
  end

  @impl GenServer
  def handle_call({:put, record, await?}, from, state) do
    # Taken now, whatever the sending below costs.
    if not await?, do: GenServer.reply(from, :ok)
    size = byte_size(record.partition_key) + byte_size(record.data)
    # A record that would take the batch past 5 MiB starts the next one.
    state = if state.bytes + size > @max_batch_bytes, do: transmit(state), else: state

    state = %{
      state
      | buffer: [record | state.buffer],
        bytes: state.bytes + size,
        count: state.count + 1
    }

    state =
      if await?, do: %{state | waiting: [{from, state.count - 1} | state.waiting]}, else: state

    cond do
      state.batch_timeout == 0 or state.count >= @max_batch ->
        {:noreply, transmit(state)}

      state.timer == nil ->
        {:noreply, %{state | timer: schedule(state.batch_timeout)}}

      true ->
        {:noreply, state}
    end
  end

  def handle_call(:flush, _from, state), do: {:reply, :ok, transmit(state)}

  def handle_call(:stats, _from, state),
    do: {:reply, %{state.stats | buffered: state.count}, state}

  @impl GenServer
  def handle_info({:transmit, ref}, %{timer: ref} = state),
    do: {:noreply, transmit(%{state | timer: nil})}

  def handle_info(_other, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    Convoy.Queue.unregister(state.stream_id)
    transmit(state)
    :ok
  end

  defp schedule(timeout) do
    ref = make_ref()
    Process.send_after(self(), {:transmit, ref}, timeout)
    ref
  end

  defp transmit(%{buffer: []} = state), do: state

  defp transmit(state) do
    records = Enum.reverse(state.buffer)
    span = Convoy.Telemetry.start([:convoy, :put_records], metadata(state))

    outcome =
      try do
        state.module.put_records(state.stream, records)
      catch
        kind, reason -> {:error, {kind, reason}}
      end

    results = results(outcome, records)
    sent = for {record, {:ok, _}} <- Enum.zip(records, results), do: record
    failures = for {record, {:error, reason}} <- Enum.zip(records, results), do: {record, reason}
    count = length(records)
    stop_measurements = %{records: count, acknowledged: length(sent), failed: length(failures)}

    case outcome do
      {:error, reason} ->
        Convoy.Telemetry.exception([:convoy, :put_records], span, :error, reason, [])

      _ ->
        Convoy.Telemetry.stop([:convoy, :put_records], span, stop_measurements)
    end

    Reporter.sent(length(sent), state.stream, state.stream_id)

    failures
    |> Enum.map(fn {record, reason} -> {record.partition_key, record.data, reason} end)
    |> Reporter.report(state.stream, state.stream_id, state.on_failure)

    # Each awaiting caller hears its own record's outcome.
    by_index = List.to_tuple(results)
    Enum.each(state.waiting, fn {from, index} -> GenServer.reply(from, elem(by_index, index)) end)
    if state.timer, do: Process.cancel_timer(state.timer)

    stats = %{
      state.stats
      | sent: state.stats.sent + length(sent),
        failed: state.stats.failed + length(failures)
    }

    %{state | buffer: [], bytes: 0, count: 0, waiting: [], timer: nil, stats: stats}
  end

  defp metadata(state), do: %{stream: state.stream, stream_id: state.stream_id}

  # Each record's outcome, in order: all went through unless the call
  # failed, or Kinesis' answer names failed entries. A result that names its
  # shard and sequence number gives them to the awaiting caller.
  defp results({:error, reason}, records), do: Enum.map(records, fn _ -> {:error, reason} end)

  defp results({:ok, %{"Records" => results}}, records) when is_list(results) do
    missing = List.duplicate(%{}, max(length(records) - length(results), 0))

    for {_record, result} <- Enum.zip(records, results ++ missing) do
      case result do
        %{"ErrorCode" => code} when is_binary(code) ->
          {:error, {:aws, code, result["ErrorMessage"] || ""}}

        %{"ShardId" => shard, "SequenceNumber" => sequence} ->
          {:ok, %{shard_id: shard, sequence_number: sequence}}

        _ ->
          {:ok, %{}}
      end
    end
  end

  defp results(_ok, records), do: Enum.map(records, fn _ -> {:ok, %{}} end)
end

defmodule Convoy.Services.Legacy.Source do
  @moduledoc false
  # Reading through a Convoy 0.1 service for Convoy.Consumer: a reader
  # process per shard that follows the native poller's protocol.
  @behaviour Convoy.Consumer.Source

  require Logger

  @impl true
  def list_shards(%{module: module, stream: stream}) do
    case safely(fn -> module.describe_stream(stream) end) do
      {:ok, description} -> shards(description)
      {:error, _} = error -> error
    end
  end

  defp shards(%{"StreamDescription" => %{"Shards" => shards}}) when is_list(shards) do
    {:ok,
     Enum.map(shards, fn shard ->
       %{
         shard_id: Map.fetch!(shard, "ShardId"),
         parent_shard_id: shard["ParentShardId"],
         adjacent_parent_shard_id: shard["AdjacentParentShardId"]
       }
     end)}
  end

  defp shards(other), do: {:error, {:unexpected_describe_stream, other}}

  @impl true
  def start_reader(source, shard_id, position, dispatcher, options) do
    spawn_link(fn -> read_shard(source, shard_id, position, dispatcher, options) end)
  end

  @impl true
  def ack(reader) do
    send(reader, :ack)
    :ok
  end

  @impl true
  def stop_reader(reader) do
    Process.unlink(reader)
    Process.exit(reader, :shutdown)
    :ok
  end

  # A pull read: the cursor is a position, or `{:iterator, iterator}` from an
  # earlier read (records before a fallback's start are skipped only once).
  @impl true
  def read(source, shard_id, cursor, limit) do
    started =
      case cursor do
        {:iterator, iterator} -> {:ok, iterator, nil}
        position -> iterator(source, shard_id, position)
      end

    with {:ok, iterator, skip} <- started,
         {:ok, records, next} <- records(source, shard_id, iterator, limit, skip) do
      {:ok, records, next && {:iterator, next}, -1}
    end
  end

  defp read_shard(source, shard_id, position, dispatcher, options) do
    case iterator(source, shard_id, position) do
      {:ok, iterator, skip} -> loop(source, shard_id, iterator, skip, dispatcher, options)
      {:error, reason} -> send(dispatcher, {:convoy_poller_stopped, shard_id, reason})
    end
  end

  defp loop(source, shard_id, iterator, skip, dispatcher, options) do
    started = System.monotonic_time()
    result = records(source, shard_id, iterator, options.poll_limit, skip)
    if Convoy.Telemetry.enabled?(), do: report(dispatcher, shard_id, started, result)

    case result do
      {:ok, [], nil} ->
        send(dispatcher, {:convoy_shard_end, shard_id})

      {:ok, [], next} ->
        Process.sleep(options.poll_interval)
        loop(source, shard_id, next, skip, dispatcher, options)

      {:ok, records, next} ->
        send(dispatcher, {:convoy_records, shard_id, records, nil})

        receive do
          :ack when next == nil -> send(dispatcher, {:convoy_shard_end, shard_id})
          :ack -> loop(source, shard_id, next, nil, dispatcher, options)
        end

      {:error, reason} ->
        send(dispatcher, {:convoy_poller_stopped, shard_id, reason})
    end
  end

  defp report(dispatcher, shard_id, started, result) do
    duration = System.convert_time_unit(System.monotonic_time() - started, :native, :nanosecond)

    {count, next, error} =
      case result do
        {:ok, records, next} -> {length(records), next, nil}
        {:error, reason} -> {0, nil, reason}
      end

    send(
      dispatcher,
      {:convoy_get_records, shard_id,
       %{
         duration: duration,
         count: count,
         millis_behind_latest: nil,
         next_iterator: next,
         error: error
       }}
    )
  end

  # An iterator for `position`, and the sequence number up to which records
  # are skipped when the service could only start from the shard's start.
  defp iterator(%{module: module, stream: stream}, shard_id, position) do
    case ask_iterator(module, stream, shard_id, position) do
      {:ok, iterator} ->
        {:ok, iterator, nil}

      {:error, _} = error when position in [:latest, :trim_horizon] ->
        error

      {:error, _} ->
        {fallback, skip} =
          case position do
            {:at_timestamp, _} -> {:latest, nil}
            {:after_sequence_number, s} -> {:trim_horizon, {:through, s}}
            {:at_sequence_number, s} -> {:trim_horizon, {:before, s}}
          end

        with {:ok, iterator} <- ask_iterator(module, stream, shard_id, fallback) do
          {:ok, iterator, skip}
        end
    end
  end

  defp ask_iterator(module, stream, shard_id, position) do
    case safely(fn -> module.get_iterator(stream, shard_id, position) end) do
      {:ok, iterator} when is_binary(iterator) -> {:ok, iterator}
      {:ok, %{"ShardIterator" => iterator}} when is_binary(iterator) -> {:ok, iterator}
      {:ok, other} -> {:error, {:unexpected_get_iterator, other}}
      {:error, _} = error -> error
    end
  end

  defp records(%{module: module, stream_id: stream_id}, shard_id, iterator, limit, skip) do
    case safely(fn -> module.get_records(iterator, limit: limit) end) do
      {:ok, {records, next}} when is_list(records) ->
        records =
          records
          |> Enum.map(&record(&1, shard_id, stream_id))
          |> Enum.drop_while(&skip?(&1, skip))

        {:ok, records, next}

      {:ok, other} ->
        {:error, {:unexpected_get_records, other}}

      {:error, _} = error ->
        error
    end
  end

  defp skip?(_record, nil), do: false
  defp skip?(%{sequence_number: nil}, _skip), do: false

  defp skip?(%{sequence_number: s}, {:through, last}),
    do: String.to_integer(s) <= String.to_integer(last)

  defp skip?(%{sequence_number: s}, {:before, first}),
    do: String.to_integer(s) < String.to_integer(first)

  defp record(%Convoy.Record{} = record, shard_id, stream_id),
    do: %{record | shard_id: record.shard_id || shard_id, stream_id: stream_id}

  defp record(%{} = raw, shard_id, stream_id) do
    %Convoy.Record{
      data: field(raw, :data, "Data"),
      partition_key: field(raw, :partition_key, "PartitionKey"),
      sequence_number: field(raw, :sequence_number, "SequenceNumber"),
      shard_id: shard_id,
      stream_id: stream_id,
      approximate_arrival_timestamp:
        arrival(field(raw, :approximate_arrival_timestamp, "ApproximateArrivalTimestamp"))
    }
  end

  defp field(map, atom, string), do: Map.get(map, atom, Map.get(map, string))

  defp arrival(%DateTime{} = at), do: at

  defp arrival(seconds) when is_number(seconds),
    do: DateTime.from_unix!(round(seconds * 1000), :millisecond)

  defp arrival(_), do: nil

  # An old service may answer `{:ok, value}`, `{:error, reason}`, the value
  # itself, or raise: exceptions become errors instead of crashing the reader.
  defp safely(fun) do
    case fun.() do
      {:ok, value} -> {:ok, value}
      {:error, reason} -> {:error, reason}
      value -> {:ok, value}
    end
  catch
    kind, reason -> {:error, {kind, reason}}
  end
end
