defmodule Convoy.Queue do
  @moduledoc """
  One stream, opened for producing and consuming.

  A queue is a child of your supervision tree. Any process may `put/3`
  records into it; handlers attached with `attach_handler/4` receive the
  records read from it.

      children = [
        {Convoy.Queue, stream: "device_service_dev"}
      ]

      Supervisor.start_link(children, strategy: :one_for_one)

      :ok = Convoy.Queue.put("device_service_dev", "device-42", %{temperature: 21.5})

  Every call names the queue by its `stream_id`, which defaults to the stream
  name. To open one stream twice, give each queue its own `stream_id`.

  The work is done by the queue's `service` (`Convoy.Services.Kinesis` by
  default); see `Convoy.Service` to write another.

  ## Telemetry

  When the `:telemetry` library is loaded (checked once, when the `:convoy`
  application starts), Convoy emits the events below; otherwise it emits
  nothing, and its Rust tasks send no reports to build them from. Spans
  follow the `:telemetry` convention: `:start` has `%{monotonic_time,
  system_time}`; `:stop` and `:exception` have `%{duration, monotonic_time}`
  (native time units) plus what the table says; all three carry the same
  `telemetry_span_context` in their metadata, and `:exception` adds `kind`,
  `reason` and `stacktrace`. Every event's metadata has `stream` (the
  stream name, a string) and `stream_id`.

  | event | measurements | metadata | when |
  |---|---|---|---|
  | `[:convoy, :queue, :attach]` | `handler_count` | `handler_id` | a handler was attached (or replaced); Convoy 0.1 |
  | `[:convoy, :queue, :detach]` | `handler_count` | `handler_id` | a handler was detached, by a call or after failing; Convoy 0.1 |
  | `[:convoy, :queue, :records_sent]` | `count` | | Kinesis confirmed `count` records of one PutRecords request; Convoy 0.1 |
  | `[:convoy, :queue, :records_received]` | `count` | `shard_id`, `next_iterator` | a poll's GetRecords call returned (`count` Kinesis records, 0 for an empty poll); Convoy 0.1 |
  | `[:convoy, :put_records, :start \\| :stop \\| :exception]` | stop: `records`, `entries`, `bytes`, `acknowledged`, `retried`, `failed` | | one PutRecords request (each retry is a request); `:exception` when the request as a whole failed |
  | `[:convoy, :get_records, :start \\| :stop \\| :exception]` | stop: `count`, `millis_behind_latest` | `shard_id`, `next_iterator` | one GetRecords call of a shard's poller (empty ones included) or of `get/2`; with enhanced fan-out, one pushed event (duration: the wait for it; `next_iterator`: its continuation sequence number) |
  | `[:convoy, :handler, :start \\| :stop \\| :exception]` | stop: `count` | `shard_id`, `handler_id`; exception: `detached` | one handler on one batch: a function handler's calls on its records, or a pid handler from the batch sent to its ack |
  | `[:convoy, :batch, :stop]` | `count`, `duration`, `millis_behind_latest` | `shard_id` | what a shard's read brought went through every handler and was checkpointed (at a stop, the part finished) |
  | `[:convoy, :put, :failed]` | `count` | `reason` | records finally failed after all retries |
  | `[:convoy, :poller, :error]` | `count` (1) | `shard_id`, `reason` | a shard's reader met an error (it retries transient ones) |
  | `[:convoy, :handler, :failed]` | `count` (1) | `shard_id`, `handler_id`, `kind`, `reason`, `action`, `sequence_number` | a handler failed on a record for the last time its `:on_error` allows; `action` is `:detach`, `:halt` or `:dead_letter` |
  | `[:convoy, :shard, :halted]` | `count` (1) | `shard_id`, `handler_id`, `sequence_number`, `reason` | a shard stopped at a record under `on_error: :halt` |
  | `[:convoy, :record, :unparseable]` | `count` | `shard_id`, `records` (`[{sequence_number, reason}]`) | records that looked aggregated but could not be unpacked: one holding no user record (nothing delivered) or with a bad checksum or protobuf (delivered as a plain record, as the KCL does); the shard goes on |
  | `[:convoy, :lease, :taken]` | `count` (1) | `shard_id`, `previous_owner` | this node took a shard's lease (queues with `leases:`) |
  | `[:convoy, :lease, :lost]` | `count` (1) | `shard_id`, `reason` | this node lost a lease it held (taken by another node, or not renewed in time); the shard stops here |
  | `[:convoy, :lease, :error]` | `count` (1) | `shard_id` (or `:all`), `operation`, `reason` | a DynamoDB call for the leases or their checkpoints failed; it is retried |

  `records`, `count` and `acknowledged` count user records for PutRecords
  (an aggregated Kinesis record counts each record it carries) and Kinesis
  records for GetRecords. A handler's `:exception` is emitted for every
  failed call, also those that `on_error: :retry` retries (`detached:
  false`); a pid handler that dies, misses its `:ack_timeout` or is detached
  while it holds a batch ends its span with `kind: :exit`. The GetRecords
  calls of pull reads (`get/2`) on Kinesis are spanned too (they emit no
  `records_received`). `Convoy.Services.Memory` emits every event but
  the PutRecords span (it sends no requests), with `millis_behind_latest`
  0; a Convoy 0.1 service (`Convoy.Services.Legacy`) emits them all, each
  `put_records/2` call being one request, with `millis_behind_latest` nil.
  """

  alias Convoy.Queue.{HandleCache, Options, Topology}

  @typedoc "The identifier of a started queue: its `stream_id` option."
  @type stream_id :: term

  @typedoc """
  A handler: a 2-arity function called as `handler.(record, config)` for each
  record, or a pid that receives batches (see `attach_handler/5`).
  """
  @type handler :: (Convoy.Record.t(), term -> any) | pid

  @typedoc "Why a call failed."
  @type reason ::
          :unknown_stream
          | :closed
          | :overloaded
          | :timeout
          | {:invalid_partition_key, String.t()}
          | {:invalid_explicit_hash_key, String.t()}
          | {:invalid_data, String.t()}
          | {:record_too_large, non_neg_integer, non_neg_integer}
          | {:aws, String.t(), String.t()}
          | term

  @doc """
  A child spec for a supervision tree. Options are validated here, so a bad
  option raises `ArgumentError` when the tree is built.

  As in the original Convoy, the child id is `:"stream_\#{stream_id}"` and
  the restart type `:transient`, so supervisor calls that name the child
  (`Supervisor.terminate_child(sup, :stream_events)`) keep working. A
  `stream_id` that is neither an atom, a string nor a number has no such
  name: its child id is `{Convoy.Queue, stream_id}`.

  ## Example

      Supervisor.start_link([{Convoy.Queue, stream: :events}], strategy: :one_for_one)
      Supervisor.terminate_child(MyApp.Supervisor, :stream_events)
  """
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(options) do
    options = Options.validate!(options)

    %{
      id: child_id(options[:stream_id]),
      start: {__MODULE__, :start_link, [options]},
      restart: :transient,
      type: :supervisor,
      shutdown: :infinity
    }
  end

  defp child_id(id) when is_atom(id) or is_binary(id) or is_number(id), do: :"stream_#{id}"
  defp child_id(id), do: {__MODULE__, id}

  @doc """
  Starts a queue.

  The options are checked here (and already in `child_spec/1`): a bad one
  raises `ArgumentError` naming the option and the value.

  ## Options

  #{Options.docs()}
  ## Examples

      {:ok, _pid} = Convoy.Queue.start_link(stream: "events", batch_timeout: 100)

  A second queue on the same stream, for replaying it from its oldest record
  through a handler attached at start:

      {:ok, _pid} =
        Convoy.Queue.start_link(
          stream: "events",
          stream_id: :events_replay,
          iterator_type: :trim_horizon,
          poll_interval: 1_000,
          handlers: [{:printer, &MyApp.Printer.handle/2, %{}, on_error: :retry}]
        )

  A queue for tests, with no Kinesis at all:

      {:ok, _pid} =
        Convoy.Queue.start_link(
          stream: "events",
          service: Convoy.Services.Memory,
          service_options: [shards: 2]
        )
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(options) do
    options |> Options.validate!() |> Topology.start_link()
  end

  @doc """
  Puts a record. Returns `:ok` once the record is buffered; it is sent within
  `batch_timeout` ms.

  `data` is sent as it is when it is a binary; any other term is encoded as
  JSON the way Convoy 0.1 did with Poison: maps (structs without their
  `__struct__`), lists, numbers, strings, atoms, booleans and `nil`, with
  `DateTime`, `NaiveDateTime`, `Date` and `Time` as their ISO 8601 strings.
  `partition_key` is a string of 1..256 characters.

  ## Options

    * `:explicit_hash_key` - a decimal string in 0..2^128-1 that picks the
      shard instead of the key's hash.
    * `:await` - a timeout in ms (or `:infinity`): wait until Kinesis has
      acknowledged the record and return `{:ok, %{shard_id: id,
      sequence_number: seq}}` (with `aggregation: true` also
      `sub_sequence_number`, the record's index inside its aggregated
      record). The record still waits for its batch, up to `batch_timeout`
      ms, so the timeout should allow more than that. On `{:error,
      :timeout}` the record may still arrive later, and its outcome message
      (`{ref, result}`, `ref` a reference `put/4` made) may still reach the
      caller's mailbox; a GenServer calling this should ignore it.

  ## Errors

    * `{:error, :unknown_stream}` - no queue was started with this `stream_id`
    * `{:error, :closed}` - the queue is stopping, or restarting its producer
    * `{:error, :overloaded}` - the buffer is full (see `:max_buffered_records`)
    * `{:error, {:invalid_partition_key, detail}}`
    * `{:error, {:invalid_explicit_hash_key, detail}}`
    * `{:error, {:invalid_data, detail}}` - a term with no JSON form (pids,
      references, functions, tuples); `detail` says where it is, as in
      `"a pid has no JSON form, at [:user][\"pids\"][1]"`
    * `{:error, {:record_too_large, size, max}}`

  ## Example

      :ok = Convoy.Queue.put("events", "user-1", ~s({"clicked":true}))
      {:ok, %{shard_id: _, sequence_number: _}} =
        Convoy.Queue.put("events", "user-1", %{clicked: true}, await: 10_000)
  """
  @spec put(stream_id, String.t(), term, keyword) :: :ok | {:ok, map} | {:error, reason}
  def put(stream_id, partition_key, data, opts \\ []) do
    # The handle found last time, while it is certainly still the registered
    # one (see Convoy.Queue.HandleCache); else through the Registry.
    with {:ok, put, handle} <- HandleCache.fetch(stream_id),
         {:error, :closed} <- put.(handle, partition_key, data, opts) do
      HandleCache.forget(stream_id)
      put_looked_up(stream_id, partition_key, data, opts)
    else
      :miss -> put_looked_up(stream_id, partition_key, data, opts)
      result -> result
    end
  end

  defp put_looked_up(stream_id, partition_key, data, opts) do
    # Read before the lookup: a change after it shows as a newer generation.
    generation = HandleCache.generation()

    case Registry.lookup(Convoy.Registry, {:handle, Topology.key(stream_id)}) do
      [{owner, {service, handle}}] ->
        HandleCache.store(stream_id, generation, owner, service, handle)
        service.put(handle, partition_key, data, opts)

      [] ->
        missing(stream_id)
    end
  end

  @doc """
  Sends everything buffered now instead of waiting for `batch_timeout`.

  With `await: timeout`, returns once every record buffered before the call
  has an outcome (acknowledged or failed), or `{:error, :timeout}`. Bad
  options give `{:error, {:invalid_options | :unknown_options | :invalid_await, _}}`.

  ## Example

      :ok = Convoy.Queue.flush("events", await: 10_000)
  """
  @spec flush(stream_id, keyword) :: :ok | {:error, reason}
  def flush(stream_id, opts \\ []) do
    case lookup(stream_id) do
      {:ok, service, handle} -> service.flush(handle, opts)
      error -> error
    end
  end

  @doc """
  Reads up to `limit` records across the stream's shards and advances the
  queue's positions, so the next call continues where this one stopped.
  Returns `{:error, :polling}` while handlers are attached and polling, and
  `{:error, :leases}` for a queue with `:leases`, whose shards are read by
  handlers only, on the nodes holding their leases.

  A call reads the shards in turn, starting each time with the next one, so
  no shard waits for another to be drained; it follows each shard's
  iterator across empty answers, spaces the reads of a shard by 200 ms (the
  5 reads per second Kinesis allows), and stops once it has `limit`
  records, every shard is caught up, after 10 rounds, or once it has read
  for 20 seconds (a read started by then still finishes; the call waits for
  it, since the records it returns are already checkpointed). A closed
  shard read
  to its end is checkpointed as ended and its children are read next, as
  when polling.

  `limit` counts user records: the user records of an aggregated record
  (see `:aggregation`) that do not fit are kept for the next call. The
  checkpoint of a shard is the last record returned, with its sub-sequence
  number when it came out of an aggregated record, so a restart goes on
  with the next user record: none is returned twice or skipped.

  ## Example

      records = Convoy.Queue.get("events", 100)
  """
  @spec get(stream_id, pos_integer) :: [Convoy.Record.t()] | {:error, reason}
  def get(stream_id, limit \\ 10)

  def get(stream_id, limit) when is_integer(limit) and limit > 0 and limit <= 10_000 do
    case lookup(stream_id) do
      {:ok, service, handle} -> service.get(handle, limit)
      error -> error
    end
  end

  def get(_stream_id, limit), do: {:error, {:invalid_limit, limit}}

  @doc """
  Attaches a handler, replacing the one attached under `handler_id`, if any,
  as the original Convoy did. Same as `attach_handler/5` with
  `replace: true`; `attach_handler/5` without it refuses an id in use.

  ## Example

      Convoy.Queue.attach_handler("events", :printer, fn record, _config -> IO.inspect(record) end, nil)
  """
  @spec attach_handler(stream_id, term, handler, term) :: :ok | {:error, reason}
  def attach_handler(stream_id, handler_id, handler, config),
    do: attach_handler(stream_id, handler_id, handler, config, replace: true)

  @doc """
  Attaches a handler under `handler_id`. Polling starts with the first
  handler (when the queue has a `poll_interval`).

  A function handler is called as `handler.(record, config)` for every record,
  in shard order. A pid handler is sent, for each batch of a shard,

      {:convoy_batch, %Convoy.Batch{stream_id: id, shard_id: shard, records: records}}

  and must answer `Convoy.Queue.ack(batch)` when done; the shard reads on only
  after every handler has finished its batch. A Kinesis batch holds at most
  500 Kinesis records and 1 MiB of data (more user records when they are
  aggregated): what one GetRecords call (or fan-out event) read comes in
  chunks of that size, and the shard's checkpoint is stored once the last
  of them is finished.

  A shard's batch goes through the handlers one after another, in attach
  order: a handler gets it once the handler attached before it has finished
  it (a pid handler by acking it). A pid handler that is detached or dies
  while it holds a batch no longer holds up the shard: the batch goes on to
  the next handler, and a late ack is ignored. One that misses its
  `:ack_timeout`, nacks or acks part of the batch is dealt with by its
  `:on_error` (by default it is detached and the batch goes on).
  A batch that none of the attached handlers finished (they all failed on it,
  or the last one was detached) is not checkpointed: handlers attached later
  receive it again. A handler detached, or detached after a failure, and
  attached again under the same id is a new handler and receives the records
  of every shard.

  ## Options

    * `:partition_keys` - only records with these keys: a string, a list of
      strings, or a 1-arity predicate on the key.
    * `:on_error` - what happens when a handler fails on a record (a
      function raises, throws or exits; a pid handler nacks, acks part of a
      batch with `ack/2`, or misses its `:ack_timeout`): `:detach` (the
      default, as the original Convoy did) logs the error with its
      stacktrace and detaches the handler; `:halt` stops the shard at that
      record, with no checkpoint past it, until the handlers change or the
      queue restarts; `{:dead_letter, fun}` hands the record to
      `fun.(record, %{handler_id:, kind:, reason:, attempts:})` and goes on;
      `:retry` tries again with backoff until it works; `{:retry, n}` makes
      `n` attempts, then detaches; `{:retry, n, then}` does `then` (one of
      the first three) after the last attempt. The checkpoint never moves
      past a record no policy accounted for.
    * `:ack_timeout` - ms a pid handler has to ack a batch; past it the
      batch counts as failed and `:on_error` applies. Defaults to
      `:infinity`.
    * `:replace` - when `handler_id` is already attached: `false` (the
      default) answers `{:error, :already_exists}`; `true` replaces that
      handler, as `attach_handler/4` and `attach/4` do. The replacement is a
      new handler in the old one's place in the attach order: a batch the
      old one was still working on (or had finished, while later handlers
      had not) is handed to it again.

  Returns `{:error, :already_exists}` when the id is taken and `:replace` is
  not `true`.

  ## Example

      :ok =
        Convoy.Queue.attach_handler("events", :audit, &MyApp.Audit.handle/2, %{},
          partition_keys: ["user-1", "user-2"],
          on_error: :retry
        )
  """
  @spec attach_handler(stream_id, term, handler, term, keyword) :: :ok | {:error, reason}
  def attach_handler(stream_id, handler_id, handler, config, opts) do
    with {:ok, service, handle} <- lookup(stream_id),
         {:ok, opts} <- Options.handler(handler, opts) do
      service.attach_handler(handle, handler_id, handler, config, opts)
    end
  end

  @doc """
  Detaches a handler. Polling stops when the last one goes; positions are
  kept, so attaching again resumes where reading stopped.

  As in the original Convoy, detaching an id that is not attached is a no-op
  answering `:ok`; with `strict: true` it answers `{:error, :not_found}`.

  ## Example

      :ok = Convoy.Queue.detach_handler("events", :printer)
      {:error, :not_found} = Convoy.Queue.detach_handler("events", :printer, strict: true)
  """
  @spec detach_handler(stream_id, term, keyword) :: :ok | {:error, :not_found | reason}
  def detach_handler(stream_id, handler_id, opts \\ []) do
    with {:ok, strict} <- strict_option(opts),
         {:ok, service, handle} <- lookup(stream_id) do
      case service.detach_handler(handle, handler_id) do
        {:error, :not_found} when not strict -> :ok
        result -> result
      end
    end
  end

  defp strict_option(opts) do
    case opts do
      [] -> {:ok, false}
      [strict: strict] when is_boolean(strict) -> {:ok, strict}
      _ -> {:error, {:invalid_options, opts}}
    end
  end

  @doc """
  The original name of `attach_handler/4`: an id already attached is
  replaced.

  ## Example

      :ok = Convoy.Queue.attach(:events, :printer, fn record, _ -> IO.inspect(record) end, nil)
  """
  @spec attach(stream_id, term, handler, term) :: :ok | {:error, reason}
  def attach(stream_id, handler_id, handler, config),
    do: attach_handler(stream_id, handler_id, handler, config)

  @doc """
  The original name of `detach_handler/2`: an unknown id answers `:ok`.

  ## Example

      :ok = Convoy.Queue.detach(:events, :printer)
  """
  @spec detach(stream_id, term) :: :ok | {:error, reason}
  def detach(stream_id, handler_id), do: detach_handler(stream_id, handler_id)

  @doc """
  Acknowledges a batch delivered to a pid handler.

  ## Example

      receive do
        {:convoy_batch, batch} ->
          Enum.each(batch.records, &process/1)
          Convoy.Queue.ack(batch)
      end
  """
  @spec ack(Convoy.Batch.t()) :: :ok
  def ack(%Convoy.Batch{dispatcher: dispatcher, ref: ref}) do
    send(dispatcher, {:convoy_ack, ref})
    :ok
  end

  @doc """
  Acknowledges the first `count` records of a batch delivered to a pid
  handler; the records after them failed, and the handler's `:on_error`
  policy applies to them (with `:retry`, a batch of the rest is sent
  again). The checkpoint never moves past a record that was neither
  acknowledged nor accounted for by the policy.

  ## Example

      {done, _rest} = Enum.split_while(batch.records, &process/1)
      Convoy.Queue.ack(batch, length(done))
  """
  @spec ack(Convoy.Batch.t(), non_neg_integer) :: :ok
  def ack(%Convoy.Batch{dispatcher: dispatcher, ref: ref, records: records}, count)
      when is_integer(count) and count >= 0 do
    if count >= length(records),
      do: send(dispatcher, {:convoy_ack, ref}),
      else: send(dispatcher, {:convoy_ack, ref, count})

    :ok
  end

  @doc """
  Refuses a whole batch delivered to a pid handler: the handler's
  `:on_error` policy applies to all of its records (with `:retry` the batch
  is sent again after a pause, with `:halt` the shard stops at its first
  record).

  ## Example

      receive do
        {:convoy_batch, batch} ->
          case store(batch.records) do
            :ok -> Convoy.Queue.ack(batch)
            {:error, reason} -> Convoy.Queue.nack(batch, reason)
          end
      end
  """
  @spec nack(Convoy.Batch.t(), term) :: :ok
  def nack(%Convoy.Batch{dispatcher: dispatcher, ref: ref}, reason \\ :nack) do
    send(dispatcher, {:convoy_nack, ref, reason})
    :ok
  end

  @doc """
  Counters of the queue, read cheaply from Rust: `buffered` (records waiting
  for a request), `buffered_bytes` (the bytes the buffer budget holds:
  records waiting and in flight), `in_flight`, `sent`, `retried`,
  `throttled`, `failed`.

  ## Example

      %{sent: sent, failed: 0} = Convoy.Queue.stats("events")
  """
  @spec stats(stream_id) :: map | {:error, reason}
  def stats(stream_id) do
    case lookup(stream_id) do
      {:ok, service, handle} -> service.stats(handle)
      error -> error
    end
  end

  @doc """
  Registers the handle of a started service under `stream_id`, for the
  calling process: `put/4` and the other calls find the handle without a
  process hop, and the entry goes when that process ends. Services call this
  from the process that owns what the handle refers to.

  ## Example

      :ok = Convoy.Queue.register(options[:stream_id], __MODULE__, handle)
  """
  @spec register(stream_id, module, Convoy.Service.handle()) :: :ok | {:error, term}
  def register(stream_id, service, handle) do
    case Registry.register(Convoy.Registry, {:handle, Topology.key(stream_id)}, {service, handle}) do
      {:ok, _owner} -> HandleCache.bump()
      {:error, _} = error -> error
    end
  end

  @doc """
  Removes the calling process's handle for `stream_id`: calls then return
  `{:error, :closed}` while the queue's tree is still up (stopping or
  restarting), and `{:error, :unknown_stream}` once it is gone.

  ## Example

      :ok = Convoy.Queue.unregister(options[:stream_id])
  """
  @spec unregister(stream_id) :: :ok
  def unregister(stream_id) do
    :ok = Registry.unregister(Convoy.Registry, {:handle, Topology.key(stream_id)})
    HandleCache.bump()
  end

  defp lookup(stream_id) do
    case Registry.lookup(Convoy.Registry, {:handle, Topology.key(stream_id)}) do
      [{_owner, {service, handle}}] ->
        {:ok, service, handle}

      [] ->
        missing(stream_id)
    end
  end

  defp missing(stream_id) do
    if Topology.whereis(__MODULE__, stream_id),
      do: {:error, :closed},
      else: {:error, :unknown_stream}
  end
end
