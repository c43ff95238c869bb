defmodule Convoy.Queue.Reporter do
  @moduledoc false
  # Receives the reports of records that finally failed to be sent, and
  # reports them: a log line and a telemetry event per reason, then the
  # queue's `on_failure`. It is the first process of a queue's tree, so a
  # producer whose owner was killed still reports to a live process.
  #
  # It also keeps the queue's latest registered native producer
  # (`latest_producer/1`, `keep_producer/2`): a
  # producer whose owner was killed goes on sending what it held, and the
  # owner's successor waits for it.
  #
  # Reports arrive as `{:convoy_put_failed, [{partition_key, data, reason}]}`.
  # When telemetry is on, the native producer also sends it one
  # `{:convoy_put_records, report}` per PutRecords request, which becomes a
  # `[:convoy, :put_records]` span and, for the records Kinesis confirmed,
  # Convoy 0.1's `[:convoy, :queue, :records_sent]`.

  use GenServer

  require Logger

  alias Convoy.Telemetry

  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options) do
    name = Convoy.Queue.Topology.name(__MODULE__, options[:stream_id])
    GenServer.start_link(__MODULE__, options, name: name)
  end

  @doc "The reporter of a queue, or nil."
  @spec whereis(term) :: pid | nil
  def whereis(stream_id), do: Convoy.Queue.Topology.whereis(__MODULE__, stream_id)

  @impl true
  def init(options) do
    {:ok,
     %{
       stream_id: options[:stream_id],
       stream: options[:stream],
       on_failure: options[:on_failure],
       producer: nil
     }}
  end

  @doc """
  The queue's latest registered producer: `{:ok, producer}` (nil before the
  first), or `:error` when the reporter did not answer.
  """
  @spec latest_producer(pid) :: {:ok, reference | nil} | :error
  def latest_producer(reporter) do
    GenServer.call(reporter, :latest_producer, 5_000)
  catch
    :exit, _ -> :error
  end

  @doc "Keeps `producer` as the queue's latest registered one."
  @spec keep_producer(pid, reference) :: :ok | :error
  def keep_producer(reporter, producer) do
    GenServer.call(reporter, {:keep_producer, producer}, 5_000)
  catch
    :exit, _ -> :error
  end

  @doc """
  Returns once `reporter` has handled every report sent to it before the
  call (the producer's last ones, when a queue stops); `:ok` also when it is
  gone.
  """
  @spec sync(pid, timeout) :: :ok
  def sync(reporter, timeout) do
    GenServer.call(reporter, :sync, timeout)
  catch
    :exit, _ -> :ok
  end

  @impl true
  def handle_call(:sync, _from, state), do: {:reply, :ok, state}

  def handle_call(:latest_producer, _from, state), do: {:reply, {:ok, state.producer}, state}

  def handle_call({:keep_producer, producer}, _from, state),
    do: {:reply, :ok, %{state | producer: producer}}

  @impl true
  def handle_info({:convoy_put_failed, failures}, state) do
    report(failures, state.stream, state.stream_id, state.on_failure)
    {:noreply, state}
  end

  def handle_info({:convoy_put_records, report}, state) do
    put_records(report, state.stream, state.stream_id)
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @doc """
  Emits the `[:convoy, :put_records]` span of one PutRecords request from
  the native producer's report, and Convoy 0.1's `records_sent` for the
  records Kinesis confirmed.
  """
  @spec put_records(map, term, term) :: :ok
  def put_records(report, stream, stream_id) do
    metadata = %{stream: stream, stream_id: stream_id}
    measurements = Map.drop(report, [:duration, :error])

    Telemetry.reported(
      [:convoy, :put_records],
      report.duration,
      measurements,
      metadata,
      report.error
    )

    sent(report.acknowledged, stream, stream_id)
  end

  @doc """
  Emits Convoy 0.1's `[:convoy, :queue, :records_sent]` for `count` records
  Kinesis (or the service) confirmed; nothing for 0.
  """
  @spec sent(non_neg_integer, term, term) :: :ok
  def sent(0, _stream, _stream_id), do: :ok

  def sent(count, stream, stream_id) do
    Telemetry.execute([:convoy, :queue, :records_sent], %{count: count}, %{
      stream: stream,
      stream_id: stream_id
    })
  end

  @doc """
  Logs records that finally failed, emits `[:convoy, :put, :failed]` and
  calls `on_failure`. Every service reports through here.
  """
  @spec report([{String.t(), binary, term}], term, term, (map -> any) | pid | atom | nil) :: :ok
  def report([], _stream, _stream_id, _on_failure), do: :ok

  def report(failures, stream, stream_id, on_failure) do
    by_reason = Enum.group_by(failures, fn {_key, _data, reason} -> reason end)

    for {reason, group} <- by_reason do
      Logger.error(
        "Convoy #{inspect(stream_id)}: #{length(group)} record(s) failed after retries: #{inspect(reason)}"
      )

      Telemetry.execute([:convoy, :put, :failed], %{count: length(group)}, %{
        stream: stream,
        stream_id: stream_id,
        reason: reason
      })
    end

    notify(on_failure, failures, stream_id)
  end

  defp notify(nil, _failures, _stream_id), do: :ok

  defp notify(fun, failures, _stream_id) when is_function(fun, 1) do
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
  end

  defp notify(dest, failures, stream_id) do
    payload =
      Enum.map(failures, fn {key, data, reason} ->
        %{partition_key: key, data: data, reason: reason}
      end)

    send(dest, {:convoy_put_failed, stream_id, payload})
    :ok
  rescue
    # A dead registered name must not take the reporter down.
    e in ArgumentError ->
      Logger.error("Convoy on_failure destination unreachable: #{Exception.message(e)}")
  end
end
