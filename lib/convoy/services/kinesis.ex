defmodule Convoy.Services.Kinesis do
  @moduledoc """
  The Kinesis Data Streams service behind `Convoy.Queue` (the default
  `:service`).

  Producing runs in the Rust NIF: `put/4` validates the record and hands it to
  the queue's batcher without a process hop. Consuming runs there too: one
  poller task per shard reads GetRecords and sends each batch to that shard's
  dispatcher process (`Convoy.Services.Kinesis.ShardDispatcher`), which calls
  the handlers and acknowledges the batch before the next one is read.

  This process owns the native resources, the handler list, the shard map and
  the checkpoint store. See `Convoy.Queue` for the API and options.

  ## Example

      {:ok, _} = Convoy.Queue.start_link(stream: "events", service: Convoy.Services.Kinesis)
  """
  @behaviour Convoy.Service
  use GenServer

  require Logger

  alias Convoy.{KinesisConfig, Native, Telemetry}
  alias Convoy.Services.Kinesis.ShardDispatcher

  @typedoc "The handle registered for the queue."
  @type t :: %{producer: reference, server: pid, stream_id: term}

  # ---------------------------------------------------------------------------
  # Convoy.Service

  @impl Convoy.Service
  def child_spec(options) do
    %{
      id: {__MODULE__, options[:stream_id]},
      start: {__MODULE__, :start_link, [options]},
      shutdown: options[:shutdown] + 1_000
    }
  end

  @doc """
  Starts the service for one queue; `Convoy.Queue.start_link/1` calls this
  with validated options.

  ## Example

      Convoy.Services.Kinesis.start_link(Convoy.Queue.Options.validate!(stream: "events"))
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options) do
    name = {:via, Registry, {Convoy.Registry, options[:stream_id]}}
    GenServer.start_link(__MODULE__, options, name: name)
  end

  @impl Convoy.Service
  def put(%{producer: producer}, key, data, []) do
    native_put(producer, key, data, nil, nil)
  end

  def put(%{producer: producer}, key, data, opts) do
    with {:ok, hash_key, await} <- put_options(opts) do
      case await do
        nil ->
          native_put(producer, key, data, hash_key, nil)

        timeout ->
          id = System.unique_integer([:positive])

          with :ok <- native_put(producer, key, data, hash_key, {self(), id}) do
            receive do
              {:convoy_put, ^id, result} -> result
            after
              timeout -> {:error, :timeout}
            end
          end
      end
    end
  end

  defp native_put(producer, key, data, hash_key, reply) when is_binary(data),
    do: Native.producer_put(producer, key, data, hash_key, reply)

  defp native_put(producer, key, data, hash_key, reply),
    do: Native.producer_put_term(producer, key, data, hash_key, reply)

  defp put_options(opts) do
    if is_list(opts) and Keyword.keyword?(opts) do
      case Keyword.split(opts, [:explicit_hash_key, :await]) do
        {known, []} ->
          check_await(Keyword.get(known, :explicit_hash_key), Keyword.get(known, :await))

        {_, unknown} ->
          {:error, {:unknown_options, Keyword.keys(unknown)}}
      end
    else
      {:error, {:invalid_options, opts}}
    end
  end

  defp check_await(hash_key, await)
       when is_nil(await) or await == :infinity or (is_integer(await) and await >= 0),
       do: {:ok, hash_key, await}

  defp check_await(_hash_key, await), do: {:error, {:invalid_await, await}}

  @impl Convoy.Service
  def flush(%{producer: producer}, opts) do
    case Keyword.get(opts, :await) do
      nil ->
        Native.producer_flush(producer, nil)

      timeout ->
        id = System.unique_integer([:positive])
        :ok = Native.producer_flush(producer, {self(), id})

        receive do
          {:convoy_flushed, ^id} -> :ok
        after
          timeout -> {:error, :timeout}
        end
    end
  end

  @impl Convoy.Service
  def get(%{server: server}, limit), do: GenServer.call(server, {:get, limit}, 60_000)

  @impl Convoy.Service
  def attach_handler(%{server: server}, id, handler, config, opts),
    do: GenServer.call(server, {:attach, id, handler, config, opts})

  @impl Convoy.Service
  def detach_handler(%{server: server}, id), do: GenServer.call(server, {:detach, id})

  @impl Convoy.Service
  def stats(%{producer: producer}), do: Native.producer_stats(producer)

  # ---------------------------------------------------------------------------
  # Server

  @impl GenServer
  def init(options) do
    Process.flag(:trap_exit, true)
    kinesis = options[:kinesis]

    case Native.call(&Native.client_new(KinesisConfig.to_native(kinesis), &1, &2)) do
      {:ok, client} ->
        {checkpoint_module, checkpoint_options} = options[:checkpoint]

        {:ok, checkpoint} =
          checkpoint_module.init([{:stream_id, options[:stream_id]} | checkpoint_options])

        producer = Native.producer_start(client, producer_options(options))
        handle = %{producer: producer, server: self(), stream_id: options[:stream_id]}
        Convoy.Queue.register(options[:stream_id], __MODULE__, handle)

        {:ok,
         %{
           options: options,
           stream_id: options[:stream_id],
           client: client,
           producer: producer,
           checkpoint: {checkpoint_module, checkpoint},
           handlers: %{},
           next_order: 0,
           shards: %{},
           ended: MapSet.new(),
           dispatchers: %{},
           stopping: %{},
           polling: false,
           refresh_ref: nil,
           started_at: System.system_time(:millisecond)
         }}

      {:error, reason} ->
        {:stop, {:kinesis_client, reason}}
    end
  end

  defp producer_options(options) do
    %{
      stream_name: options[:stream],
      batch_timeout_ms: options[:batch_timeout],
      max_in_flight: options[:max_in_flight],
      max_buffered_records: options[:max_buffered_records],
      max_buffered_bytes: options[:max_buffered_bytes],
      max_record_bytes: options[:max_record_bytes],
      max_retries: options[:max_retries],
      retry_deadline_ms: options[:retry_deadline],
      retry_base_ms: options[:retry_backoff],
      max_backoff_ms: options[:max_backoff],
      aggregation_max_bytes:
        if(options[:aggregation], do: options[:aggregation_max_bytes], else: 0),
      shard_refresh_ms: options[:shard_refresh_interval],
      owner: self()
    }
  end

  @impl GenServer
  def handle_call({:attach, id, handler, config, opts}, _from, state) do
    if Map.has_key?(state.handlers, id) do
      {:reply, {:error, :already_exists}, state}
    else
      entry = %{id: id, handler: handler, config: config, opts: opts, order: state.next_order}
      if is_pid(handler), do: Process.monitor(handler)

      state = %{
        state
        | handlers: Map.put(state.handlers, id, entry),
          next_order: state.next_order + 1
      }

      {:reply, :ok, state |> broadcast_handlers() |> update_polling()}
    end
  end

  def handle_call({:detach, id}, _from, state) do
    if Map.has_key?(state.handlers, id) do
      {:reply, :ok, remove_handler(state, id)}
    else
      {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call({:get, _limit}, _from, %{polling: true} = state) do
    {:reply, {:error, :polling}, state}
  end

  def handle_call({:get, limit}, _from, state) do
    with {:ok, state} <- list_shards(state),
         positions = Enum.map(readable_shards(state), &{&1, position(state, &1)}),
         {:ok, shards} <-
           Native.call(
             &Native.fetch_records(
               state.client,
               state.options[:stream],
               positions,
               limit,
               &1,
               &2
             ),
             55_000
           ) do
      records =
        Enum.flat_map(shards, fn {shard_id, raw} ->
          records = Convoy.Record.from_native(raw, shard_id, state.stream_id)

          if last = List.last(records) do
            store_checkpoint(state, shard_id, last.sequence_number)
          end

          records
        end)

      {:reply, records, state}
    else
      {:error, reason} -> {:reply, {:error, reason}, state}
    end
  end

  @impl GenServer
  def handle_info({:convoy_put_failed, failures}, state) do
    report_failures(failures, state)
    {:noreply, state}
  end

  def handle_info({:shard_ended, shard_id}, state) do
    state = %{state | ended: MapSet.put(state.ended, shard_id)}
    # Children appear in the shard list once their parent closed.
    {:noreply, refresh(state)}
  end

  def handle_info({:handler_failed, id}, state) do
    if Map.has_key?(state.handlers, id),
      do: {:noreply, remove_handler(state, id)},
      else: {:noreply, state}
  end

  def handle_info(:refresh_shards, state) do
    {:noreply, refresh(%{state | refresh_ref: nil})}
  end

  def handle_info({:restart_shard, shard_id}, state) do
    {:noreply, start_shards(state, [shard_id])}
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    ids = for {id, %{handler: ^pid}} <- state.handlers, do: id
    {:noreply, Enum.reduce(ids, state, &remove_handler(&2, &1))}
  end

  def handle_info({:EXIT, pid, reason}, state) do
    cond do
      Map.has_key?(state.stopping, pid) ->
        {shard_id, stopping} = Map.pop(state.stopping, pid)
        state = %{state | stopping: stopping}
        {:noreply, if(state.polling, do: start_shards(state, [shard_id]), else: state)}

      shard_id = find_dispatcher(state, pid) ->
        state = %{state | dispatchers: Map.delete(state.dispatchers, shard_id)}

        if reason not in [:normal, :shutdown] do
          Logger.error(
            "Convoy #{inspect(state.stream_id)}: dispatcher of #{shard_id} exited: #{inspect(reason)}; restarting"
          )

          Process.send_after(self(), {:restart_shard, shard_id}, 1_000)
        end

        {:noreply, state}

      true ->
        {:noreply, state}
    end
  end

  def handle_info({:convoy_task_panic, what, message}, state) do
    Logger.error("Convoy #{inspect(state.stream_id)}: #{what} panicked: #{message}")
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    Convoy.Queue.unregister(state.stream_id)
    # Leave a little of the supervisor's shutdown time for the replies.
    deadline = max(state.options[:shutdown] - 500, 100)
    id = System.unique_integer([:positive])
    :ok = Native.producer_close(state.producer, deadline, self(), id)
    await_close(id, state, deadline + 1_000)
    Enum.each(Map.values(state.dispatchers), &ShardDispatcher.stop/1)
    :ok
  end

  defp await_close(id, state, timeout) do
    receive do
      {:convoy_closed, ^id} ->
        drain_failures(state)

      {:convoy_put_failed, failures} ->
        report_failures(failures, state)
        await_close(id, state, timeout)
    after
      timeout ->
        Logger.error("Convoy #{inspect(state.stream_id)}: producer did not close in time")
    end
  end

  defp drain_failures(state) do
    receive do
      {:convoy_put_failed, failures} ->
        report_failures(failures, state)
        drain_failures(state)
    after
      0 -> :ok
    end
  end

  # ---------------------------------------------------------------------------
  # Failed records

  defp report_failures(failures, state) do
    by_reason = Enum.group_by(failures, fn {_key, _data, reason} -> reason end)

    for {reason, group} <- by_reason do
      Logger.error(
        "Convoy #{inspect(state.stream_id)}: #{length(group)} record(s) failed after retries: #{inspect(reason)}"
      )

      Telemetry.execute([:convoy, :put, :failed], %{count: length(group)}, %{
        stream_id: state.stream_id,
        reason: reason
      })
    end

    case state.options[:on_failure] do
      nil ->
        :ok

      fun when is_function(fun, 1) ->
        Enum.each(failures, fn {key, data, reason} ->
          try do
            fun.(%{partition_key: key, data: data, reason: reason})
          rescue
            e ->
              Logger.error(
                "Convoy on_failure callback raised: " <>
                  Exception.format(:error, e, __STACKTRACE__)
              )
          end
        end)

      dest ->
        payload =
          Enum.map(failures, fn {key, data, reason} ->
            %{partition_key: key, data: data, reason: reason}
          end)

        send(dest, {:convoy_put_failed, state.stream_id, payload})
    end
  rescue
    # A dead registered name must not take the queue down.
    e in ArgumentError ->
      Logger.error("Convoy on_failure destination unreachable: #{Exception.message(e)}")
  end

  # ---------------------------------------------------------------------------
  # Handlers and polling

  defp remove_handler(state, id) do
    %{state | handlers: Map.delete(state.handlers, id)}
    |> broadcast_handlers()
    |> update_polling()
  end

  defp handler_list(state), do: state.handlers |> Map.values() |> Enum.sort_by(& &1.order)

  defp broadcast_handlers(state) do
    handlers = handler_list(state)
    Enum.each(Map.values(state.dispatchers), &ShardDispatcher.set_handlers(&1, handlers))
    state
  end

  defp update_polling(state) do
    wanted = map_size(state.handlers) > 0 and not is_nil(state.options[:poll_interval])

    cond do
      wanted and not state.polling -> refresh(%{state | polling: true})
      not wanted and state.polling -> stop_polling(state)
      true -> state
    end
  end

  defp stop_polling(state) do
    if state.refresh_ref, do: Process.cancel_timer(state.refresh_ref)

    stopping =
      Enum.reduce(state.dispatchers, state.stopping, fn {shard_id, pid}, acc ->
        ShardDispatcher.stop_async(pid)
        Map.put(acc, pid, shard_id)
      end)

    %{state | polling: false, dispatchers: %{}, stopping: stopping, refresh_ref: nil}
  end

  defp refresh(%{polling: false} = state), do: state

  defp refresh(state) do
    state =
      case list_shards(state) do
        {:ok, state} ->
          start_shards(state, readable_shards(state))

        {:error, reason} ->
          Logger.warning(
            "Convoy #{inspect(state.stream_id)}: ListShards failed: #{inspect(reason)}"
          )

          state
      end

    if state.refresh_ref, do: Process.cancel_timer(state.refresh_ref)

    %{
      state
      | refresh_ref:
          Process.send_after(self(), :refresh_shards, state.options[:shard_refresh_interval])
    }
  end

  defp list_shards(state) do
    case Native.call(&Native.list_shards_nif(state.client, state.options[:stream], &1, &2)) do
      {:ok, shards} ->
        shards = Map.new(shards, &{&1.shard_id, &1})
        {:ok, %{state | shards: shards}}

      {:error, _} = error ->
        error
    end
  end

  # Shards that may be read now: not finished, and every parent finished (a
  # parent no longer listed has aged out of the stream and counts as finished).
  defp readable_shards(state) do
    state.shards
    |> Map.values()
    |> Enum.filter(fn shard ->
      not ended?(state, shard.shard_id) and
        Enum.all?([shard.parent_shard_id, shard.adjacent_parent_shard_id], fn parent ->
          is_nil(parent) or not Map.has_key?(state.shards, parent) or ended?(state, parent)
        end)
    end)
    |> Enum.map(& &1.shard_id)
    |> Enum.sort()
  end

  defp ended?(state, shard_id) do
    MapSet.member?(state.ended, shard_id) or
      fetch_checkpoint(state, shard_id) == {:ok, :shard_end}
  end

  defp start_shards(%{polling: false} = state, _), do: state

  defp start_shards(state, shard_ids) do
    Enum.reduce(shard_ids, state, fn shard_id, state ->
      busy = Map.has_key?(state.dispatchers, shard_id) or shard_id in Map.values(state.stopping)

      if busy or ended?(state, shard_id) do
        state
      else
        {:ok, pid} =
          ShardDispatcher.start_link(%{
            server: self(),
            stream_id: state.stream_id,
            stream: state.options[:stream],
            shard_id: shard_id,
            client: state.client,
            position: position(state, shard_id),
            handlers: handler_list(state),
            checkpoint: state.checkpoint,
            poll_interval: state.options[:poll_interval],
            poll_limit: state.options[:poll_limit],
            retry_backoff: state.options[:retry_backoff],
            max_backoff: state.options[:max_backoff]
          })

        %{state | dispatchers: Map.put(state.dispatchers, shard_id, pid)}
      end
    end)
  end

  defp find_dispatcher(state, pid) do
    Enum.find_value(state.dispatchers, fn {shard_id, p} -> if p == pid, do: shard_id end)
  end

  # Where a shard resumes: after its checkpoint; a shard born from resharding
  # from its start; any other from `iterator_type`, with `:latest` pinned to
  # the queue's start time so that no restart of polling leaves a gap.
  defp position(state, shard_id) do
    shard = Map.get(state.shards, shard_id, %{parent_shard_id: nil})

    case fetch_checkpoint(state, shard_id) do
      {:ok, sequence} when is_binary(sequence) ->
        {:after_sequence_number, sequence}

      _ ->
        cond do
          shard.parent_shard_id != nil -> :trim_horizon
          true -> initial_position(state)
        end
    end
  end

  defp initial_position(state) do
    case state.options[:iterator_type] do
      :latest -> {:at_timestamp, state.started_at}
      {:at_timestamp, %DateTime{} = at} -> {:at_timestamp, DateTime.to_unix(at, :millisecond)}
      other -> other
    end
  end

  defp fetch_checkpoint(%{checkpoint: {module, checkpoint}, stream_id: stream_id}, shard_id),
    do: module.fetch(checkpoint, stream_id, shard_id)

  defp store_checkpoint(
         %{checkpoint: {module, checkpoint}, stream_id: stream_id},
         shard_id,
         sequence
       ),
       do: module.store(checkpoint, stream_id, shard_id, sequence)
end
