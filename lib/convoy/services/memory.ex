defmodule Convoy.Services.Memory do
  @moduledoc """
  An in-memory stream service, for your own tests: no emulator, no network.

  It behaves like Kinesis where handlers can tell: shards own ranges of the
  128-bit hash space, a record goes to the shard its partition key's MD5 (or
  its explicit hash key) falls in, every record gets a growing sequence
  number, order holds within a shard, and resharding closes a parent whose
  children are read after it. Handlers, acknowledgements, checkpoints and
  filters are the same `Convoy.Consumer` the Kinesis service uses.

  Faults can be injected to exercise error paths: `fail_next_puts/3`,
  `throttle/2` and `split_shard/2`.

  ## Service options

  Given as `service_options:` to the queue:

    * `:shards` - number of shards. Defaults to `1`.

  ## Example

      {Convoy.Queue,
       stream: "events",
       service: Convoy.Services.Memory,
       service_options: [shards: 4],
       poll_interval: 10,
       iterator_type: :trim_horizon}

      :ok = Convoy.Queue.put("events", "user-1", "hello")
      Convoy.Services.Memory.fail_next_puts("events", 2)
      {:error, {:aws, "InternalFailure", "injected failure"}} = Convoy.Queue.put("events", "user-1", "lost")
  """
  @behaviour Convoy.Service
  use GenServer

  require Logger

  alias Convoy.Services.Memory.Source

  @max_hash Bitwise.bsl(1, 128) - 1

  # ---------------------------------------------------------------------------
  # Convoy.Service

  @impl Convoy.Service
  def child_spec(options) do
    # The stream's server, then the consumer that reads it.
    source = {Source, Convoy.Queue.Topology.name(__MODULE__, options[:stream_id])}

    children = [
      %{id: __MODULE__, start: {__MODULE__, :start_link, [options]}},
      {Convoy.Consumer, Convoy.Consumer.queue_options(options) ++ [source: source]}
    ]

    %{
      id: __MODULE__,
      start: {Supervisor, :start_link, [children, [strategy: :rest_for_one]]},
      type: :supervisor
    }
  end

  @doc """
  Starts the service for one queue; `Convoy.Queue.start_link/1` calls this.

  ## Example

      Convoy.Queue.start_link(stream: "events", service: Convoy.Services.Memory)
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options) do
    shards = Keyword.get(options[:service_options] || [], :shards, 1)

    unless is_integer(shards) and shards in 1..1024 do
      raise ArgumentError,
            "invalid Convoy.Services.Memory option :shards: expected 1..1024, got: #{inspect(shards)}"
    end

    name = Convoy.Queue.Topology.name(__MODULE__, options[:stream_id])
    GenServer.start_link(__MODULE__, {options, shards}, name: name)
  end

  @impl Convoy.Service
  def put(%{server: server, max_record_bytes: max}, key, data, opts) do
    with {:ok, hash_key, await} <- Convoy.Queue.PutOptions.parse(opts),
         {:ok, data} <- Convoy.Native.put_record_check(key, data, hash_key, max) do
      case GenServer.call(server, {:put, key, hash_key, data}) do
        {:ok, outcome} -> if is_nil(await), do: :ok, else: {:ok, outcome}
        {:error, _} = error -> error
      end
    end
  end

  @impl Convoy.Service
  def flush(_handle, _opts), do: :ok

  @impl Convoy.Service
  def get(%{consumer: consumer}, limit), do: Convoy.Consumer.get(consumer, limit)

  @impl Convoy.Service
  def attach_handler(%{consumer: consumer}, id, handler, config, opts),
    do: Convoy.Consumer.attach(consumer, id, handler, config, opts)

  @impl Convoy.Service
  def detach_handler(%{consumer: consumer}, id), do: Convoy.Consumer.detach(consumer, id)

  @impl Convoy.Service
  def stats(%{server: server}), do: GenServer.call(server, :stats)

  # ---------------------------------------------------------------------------
  # Fault injection

  @doc """
  Makes the next `count` puts of the queue fail with `reason` (default
  `{:aws, "InternalFailure", "injected failure"}`). Failed records take the
  failure path: logged, counted, and handed to `on_failure`.

  ## Example

      :ok = Convoy.Services.Memory.fail_next_puts("events", 3)
  """
  @spec fail_next_puts(term, non_neg_integer, term) :: :ok
  def fail_next_puts(stream_id, count, reason \\ {:aws, "InternalFailure", "injected failure"}),
    do: GenServer.call(server!(stream_id), {:fail_next, count, reason})

  @doc """
  Turns throttling on or off: while on, every put fails with
  `{:aws, "ProvisionedThroughputExceededException", _}`.

  ## Example

      :ok = Convoy.Services.Memory.throttle("events", true)
  """
  @spec throttle(term, boolean) :: :ok
  def throttle(stream_id, on?) when is_boolean(on?),
    do: GenServer.call(server!(stream_id), {:throttle, on?})

  @doc """
  Splits an open shard in two halves of its hash range, as Kinesis'
  SplitShard does: the parent closes, its children take new records.
  Returns the children's ids.

  ## Example

      {:ok, [_left, _right]} = Convoy.Services.Memory.split_shard("events", "shardId-000000000000")
  """
  @spec split_shard(term, String.t()) :: {:ok, [String.t()]} | {:error, term}
  def split_shard(stream_id, shard_id), do: GenServer.call(server!(stream_id), {:split, shard_id})

  defp server!(stream_id) do
    case Convoy.Queue.Topology.whereis(__MODULE__, stream_id) do
      pid when is_pid(pid) -> pid
      nil -> raise ArgumentError, "no queue is started with stream_id #{inspect(stream_id)}"
    end
  end

  # ---------------------------------------------------------------------------
  # Server: the stream

  @impl GenServer
  def init({options, shard_count}) do
    Process.flag(:trap_exit, true)
    width = div(@max_hash + 1, shard_count)

    shards =
      for i <- 0..(shard_count - 1), into: %{} do
        last = if i == shard_count - 1, do: @max_hash, else: (i + 1) * width - 1
        shard(shard_id(i), i * width, last, nil)
      end

    state = %{
      stream_id: options[:stream_id],
      stream: options[:stream],
      on_failure: options[:on_failure],
      shards: shards,
      next_shard: shard_count,
      # The last sequence number given; 0 before the first record.
      last_sequence: 0,
      fail_next: {0, nil},
      throttled: false,
      stats: %{
        buffered: 0,
        buffered_bytes: 0,
        in_flight: 0,
        sent: 0,
        retried: 0,
        throttled: 0,
        failed: 0
      }
    }

    handle = %{
      server: self(),
      consumer: Convoy.Consumer.name(options[:stream_id]),
      max_record_bytes: options[:max_record_bytes]
    }

    :ok = Convoy.Queue.register(options[:stream_id], __MODULE__, handle)
    {:ok, state}
  end

  defp shard_id(i), do: "shardId-" <> String.pad_leading(Integer.to_string(i), 12, "0")

  defp shard(id, first, last, parents) do
    {id,
     %{
       shard_id: id,
       starting_hash_key: Integer.to_string(first),
       ending_hash_key: Integer.to_string(last),
       parent_shard_id: parents && elem(parents, 0),
       adjacent_parent_shard_id: nil,
       ending_sequence_number: nil,
       range: {first, last},
       records: :gb_trees.empty()
     }}
  end

  @impl GenServer
  def handle_call({:put, key, hash_key, data}, _from, state) do
    cond do
      state.throttled ->
        failed(
          state,
          key,
          data,
          {:aws, "ProvisionedThroughputExceededException", "injected throttling"},
          :throttled
        )

      elem(state.fail_next, 0) > 0 ->
        {n, reason} = state.fail_next
        failed(%{state | fail_next: {n - 1, reason}}, key, data, reason, nil)

      true ->
        hash =
          if hash_key,
            do: String.to_integer(hash_key),
            else: :binary.decode_unsigned(:erlang.md5(key))

        {id, shard} = Enum.find(state.shards, fn {_, s} -> open?(s) and in_range?(s, hash) end)
        # Growing across every stream of the VM, as Kinesis' grow over time:
        # a checkpoint kept from an earlier queue of the same stream_id never
        # hides the records of a new one.
        sequence = System.unique_integer([:positive, :monotonic])

        record = %Convoy.Record{
          data: data,
          partition_key: key,
          sequence_number: sequence_string(sequence),
          shard_id: id,
          approximate_arrival_timestamp: DateTime.utc_now() |> DateTime.truncate(:millisecond),
          stream_id: state.stream_id
        }

        shard = %{shard | records: :gb_trees.insert(sequence, record, shard.records)}

        state = %{
          state
          | shards: Map.put(state.shards, id, shard),
            last_sequence: sequence,
            stats: Map.update!(state.stats, :sent, &(&1 + 1))
        }

        Convoy.Queue.Reporter.sent(1, state.stream, state.stream_id)
        {:reply, {:ok, %{shard_id: id, sequence_number: sequence_string(sequence)}}, state}
    end
  end

  def handle_call({:fail_next, count, reason}, _from, state),
    do: {:reply, :ok, %{state | fail_next: {count, reason}}}

  def handle_call({:throttle, on?}, _from, state), do: {:reply, :ok, %{state | throttled: on?}}
  def handle_call(:stats, _from, state), do: {:reply, state.stats, state}

  def handle_call({:split, id}, _from, state) do
    case Map.fetch(state.shards, id) do
      {:ok, %{ending_sequence_number: nil, range: {first, last}} = parent} ->
        middle = first + div(last - first, 2)
        {left_id, left} = shard(shard_id(state.next_shard), first, middle, {id})
        {right_id, right} = shard(shard_id(state.next_shard + 1), middle + 1, last, {id})
        parent = %{parent | ending_sequence_number: sequence_string(state.last_sequence)}

        shards =
          state.shards
          |> Map.put(id, parent)
          |> Map.put(left_id, left)
          |> Map.put(right_id, right)

        {:reply, {:ok, [left_id, right_id]},
         %{state | shards: shards, next_shard: state.next_shard + 2}}

      {:ok, _closed} ->
        {:reply, {:error, :shard_closed}, state}

      :error ->
        {:reply, {:error, :unknown_shard}, state}
    end
  end

  def handle_call(:list_shards, _from, state) do
    shards = for {_, s} <- state.shards, do: Map.drop(s, [:range, :records])
    {:reply, {:ok, shards}, state}
  end

  def handle_call({:read, shard_id, position, limit}, _from, state) do
    {:reply, read(state, shard_id, position, limit), state}
  end

  @impl GenServer
  def handle_info(_other, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state), do: Convoy.Queue.unregister(state.stream_id)

  defp open?(shard), do: is_nil(shard.ending_sequence_number)
  defp in_range?(%{range: {first, last}}, hash), do: hash >= first and hash <= last

  # Sequence numbers are decimal strings that compare like the numbers they are.
  defp sequence_string(n), do: String.pad_leading(Integer.to_string(n), 21, "0")

  defp failed(state, key, data, reason, counter) do
    Convoy.Queue.Reporter.report(
      [{key, data, reason}],
      state.stream,
      state.stream_id,
      state.on_failure
    )

    stats = Map.update!(state.stats, :failed, &(&1 + 1))
    stats = if counter, do: Map.update!(stats, counter, &(&1 + 1)), else: stats
    {:reply, {:error, reason}, %{state | stats: stats}}
  end

  # Records of a shard from a position: {records, at_end_of_closed_shard?}.
  defp read(state, shard_id, position, limit) do
    case Map.fetch(state.shards, shard_id) do
      {:ok, shard} ->
        records =
          shard.records
          |> :gb_trees.values()
          |> Enum.filter(&after_position?(&1, position))
          |> Enum.take(limit)

        ended = not open?(shard) and length(records) < limit
        {:ok, records, ended}

      :error ->
        {:error, {:aws, "ResourceNotFoundException", "shard #{shard_id} not found"}}
    end
  end

  defp after_position?(_record, :trim_horizon), do: true
  defp after_position?(_record, :latest), do: false

  defp after_position?(record, {:at_sequence_number, s}),
    do: String.to_integer(record.sequence_number) >= String.to_integer(s)

  defp after_position?(record, {:after_sequence_number, s}),
    do: String.to_integer(record.sequence_number) > String.to_integer(s)

  defp after_position?(record, {:at_timestamp, ms}),
    do: DateTime.to_unix(record.approximate_arrival_timestamp, :millisecond) >= ms
end
