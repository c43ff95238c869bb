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
  alias Convoy.Services.Kinesis.{Heir, Source}

  @typedoc "The handle registered for the queue."
  @type t :: %{producer: reference, consumer: pid, stream_id: term}

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
    with {:ok, hash_key, await} <- Convoy.Queue.PutOptions.parse(opts) do
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

  @impl Convoy.Service
  def flush(%{producer: producer}, opts) do
    case flush_timeout(opts) do
      {:ok, nil} ->
        Native.producer_flush(producer, nil)

      {:ok, timeout} ->
        id = System.unique_integer([:positive])
        :ok = Native.producer_flush(producer, {self(), id})

        receive do
          {:convoy_flushed, ^id} -> :ok
        after
          timeout -> {:error, :timeout}
        end

      {:error, _} = error ->
        error
    end
  end

  defp flush_timeout(opts) do
    with true <- is_list(opts) and Keyword.keyword?(opts),
         {known, []} <- Keyword.split(opts, [:await]),
         await when is_nil(await) or await == :infinity or (is_integer(await) and await >= 0) <-
           known[:await] do
      {:ok, await}
    else
      false -> {:error, {:invalid_options, opts}}
      {_, unknown} -> {:error, {:unknown_options, Keyword.keys(unknown)}}
      await -> {:error, {:invalid_await, await}}
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
  def stats(%{producer: producer}), do: Native.producer_stats(producer)

  # ---------------------------------------------------------------------------
  # Server

  @impl GenServer
  def init(options) do
    Process.flag(:trap_exit, true)
    kinesis = options[:kinesis]

    case Native.call(&Native.client_new(KinesisConfig.to_native(kinesis), &1, &2)) do
      {:ok, client} ->
        {heir, heir_id} = Heir.register(options[:stream_id], options[:on_failure])

        producer = Native.producer_start(client, producer_options(options, heir, heir_id))

        {:ok, consumer} =
          Convoy.Consumer.start_link(
            Convoy.Consumer.queue_options(options) ++
              [source: {Source, %{client: client, stream: options[:stream]}}]
          )

        handle = %{producer: producer, consumer: consumer, stream_id: options[:stream_id]}
        Convoy.Queue.register(options[:stream_id], __MODULE__, handle)

        {:ok,
         %{
           options: options,
           stream_id: options[:stream_id],
           client: client,
           producer: producer,
           consumer: consumer
         }}

      {:error, reason} ->
        {:stop, {:kinesis_client, reason}}
    end
  end

  defp producer_options(options, heir, heir_id) do
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
      owner: self(),
      heir: heir,
      heir_id: heir_id,
      # As long as a normal stop would have allowed.
      close_timeout_ms: close_timeout(options)
    }
  end

  defp close_timeout(options), do: max(options[:shutdown] - 500, 100)

  @impl GenServer
  def handle_info({:convoy_put_failed, failures}, state) do
    report_failures(failures, state)
    {:noreply, state}
  end

  def handle_info({:EXIT, consumer, reason}, %{consumer: consumer} = state) do
    # The consumer is part of the queue: without it the queue stops too (its
    # supervisor restarts it, and the producer's buffer is flushed first).
    {:stop, {:consumer_exited, reason}, state}
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
    deadline = close_timeout(state.options)
    id = System.unique_integer([:positive])
    :ok = Native.producer_close(state.producer, deadline, self(), id)
    await_close(id, state, deadline + 1_000)
    Convoy.Consumer.stop(state.consumer)
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

  defp report_failures(failures, state),
    do: report_failures(failures, state.stream_id, state.options[:on_failure])

  @doc false
  # Logs records that finally failed, emits telemetry and calls `on_failure`;
  # the heir reports for a killed queue the same way.
  def report_failures(failures, stream_id, on_failure) do
    by_reason = Enum.group_by(failures, fn {_key, _data, reason} -> reason end)

    for {reason, group} <- by_reason do
      Logger.error(
        "Convoy #{inspect(stream_id)}: #{length(group)} record(s) failed after retries: #{inspect(reason)}"
      )

      Telemetry.execute([:convoy, :put, :failed], %{count: length(group)}, %{
        stream_id: stream_id,
        reason: reason
      })
    end

    case on_failure do
      nil ->
        :ok

      fun when is_function(fun, 1) ->
        Enum.each(failures, fn {key, data, reason} ->
          try do
            fun.(%{partition_key: key, data: data, reason: reason})
          catch
            kind, reason ->
              Logger.error(
                "Convoy on_failure callback failed: " <>
                  Exception.format(kind, reason, __STACKTRACE__)
              )
          end
        end)

      dest ->
        payload =
          Enum.map(failures, fn {key, data, reason} ->
            %{partition_key: key, data: data, reason: reason}
          end)

        send(dest, {:convoy_put_failed, stream_id, payload})
    end
  rescue
    # A dead registered name must not take the queue down.
    e in ArgumentError ->
      Logger.error("Convoy on_failure destination unreachable: #{Exception.message(e)}")
  end
end
