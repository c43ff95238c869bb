defmodule Convoy.Consumer.ShardDispatcher do
  @moduledoc false
  # One process per shard being read. It owns the shard's reader (for
  # Kinesis a native poller, which stops when this process goes), receives
  # each batch the reader sends, runs it through the handlers in attach order, stores the
  # checkpoint, and only then acknowledges the batch so the poller reads on.
  #
  # Handler failures are contained here: the handler is logged and detached
  # (or retried with `on_error: :retry`), the shard goes on.

  use GenServer, restart: :temporary

  require Logger

  alias Convoy.Telemetry

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  def set_handlers(pid, handlers), do: send(pid, {:handlers, handlers})

  def stop_async(pid), do: send(pid, :stop)

  def stop(pid) do
    GenServer.stop(pid, :normal, 5_000)
  catch
    :exit, _ -> :ok
  end

  @impl true
  def init(args) do
    {module, source} = args.source

    reader =
      module.start_reader(source, args.shard_id, args.position, self(), args.reader_options)

    {:ok, Map.merge(args, %{reader: reader, reader_module: module, failed: MapSet.new()})}
  end

  @impl true
  def handle_info({:convoy_records, _shard_id, raw, millis_behind}, state) do
    started = System.monotonic_time()
    records = raw
    state = Enum.reduce(state.handlers, state, &run_handler(&1, records, &2))
    last = List.last(records)
    {module, checkpoint} = state.checkpoint
    :ok = module.store(checkpoint, state.stream_id, state.shard_id, last.sequence_number)
    state.reader_module.ack(state.reader)

    Telemetry.execute(
      [:convoy, :batch, :stop],
      %{
        count: length(records),
        duration: System.monotonic_time() - started,
        millis_behind_latest: millis_behind
      },
      %{stream_id: state.stream_id, shard_id: state.shard_id}
    )

    {:noreply, state}
  end

  def handle_info({:convoy_shard_end, _shard_id}, state) do
    {module, checkpoint} = state.checkpoint
    :ok = module.store(checkpoint, state.stream_id, state.shard_id, :shard_end)
    send(state.consumer, {:shard_ended, state.shard_id})
    {:stop, :normal, state}
  end

  def handle_info({:convoy_poller_error, _shard_id, reason}, state) do
    reader_error(:warning, "reading #{state.shard_id}", reason, state)
    {:noreply, state}
  end

  def handle_info({:convoy_poller_stopped, _shard_id, reason}, state) do
    # The reader gave up on an error retrying cannot cure. Stopping lets the
    # consumer start this shard again from its checkpoint, after a pause.
    reader_error(:error, "reading #{state.shard_id} stopped", reason, state)
    {:stop, {:reader_stopped, reason}, state}
  end

  def handle_info({:convoy_task_panic, what, message}, state) do
    Logger.error(
      "Convoy #{inspect(state.stream_id)}: #{what} of #{state.shard_id} panicked: #{message}"
    )

    {:stop, {:poller_panic, message}, state}
  end

  def handle_info({:handlers, handlers}, state) do
    {:noreply, %{state | handlers: Enum.reject(handlers, &MapSet.member?(state.failed, &1.id))}}
  end

  def handle_info(:stop, state), do: {:stop, :normal, state}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    state.reader_module.stop_reader(state.reader)
  end

  # ---------------------------------------------------------------------------

  defp reader_error(level, what, reason, state) do
    Logger.log(level, "Convoy #{inspect(state.stream_id)}: #{what}: #{inspect(reason)}")

    Telemetry.execute([:convoy, :poller, :error], %{count: 1}, %{
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      reason: reason
    })
  end

  defp run_handler(handler, records, state) do
    if MapSet.member?(state.failed, handler.id) do
      state
    else
      case select(records, handler.opts[:partition_keys]) do
        [] -> state
        selected -> deliver(handler, selected, state)
      end
    end
  end

  defp select(records, nil), do: records

  defp select(records, key) when is_binary(key),
    do: Enum.filter(records, &(&1.partition_key == key))

  defp select(records, keys) when is_list(keys),
    do: Enum.filter(records, &(&1.partition_key in keys))

  defp select(records, fun) when is_function(fun, 1),
    do: Enum.filter(records, &fun.(&1.partition_key))

  defp deliver(%{handler: pid} = handler, records, state) when is_pid(pid) do
    ref = make_ref()
    monitor = Process.monitor(pid)

    batch = %Convoy.Batch{
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id,
      records: records,
      ref: ref,
      dispatcher: self()
    }

    send(pid, {:convoy_batch, batch})

    receive do
      {:convoy_ack, ^ref} ->
        Process.demonitor(monitor, [:flush])
        state

      {:DOWN, ^monitor, :process, ^pid, reason} ->
        handler_failed(handler, :exit, {:handler_down, reason}, [], state)
    after
      handler.opts[:ack_timeout] ->
        Process.demonitor(monitor, [:flush])
        handler_failed(handler, :exit, :ack_timeout, [], state)
    end
  end

  defp deliver(handler, records, state) do
    attempts =
      case handler.opts[:on_error] do
        :retry -> 5
        {:retry, n} -> n
        _ -> 1
      end

    Enum.reduce_while(records, state, fn record, state ->
      case call(handler, record, attempts, 1) do
        :ok -> {:cont, state}
        {kind, reason, stack} -> {:halt, handler_failed(handler, kind, reason, stack, state)}
      end
    end)
  end

  defp call(handler, record, attempts, attempt) do
    handler.handler.(record, handler.config)
    :ok
  catch
    kind, reason ->
      stack = __STACKTRACE__

      if attempt < attempts do
        Process.sleep(min(100 * Integer.pow(2, attempt - 1), 5_000))
        call(handler, record, attempts, attempt + 1)
      else
        {kind, reason, stack}
      end
  end

  defp handler_failed(handler, kind, reason, stack, state) do
    Logger.error(
      "Convoy #{inspect(state.stream_id)}: handler #{inspect(handler.id)} failed on #{state.shard_id} " <>
        "and is detached:\n" <> Exception.format(kind, reason, stack)
    )

    Telemetry.execute([:convoy, :handler, :exception], %{count: 1}, %{
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id,
      kind: kind,
      reason: reason
    })

    send(state.consumer, {:handler_failed, handler.id})
    %{state | failed: MapSet.put(state.failed, handler.id)}
  end
end
